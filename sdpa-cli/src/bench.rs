//! `sdpa bench`: times the forward pass on model shapes or a shape given by
//! flags, and reports the median time and throughput.
//!
//! Each case fills `q`, `k` and `v` with seeded random values, builds its
//! layer, runs warm-up passes, then times passes of `forward_into` into one
//! preallocated output and reports their median. On the CUDA backend the
//! tensors are copied to device 0 once, before timing, and each pass is
//! timed with CUDA events around the launch (the first warm-up pass pays
//! the JIT load of the variant, reported after the table). Without `--iters`, the
//! number of timed passes follows the time a pass takes: at least
//! [`MIN_RUNS`] passes and the budget's `target` time, but no more once the
//! budget's `max` time has passed and [`FLOOR_RUNS`] passes are in. One or two
//! cases get [`SINGLE`] (about 2 s each at most); the preset table gets
//! [`TABLE`], so that the CPU table stays well under 30 s on two cores.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sdpa_runtime::cudarc::driver::sys::CUevent_flags;
use sdpa_runtime::cudarc::driver::{CudaSlice, CudaStream};
use sdpa_runtime::prelude::*;
use sdpa_runtime::{cuda, probe_cuda, select, CudaProbe, Element, Residence, SdpaError, SdpaImpl};

use crate::error::{CliError, Result};
use crate::options::{BackendArg, DTypeArg};
use crate::presets::{self, Shape};
use sdpa_cli::variants::SdpaCli;

/// Timed passes made at least when the count is chosen by time.
pub const MIN_RUNS: usize = 10;
/// Timed passes made at least, even for a slow shape.
pub const FLOOR_RUNS: usize = 3;
/// How long the warm-up passes of one case run at least (at least one pass).
pub const WARMUP_TIME: Duration = Duration::from_millis(150);
/// The seed of the random inputs.
pub const SEED: u64 = 0x5d9a;

/// How long the timed passes of one case may run when `--iters` is not
/// given.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Time at least this long (and at least [`MIN_RUNS`] passes).
    pub target: Duration,
    /// Stop after this long once [`FLOOR_RUNS`] passes are in.
    pub max: Duration,
}

/// The budget of a single shape or preset.
pub const SINGLE: Budget = Budget {
    target: Duration::from_millis(1000),
    max: Duration::from_millis(2000),
};

/// The budget of each row of a preset table.
pub const TABLE: Budget = Budget {
    target: Duration::from_millis(500),
    max: Duration::from_millis(1000),
};

/// The flags of `sdpa bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Time one named preset row instead of the whole table of the backend
    /// in use; `--preset list` prints the names and shapes.
    #[arg(long, value_name = "NAME", conflicts_with_all = [
        "batch", "heads", "kv_heads", "seq_q", "seq_k", "head_size", "causal",
    ])]
    pub preset: Option<String>,
    /// Batch size B (with the other shape flags: time this shape only).
    #[arg(long, value_name = "B", help_heading = "Shape")]
    pub batch: Option<usize>,
    /// Query heads Hq.
    #[arg(long, value_name = "H", help_heading = "Shape")]
    pub heads: Option<usize>,
    /// Key/value heads Hkv, a divisor of --heads (GQA/MQA) [default: --heads].
    #[arg(long, value_name = "H", help_heading = "Shape")]
    pub kv_heads: Option<usize>,
    /// Query tokens Sq.
    #[arg(long, value_name = "S", help_heading = "Shape")]
    pub seq_q: Option<usize>,
    /// Key/value tokens Sk [default: --seq-q].
    #[arg(long, value_name = "S", help_heading = "Shape")]
    pub seq_k: Option<usize>,
    /// Head size D; one of the compiled sizes (`sdpa info` lists them).
    #[arg(long, value_name = "D", help_heading = "Shape")]
    pub head_size: Option<usize>,
    /// Element type of q, k, v and the output. Required with the shape
    /// flags; with presets, runs only the rows of this dtype.
    #[arg(long, value_enum, value_name = "DTYPE", help_heading = "Shape")]
    pub dtype: Option<DTypeArg>,
    /// Top-left causal masking (query i sees keys j <= i).
    #[arg(long, help_heading = "Shape")]
    pub causal: bool,
    /// The backend to time. Without this flag, the SDPA_BACKEND environment
    /// variable decides, else auto. Also picks the preset table.
    #[arg(long, value_enum, value_name = "BACKEND")]
    pub backend: Option<BackendArg>,
    /// Also write the results to FILE as a JSON array of objects with the
    /// fields shape ("BxHqxSqxSkxD"), dtype, causal, backend, median_ms,
    /// tflops, plus batch, heads_q, heads_kv, seq_q, seq_k, head_size.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Untimed passes before timing [default: as many as fit in 150 ms, at
    /// least 1].
    #[arg(long, value_name = "N")]
    pub warmup: Option<usize>,
    /// Timed passes [default: by time: at least 10 passes and 1 s, stopping
    /// at 2 s once 3 passes are in; half those times per row of the preset
    /// table].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub iters: Option<u64>,
    /// Time sequence-parallel attention (FastVideo's DistributedAttention)
    /// on each of these rank counts, e.g. `1,2,4`: one GPU per rank over
    /// NCCL on CUDA, threads on the CPU. Without shape flags or a preset it
    /// times Wan2.1-14B 720p-like self-attention (1x40x75600x128, bf16);
    /// passes are counted: --warmup [default: 2] and --iters [default: 10].
    #[arg(long, value_name = "N[,N...]", value_delimiter = ',', value_parser = crate::bench_sp::parse_world)]
    pub world_size: Option<Vec<usize>>,
}

/// One line of the results table.
pub(crate) struct Case {
    pub(crate) preset: Option<&'static str>,
    pub(crate) shape: Shape,
    pub(crate) dtype: DType,
}

/// One line of `--json`.
#[derive(Debug, serde::Serialize)]
struct Record {
    shape: String,
    dtype: &'static str,
    causal: bool,
    backend: &'static str,
    median_ms: f64,
    tflops: f64,
    batch: usize,
    heads_q: usize,
    heads_kv: usize,
    seq_q: usize,
    seq_k: usize,
    head_size: usize,
}

/// Runs `sdpa bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    if args.preset.as_deref() == Some("list") {
        print!("{}", presets::listing());
        return Ok(());
    }
    if let Some(worlds) = &args.world_size {
        return crate::bench_sp::run(args, worlds);
    }
    let explicit = args.backend.map(BackendKind::from);
    let request = BackendKind::resolve(explicit)?;
    // Tensors go to device 0 when CUDA is asked for or auto finds a device;
    // `select` then says what runs them (or why CUDA cannot).
    let residence = match (request, probe_cuda()) {
        (BackendKind::Cpu, _) | (_, CudaProbe::Absent(_)) => Residence::Host,
        (_, CudaProbe::Present { .. }) => Residence::Cuda { ordinal: 0 },
    };
    let selection = select(request, residence)?;
    let backend = selection.backend;
    let cases = cases(args, backend)?;
    let layers = cases
        .iter()
        .map(|case| build_layer(&case.shape, explicit))
        .collect::<Result<Vec<_>>>()?;

    println!(
        "backend {backend} ({}), {} rayon threads",
        selection.reason,
        rayon::current_num_threads()
    );
    let budget = if cases.len() <= 2 { SINGLE } else { TABLE };
    let table = Table::new(&cases);
    table.header();
    let mut records = Vec::with_capacity(cases.len());
    for (case, layer) in cases.iter().zip(&layers) {
        let timing = time_case(case, layer, backend, args.warmup, args.iters, budget)?;
        let seconds = timing.median.as_secs_f64();
        let flops_per_s = case.shape.flops() / seconds;
        table.row(case, backend, &timing, flops_per_s);
        records.push(Record {
            shape: case.shape.dims(),
            dtype: case.dtype.name(),
            causal: case.shape.causal,
            backend: backend.name(),
            median_ms: seconds * 1e3,
            tflops: flops_per_s / 1e12,
            batch: case.shape.batch,
            heads_q: case.shape.heads_q,
            heads_kv: case.shape.heads_kv,
            seq_q: case.shape.seq_q,
            seq_k: case.shape.seq_k,
            head_size: case.shape.head_size,
        });
    }
    if args.preset.is_none() && !has_shape_flags(args) && backend == BackendKind::Cpu {
        println!(
            "note: CPU presets run in f32 and bf16 with sequences scaled down for a small \
             machine; the CUDA table runs full size in bf16 (`sdpa bench --preset list`)"
        );
    }
    if backend == BackendKind::Cuda {
        let loads = cuda::jit_loads();
        let ms: f64 = loads.iter().map(|l| l.elapsed.as_secs_f64() * 1e3).sum();
        println!(
            "jit: {} kernel(s) loaded in {ms:.1} ms (during warm-up, not timed)",
            loads.len()
        );
    }
    if let Some(path) = &args.json {
        write_json(path, &records)?;
    }
    Ok(())
}

/// Whether any flag that shapes a custom case (all but `--dtype`) was given.
pub(crate) fn has_shape_flags(args: &BenchArgs) -> bool {
    args.batch.is_some()
        || args.heads.is_some()
        || args.kv_heads.is_some()
        || args.seq_q.is_some()
        || args.seq_k.is_some()
        || args.head_size.is_some()
        || args.causal
}

/// The cases the flags ask for: the shape flags, one preset, or the
/// backend's preset table.
pub(crate) fn cases(args: &BenchArgs, backend: BackendKind) -> Result<Vec<Case>> {
    let dtype_filter = args.dtype.map(DType::from);
    if has_shape_flags(args) {
        let missing: Vec<&str> = [
            ("--batch", args.batch.is_none()),
            ("--heads", args.heads.is_none()),
            ("--seq-q", args.seq_q.is_none()),
            ("--head-size", args.head_size.is_none()),
            ("--dtype", args.dtype.is_none()),
        ]
        .into_iter()
        .filter_map(|(flag, absent)| absent.then_some(flag))
        .collect();
        if !missing.is_empty() {
            return Err(CliError::Usage(format!(
                "a shape needs --batch, --heads, --seq-q, --head-size and --dtype; missing {} \
                 (or pass --preset NAME, or no shape flags for the preset table)",
                missing.join(", ")
            )));
        }
        let (heads_q, seq_q) = (args.heads.unwrap_or(0), args.seq_q.unwrap_or(0));
        let shape = Shape {
            batch: args.batch.unwrap_or(0),
            heads_q,
            heads_kv: args.kv_heads.unwrap_or(heads_q),
            seq_q,
            seq_k: args.seq_k.unwrap_or(seq_q),
            head_size: args.head_size.unwrap_or(0),
            causal: args.causal,
        };
        if shape.flops() == 0.0 {
            return Err(CliError::Usage(format!(
                "shape {shape} has no work to time; every size must be at least 1"
            )));
        }
        let dtype = dtype_filter.unwrap_or(DType::F32);
        let bytes = |seq: usize, heads: usize| {
            [shape.batch, seq, heads, shape.head_size, dtype.size_bytes()]
                .into_iter()
                .try_fold(1usize, usize::checked_mul)
        };
        if bytes(shape.seq_q, shape.heads_q).is_none()
            || bytes(shape.seq_k, shape.heads_kv).is_none()
        {
            return Err(CliError::Usage(format!(
                "shape {shape} does not fit in this machine's address space"
            )));
        }
        return Ok(vec![Case {
            preset: None,
            shape,
            dtype,
        }]);
    }
    let rows = match &args.preset {
        Some(name) => std::slice::from_ref(presets::find(backend, name)?),
        None => presets::table(backend),
    };
    let dtypes: Vec<DType> = presets::dtypes(backend)
        .iter()
        .copied()
        .filter(|d| dtype_filter.is_none_or(|f| f == *d))
        .collect();
    let dtypes = match (dtypes.is_empty(), dtype_filter) {
        // A dtype the table does not run by default is still timed when asked for.
        (true, Some(d)) => vec![d],
        _ => dtypes,
    };
    Ok(rows
        .iter()
        .flat_map(|p| {
            dtypes.iter().map(|&dtype| Case {
                preset: Some(p.name),
                shape: p.shape,
                dtype,
            })
        })
        .collect())
}

/// Builds the layer for `shape`; sets the backend only when the flag gave
/// one, so that `SDPA_BACKEND` still applies.
fn build_layer(shape: &Shape, backend: Option<BackendKind>) -> Result<SdpaImpl> {
    let mut params = AttentionParams::new(shape.heads_q, shape.head_size)
        .num_kv_heads(shape.heads_kv)
        .causal(shape.causal)
        .prefix("sdpa bench");
    if let Some(backend) = backend {
        params = params.backend(backend);
    }
    Ok(SdpaCli.build_impl(params)?)
}

/// The outcome of timing one case.
pub(crate) struct Timing {
    pub(crate) median: Duration,
    runs: usize,
}

/// Warms up, then times passes of `forward_into` and returns their median,
/// on the host or, for `Cuda`, on device 0.
fn time_case(
    case: &Case,
    layer: &SdpaImpl,
    backend: BackendKind,
    warmup: Option<usize>,
    iters: Option<u64>,
    budget: Budget,
) -> Result<Timing> {
    let s = &case.shape;
    let mut rng = StdRng::seed_from_u64(SEED);
    let q_shape = [s.batch, s.seq_q, s.heads_q, s.head_size];
    let kv_shape = [s.batch, s.seq_k, s.heads_kv, s.head_size];
    let q = random_tensor(&mut rng, case.dtype, q_shape)?;
    let k = random_tensor(&mut rng, case.dtype, kv_shape)?;
    let v = random_tensor(&mut rng, case.dtype, kv_shape)?;
    if backend == BackendKind::Cuda {
        return match case.dtype {
            DType::F32 => time_on_device::<f32>(layer, [&q, &k, &v], warmup, iters, budget),
            DType::F16 => time_on_device::<f16>(layer, [&q, &k, &v], warmup, iters, budget),
            DType::BF16 => time_on_device::<bf16>(layer, [&q, &k, &v], warmup, iters, budget),
        };
    }
    let (q, k, v) = (q.view(), k.view(), v.view());
    let mut out = Tensor::zeros(case.dtype, q_shape);
    let mut out = out.view_mut();
    let metadata = AttentionMetadata::default();
    let pass = || -> Result<Duration> {
        let start = Instant::now();
        layer.forward_into(&q, &k, &v, &metadata, &mut out)?;
        Ok(start.elapsed())
    };
    time_passes(pass, warmup, iters, budget)
}

/// Times passes with `q`, `k`, `v` and the output on device 0, allocated
/// once; each pass is the time between CUDA events recorded on the stream
/// before and after the launch.
fn time_on_device<T: Element>(
    layer: &SdpaImpl,
    [q, k, v]: [&Tensor; 3],
    warmup: Option<usize>,
    iters: Option<u64>,
    budget: Budget,
) -> Result<Timing> {
    let cuda_err = |doing: &str, e: sdpa_runtime::cudarc::driver::DriverError| {
        CliError::Sdpa(SdpaError::Cuda(format!("{doing}: {e}")))
    };
    let stream = cuda::context(0)?.default_stream();
    let upload = |t: &Tensor| -> Result<CudaSlice<T>> {
        let host = t
            .as_slice::<T>()
            .ok_or_else(|| CliError::Input("a bench tensor has the wrong dtype".into()))?;
        stream
            .clone_htod(host)
            .map_err(|e| cuda_err("copying the inputs to device 0", e))
    };
    let (dq, dk, dv) = (upload(q)?, upload(k)?, upload(v)?);
    let mut dout = stream
        .alloc_zeros::<T>(q.shape().iter().product::<usize>().max(1))
        .map_err(|e| cuda_err("allocating the output on device 0", e))?;
    let qv = TensorView::from_cuda(&dq, q.shape())?;
    let kv = TensorView::from_cuda(&dk, k.shape())?;
    let vv = TensorView::from_cuda(&dv, v.shape())?;
    let mut out = TensorViewMut::from_cuda(&mut dout, q.shape())?;
    let metadata = AttentionMetadata::default();
    let ctx = stream.context();
    let event = || {
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| cuda_err("creating a timing event", e))
    };
    let (start, end) = (event()?, event()?);
    let stream: &CudaStream = &stream;
    let pass = || -> Result<Duration> {
        start
            .record(stream)
            .map_err(|e| cuda_err("recording an event", e))?;
        layer.forward_into(&qv, &kv, &vv, &metadata, &mut out)?;
        end.record(stream)
            .map_err(|e| cuda_err("recording an event", e))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| cuda_err("running the kernel", e))?;
        Ok(Duration::from_secs_f64(f64::from(ms) / 1e3))
    };
    time_passes(pass, warmup, iters, budget)
}

/// Runs `pass` for warm-up, then times it (the durations it returns) until
/// `iters` or the budget is reached, and returns the median.
pub(crate) fn time_passes(
    mut pass: impl FnMut() -> Result<Duration>,
    warmup: Option<usize>,
    iters: Option<u64>,
    budget: Budget,
) -> Result<Timing> {
    match warmup {
        Some(n) => {
            for _ in 0..n {
                pass()?;
            }
        }
        None => {
            let start = Instant::now();
            pass()?;
            while start.elapsed() < WARMUP_TIME {
                pass()?;
            }
        }
    }

    let mut times = Vec::new();
    let start = Instant::now();
    loop {
        times.push(pass()?);
        let (runs, elapsed) = (times.len(), start.elapsed());
        let done = match iters {
            Some(n) => runs as u64 >= n,
            None => {
                (runs >= MIN_RUNS && elapsed >= budget.target)
                    || (runs >= FLOOR_RUNS && elapsed >= budget.max)
            }
        };
        if done {
            break;
        }
    }
    times.sort_unstable();
    let mid = times.len() / 2;
    let median = if times.len() % 2 == 1 {
        times[mid]
    } else {
        (times[mid - 1] + times[mid]) / 2
    };
    Ok(Timing {
        median,
        runs: times.len(),
    })
}

/// A tensor of `shape` with values uniform in `[-1, 1)`.
fn random_tensor(rng: &mut StdRng, dtype: DType, shape: [usize; 4]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let values = (0..n).map(|_| rng.random_range(-1.0f32..1.0));
    let tensor = match dtype {
        DType::F32 => Tensor::from_vec(values.collect(), shape),
        DType::F16 => Tensor::from_vec(values.map(f16::from_f32).collect(), shape),
        DType::BF16 => Tensor::from_vec(values.map(bf16::from_f32).collect(), shape),
    };
    Ok(tensor?)
}

/// `12.3 GFLOP/s` below a TFLOP/s, `1.23 TFLOP/s` from there on.
pub(crate) fn throughput(flops_per_s: f64) -> String {
    if flops_per_s >= 1e12 {
        format!("{:.2} TFLOP/s", flops_per_s / 1e12)
    } else {
        format!("{:.1} GFLOP/s", flops_per_s / 1e9)
    }
}

/// The results table, printed a row at a time as cases finish.
struct Table {
    preset_width: usize,
    shape_width: usize,
}

impl Table {
    fn new(cases: &[Case]) -> Table {
        let width = |f: &dyn Fn(&Case) -> usize, title: &str| {
            cases.iter().map(f).max().unwrap_or(0).max(title.len())
        };
        Table {
            preset_width: width(&|c| c.preset.map_or(1, str::len), "preset"),
            shape_width: width(&|c| c.shape.to_string().len(), "shape (BxHqxSqxSkxD)"),
        }
    }

    fn header(&self) {
        println!(
            "{:<pw$}  {:<sw$}  {:<5}  {:<6}  {:<7}  {:>10}  {:>5}  {:>15}",
            "preset",
            "shape (BxHqxSqxSkxD)",
            "dtype",
            "causal",
            "backend",
            "median ms",
            "runs",
            "throughput",
            pw = self.preset_width,
            sw = self.shape_width,
        );
    }

    fn row(&self, case: &Case, backend: BackendKind, timing: &Timing, flops_per_s: f64) {
        println!(
            "{:<pw$}  {:<sw$}  {:<5}  {:<6}  {:<7}  {:>10.3}  {:>5}  {:>15}",
            case.preset.unwrap_or("-"),
            case.shape,
            case.dtype.name(),
            case.shape.causal,
            backend.name(),
            timing.median.as_secs_f64() * 1e3,
            timing.runs,
            throughput(flops_per_s),
            pw = self.preset_width,
            sw = self.shape_width,
        );
    }
}

/// Writes the records as a JSON array.
pub(crate) fn write_json<R: serde::Serialize>(path: &Path, records: &[R]) -> Result<()> {
    let write = |source: Box<dyn std::error::Error + Send + Sync>| CliError::Write {
        path: path.to_owned(),
        source,
    };
    let text = serde_json::to_string_pretty(records).map_err(|e| write(e.into()))?;
    std::fs::write(path, text + "\n").map_err(|e| write(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_units() {
        assert_eq!(throughput(152.34e9), "152.3 GFLOP/s");
        assert_eq!(throughput(585.0e12), "585.00 TFLOP/s");
    }
}

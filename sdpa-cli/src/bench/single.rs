//! `sdpa bench` on one device: times the forward pass (or, with
//! `--backward`, the backward pass alone and the forward and backward
//! together) on model shapes or a shape given by flags, and reports the
//! median time and throughput.
//!
//! Each case fills `q`, `k` and `v` (and `dout`) with seeded random values,
//! builds its layer, runs warm-up passes, then times passes of
//! `forward_into` (or `backward_into`, or `forward_with_lse_into` then
//! `backward_into`) into preallocated buffers and reports their median. On
//! the CUDA backend the tensors are copied to device 0 once, before timing,
//! and each pass is timed with CUDA events around the launches (the first
//! warm-up pass pays the JIT load of the variant, reported after the
//! table).

use std::time::{Duration, Instant};

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sdpa_runtime::cudarc::driver::sys::CUevent_flags;
use sdpa_runtime::cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DriverError};
use sdpa_runtime::prelude::*;
use sdpa_runtime::{
    cuda, probe_cuda, select, BackwardInputs, CudaProbe, Element, Gradients, Residence, SdpaError,
    SdpaImpl,
};

use super::args::{cases, has_shape_flags, BenchArgs, Case};
use super::extra::HostExtra;
use super::plot::{Group, PlotRequest};
use super::timing::{throughput, time_passes, write_json, Budget, Timing, SEED, SINGLE, TABLE};
use crate::error::{CliError, Result};
use crate::presets::Shape;
use sdpa_cli::variants::SdpaCli;

/// One line of `--json`.
#[derive(Debug, serde::Serialize)]
struct Record {
    shape: String,
    /// `-`, the mask (`key-padding:0.9`, `bool`, `additive`) or
    /// `varlen:L1/L2/...`.
    workload: String,
    /// `forward`, `backward` or `forward+backward`.
    pass: &'static str,
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

/// Runs `sdpa bench` on one device: the preset table, one preset or the
/// shape of the flags.
pub fn run(args: &BenchArgs) -> Result<()> {
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
        "backend {backend} ({}), {} rayon threads{}",
        selection.reason,
        rayon::current_num_threads(),
        if args.backward {
            "; timing the backward pass (FLOPs 2.5x the forward's) and the forward and \
             backward together (3.5x)"
        } else {
            ""
        }
    );
    let budget = if cases.len() <= 2 { SINGLE } else { TABLE };
    let table = Table::new(&cases, args.backward);
    table.header();
    let mut records = Vec::with_capacity(cases.len());
    let mut groups = Vec::with_capacity(cases.len());
    for (case, layer) in cases.iter().zip(&layers) {
        let timings = if args.backward {
            let [backward, both] =
                time_backward(case, layer, backend, args.warmup, args.iters, budget)?;
            vec![
                ("backward", BACKWARD_FLOPS, backward),
                ("forward+backward", 1.0 + BACKWARD_FLOPS, both),
            ]
        } else {
            let forward = time_case(case, layer, backend, args.warmup, args.iters, budget)?;
            vec![("forward", 1.0, forward)]
        };
        let mut group = Group {
            label: match case.preset {
                Some(name) => format!("{name} {}", case.dtype),
                None if case.shape.causal => format!("{} causal {}", label(case), case.dtype),
                None => format!("{} {}", label(case), case.dtype),
            },
            dims: case.shape.dims(),
            dtype: case.dtype,
            causal: case.shape.causal,
            bars: Vec::new(),
        };
        for (pass, times_forward, timing) in timings {
            let seconds = timing.median.as_secs_f64();
            let flops_per_s = case.flops() * times_forward / seconds;
            table.row(case, pass, backend, &timing, flops_per_s);
            group.bars.push((pass.to_owned(), flops_per_s / 1e12));
            records.push(Record {
                shape: case.shape.dims(),
                workload: case.workload(),
                pass,
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
        groups.push(group);
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
        // A variant's kernels share their entry name: count them by target.
        let mut targets: Vec<(&str, usize)> = Vec::new();
        for l in &loads {
            match targets.iter_mut().find(|(t, _)| *t == l.target.name()) {
                Some((_, n)) => *n += 1,
                None => targets.push((l.target.name(), 1)),
            }
        }
        let targets: Vec<String> = targets.iter().map(|(t, n)| format!("{n} {t}")).collect();
        println!(
            "jit: {} kernel(s) loaded in {ms:.1} ms ({}; during warm-up, not timed)",
            loads.len(),
            targets.join(", ")
        );
    }
    if let Some(path) = &args.json {
        write_json(path, &records)?;
    }
    if let Some(svg) = &args.plot {
        let request = PlotRequest {
            svg: svg.clone(),
            compare: args.compare.clone(),
        };
        request.write(&format!("sdpa bench, {backend} backend"), groups)?;
    }
    Ok(())
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

/// The inputs of one case, drawn once before timing.
struct Inputs {
    q_shape: [usize; 4],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// The mask or the sequence offsets.
    extra: HostExtra,
}

/// Random `q`, `k` and `v` of the case's shape (packed for `--varlen`) and
/// dtype, then its mask, drawn from `rng` in that order.
fn random_inputs(case: &Case, rng: &mut StdRng) -> Result<Inputs> {
    let draw_extra = HostExtra::new(case, &mut StdRng::seed_from_u64(SEED + 1))?;
    let (q_shape, kv_shape) = draw_extra.shapes(case);
    let q = random_tensor(rng, case.dtype, q_shape)?;
    let k = random_tensor(rng, case.dtype, kv_shape)?;
    let v = random_tensor(rng, case.dtype, kv_shape)?;
    Ok(Inputs {
        q_shape,
        q,
        k,
        v,
        extra: draw_extra,
    })
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
    let mut rng = StdRng::seed_from_u64(SEED);
    let inputs = random_inputs(case, &mut rng)?;
    if backend == BackendKind::Cuda {
        return match case.dtype {
            DType::F32 => time_on_device::<f32>(layer, &inputs, warmup, iters, budget),
            DType::F16 => time_on_device::<f16>(layer, &inputs, warmup, iters, budget),
            DType::BF16 => time_on_device::<bf16>(layer, &inputs, warmup, iters, budget),
        };
    }
    let (q, k, v) = (inputs.q.view(), inputs.k.view(), inputs.v.view());
    let mut out = Tensor::zeros(case.dtype, inputs.q_shape);
    let mut out = out.view_mut();
    let metadata = inputs.extra.metadata()?;
    let pass = || -> Result<Duration> {
        let start = Instant::now();
        layer.forward_into(&q, &k, &v, &metadata, &mut out)?;
        Ok(start.elapsed())
    };
    time_passes(pass, warmup, iters, budget)
}

/// The backward's FLOPs as a multiple of the forward's (as FlashAttention's
/// benchmarks count them).
const BACKWARD_FLOPS: f64 = 2.5;

/// Times the backward pass alone and the forward (with the log-sum-exp)
/// and backward together: on the host, or, for `Cuda`, on device 0.
fn time_backward(
    case: &Case,
    layer: &SdpaImpl,
    backend: BackendKind,
    warmup: Option<usize>,
    iters: Option<u64>,
    budget: Budget,
) -> Result<[Timing; 2]> {
    let mut rng = StdRng::seed_from_u64(SEED);
    let inputs = random_inputs(case, &mut rng)?;
    let q_shape = inputs.q_shape;
    let dout = random_tensor(&mut rng, case.dtype, q_shape)?;
    if backend == BackendKind::Cuda {
        return match case.dtype {
            DType::F32 => backward_on_device::<f32>(layer, &inputs, &dout, warmup, iters, budget),
            DType::F16 => backward_on_device::<f16>(layer, &inputs, &dout, warmup, iters, budget),
            DType::BF16 => backward_on_device::<bf16>(layer, &inputs, &dout, warmup, iters, budget),
        };
    }
    let (q, k, v) = (inputs.q.view(), inputs.k.view(), inputs.v.view());
    let metadata = inputs.extra.metadata()?;
    let (mut out, mut lse) = layer.forward_with_lse(&q, &k, &v, &metadata)?;
    let mut dq = Tensor::zeros(case.dtype, q_shape);
    let mut dk = Tensor::zeros(case.dtype, k.layout().shape());
    let mut dv = Tensor::zeros(case.dtype, v.layout().shape());
    let mut backward = |out: &Tensor, lse: &Tensor| -> Result<()> {
        let inputs = BackwardInputs {
            out: out.view(),
            dout: dout.view(),
            lse: lse.view(),
        };
        let mut grads = Gradients {
            dq: dq.view_mut(),
            dk: dk.view_mut(),
            dv: dv.view_mut(),
        };
        Ok(layer.backward_into(&q, &k, &v, &metadata, &inputs, &mut grads)?)
    };
    let alone = time_passes(
        || {
            let start = Instant::now();
            backward(&out, &lse)?;
            Ok(start.elapsed())
        },
        warmup,
        iters,
        budget,
    )?;
    let both = time_passes(
        || {
            let start = Instant::now();
            layer.forward_with_lse_into(
                &q,
                &k,
                &v,
                &metadata,
                &mut out.view_mut(),
                &mut lse.view_mut(),
            )?;
            backward(&out, &lse)?;
            Ok(start.elapsed())
        },
        warmup,
        iters,
        budget,
    )?;
    Ok([alone, both])
}

/// A driver error of the bench, with what it was doing.
fn cuda_err(doing: &str, e: DriverError) -> CliError {
    CliError::Sdpa(SdpaError::Cuda(format!("{doing}: {e}")))
}

/// Copies a host tensor of the bench to a new buffer on `stream`.
fn upload<T: Element>(stream: &Arc<CudaStream>, t: &Tensor) -> Result<CudaSlice<T>> {
    let host = t
        .as_slice::<T>()
        .ok_or_else(|| CliError::Input("a bench tensor has the wrong dtype".into()))?;
    if host.is_empty() {
        return stream
            .alloc_zeros::<T>(1)
            .map_err(|e| cuda_err("allocating a tensor on device 0", e));
    }
    stream
        .clone_htod(host)
        .map_err(|e| cuda_err("copying the inputs to device 0", e))
}

/// A buffer of `n` zeros (at least one) on `stream`.
fn zeros<T: Element>(stream: &Arc<CudaStream>, n: usize) -> Result<CudaSlice<T>> {
    stream
        .alloc_zeros::<T>(n.max(1))
        .map_err(|e| cuda_err("allocating an output on device 0", e))
}

/// Times work on a stream with two CUDA events recorded before and after
/// it.
struct Events {
    stream: Arc<CudaStream>,
    start: CudaEvent,
    end: CudaEvent,
}

impl Events {
    fn new(stream: &Arc<CudaStream>) -> Result<Events> {
        let event = || {
            stream
                .context()
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| cuda_err("creating a timing event", e))
        };
        Ok(Events {
            stream: stream.clone(),
            start: event()?,
            end: event()?,
        })
    }

    /// The device time of the work `queue` queues on the stream (waiting
    /// for it).
    fn time(&self, queue: impl FnOnce() -> Result<()>) -> Result<Duration> {
        self.start
            .record(&self.stream)
            .map_err(|e| cuda_err("recording an event", e))?;
        queue()?;
        self.end
            .record(&self.stream)
            .map_err(|e| cuda_err("recording an event", e))?;
        let ms = self
            .start
            .elapsed_ms(&self.end)
            .map_err(|e| cuda_err("running the kernels", e))?;
        Ok(Duration::from_secs_f64(f64::from(ms) / 1e3))
    }
}

/// Times the backward alone and the forward and backward together with
/// every tensor on device 0, allocated once; each pass is the time between
/// CUDA events recorded around its launches. `out` and `lse` come from the
/// layer's forward on the device.
fn backward_on_device<T: Element>(
    layer: &SdpaImpl,
    inputs: &Inputs,
    dout: &Tensor,
    warmup: Option<usize>,
    iters: Option<u64>,
    budget: Budget,
) -> Result<[Timing; 2]> {
    let stream = cuda::context(0)?.default_stream();
    let (q, k, v) = (&inputs.q, &inputs.k, &inputs.v);
    let (q_shape, kv_shape) = (q.shape(), k.shape());
    let [b, _, hq, _] = q_shape;
    let sq = q_shape[1];
    let lse_shape = [b, hq, sq, 1];
    let extra = inputs.extra.upload(&stream)?;
    let (dq_buf, dk_buf, dv_buf) = (
        upload::<T>(&stream, q)?,
        upload::<T>(&stream, k)?,
        upload::<T>(&stream, v)?,
    );
    let dout_buf = upload::<T>(&stream, dout)?;
    let qv = TensorView::from_cuda(&dq_buf, q_shape)?;
    let kv = TensorView::from_cuda(&dk_buf, kv_shape)?;
    let vv = TensorView::from_cuda(&dv_buf, kv_shape)?;
    let dov = TensorView::from_cuda(&dout_buf, q_shape)?;
    let metadata = extra.metadata()?;
    let mut out = zeros::<T>(&stream, q_shape.iter().product())?;
    let mut lse = zeros::<f32>(&stream, lse_shape.iter().product())?;
    layer.forward_with_lse_into(
        &qv,
        &kv,
        &vv,
        &metadata,
        &mut TensorViewMut::from_cuda(&mut out, q_shape)?,
        &mut TensorViewMut::from_cuda(&mut lse, lse_shape)?,
    )?;
    let mut dq = zeros::<T>(&stream, q_shape.iter().product())?;
    let mut dk = zeros::<T>(&stream, kv_shape.iter().product())?;
    let mut dv = zeros::<T>(&stream, kv_shape.iter().product())?;
    let mut backward = |out: &CudaSlice<T>, lse: &CudaSlice<f32>| -> Result<()> {
        let inputs = BackwardInputs {
            out: TensorView::from_cuda(out, q_shape)?,
            dout: dov,
            lse: TensorView::from_cuda(lse, lse_shape)?,
        };
        let mut grads = Gradients {
            dq: TensorViewMut::from_cuda(&mut dq, q_shape)?,
            dk: TensorViewMut::from_cuda(&mut dk, kv_shape)?,
            dv: TensorViewMut::from_cuda(&mut dv, kv_shape)?,
        };
        Ok(layer.backward_into(&qv, &kv, &vv, &metadata, &inputs, &mut grads)?)
    };
    let events = Events::new(&stream)?;
    let alone = time_passes(
        || events.time(|| backward(&out, &lse)),
        warmup,
        iters,
        budget,
    )?;
    let both = time_passes(
        || {
            events.time(|| {
                let mut ov = TensorViewMut::from_cuda(&mut out, q_shape)?;
                let mut lv = TensorViewMut::from_cuda(&mut lse, lse_shape)?;
                layer.forward_with_lse_into(&qv, &kv, &vv, &metadata, &mut ov, &mut lv)?;
                backward(&out, &lse)
            })
        },
        warmup,
        iters,
        budget,
    )?;
    Ok([alone, both])
}

/// Times passes with `q`, `k`, `v` and the output on device 0, allocated
/// once; each pass is the time between CUDA events recorded on the stream
/// before and after the launch.
fn time_on_device<T: Element>(
    layer: &SdpaImpl,
    inputs: &Inputs,
    warmup: Option<usize>,
    iters: Option<u64>,
    budget: Budget,
) -> Result<Timing> {
    let stream = cuda::context(0)?.default_stream();
    let (q, k, v) = (&inputs.q, &inputs.k, &inputs.v);
    let extra = inputs.extra.upload(&stream)?;
    let (dq, dk, dv) = (
        upload::<T>(&stream, q)?,
        upload::<T>(&stream, k)?,
        upload::<T>(&stream, v)?,
    );
    let mut dout = zeros::<T>(&stream, q.shape().iter().product())?;
    let qv = TensorView::from_cuda(&dq, q.shape())?;
    let kv = TensorView::from_cuda(&dk, k.shape())?;
    let vv = TensorView::from_cuda(&dv, v.shape())?;
    let mut out = TensorViewMut::from_cuda(&mut dout, q.shape())?;
    let metadata = extra.metadata()?;
    let events = Events::new(&stream)?;
    let pass = || events.time(|| Ok(layer.forward_into(&qv, &kv, &vv, &metadata, &mut out)?));
    time_passes(pass, warmup, iters, budget)
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

/// A case's shape column: the shape, then its mask or sequences if any.
fn label(case: &Case) -> String {
    match case.workload().as_str() {
        "-" => case.shape.to_string(),
        w => format!("{} {w}", case.shape),
    }
}

/// The results table, printed a row at a time as cases finish.
struct Table {
    preset_width: usize,
    shape_width: usize,
    pass_width: usize,
}

impl Table {
    fn new(cases: &[Case], backward: bool) -> Table {
        let width = |f: &dyn Fn(&Case) -> usize, title: &str| {
            cases.iter().map(f).max().unwrap_or(0).max(title.len())
        };
        Table {
            preset_width: width(&|c| c.preset.map_or(1, str::len), "preset"),
            shape_width: width(&|c| label(c).len(), "shape (BxHqxSqxSkxD)"),
            pass_width: if backward {
                "forward+backward".len()
            } else {
                "forward".len()
            },
        }
    }

    fn header(&self) {
        println!(
            "{:<pw$}  {:<sw$}  {:<aw$}  {:<5}  {:<6}  {:<7}  {:>10}  {:>5}  {:>15}",
            "preset",
            "shape (BxHqxSqxSkxD)",
            "pass",
            "dtype",
            "causal",
            "backend",
            "median ms",
            "runs",
            "throughput",
            pw = self.preset_width,
            sw = self.shape_width,
            aw = self.pass_width,
        );
    }

    fn row(
        &self,
        case: &Case,
        pass: &str,
        backend: BackendKind,
        timing: &Timing,
        flops_per_s: f64,
    ) {
        println!(
            "{:<pw$}  {:<sw$}  {:<aw$}  {:<5}  {:<6}  {:<7}  {:>10.3}  {:>5}  {:>15}",
            case.preset.unwrap_or("-"),
            label(case),
            pass,
            case.dtype.name(),
            case.shape.causal,
            backend.name(),
            timing.median.as_secs_f64() * 1e3,
            timing.runs,
            throughput(flops_per_s),
            pw = self.preset_width,
            sw = self.shape_width,
            aw = self.pass_width,
        );
    }
}

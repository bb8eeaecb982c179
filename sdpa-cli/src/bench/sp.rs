//! `sdpa bench --world-size N[,N...]`: times sequence-parallel attention
//! (`DistributedAttention`) on N ranks, against the same layer's local
//! attention alone, so the exchange's share of the time shows.
//!
//! On CUDA each rank is one GPU (devices `0..N`) driven by its own thread,
//! over NCCL; on the CPU the ranks are threads exchanging host buffers. A
//! pass starts with every rank at a barrier and ends when every rank's
//! stream is idle: the time the slowest rank takes, all-to-alls included.
//! The same passes of the rank's local attention alone (on `[B, S, H/N, D]`)
//! give the compute time; the rest is the exchanges and their packing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sdpa_runtime::distributed::{
    CommBuffer, Communicator, DistributedAttention, NcclCommunicator, SequenceParallel,
    ThreadCommunicator,
};
use sdpa_runtime::prelude::*;
use sdpa_runtime::{probe_cuda, CudaProbe, Element, Layout, SdpaError};

use super::args::{cases, has_shape_flags, BenchArgs, Case};
use super::timing::{throughput, time_passes, write_json, SEED, SINGLE};
use crate::error::{CliError, Result};
use crate::presets::Shape;
use sdpa_cli::variants::SdpaCli;

/// Untimed passes before timing, unless `--warmup` says otherwise.
pub const WARMUP: usize = 2;
/// Timed passes, unless `--iters` says otherwise.
pub const ITERS: usize = 10;

/// Wan2.1-14B 720p-like self-attention: what `--world-size` times without
/// shape flags.
pub const WAN14B_720P: Shape = Shape {
    batch: 1,
    heads_q: 40,
    heads_kv: 40,
    seq_q: 75600,
    seq_k: 75600,
    head_size: 128,
    causal: false,
};

/// One line of `--json`.
#[derive(Debug, serde::Serialize)]
struct Record {
    shape: String,
    dtype: &'static str,
    causal: bool,
    backend: &'static str,
    world_size: usize,
    median_ms: f64,
    local_attention_ms: f64,
    exchange_share: f64,
    tflops: f64,
    speedup: Option<f64>,
}

/// A rank of either kind: where inputs go and how to wait for its work.
trait Rank: Communicator + 'static {
    fn upload<T: Element>(&self, host: Vec<T>) -> Result<CommBuffer<T>>;
    fn sync(&self) -> Result<()>;
}

impl Rank for ThreadCommunicator {
    fn upload<T: Element>(&self, host: Vec<T>) -> Result<CommBuffer<T>> {
        Ok(CommBuffer::Host(host))
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
}

impl Rank for NcclCommunicator {
    fn upload<T: Element>(&self, host: Vec<T>) -> Result<CommBuffer<T>> {
        self.stream()
            .clone_htod(&host)
            .map(CommBuffer::Cuda)
            .map_err(|e| SdpaError::Cuda(format!("copying inputs to the device: {e}")).into())
    }
    fn sync(&self) -> Result<()> {
        self.stream()
            .synchronize()
            .map_err(|e| SdpaError::Cuda(format!("waiting for the rank's stream: {e}")).into())
    }
}

/// Runs `sdpa bench --world-size ...`.
pub fn run(args: &BenchArgs, worlds: &[usize]) -> Result<()> {
    let mut worlds = worlds.to_vec();
    worlds.sort_unstable();
    worlds.dedup();
    let explicit = args.backend.map(BackendKind::from);
    let request = BackendKind::resolve(explicit)?;
    let on_cuda = match (request, probe_cuda()) {
        (BackendKind::Cpu, _) => false,
        (_, CudaProbe::Present { devices }) => {
            let most = worlds.iter().copied().max().unwrap_or(1);
            if most > devices {
                return Err(CliError::Usage(format!(
                    "--world-size {most} needs {most} CUDA devices; this machine has {devices}"
                )));
            }
            true
        }
        (BackendKind::Cuda, CudaProbe::Absent(reason)) => {
            return Err(SdpaError::BackendUnavailable {
                backend: "cuda",
                reason,
            }
            .into())
        }
        (_, CudaProbe::Absent(_)) => false,
    };
    let backend = if on_cuda {
        BackendKind::Cuda
    } else {
        BackendKind::Cpu
    };
    let cases = if has_shape_flags(args) || args.preset.is_some() {
        cases(args, backend)?
    } else {
        let dtype = args.dtype.map(DType::from).unwrap_or(DType::BF16);
        vec![Case {
            preset: Some("wan14b-720p"),
            shape: WAN14B_720P,
            dtype,
            mask: None,
            varlen: None,
        }]
    };
    let (warmup, iters) = (
        args.warmup.unwrap_or(WARMUP),
        args.iters.map_or(ITERS, |n| n as usize),
    );
    let transport = if on_cuda {
        "NCCL, one GPU per rank"
    } else {
        "threads exchanging host memory"
    };
    println!("sequence-parallel attention on {backend} ranks ({transport}); {warmup} warm-up, {iters} timed passes");
    println!(
        "{:<16}  {:<5}  {:>5}  {:>10}  {:>14}  {:>9}  {:>15}  {:>8}",
        "shape (BxHxSxD)",
        "dtype",
        "ranks",
        "median ms",
        "local attn ms",
        "exchange",
        "throughput",
        "speed-up"
    );
    let mut records = Vec::new();
    for case in &cases {
        let s = &case.shape;
        if s.seq_k != s.seq_q {
            return Err(CliError::Usage(format!(
                "--world-size times self-attention; shape {s} has --seq-k {} and --seq-q {}",
                s.seq_k, s.seq_q
            )));
        }
        // Speed-ups are against one rank, timed first when asked for.
        let mut one_rank_ms = None;
        for &world in &worlds {
            let plan = Plan {
                shape: s,
                backend: explicit,
                warmup,
                iters,
            };
            let (full, local) = if on_cuda {
                let ordinals: Vec<usize> = (0..world).collect();
                let comms = NcclCommunicator::for_devices(&ordinals)?;
                time_world(comms, case.dtype, plan)?
            } else {
                let comms = ThreadCommunicator::group(world)?;
                time_world(comms, case.dtype, plan)?
            };
            let (full_ms, local_ms) = (full.as_secs_f64() * 1e3, local.as_secs_f64() * 1e3);
            if world == 1 {
                one_rank_ms = Some(full_ms);
            }
            let speedup = one_rank_ms.map(|base| base / full_ms);
            let share = 1.0 - local_ms / full_ms;
            let tflops = s.flops() / full.as_secs_f64() / 1e12;
            println!(
                "{:<16}  {:<5}  {:>5}  {:>10.2}  {:>14.2}  {:>8.1}%  {:>15}  {:>8}",
                format!("{}x{}x{}x{}", s.batch, s.heads_q, s.seq_q, s.head_size),
                case.dtype.name(),
                world,
                full_ms,
                local_ms,
                share * 100.0,
                throughput(tflops * 1e12),
                speedup.map_or("-".into(), |x| format!("{x:.2}x")),
            );
            records.push(Record {
                shape: s.dims(),
                dtype: case.dtype.name(),
                causal: s.causal,
                backend: backend.name(),
                world_size: world,
                median_ms: full_ms,
                local_attention_ms: local_ms,
                exchange_share: share,
                tflops,
                speedup,
            });
        }
    }
    if let Some(path) = &args.json {
        write_json(path, &records)?;
    }
    Ok(())
}

/// What every rank of one timing runs: the shape, the backend the flag
/// asked for (if any) and the pass counts.
#[derive(Clone, Copy)]
struct Plan<'a> {
    /// The whole problem; each rank holds `1/world` of its sequence.
    shape: &'a Shape,
    /// `--backend`, when given (else `SDPA_BACKEND` or auto decide).
    backend: Option<BackendKind>,
    /// Untimed passes.
    warmup: usize,
    /// Timed passes.
    iters: usize,
}

/// Where the ranks of one timing meet: the barrier around every pass, and
/// the flag a rank raises when its setup failed.
#[derive(Clone, Copy)]
struct Meeting<'a> {
    /// Waited on by every rank before and after each pass.
    barrier: &'a Barrier,
    /// Set by a rank whose setup failed, read after the first barrier.
    failed: &'a AtomicBool,
}

/// Times `world` ranks: the medians of the sequence-parallel pass and of the
/// local attention alone.
fn time_world<C: Rank>(
    comms: Vec<C>,
    dtype: DType,
    plan: Plan<'_>,
) -> Result<(Duration, Duration)> {
    match dtype {
        DType::F32 => time_world_typed::<C, f32>(comms, plan),
        DType::F16 => time_world_typed::<C, f16>(comms, plan),
        DType::BF16 => time_world_typed::<C, bf16>(comms, plan),
    }
}

/// [`time_world`] for element type `T`: one thread per rank.
fn time_world_typed<C: Rank, T: Element>(
    comms: Vec<C>,
    plan: Plan<'_>,
) -> Result<(Duration, Duration)> {
    let world = comms.len();
    let barrier = Barrier::new(world);
    let failed = AtomicBool::new(false);
    let meeting = Meeting {
        barrier: &barrier,
        failed: &failed,
    };
    let results: Vec<Result<(Duration, Duration)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| scope.spawn(move || rank_passes::<C, T>(comm, plan, meeting)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CliError::Input("a rank's thread panicked".into())))
            })
            .collect()
    });
    // Rank 0's clock spans every rank's pass (barriers on both sides).
    let mut first = None;
    for r in results {
        let r = r?;
        first.get_or_insert(r);
    }
    first.ok_or_else(|| CliError::Usage("--world-size must be at least 1".into()))
}

/// One rank's side of [`time_world`]: setup, then passes between barriers.
fn rank_passes<C: Rank, T: Element>(
    comm: C,
    plan: Plan<'_>,
    meeting: Meeting<'_>,
) -> Result<(Duration, Duration)> {
    let Plan {
        shape,
        backend,
        warmup,
        iters,
    } = plan;
    let Meeting { barrier, failed } = meeting;
    let world = comm.world_size();
    let (b, h, hkv, d) = (shape.batch, shape.heads_q, shape.heads_kv, shape.head_size);
    // Pad the sequence to a multiple of the world size, as FastVideo does.
    let sl = shape.seq_q.div_ceil(world);
    let original = (sl * world != shape.seq_q).then_some(shape.seq_q);
    let setup = || -> Result<_> {
        let mut params = AttentionParams::new(h, d)
            .num_kv_heads(hkv)
            .causal(shape.causal)
            .prefix("sdpa bench --world-size");
        if let Some(backend) = backend {
            params = params.backend(backend);
        }
        let rank = comm.rank();
        let layer = DistributedAttention::new(&SdpaCli, params, comm)?;
        let comm = layer.communicator();
        let mut rng = StdRng::seed_from_u64(SEED ^ rank as u64);
        let mut random = |n: usize| -> Vec<T> {
            (0..n)
                .map(|_| T::from_f32(rng.random_range(-1.0f32..1.0)))
                .collect()
        };
        let q = comm.upload(random(b * sl * h * d))?;
        let k = comm.upload(random(b * sl * hkv * d))?;
        let v = comm.upload(random(b * sl * hkv * d))?;
        // The local attention's output: [B, S, H/P, D], as many elements as q.
        let out = comm.alloc::<T>(b * sl * h * d)?;
        Ok((layer, q, k, v, out))
    };
    let ready = setup();
    if ready.is_err() {
        failed.store(true, Ordering::SeqCst);
    }
    barrier.wait();
    if failed.load(Ordering::SeqCst) {
        return ready
            .map(|_| (Duration::ZERO, Duration::ZERO))
            .and(Err(CliError::Input(
                "another rank failed to set up; see its error".into(),
            )));
    }
    let (layer, q, k, v, mut out) = ready?;
    let comm = layer.communicator();
    let meta = AttentionMetadata::default();
    let sp = SequenceParallel {
        original_seq_len: original,
        replicated: None,
    };
    // Every rank waits for the others before and after each pass, so rank
    // 0's clock spans the slowest rank.
    let timed = |pass: &mut dyn FnMut() -> Result<()>| -> Result<Duration> {
        let one = || -> Result<Duration> {
            barrier.wait();
            let start = Instant::now();
            pass()?;
            comm.sync()?;
            barrier.wait();
            Ok(start.elapsed())
        };
        let timing = time_passes(one, Some(warmup), Some(iters as u64), SINGLE)?;
        Ok(timing.median)
    };
    let local_shape = [b, sl, h, d];
    let kv_shape = [b, sl, hkv, d];
    let full = timed(&mut || {
        let (qv, kv, vv) = (
            q.view(Layout::contiguous(local_shape))?,
            k.view(Layout::contiguous(kv_shape))?,
            v.view(Layout::contiguous(kv_shape))?,
        );
        layer.forward(&qv, &kv, &vv, &sp, &meta)?;
        Ok(())
    })?;
    // The same element counts seen as [B, S, H/P, D]: the local attention
    // each rank runs between the exchanges.
    let s = sl * world;
    let heads_shape = [b, s, h / world, d];
    let kv_heads_shape = [b, s, hkv / world, d];
    let local = timed(&mut || {
        let qv = q.view(Layout::contiguous(heads_shape))?;
        let (kv, vv) = (
            k.view(Layout::contiguous(kv_heads_shape))?,
            v.view(Layout::contiguous(kv_heads_shape))?,
        );
        let mut ov = out.view_mut(Layout::contiguous(heads_shape))?;
        layer.local().forward_into(&qv, &kv, &vv, &meta, &mut ov)?;
        Ok(())
    })?;
    Ok((full, local))
}

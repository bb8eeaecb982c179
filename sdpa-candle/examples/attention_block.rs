//! A small candle attention block (q/k/v projections, attention, output
//! projection) with two attentions: sdpa's fused kernel through
//! `sdpa_candle::forward`, and candle's own matmul-softmax-matmul
//! (`sdpa_candle::naive_attention`, which materialises the `[B, H, S, S]`
//! scores). Checks that they agree, then times each (median after a
//! warm-up) for the forward and for forward + backward, and reports the
//! peak memory each adds, every measurement in a process of its own.
//!
//! ```sh
//! cargo run --release -p sdpa-candle --example attention_block [-- --seq 2048 --runs 5]
//! # on the first CUDA device, in bf16 (needs the `cuda` feature):
//! cargo run --release -p sdpa-candle --features cuda --example attention_block -- --cuda --bf16
//! ```
//!
//! Peak memory is the process's resident memory on the host; on CUDA it is
//! not reported (candle allocates from the driver's stream-ordered pool,
//! which keeps freed blocks).

use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use sdpa_runtime::prelude::*;
use sdpa_runtime::SdpaImpl;

#[sdpa_variants(head_sizes = [64], causal = [false], dtypes = [f32, bf16], backward = true)]
struct BlockAttention;

const HEADS: usize = 8;
const HEAD_DIM: usize = 64;
const MODEL: usize = HEADS * HEAD_DIM;

/// The block's weights, `[MODEL, MODEL]` each, as variables.
struct Block {
    wq: Var,
    wk: Var,
    wv: Var,
    wo: Var,
    layer: SdpaImpl,
}

impl Block {
    fn new(on: &On) -> candle_core::Result<Block> {
        let w = || {
            let w = Tensor::randn(
                0f32,
                (1.0 / MODEL as f64).sqrt() as f32,
                (MODEL, MODEL),
                &Device::Cpu,
            )?;
            Var::from_tensor(&on.put(&w)?)
        };
        let layer = BlockAttention
            .build_impl(AttentionParams::new(HEADS, HEAD_DIM))
            .map_err(candle_core::Error::wrap)?;
        Ok(Block {
            wq: w()?,
            wk: w()?,
            wv: w()?,
            wo: w()?,
            layer,
        })
    }

    /// The same block with its weights in `dtype`, as new variables.
    fn cast(&self, dtype: DType) -> candle_core::Result<Block> {
        let c = |w: &Var| Var::from_tensor(&w.as_tensor().to_dtype(dtype)?);
        Ok(Block {
            wq: c(&self.wq)?,
            wk: c(&self.wk)?,
            wv: c(&self.wv)?,
            wo: c(&self.wo)?,
            layer: self.layer.clone(),
        })
    }

    /// `x` is `[B, S, MODEL]`; `fused` picks sdpa or candle's attention.
    fn forward(&self, x: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let proj = |w: &Var| x.broadcast_matmul(w)?.reshape((b, s, HEADS, HEAD_DIM));
        let (q, k, v) = (proj(&self.wq)?, proj(&self.wk)?, proj(&self.wv)?);
        let attn = if fused {
            sdpa_candle::forward(&self.layer, &q, &k, &v, None)?
        } else {
            let scale = 1.0 / (HEAD_DIM as f64).sqrt();
            sdpa_candle::naive_attention(&q, &k, &v, None, scale, false)?
        };
        attn.reshape((b, s, MODEL))?.broadcast_matmul(&self.wo)
    }
}

/// A line of /proc/self/status in KiB (`VmRSS`, `VmHWM`).
fn status_kib(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Where the block runs and in which dtype.
struct On {
    device: Device,
    dtype: DType,
}

impl On {
    fn from_args(args: &[String]) -> candle_core::Result<On> {
        let flag = |name: &str| args.iter().any(|a| a == name);
        let device = if flag("--cuda") {
            Device::new_cuda(0)?
        } else {
            Device::Cpu
        };
        let dtype = if flag("--bf16") {
            DType::BF16
        } else {
            DType::F32
        };
        Ok(On { device, dtype })
    }

    /// `t` (made on the host in f32) on this device, in this dtype.
    fn put(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        t.to_dtype(self.dtype)?.to_device(&self.device)
    }

    /// The flags that say so, for a child process.
    fn flags(&self) -> Vec<&'static str> {
        let mut flags = Vec::new();
        if self.device.is_cuda() {
            flags.push("--cuda");
        }
        if self.dtype == DType::BF16 {
            flags.push("--bf16");
        }
        flags
    }
}

/// One measurement in this process: prints `median_ms extra_peak_mib`.
fn child(on: &On, fused: bool, train: bool, seq: usize, runs: usize) -> candle_core::Result<()> {
    let block = Block::new(on)?;
    let x = on.put(&Tensor::randn(0f32, 1.0, (1, seq, MODEL), &Device::Cpu)?)?;
    let step = || -> candle_core::Result<()> {
        let y = block.forward(&x, fused)?;
        if train {
            let grads = y.sqr()?.sum_all()?.backward()?;
            assert!(grads.get(&block.wq).is_some());
        } else {
            y.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        }
        // Queued device work finishes inside the timed step.
        on.device.synchronize()
    };
    let base = status_kib("VmRSS");
    step()?; // warm-up
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            step().map(|()| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<candle_core::Result<_>>()?;
    times.sort_by(f64::total_cmp);
    let peak = status_kib("VmHWM");
    let peak = if on.device.is_cuda() {
        "n/a".to_string()
    } else {
        format!("{:.0}", peak.saturating_sub(base) as f64 / 1024.0)
    };
    println!("{:.1} {peak}", times[times.len() / 2]);
    Ok(())
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let seq = arg(&args, "--seq", 2048);
    let runs = arg(&args, "--runs", 5);
    let on = On::from_args(&args)?;
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let fused = args[i + 1] == "sdpa";
        let train = args[i + 2] == "train";
        return Ok(child(&on, fused, train, seq, runs)?);
    }

    // Agreement on one input: the block's output and the weights' gradients
    // with each attention, against candle's attention in f32 on the same
    // weights (in bf16 both sides round; sdpa must not round worse).
    let block = Block::new(&on)?;
    let x = on.put(&Tensor::randn(0f32, 1.0, (1, seq, MODEL), &Device::Cpu)?)?;
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
    let reference = block.cast(DType::F32)?;
    let want = reference.forward(&f32_of(&x)?, false)?;
    let want_grads = want.sqr()?.sum_all()?.backward()?;
    let want_dwq = want_grads.get(&reference.wq).expect("dWq");
    let max_abs = |t: &Tensor| -> candle_core::Result<f32> {
        f32_of(t)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    };
    // (max |out - want|, max |dWq - want| / max |want|) for one attention.
    let errors = |fused: bool| -> candle_core::Result<(f32, f32)> {
        let out = block.forward(&x, fused)?;
        let grads = out.sqr()?.sum_all()?.backward()?;
        let dwq = grads.get(&block.wq).expect("dWq");
        Ok((
            max_abs(&(f32_of(&out)? - &want)?)?,
            max_abs(&(f32_of(dwq)? - want_dwq)?)? / max_abs(want_dwq)?,
        ))
    };
    let (ours, theirs) = (errors(true)?, errors(false)?);
    let (device, dtype) = (
        if on.device.is_cuda() { "CUDA" } else { "CPU" },
        format!("{:?}", on.dtype).to_lowercase(),
    );
    println!(
        "block [1, {seq}, {MODEL}], {HEADS} heads of {HEAD_DIM}, {dtype}, {device}; against \
         candle's attention in f32: max |out diff| sdpa {:.2e}, candle {:.2e}; \
         max |dWq diff| / max |dWq| sdpa {:.2e}, candle {:.2e}",
        ours.0, theirs.0, ours.1, theirs.1
    );
    let worse = |a: f32, b: f32| a > 1e-3 && a > 2.0 * b;
    if worse(ours.0, theirs.0) || worse(ours.1, theirs.1) {
        return Err("sdpa's attention is further from the f32 reference than candle's".into());
    }

    println!(
        "{:<28} {:>12} {:>22}",
        "", "median ms", "peak memory added MiB"
    );
    let exe = std::env::current_exe()?;
    for train in [false, true] {
        for fused in [true, false] {
            let out = Command::new(&exe)
                .args(["--child", if fused { "sdpa" } else { "candle" }])
                .arg(if train { "train" } else { "forward" })
                .args(["--seq", &seq.to_string(), "--runs", &runs.to_string()])
                .args(on.flags())
                .output()?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned().into());
            }
            let line = String::from_utf8_lossy(&out.stdout);
            let mut it = line.split_whitespace();
            let (ms, mib) = (it.next().unwrap_or("?"), it.next().unwrap_or("?"));
            let name = format!(
                "{} {}",
                if fused {
                    "sdpa"
                } else {
                    "candle matmul-softmax"
                },
                if train { "fwd+bwd" } else { "forward" }
            );
            println!("{name:<28} {ms:>12} {mib:>22}");
        }
    }
    Ok(())
}

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
//! ```

use std::process::Command;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use sdpa_runtime::prelude::*;
use sdpa_runtime::SdpaImpl;

#[sdpa_variants(head_sizes = [64], causal = [false], dtypes = [f32], backward = true)]
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
    fn new() -> candle_core::Result<Block> {
        let w = || {
            Var::randn(
                0f32,
                (1.0 / MODEL as f64).sqrt() as f32,
                (MODEL, MODEL),
                &Device::Cpu,
            )
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

/// One measurement in this process: prints `median_ms extra_peak_mib`.
fn child(fused: bool, train: bool, seq: usize, runs: usize) -> candle_core::Result<()> {
    let block = Block::new()?;
    let x = Tensor::randn(0f32, 1.0, (1, seq, MODEL), &Device::Cpu)?;
    let step = || -> candle_core::Result<()> {
        let y = block.forward(&x, fused)?;
        if train {
            let grads = y.sqr()?.sum_all()?.backward()?;
            assert!(grads.get(&block.wq).is_some());
        } else {
            y.sum_all()?.to_scalar::<f32>()?;
        }
        Ok(())
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
    println!(
        "{:.1} {:.0}",
        times[times.len() / 2],
        peak.saturating_sub(base) as f64 / 1024.0
    );
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
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let fused = args[i + 1] == "sdpa";
        let train = args[i + 2] == "train";
        return Ok(child(fused, train, seq, runs)?);
    }

    // Agreement on one input: the block's output and the weights' gradients.
    let block = Block::new()?;
    let x = Tensor::randn(0f32, 1.0, (1, seq, MODEL), &Device::Cpu)?;
    let diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    };
    let (ours, theirs) = (block.forward(&x, true)?, block.forward(&x, false)?);
    let out_diff = diff(&ours, &theirs)?;
    let g1 = ours.sqr()?.sum_all()?.backward()?;
    let g2 = theirs.sqr()?.sum_all()?.backward()?;
    let scale = g2
        .get(&block.wq)
        .unwrap()
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let grad_diff = diff(g1.get(&block.wq).unwrap(), g2.get(&block.wq).unwrap())? / scale;
    println!(
        "block [1, {seq}, {MODEL}], {HEADS} heads of {HEAD_DIM}, f32, CPU: \
         max |out sdpa - out candle| = {out_diff:.2e}, max |dWq diff| / max |dWq| = {grad_diff:.2e}"
    );
    if out_diff > 1e-3 || grad_diff > 1e-3 {
        return Err("sdpa and candle's attention disagree".into());
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

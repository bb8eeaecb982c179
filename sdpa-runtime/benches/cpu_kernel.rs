//! The CPU kernel alone: `sdpa_runtime::cpu::attention` on the shapes of the
//! CPU targets, without a layer or backend selection in between.
//!
//! ```sh
//! cargo bench -p sdpa-runtime --bench cpu_kernel            # every shape
//! cargo bench -p sdpa-runtime --bench cpu_kernel -- decode  # a filter
//! SDPA_CPU_ISA=avx2 cargo bench -p sdpa-runtime --bench cpu_kernel
//! ```
//!
//! Throughput is reported in items per second, one item being one
//! floating-point operation as `sdpa bench` counts them (`4·B·H·Sq·Sk·D`,
//! halved when causal): `Gitem/s` reads as GFLOP/s.

use divan::counter::ItemsCount;
use divan::Bencher;
use sdpa_runtime::half::{bf16, f16};
use sdpa_runtime::{cpu, BackwardInputs, Element, Gradients, Problem, TensorView, TensorViewMut};

fn main() {
    eprintln!(
        "cpu kernel path: {} (detected {}), {} CPUs",
        cpu::active_isa(),
        cpu::detected_isa(),
        cpus()
    );
    divan::main();
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Deterministic inputs in [-1, 1).
fn fill<T: Element>(n: usize, seed: u32) -> Vec<T> {
    let mut x = seed.wrapping_mul(0x9e37_79b9) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            T::from_f32(x as f32 / u32::MAX as f32 * 2.0 - 1.0)
        })
        .collect()
}

/// Times `attention::<D, CAUSAL, T>` on `[b, sq, h, D]` queries against
/// `sk` keys.
fn run<const D: usize, const CAUSAL: bool, T: Element>(
    bencher: Bencher,
    [b, h, sq, sk]: [usize; 4],
) {
    let q = fill::<T>(b * sq * h * D, 1);
    let k = fill::<T>(b * sk * h * D, 2);
    let v = fill::<T>(b * sk * h * D, 3);
    let mut o = vec![T::from_f32(0.0); b * sq * h * D];
    let qv = TensorView::from_slice(&q, [b, sq, h, D]).unwrap();
    let kv = TensorView::from_slice(&k, [b, sk, h, D]).unwrap();
    let vv = TensorView::from_slice(&v, [b, sk, h, D]).unwrap();
    let p = Problem::new(qv, kv, vv, None, 1.0 / (D as f32).sqrt()).unwrap();
    let mut ov = TensorViewMut::from_slice(&mut o, [b, sq, h, D]).unwrap();
    let flops = 4 * b * h * sq * sk * D / if CAUSAL { 2 } else { 1 };
    bencher
        .counter(ItemsCount::new(flops))
        .bench_local(|| cpu::attention::<D, CAUSAL, T>(&p, &mut ov).unwrap());
}

/// Times `backward::<D, CAUSAL, T>` on `[b, sq, h, D]` queries against
/// `sk` keys, after one forward with the log-sum-exp; FLOPs counted as 2.5
/// times the forward's.
fn run_backward<const D: usize, const CAUSAL: bool, T: Element>(
    bencher: Bencher,
    [b, h, sq, sk]: [usize; 4],
) {
    let q = fill::<T>(b * sq * h * D, 1);
    let k = fill::<T>(b * sk * h * D, 2);
    let v = fill::<T>(b * sk * h * D, 3);
    let dout = fill::<T>(b * sq * h * D, 4);
    let mut o = vec![T::from_f32(0.0); b * sq * h * D];
    let mut lse = vec![0.0f32; b * h * sq];
    let qv = TensorView::from_slice(&q, [b, sq, h, D]).unwrap();
    let kv = TensorView::from_slice(&k, [b, sk, h, D]).unwrap();
    let vv = TensorView::from_slice(&v, [b, sk, h, D]).unwrap();
    let p = Problem::new(qv, kv, vv, None, 1.0 / (D as f32).sqrt()).unwrap();
    {
        let mut ov = TensorViewMut::from_slice(&mut o, [b, sq, h, D]).unwrap();
        let mut lv = TensorViewMut::from_slice(&mut lse, [b, h, sq, 1]).unwrap();
        cpu::attention_lse::<D, CAUSAL, T>(&p, &mut ov, Some(&mut lv)).unwrap();
    }
    let x = BackwardInputs {
        out: TensorView::from_slice(&o, [b, sq, h, D]).unwrap(),
        dout: TensorView::from_slice(&dout, [b, sq, h, D]).unwrap(),
        lse: TensorView::from_slice(&lse, [b, h, sq, 1]).unwrap(),
    };
    let (mut dq, mut dk, mut dv) = (
        vec![T::from_f32(0.0); q.len()],
        vec![T::from_f32(0.0); k.len()],
        vec![T::from_f32(0.0); v.len()],
    );
    let mut g = Gradients {
        dq: TensorViewMut::from_slice(&mut dq, [b, sq, h, D]).unwrap(),
        dk: TensorViewMut::from_slice(&mut dk, [b, sk, h, D]).unwrap(),
        dv: TensorViewMut::from_slice(&mut dv, [b, sk, h, D]).unwrap(),
    };
    let flops = 10 * b * h * sq * sk * D / if CAUSAL { 2 } else { 1 };
    bencher
        .counter(ItemsCount::new(flops))
        .bench_local(|| cpu::backward::<D, CAUSAL, T>(&p, &x, &mut g).unwrap());
}

/// 1×8×2048×128, the CPU anchor shape.
const ANCHOR: [usize; 4] = [1, 8, 2048, 2048];
/// 1×4×4096×128.
const LONG: [usize; 4] = [1, 4, 4096, 4096];
/// CLIP: 4×16×257×80.
const CLIP: [usize; 4] = [4, 16, 257, 257];
/// Decode: one query against 4096 keys, 8 heads, head size 128.
const DECODE: [usize; 4] = [1, 8, 1, 4096];

#[divan::bench(sample_count = 10, sample_size = 1)]
fn anchor_f32(b: Bencher) {
    run::<128, false, f32>(b, ANCHOR);
}

#[divan::bench(sample_count = 10, sample_size = 1)]
fn anchor_bf16(b: Bencher) {
    run::<128, false, bf16>(b, ANCHOR);
}

#[divan::bench(sample_count = 10, sample_size = 1)]
fn anchor_f16(b: Bencher) {
    run::<128, false, f16>(b, ANCHOR);
}

#[divan::bench(sample_count = 10, sample_size = 1)]
fn anchor_causal_f32(b: Bencher) {
    run::<128, true, f32>(b, ANCHOR);
}

#[divan::bench(sample_count = 10, sample_size = 1)]
fn anchor_causal_bf16(b: Bencher) {
    run::<128, true, bf16>(b, ANCHOR);
}

#[divan::bench(sample_count = 5, sample_size = 1)]
fn long_f32(b: Bencher) {
    run::<128, false, f32>(b, LONG);
}

#[divan::bench(sample_count = 20, sample_size = 1)]
fn clip_f32(b: Bencher) {
    run::<80, false, f32>(b, CLIP);
}

#[divan::bench(sample_count = 20, sample_size = 1)]
fn clip_bf16(b: Bencher) {
    run::<80, false, bf16>(b, CLIP);
}

#[divan::bench(sample_count = 50, sample_size = 5)]
fn decode_f32(b: Bencher) {
    run::<128, false, f32>(b, DECODE);
}

#[divan::bench(sample_count = 50, sample_size = 5)]
fn decode_bf16(b: Bencher) {
    run::<128, false, bf16>(b, DECODE);
}

#[divan::bench(sample_count = 3, sample_size = 1)]
fn backward_anchor_f32(b: Bencher) {
    run_backward::<128, false, f32>(b, ANCHOR);
}

#[divan::bench(sample_count = 3, sample_size = 1)]
fn backward_anchor_bf16(b: Bencher) {
    run_backward::<128, false, bf16>(b, ANCHOR);
}

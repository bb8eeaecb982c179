//! sdpa-candle on CUDA tensors (feature `cuda`) against candle's own
//! attention computed on the host in f64: forward in every dtype, strided
//! views, grouped-query and causal, masks on the device and on the host,
//! and gradients through candle's autograd. Every test skips, saying so,
//! where no CUDA device is present.
//!
//! Built only with the feature (`cargo test -p sdpa-candle --features
//! cuda`; the build needs nvcc and the CUDA libraries, see the crate's
//! README). The binary links the CUDA driver, so it runs only where one is
//! installed.

#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use sdpa_candle::naive_attention;
use sdpa_runtime::prelude::*;
use sdpa_runtime::{CudaProbe, SdpaImpl};

mod common;
use common::{max_abs_diff, randn};

#[sdpa_variants(head_sizes = [64], causal = [false, true], dtypes = [f32, f16, bf16], backward = true)]
struct Attention;

const D: usize = 64;

/// The first CUDA device, or `None` after saying why the test skips.
fn gpu(test: &str) -> Option<Device> {
    match sdpa_runtime::probe_cuda() {
        CudaProbe::Present { .. } => Some(Device::new_cuda(0).expect("candle's CUDA device 0")),
        CudaProbe::Absent(why) => {
            eprintln!("SKIPPED {test}: no CUDA device ({why})");
            None
        }
    }
}

fn layer(heads: usize, kv_heads: usize, causal: bool) -> SdpaImpl {
    Attention
        .build_impl(
            AttentionParams::new(heads, D)
                .num_kv_heads(kv_heads)
                .causal(causal),
        )
        .unwrap()
}

/// sdpa on the device against the host reference, for `q`, `k`, `v` (any
/// device, any layout) cast to `dtype`.
fn check_forward(
    layer: &SdpaImpl,
    qkv: (&Tensor, &Tensor, &Tensor),
    mask: Option<&Tensor>,
    dtype: DType,
    tol: f64,
) {
    let out = common::check_forward(layer, qkv, mask, dtype, tol);
    assert!(out.device().is_cuda());
}

#[test]
fn forward_on_the_device_in_every_dtype() {
    let Some(dev) = gpu("forward_on_the_device_in_every_dtype") else {
        return;
    };
    let g = |t: Tensor| t.to_device(&dev).unwrap();
    let (q, k, v) = (
        g(randn(&[2, 77, 4, D])),
        g(randn(&[2, 130, 4, D])),
        g(randn(&[2, 130, 4, D])),
    );
    let layer = layer(4, 4, false);
    check_forward(&layer, (&q, &k, &v), None, DType::F32, 2e-5);
    check_forward(&layer, (&q, &k, &v), None, DType::F16, 5e-3);
    check_forward(&layer, (&q, &k, &v), None, DType::BF16, 3e-2);
}

#[test]
fn forward_causal_gqa_and_strided_views_on_the_device() {
    let Some(dev) = gpu("forward_causal_gqa_and_strided_views_on_the_device") else {
        return;
    };
    let g = |t: Tensor| t.to_device(&dev).unwrap();
    // [B, H, S, D] storage seen as [B, S, H, D]; a narrowed sequence (a
    // start offset into the buffer); read in place on the device.
    let q = g(randn(&[2, 8, 96, D])).transpose(1, 2).unwrap();
    let k = g(randn(&[2, 110, 2, D])).narrow(1, 5, 96).unwrap();
    let v = g(randn(&[2, 96, 2, D]));
    assert!(!q.is_contiguous() && k.layout().start_offset() > 0);
    for causal in [false, true] {
        let layer = layer(8, 2, causal);
        check_forward(&layer, (&q, &k, &v), None, DType::F32, 2e-5);
        check_forward(&layer, (&q, &k, &v), None, DType::BF16, 3e-2);
    }
}

#[test]
fn forward_with_device_and_host_masks() {
    let Some(dev) = gpu("forward_with_device_and_host_masks") else {
        return;
    };
    let g = |t: Tensor| t.to_device(&dev).unwrap();
    let (b, sq, sk, h) = (2, 61, 150, 4);
    let (q, k, v) = (
        g(randn(&[b, sq, h, D])),
        g(randn(&[b, sk, h, D])),
        g(randn(&[b, sk, h, D])),
    );
    let layer = layer(h, h, false);
    // Key padding: the second sequence's last 37 keys hidden.
    let keep: Vec<u8> = (0..b * sk)
        .map(|i| u8::from(i / sk == 0 || i % sk < sk - 37))
        .collect();
    let keep = Tensor::from_vec(keep, (b, sk), &Device::Cpu).unwrap();
    // On the device (read in place) and on the host (uploaded).
    check_forward(
        &layer,
        (&q, &k, &v),
        Some(&g(keep.clone())),
        DType::F32,
        2e-5,
    );
    check_forward(&layer, (&q, &k, &v), Some(&keep), DType::BF16, 3e-2);
    // An additive [B, H, Sq, Sk] bias on the device, f32 and bf16.
    let bias = g(randn(&[b, h, sq, sk]));
    check_forward(&layer, (&q, &k, &v), Some(&bias), DType::F32, 2e-5);
    let bias16 = bias.to_dtype(DType::BF16).unwrap();
    check_forward(&layer, (&q, &k, &v), Some(&bias16), DType::BF16, 3e-2);
    // A [B, Sq, Sk] i64 band on the device, under causal.
    let band: Vec<i64> = (0..b * sq * sk).map(|i| i64::from(i % 7 != 3)).collect();
    let band = g(Tensor::from_vec(band, (b, sq, sk), &Device::Cpu).unwrap());
    check_forward(
        &self::layer(h, h, true),
        (&q, &k, &v),
        Some(&band),
        DType::F32,
        2e-5,
    );
}

/// Gradients of `sum(out * r)` through sdpa on the device against candle's
/// autograd through its attention on the host in f64.
fn check_backward(
    dev: &Device,
    hq: usize,
    hkv: usize,
    causal: bool,
    mask: Option<&Tensor>,
    dtype: DType,
    tol: f64,
) {
    let (b, sq, sk) = (2, 83, 117);
    let layer = layer(hq, hkv, causal);
    let host = [
        randn(&[b, sq, hq, D]),
        randn(&[b, sk, hkv, D]),
        randn(&[b, sk, hkv, D]),
    ];
    let r = randn(&[b, sq, hq, D]);
    let on =
        |t: &Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap().to_device(dev).unwrap()).unwrap();
    let [q, k, v] = [on(&host[0]), on(&host[1]), on(&host[2])];
    let out = sdpa_candle::forward(&layer, &q, &k, &v, mask).unwrap();
    let r_dev = r.to_dtype(dtype).unwrap().to_device(dev).unwrap();
    let grads = (out * &r_dev)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    // The reference sees the same (rounded) inputs, in f64 on the host.
    let wide = |t: &Var| {
        Var::from_tensor(
            &t.as_tensor()
                .to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap(),
        )
        .unwrap()
    };
    let [q64, k64, v64] = [wide(&q), wide(&k), wide(&v)];
    let mask64 = mask.map(|m| {
        let m = m.to_device(&Device::Cpu).unwrap();
        if m.dtype().is_float() {
            m.to_dtype(DType::F64).unwrap()
        } else {
            m
        }
    });
    let r64 = r_dev
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let want = naive_attention(
        &q64,
        &k64,
        &v64,
        mask64.as_ref(),
        1.0 / (D as f64).sqrt(),
        causal,
    )
    .unwrap();
    let want = (want * r64).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, ours, theirs) in [("dq", &q, &q64), ("dk", &k, &k64), ("dv", &v, &v64)] {
        let got = grads.get(ours).unwrap_or_else(|| panic!("no {name}"));
        assert!(got.device().is_cuda(), "{name} is not on the device");
        let exp = want.get(theirs).unwrap();
        let diff = max_abs_diff(got, exp);
        assert!(
            diff < tol,
            "{dtype:?} {name}: max |sdpa - candle f64| = {diff} >= {tol}"
        );
    }
}

#[test]
fn backward_on_the_device_matches_candle_autograd() {
    let Some(dev) = gpu("backward_on_the_device_matches_candle_autograd") else {
        return;
    };
    check_backward(&dev, 4, 4, false, None, DType::F32, 1e-4);
    check_backward(&dev, 8, 2, true, None, DType::F32, 1e-4);
    check_backward(&dev, 4, 4, false, None, DType::BF16, 1e-1);
    let keep: Vec<u8> = (0..2 * 117).map(|i| u8::from(i % 117 < 100)).collect();
    let keep = Tensor::from_vec(keep, (2, 117), &dev).unwrap();
    check_backward(&dev, 4, 2, true, Some(&keep), DType::F32, 1e-4);
}

#[test]
fn a_device_mask_with_host_tensors_is_refused() {
    let Some(dev) = gpu("a_device_mask_with_host_tensors_is_refused") else {
        return;
    };
    let layer = layer(2, 2, false);
    let q = randn(&[1, 8, 2, D]);
    let keep = Tensor::ones((1, 8), DType::U8, &dev).unwrap();
    let e = sdpa_candle::forward(&layer, &q, &q, &q, Some(&keep))
        .map(drop)
        .unwrap_err()
        .to_string();
    assert!(e.contains("mask"), "{e}");
}

#[test]
fn packed_sequences_with_device_offsets() {
    let Some(dev) = gpu("packed_sequences_with_device_offsets") else {
        return;
    };
    // Four sequences, one empty; offsets on the device (u32, cast there).
    let (cu_q, cu_k) = ([0u32, 70, 70, 200, 263], [0u32, 33, 33, 190, 300]);
    let (tq, tk, hq, hkv) = (263, 300, 8, 2);
    let host_q = randn(&[tq, hq, D]);
    let host_k = randn(&[tk, hkv, D]);
    let host_v = randn(&[tk, hkv, D]);
    let on = |t: &Tensor| Var::from_tensor(&t.to_device(&dev).unwrap()).unwrap();
    let (q, k, v) = (on(&host_q), on(&host_k), on(&host_v));
    let cq = Tensor::new(&cu_q, &dev).unwrap();
    let ck = Tensor::new(&cu_k, &dev).unwrap();
    for causal in [false, true] {
        let layer = layer(hq, hkv, causal);
        let out = sdpa_candle::forward_varlen(&layer, &q, &k, &v, &cq, &ck, 130, 157).unwrap();
        assert!(out.device().is_cuda());
        let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let f64 = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap();
        let (q64, k64, v64) = (f64(&host_q), f64(&host_k), f64(&host_v));
        let scale = 1.0 / (D as f64).sqrt();
        let want = common::packed_reference((&q64, &k64, &v64), &cu_q, &cu_k, scale, causal);
        let diff = max_abs_diff(&out, &want);
        assert!(diff < 2e-5, "out causal={causal}: {diff}");
        let want = want.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for (name, ours, theirs) in [("dq", &q, &q64), ("dk", &k, &k64), ("dv", &v, &v64)] {
            let diff = max_abs_diff(grads.get(ours).unwrap(), want.get(theirs).unwrap());
            assert!(diff < 1e-4, "{name} causal={causal}: {diff}");
        }
    }
}

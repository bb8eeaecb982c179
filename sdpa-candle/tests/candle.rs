//! sdpa-candle against candle's own attention: forward against
//! [`naive_attention`] computed in f64, gradients through candle's autograd
//! against autograd through the naive attention in f32, and errors.

use candle_core::{DType, Device, Tensor, Var};
use sdpa_candle::naive_attention;
use sdpa_runtime::prelude::*;
use sdpa_runtime::SdpaImpl;

mod common;
use common::{check_forward, max_abs_diff, randn};

#[sdpa_variants(head_sizes = [32], causal = [false, true], dtypes = [f32, f16, bf16], backward = true)]
struct Attention;

/// Forward only: its backward is not declared.
#[sdpa_variants(head_sizes = [16], causal = [false], dtypes = [f32])]
struct ForwardOnly;

const D: usize = 32;

fn layer(heads: usize, kv_heads: usize, causal: bool) -> SdpaImpl {
    Attention
        .build_impl(
            AttentionParams::new(heads, D)
                .num_kv_heads(kv_heads)
                .causal(causal),
        )
        .unwrap()
}

fn qkv(b: usize, sq: usize, sk: usize, hq: usize, hkv: usize) -> (Tensor, Tensor, Tensor) {
    (
        randn(&[b, sq, hq, D]),
        randn(&[b, sk, hkv, D]),
        randn(&[b, sk, hkv, D]),
    )
}

#[test]
fn forward_matches_f64_reference_in_every_dtype() {
    let (q, k, v) = qkv(2, 37, 45, 4, 4);
    let layer = layer(4, 4, false);
    check_forward(&layer, (&q, &k, &v), None, DType::F32, 2e-5);
    check_forward(&layer, (&q, &k, &v), None, DType::F16, 5e-3);
    check_forward(&layer, (&q, &k, &v), None, DType::BF16, 3e-2);
}

#[test]
fn forward_causal_and_gqa() {
    let (q, k, v) = qkv(2, 45, 45, 8, 2);
    for causal in [false, true] {
        let layer = layer(8, 2, causal);
        check_forward(&layer, (&q, &k, &v), None, DType::F32, 2e-5);
        check_forward(&layer, (&q, &k, &v), None, DType::BF16, 3e-2);
    }
}

#[test]
fn forward_reads_strided_views_in_place_and_copies_a_strided_head_dim() {
    let layer = layer(4, 4, true);
    // [B, H, S, D] contiguous, viewed as [B, S, H, D]: strided, head dim
    // contiguous, read in place.
    let q = randn(&[2, 4, 33, D]).transpose(1, 2).unwrap();
    assert!(!q.is_contiguous());
    // A narrowed sequence: a start offset into the storage.
    let k = randn(&[2, 40, 4, D]).narrow(1, 7, 33).unwrap();
    // The head dimension strided: made contiguous first.
    let v = randn(&[2, 33, D, 4]).transpose(2, 3).unwrap();
    assert_ne!(v.stride()[3], 1);
    check_forward(&layer, (&q, &k, &v), None, DType::F32, 2e-5);
    check_forward(&layer, (&q, &k, &v), None, DType::BF16, 3e-2);
}

#[test]
fn forward_with_masks() {
    let (b, sq, sk, h) = (2, 29, 41, 4);
    let (q, k, v) = qkv(b, sq, sk, h, h);
    let layer = layer(h, h, false);
    // Key padding: the second sequence's last 9 keys hidden.
    let keep: Vec<u8> = (0..b * sk)
        .map(|i| u8::from(i / sk == 0 || i % sk < sk - 9))
        .collect();
    let keep = Tensor::from_vec(keep, (b, sk), &Device::Cpu).unwrap();
    check_forward(&layer, (&q, &k, &v), Some(&keep), DType::F32, 2e-5);
    check_forward(&layer, (&q, &k, &v), Some(&keep), DType::BF16, 3e-2);
    // An additive [B, H, Sq, Sk] bias.
    let bias = randn(&[b, h, sq, sk]);
    check_forward(&layer, (&q, &k, &v), Some(&bias), DType::F32, 2e-5);
    // u32 masks are widened; a [B, Sq, Sk] i64 mask with a hidden band.
    let band: Vec<u32> = (0..b * sq * sk)
        .map(|i| u32::from((i % sk) % 5 != 1))
        .collect();
    let band = Tensor::from_vec(band, (b, sq, sk), &Device::Cpu).unwrap();
    check_forward(&layer, (&q, &k, &v), Some(&band), DType::F32, 2e-5);
    let causal = self::layer(h, h, true);
    check_forward(&causal, (&q, &k, &v), Some(&keep), DType::F32, 2e-5);
}

/// Gradients of `sum(out * r)` by candle's autograd through sdpa and
/// through the naive attention, in f32.
fn check_backward(hq: usize, hkv: usize, causal: bool, mask: Option<&Tensor>, strided: bool) {
    let (b, sq, sk) = (2, 33, 47);
    let layer = layer(hq, hkv, causal);
    let qv = Var::from_tensor(&randn(&[b, sq, hq, D])).unwrap();
    let kv = Var::from_tensor(&randn(&[b, sk, hkv, D])).unwrap();
    let vv = Var::from_tensor(&randn(&[b, sk, hkv, D])).unwrap();
    let r = randn(&[b, sq, hq, D]);
    // A strided q: the variable goes through a transpose pair, so sdpa
    // sees a non-contiguous view and candle routes the gradient back.
    let q = if strided {
        qv.transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(1, 2)
            .unwrap()
    } else {
        qv.as_tensor().clone()
    };
    let out = sdpa_candle::forward(&layer, &q, &kv, &vv, mask).unwrap();
    let grads = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let want_out = naive_attention(&q, &kv, &vv, mask, 1.0 / (D as f64).sqrt(), causal).unwrap();
    let want = (want_out * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in [("dq", &qv), ("dk", &kv), ("dv", &vv)] {
        let got = grads.get(var).unwrap_or_else(|| panic!("no {name}"));
        let exp = want.get(var).unwrap();
        assert_eq!(got.dims(), exp.dims());
        let diff = max_abs_diff(got, exp);
        assert!(diff < 1e-4, "{name}: max |sdpa - candle| = {diff}");
    }
}

#[test]
fn backward_matches_candle_autograd() {
    check_backward(4, 4, false, None, false);
}

#[test]
fn backward_causal_gqa_strided() {
    check_backward(8, 2, true, None, true);
}

#[test]
fn backward_with_mask() {
    let bias = randn(&[2, 4, 33, 47]);
    check_backward(4, 4, false, Some(&bias), false);
    let keep: Vec<i64> = (0..2 * 47).map(|i| i64::from(i % 47 < 40)).collect();
    let keep = Tensor::from_vec(keep, (2, 47), &Device::Cpu).unwrap();
    check_backward(4, 2, true, Some(&keep), false);
}

#[test]
fn backward_of_a_sum_takes_a_broadcast_gradient() {
    // d(sum(out))/d(out) reaches the op as a stride-0 broadcast.
    let layer = layer(4, 4, false);
    let q = Var::from_tensor(&randn(&[1, 9, 4, D])).unwrap();
    let k = randn(&[1, 9, 4, D]);
    let out = sdpa_candle::forward(&layer, &q, &k, &k, None).unwrap();
    let grads = out.sum_all().unwrap().backward().unwrap();
    let want = naive_attention(&q, &k, &k, None, 1.0 / (D as f64).sqrt(), false)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let diff = max_abs_diff(grads.get(&q).unwrap(), want.get(&q).unwrap());
    assert!(diff < 1e-4, "dq: {diff}");
}

fn message(r: candle_core::Result<Tensor>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn errors_come_back_as_candle_errors() {
    let layer = layer(4, 4, false);
    let (q, k, v) = qkv(1, 8, 8, 4, 4);
    // sdpa's own errors, message kept.
    let q16 = randn(&[1, 8, 4, 16]);
    let e = message(sdpa_candle::forward(&layer, &q16, &q16, &q16, None));
    assert!(e.contains("head_size"), "{e}");
    let e = message(sdpa_candle::forward(
        &layer,
        &q,
        &k.to_dtype(DType::BF16).unwrap(),
        &v,
        None,
    ));
    assert!(e.contains("dtype"), "{e}");
    let bad = Tensor::ones((1, 9), DType::U8, &Device::Cpu).unwrap();
    let e = message(sdpa_candle::forward(&layer, &q, &k, &v, Some(&bad)));
    assert!(e.contains("mask"), "{e}");
    // Checked here.
    let e = message(sdpa_candle::forward(
        &layer,
        &q.squeeze(0).unwrap(),
        &k,
        &v,
        None,
    ));
    assert!(e.contains("[batch, seq, heads, head_dim]"), "{e}");
    let f64q = q.to_dtype(DType::F64).unwrap();
    let e = message(sdpa_candle::forward(&layer, &f64q, &f64q, &f64q, None));
    assert!(e.contains("f32, f16 or bf16"), "{e}");
    // The backward of a forward-only declaration.
    let fwd = ForwardOnly.build_impl(AttentionParams::new(2, 16)).unwrap();
    let q = Var::from_tensor(&randn(&[1, 4, 2, 16])).unwrap();
    let out = sdpa_candle::forward(&fwd, &q, &q, &q, None).unwrap();
    let e = out.sum_all().unwrap().backward().unwrap_err().to_string();
    assert!(e.contains("backward"), "{e}");
}

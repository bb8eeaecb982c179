//! `sdpa_candle::forward_varlen` on packed host tensors against candle's
//! own attention run on each sequence alone in f64, forward and through
//! candle's autograd, and its errors.

use candle_core::{DType, Device, Tensor, Var};
use sdpa_runtime::prelude::*;
use sdpa_runtime::SdpaImpl;

mod common;
use common::{max_abs_diff, randn};

#[sdpa_variants(head_sizes = [32], causal = [false, true], dtypes = [f32, bf16], backward = true)]
struct Attention;

const D: usize = 32;

fn layer(hq: usize, hkv: usize, causal: bool) -> SdpaImpl {
    Attention
        .build_impl(AttentionParams::new(hq, D).num_kv_heads(hkv).causal(causal))
        .unwrap()
}

/// [`common::packed_reference`] at the layer's scale.
fn reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_q: &[u32],
    cu_k: &[u32],
    causal: bool,
) -> Tensor {
    common::packed_reference((q, k, v), cu_q, cu_k, 1.0 / (D as f64).sqrt(), causal)
}

/// Five sequences, one empty on both sides and one with queries but no
/// keys; queries and keys of different lengths.
const CU_Q: [u32; 6] = [0, 13, 13, 40, 47, 90];
const CU_K: [u32; 6] = [0, 21, 21, 29, 29, 101];

#[test]
fn packed_forward_matches_each_sequence_alone() {
    let (tq, tk) = (CU_Q[5] as usize, CU_K[5] as usize);
    for (hq, hkv, causal) in [(4, 4, false), (8, 2, true)] {
        let layer = layer(hq, hkv, causal);
        let (q, k, v) = (
            randn(&[tq, hq, D]),
            randn(&[tk, hkv, D]),
            randn(&[tk, hkv, D]),
        );
        let cu_q = Tensor::new(&CU_Q, &Device::Cpu).unwrap();
        // Offsets in another accepted dtype.
        let cu_k = Tensor::new(&CU_K, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::I64)
            .unwrap();
        let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let want = reference(&f64(&q), &f64(&k), &f64(&v), &CU_Q, &CU_K, causal);
        let out = sdpa_candle::forward_varlen(&layer, &q, &k, &v, &cu_q, &cu_k, 43, 72).unwrap();
        assert_eq!(out.dims(), [tq, hq, D]);
        let diff = max_abs_diff(&out, &want);
        assert!(diff < 2e-5, "f32 causal={causal}: {diff}");
        // bf16: against the reference of the rounded inputs.
        let b16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let (q, k, v) = (b16(&q), b16(&k), b16(&v));
        let want = reference(&f64(&q), &f64(&k), &f64(&v), &CU_Q, &CU_K, causal);
        let out = sdpa_candle::forward_varlen(&layer, &q, &k, &v, &cu_q, &cu_k, 43, 72).unwrap();
        assert_eq!(out.dtype(), DType::BF16);
        let diff = max_abs_diff(&out, &want);
        assert!(diff < 3e-2, "bf16 causal={causal}: {diff}");
    }
}

#[test]
fn packed_gradients_match_candle_autograd_per_sequence() {
    let (tq, tk, hq, hkv) = (CU_Q[5] as usize, CU_K[5] as usize, 4, 2);
    for causal in [false, true] {
        let layer = layer(hq, hkv, causal);
        let q = Var::from_tensor(&randn(&[tq, hq, D])).unwrap();
        let k = Var::from_tensor(&randn(&[tk, hkv, D])).unwrap();
        let v = Var::from_tensor(&randn(&[tk, hkv, D])).unwrap();
        let r = randn(&[tq, hq, D]);
        let cu_q = Tensor::new(&CU_Q, &Device::Cpu).unwrap();
        let cu_k = Tensor::new(&CU_K, &Device::Cpu).unwrap();
        let out = sdpa_candle::forward_varlen(&layer, &q, &k, &v, &cu_q, &cu_k, 43, 72).unwrap();
        let grads = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();

        let wide =
            |t: &Var| Var::from_tensor(&t.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
        let (q64, k64, v64) = (wide(&q), wide(&k), wide(&v));
        let want = reference(&q64, &k64, &v64, &CU_Q, &CU_K, causal);
        let r64 = r.to_dtype(DType::F64).unwrap();
        let want = (want * r64).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, ours, theirs) in [("dq", &q, &q64), ("dk", &k, &k64), ("dv", &v, &v64)] {
            let got = grads.get(ours).unwrap_or_else(|| panic!("no {name}"));
            let exp = want.get(theirs).unwrap();
            assert_eq!(got.dims(), exp.dims());
            let diff = max_abs_diff(got, exp);
            assert!(diff < 1e-4, "{name} causal={causal}: {diff}");
        }
    }
}

#[test]
fn packed_errors_say_what_to_change() {
    let layer = layer(4, 4, false);
    let q = randn(&[10, 4, D]);
    let cu = Tensor::new(&[0u32, 4, 10], &Device::Cpu).unwrap();
    let err = |r: candle_core::Result<Tensor>| r.map(drop).unwrap_err().to_string();
    // A rank-4 tensor.
    let q4 = q.unsqueeze(0).unwrap();
    let e = err(sdpa_candle::forward_varlen(
        &layer, &q4, &q4, &q4, &cu, &cu, 6, 6,
    ));
    assert!(e.contains("[tokens, heads, head_dim]"), "{e}");
    // Float offsets.
    let cu_f = cu.to_dtype(DType::F32).unwrap();
    let e = err(sdpa_candle::forward_varlen(
        &layer, &q, &q, &q, &cu_f, &cu, 6, 6,
    ));
    assert!(e.contains("u32, i32 or i64"), "{e}");
    // Offsets past the tokens: sdpa's own check.
    let bad = Tensor::new(&[0u32, 4, 12], &Device::Cpu).unwrap();
    let e = err(sdpa_candle::forward_varlen(
        &layer, &q, &q, &q, &bad, &cu, 8, 6,
    ));
    assert!(e.contains("cu_seqlens"), "{e}");
    // A sequence longer than its stated maximum.
    let e = err(sdpa_candle::forward_varlen(
        &layer, &q, &q, &q, &cu, &cu, 5, 6,
    ));
    assert!(e.contains("max"), "{e}");
}

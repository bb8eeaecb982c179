//! What the test files share: fresh inputs, the largest difference, and
//! candle's own attention as the reference (whole batches, or packed
//! sequences one at a time). Each file uses a part of it.

#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use sdpa_candle::naive_attention;
use sdpa_runtime::SdpaImpl;

/// Fresh normal values on the host, f32.
pub fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

/// The largest absolute difference, on the host in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let f = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    (f(a) - f(b))
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Candle's attention of the host copies of `q`, `k`, `v` (and a float
/// mask) in f64.
pub fn reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    causal: bool,
) -> Tensor {
    let host = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
    let f = |t: &Tensor| host(t).to_dtype(DType::F64).unwrap();
    let mask = mask.map(|m| if m.dtype().is_float() { f(m) } else { host(m) });
    naive_attention(&f(q), &f(k), &f(v), mask.as_ref(), scale, causal).unwrap()
}

/// Runs sdpa on `q`, `k`, `v` cast to `dtype` (on whichever device they
/// are) and checks the result against candle's attention of the cast
/// inputs in f64 at the layer's scale and causal flag; returns sdpa's
/// output.
pub fn check_forward(
    layer: &SdpaImpl,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    mask: Option<&Tensor>,
    dtype: DType,
    tol: f64,
) -> Tensor {
    let c = |t: &Tensor| t.to_dtype(dtype).unwrap();
    let (q, k, v) = (c(q), c(k), c(v));
    let out = sdpa_candle::forward(layer, &q, &k, &v, mask).unwrap();
    assert_eq!((out.dtype(), out.dims()), (dtype, q.dims()));
    let params = layer.params();
    let want = reference(&q, &k, &v, mask, f64::from(params.scale()), params.causal);
    let diff = max_abs_diff(&out, &want);
    assert!(
        diff < tol,
        "{dtype:?}: max |sdpa - reference| = {diff} >= {tol}"
    );
    out
}

/// Candle's attention of each packed sequence alone (`q` `[Tq, Hq, D]`,
/// `k`, `v` `[Tk, Hkv, D]`, in the dtype and on the device given), the
/// rows of a sequence with no keys as zeros, concatenated back to
/// `[Tq, Hq, D]`. Differentiable: tokens no sequence reads get zero
/// gradients through the narrows.
pub fn packed_reference(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    cu_q: &[u32],
    cu_k: &[u32],
    scale: f64,
    causal: bool,
) -> Tensor {
    let mut parts = Vec::new();
    for b in 0..cu_q.len() - 1 {
        let (q0, nq) = (cu_q[b] as usize, (cu_q[b + 1] - cu_q[b]) as usize);
        let (k0, nk) = (cu_k[b] as usize, (cu_k[b + 1] - cu_k[b]) as usize);
        if nq == 0 {
            continue;
        }
        let qs = q.narrow(0, q0, nq).unwrap();
        if nk == 0 {
            parts.push((qs * 0.0).unwrap());
            continue;
        }
        let seq = |t: &Tensor| t.narrow(0, k0, nk).unwrap().unsqueeze(0).unwrap();
        let out = naive_attention(
            &qs.unsqueeze(0).unwrap(),
            &seq(k),
            &seq(v),
            None,
            scale,
            causal,
        )
        .unwrap();
        parts.push(out.squeeze(0).unwrap());
    }
    Tensor::cat(&parts, 0).unwrap()
}

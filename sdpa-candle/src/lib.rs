//! Fused scaled-dot-product attention for [candle](https://github.com/huggingface/candle)
//! tensors, differentiable with candle's autograd.
//!
//! [`forward`] runs an sdpa layer ([`SdpaImpl`], built from a type declared
//! with `#[sdpa_variants(...)]`) on candle tensors laid out as
//! `[batch, seq, heads, head_dim]`, the layout of `candle-flash-attn`. It is
//! a candle [`CustomOp3`] over `q`, `k` and `v`: [`Tensor::backward`]
//! differentiates through it with sdpa's backward kernels when the layer's
//! variants were declared with `backward = true`.
//!
//! ```
//! use candle_core::{DType, Device, Tensor, Var};
//! use sdpa_runtime::prelude::*;
//!
//! #[sdpa_variants(head_sizes = [32], causal = [true], dtypes = [f32], backward = true)]
//! struct Attention;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let layer = Attention.build_impl(AttentionParams::new(4, 32).causal(true))?;
//! let q = Var::randn(0f32, 1.0, (2, 10, 4, 32), &Device::Cpu)?;
//! let k = Tensor::randn(0f32, 1.0, (2, 10, 4, 32), &Device::Cpu)?;
//! let v = Tensor::randn(0f32, 1.0, (2, 10, 4, 32), &Device::Cpu)?;
//! let out = sdpa_candle::forward(&layer, &q, &k, &v, None)?;
//! assert_eq!(out.dims(), [2, 10, 4, 32]);
//! let grads = out.sqr()?.sum_all()?.backward()?;
//! assert_eq!(grads.get(&q).unwrap().dims(), [2, 10, 4, 32]);
//! assert_eq!(out.dtype(), DType::F32);
//! # Ok(()) }
//! ```
//!
//! - **dtypes**: `f32`, `f16` and `bf16` (the layer's variants decide
//!   which are compiled); `q`, `k`, `v` in one dtype.
//! - **Layouts**: tensors are read in place: the storage from the
//!   layout's start offset, with the layout's strides, so a narrowed or
//!   transposed view costs no copy. The head dimension must be contiguous
//!   (stride 1); a tensor whose head dimension is not is made contiguous
//!   first (a copy), as are `k` / `v` broadcast along the head dimension.
//! - **Masks**: as [`AttnMask`](sdpa_runtime::AttnMask) takes them (`[B, Sk]`,
//!   `[B, Sq, Sk]` or `[B, H, Sq, Sk]`; `u8`, `i32`, `i64` non-zero = attend;
//!   `f32`, `f16`, `bf16` added to the scores). `u32` and `i16` masks are
//!   widened to `i64`, `f64` masks narrowed to `f32`; a mask that is not
//!   contiguous is copied. Masks get no gradient.
//! - **Devices**: the CPU, and CUDA with the `cuda` feature (candle's own
//!   `cuda` feature; the README says what its build needs). On CUDA the
//!   kernels read candle's device buffers in place and run on candle's
//!   stream for the device; a mask may be on the host (uploaded per call)
//!   or on the device (read in place). Without the feature, CUDA tensors
//!   get candle's "no cuda implementation" error.
//! - **Errors**: every [`SdpaError`](sdpa_runtime::SdpaError) comes back as a
//!   [`candle_core::Error`] carrying its message; nothing panics on bad
//!   input.

#![warn(missing_docs)]

mod host;
mod naive;
mod op;

#[cfg(feature = "cuda")]
mod cuda;

use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};
use sdpa_runtime::SdpaImpl;

pub use naive::naive_attention;
use op::SdpaOp;

/// The runtime whose layers [`forward`] runs (build them from a type
/// declared with `#[sdpa_variants(...)]`; the declaring crate depends on
/// `sdpa-runtime` itself, as the macro names `::sdpa_runtime`).
pub use sdpa_runtime;

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// Attention over candle tensors: `softmax(q kᵀ · scale + mask) v` per
/// batch and head, with the layer's scale, causal flag and grouped-query
/// heads.
///
/// `q` is `[B, Sq, Hq, D]`, `k` and `v` are `[B, Sk, Hkv, D]` with `Hq` a
/// multiple of `Hkv`; the result is a new contiguous `[B, Sq, Hq, D]` tensor
/// of `q`'s dtype. `mask`, if any, is `[B, Sk]`, `[B, Sq, Sk]` or
/// `[B, H, Sq, Sk]` (see the crate docs for its dtypes).
///
/// When any of `q`, `k`, `v` is tracked by candle's autograd (a [`Var`] or
/// computed from one), the forward also keeps the row log-sum-exp, and
/// [`Tensor::backward`] reaches `q`, `k` and `v` through sdpa's backward
/// pass (the layer's variant must be declared with `backward = true`,
/// otherwise the backward call returns that error).
///
/// [`Var`]: candle_core::Var
pub fn forward(
    layer: &SdpaImpl,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.rank() != 4 {
            candle_core::bail!(
                "sdpa: {name} has shape {:?}; pass [batch, seq, heads, head_dim]",
                t.dims()
            );
        }
        if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            candle_core::bail!(
                "sdpa: {name} has dtype {:?}; pass f32, f16 or bf16",
                t.dtype()
            );
        }
    }
    let (q, k, v) = (
        head_contiguous(q)?,
        head_contiguous(k)?,
        head_contiguous(v)?,
    );
    let mask = mask.map(prepare_mask).transpose()?;
    let track = q.track_op() || k.track_op() || v.track_op();
    let op = SdpaOp {
        layer: layer.clone(),
        mask,
        keep_lse: track,
        lse: Mutex::new(None),
    };
    if track {
        q.apply_op3_arc(&k, &v, Arc::new(Box::new(op)))
    } else {
        q.apply_op3_no_bwd(&k, &v, &op)
    }
}

/// `t`, or a contiguous copy where its head dimension has a stride other
/// than 1 (a transpose that moved the head dimension, a broadcast).
pub(crate) fn head_contiguous(t: &Tensor) -> candle_core::Result<Tensor> {
    let d = t.dims().last().copied().unwrap_or(1);
    if d > 1 && t.stride().last() != Some(&1) {
        t.contiguous()
    } else {
        Ok(t.clone())
    }
}

/// The mask detached from the graph, contiguous, in a dtype sdpa reads.
fn prepare_mask(mask: &Tensor) -> candle_core::Result<Tensor> {
    let mask = mask.detach();
    let mask = match mask.dtype() {
        DType::U8 | DType::I32 | DType::I64 | DType::F32 | DType::F16 | DType::BF16 => mask,
        DType::U32 | DType::I16 => mask.to_dtype(DType::I64)?,
        DType::F64 => mask.to_dtype(DType::F32)?,
        other => candle_core::bail!(
            "sdpa: a mask of dtype {other:?} is not supported; pass u8, i32, i64 (non-zero = \
             attend) or f32, f16, bf16 (added to the scores)"
        ),
    };
    mask.contiguous()
}

//! Fused scaled-dot-product attention for [candle](https://github.com/huggingface/candle)
//! tensors, differentiable with candle's autograd.
//!
//! [`forward`] runs an sdpa layer ([`SdpaImpl`], built from a type declared
//! with `#[sdpa_variants(...)]`) on candle tensors laid out as
//! `[batch, seq, heads, head_dim]`, the layout of `candle-flash-attn`. It is
//! a candle [`CustomOp3`](candle_core::CustomOp3) over `q`, `k` and `v`: [`Tensor::backward`]
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
//! - **Packed sequences**: [`forward_varlen`] takes sequences of different
//!   lengths concatenated along the tokens, with `cu_seqlens` offsets, as
//!   `candle-flash-attn`'s `flash_attn_varlen`.
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
use op::{Offsets, Packed, SdpaOp};

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
    check_inputs(q, k, v, 4, "[batch, seq, heads, head_dim]")?;
    let mask = mask.map(prepare_mask).transpose()?;
    apply(layer, q, k, v, mask, None)
}

/// Attention over packed sequences of different lengths, as
/// `candle-flash-attn`'s `flash_attn_varlen` takes them: the sequences of a
/// batch concatenated along the token dimension.
///
/// `q` is `[Tq, Hq, D]`, `k` and `v` are `[Tk, Hkv, D]`; `cu_seqlens_q` and
/// `cu_seqlens_k` are `[B + 1]` offsets (`u32`, `i32` or `i64`, on the host
/// or on `q`'s device): sequence `b` is query tokens
/// `cu_seqlens_q[b]..cu_seqlens_q[b + 1]` against key tokens
/// `cu_seqlens_k[b]..cu_seqlens_k[b + 1]`, with the causal rule (top-left)
/// in each sequence's own positions. `max_seqlen_q` and `max_seqlen_k` are
/// the longest sequence of each side (host offsets are checked against
/// them; device offsets are not read by the host, and a longer sequence is
/// cut to them). An empty sequence is allowed; a query that sees no key
/// gets zeros. The result is a new contiguous `[Tq, Hq, D]` tensor;
/// candle's autograd differentiates through it as through [`forward`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// use sdpa_runtime::prelude::*;
///
/// #[sdpa_variants(head_sizes = [32], causal = [true], dtypes = [f32])]
/// struct Attention;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let layer = Attention.build_impl(AttentionParams::new(4, 32).causal(true))?;
/// // Two sequences of 5 and 11 tokens, packed into 16.
/// let q = Tensor::randn(0f32, 1.0, (16, 4, 32), &Device::Cpu)?;
/// let cu = Tensor::new(&[0u32, 5, 16], &Device::Cpu)?;
/// let out = sdpa_candle::forward_varlen(&layer, &q, &q, &q, &cu, &cu, 11, 11)?;
/// assert_eq!(out.dims(), [16, 4, 32]);
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn forward_varlen(
    layer: &SdpaImpl,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens_q: &Tensor,
    cu_seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
) -> candle_core::Result<Tensor> {
    check_inputs(q, k, v, 3, "[tokens, heads, head_dim]")?;
    let packed = Packed {
        cu_q: offsets("cu_seqlens_q", cu_seqlens_q)?,
        cu_k: offsets("cu_seqlens_k", cu_seqlens_k)?,
        max_seqlen: (max_seqlen_q, max_seqlen_k),
    };
    // `[1, T, H, D]` views: sdpa's packed form.
    let (q, k, v) = (q.unsqueeze(0)?, k.unsqueeze(0)?, v.unsqueeze(0)?);
    apply(layer, &q, &k, &v, None, Some(packed))?.squeeze(0)
}

/// Checks `q`, `k`, `v` for their rank and dtype.
fn check_inputs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rank: usize,
    layout: &str,
) -> candle_core::Result<()> {
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.rank() != rank {
            candle_core::bail!("sdpa: {name} has shape {:?}; pass {layout}", t.dims());
        }
        if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            candle_core::bail!(
                "sdpa: {name} has dtype {:?}; pass f32, f16 or bf16",
                t.dtype()
            );
        }
    }
    Ok(())
}

/// Runs the op on rank-4 `q`, `k`, `v`, tracked by autograd when any of
/// them is.
fn apply(
    layer: &SdpaImpl,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<Tensor>,
    packed: Option<Packed>,
) -> candle_core::Result<Tensor> {
    let (q, k, v) = (
        head_contiguous(q)?,
        head_contiguous(k)?,
        head_contiguous(v)?,
    );
    let track = q.track_op() || k.track_op() || v.track_op();
    let op = SdpaOp {
        layer: layer.clone(),
        mask,
        packed,
        keep_lse: track,
        lse: Mutex::new(None),
    };
    if track {
        q.apply_op3_arc(&k, &v, Arc::new(Box::new(op)))
    } else {
        q.apply_op3_no_bwd(&k, &v, &op)
    }
}

/// A side's `cu_seqlens` as sdpa reads them: `i32` values read off a host
/// tensor, or a contiguous `i32` device tensor.
fn offsets(name: &str, t: &Tensor) -> candle_core::Result<Offsets> {
    if t.rank() != 1 {
        candle_core::bail!(
            "sdpa: {name} has shape {:?}; pass [batch + 1] offsets",
            t.dims()
        );
    }
    if !matches!(t.dtype(), DType::U32 | DType::I32 | DType::I64) {
        candle_core::bail!(
            "sdpa: {name} has dtype {:?}; pass u32, i32 or i64 offsets",
            t.dtype()
        );
    }
    let t = t.detach();
    if !t.device().is_cpu() {
        let t = if t.dtype() == DType::I32 {
            t
        } else {
            t.to_dtype(DType::I32)?
        };
        return Ok(Offsets::Device(t.contiguous()?));
    }
    let wide: Vec<i64> = match t.dtype() {
        DType::U32 => t.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        DType::I32 => t.to_vec1::<i32>()?.into_iter().map(i64::from).collect(),
        _ => t.to_vec1::<i64>()?,
    };
    let cu = wide
        .into_iter()
        .map(i32::try_from)
        .collect::<Result<Vec<i32>, _>>()
        .map_err(|_| {
            candle_core::Error::msg(format!("sdpa: {name} holds an offset outside i32's range"))
        })?;
    Ok(Offsets::Host(cu))
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

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
//! - **Layouts**: host tensors are read in place: the storage slice from the
//!   layout's start offset, with the layout's strides, so a narrowed or
//!   transposed view costs no copy. The head dimension must be contiguous
//!   (stride 1); a tensor whose head dimension is not is made contiguous
//!   first (a copy), as are `k` / `v` broadcast along the head dimension.
//! - **Masks**: as [`AttnMask`] takes them (`[B, Sk]`,
//!   `[B, Sq, Sk]` or `[B, H, Sq, Sk]`; `u8`, `i32`, `i64` non-zero = attend;
//!   `f32`, `f16`, `bf16` added to the scores). `u32` and `i16` masks are
//!   widened to `i64`, `f64` masks narrowed to `f32`; a mask that is not
//!   contiguous is copied. Masks get no gradient.
//! - **Devices**: the CPU. CUDA tensors are refused with an error (this
//!   crate has no `cuda` feature yet).
//! - **Errors**: every [`SdpaError`](sdpa_runtime::SdpaError) comes back as a
//!   [`candle_core::Error`] carrying its message; nothing panics on bad
//!   input.

#![warn(missing_docs)]

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor, WithDType};
use sdpa_runtime::{
    AttentionImpl, AttentionMetadata, AttnMask, BackwardInputs, Element, Gradients, MaskData,
    SdpaImpl, TensorView, TensorViewMut,
};

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
fn head_contiguous(t: &Tensor) -> candle_core::Result<Tensor> {
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

/// Maps sdpa's error into candle's, keeping its message.
fn err(e: sdpa_runtime::SdpaError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The custom op: the layer, the mask, and the forward's row log-sum-exp
/// for the backward.
struct SdpaOp {
    layer: SdpaImpl,
    mask: Option<Tensor>,
    keep_lse: bool,
    lse: Mutex<Option<sdpa_runtime::Tensor>>,
}

/// The four dimensions of a rank-4 layout.
fn dims4(layout: &Layout) -> candle_core::Result<[usize; 4]> {
    layout.dims().try_into().map_err(|_| {
        candle_core::Error::msg(format!(
            "sdpa: rank-4 tensor expected, got {:?}",
            layout.dims()
        ))
    })
}

/// A view of host storage through a candle layout, without a copy.
fn host_view<'a, T: Element + WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<TensorView<'a>> {
    let data = storage.as_slice::<T>()?;
    let shape = dims4(layout)?;
    let strides: [usize; 4] = layout
        .stride()
        .try_into()
        .map_err(candle_core::Error::wrap)?;
    let data = data.get(layout.start_offset()..).unwrap_or(&[]);
    TensorView::with_strides(data, shape, strides).map_err(err)
}

/// The mask's elements as sdpa reads them, borrowed from candle's storage.
fn host_mask<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<AttnMask<'a>> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::msg("sdpa: the mask must be contiguous"))?;
    let data = match storage {
        CpuStorage::U8(s) => MaskData::U8(&s[start..end]),
        CpuStorage::I32(s) => MaskData::I32(&s[start..end]),
        CpuStorage::I64(s) => MaskData::I64(&s[start..end]),
        CpuStorage::F32(s) => MaskData::F32(&s[start..end]),
        CpuStorage::F16(s) => MaskData::F16(&s[start..end]),
        CpuStorage::BF16(s) => MaskData::BF16(&s[start..end]),
        other => candle_core::bail!("sdpa: a mask of dtype {:?} is not supported", other.dtype()),
    };
    AttnMask::new(data, layout.dims()).map_err(err)
}

impl SdpaOp {
    /// Runs `f` with the metadata holding the mask, read in place.
    fn with_metadata<R>(
        &self,
        f: impl FnOnce(&AttentionMetadata<'_>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let Some(mask) = &self.mask else {
            return f(&AttentionMetadata::default());
        };
        let (storage, layout) = mask.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => {
                let meta = AttentionMetadata::default().with_mask(host_mask(s, layout)?);
                f(&meta)
            }
            _ => candle_core::bail!(
                "sdpa: the mask is on {:?}; this build runs host tensors only",
                mask.device().location()
            ),
        }
    }

    fn cpu_forward<T: Element + WithDType>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = host_view::<T>(s1, l1)?;
        let k = host_view::<T>(s2, l2)?;
        let v = host_view::<T>(s3, l3)?;
        let [b, sq, hq, d] = q.layout().shape();
        let mut out = vec![T::zero(); b * sq * hq * d];
        self.with_metadata(|meta| {
            let mut out_view = TensorViewMut::from_slice(&mut out, [b, sq, hq, d]).map_err(err)?;
            if self.keep_lse {
                let mut lse = sdpa_runtime::Tensor::zeros(sdpa_runtime::DType::F32, [b, hq, sq, 1]);
                self.layer
                    .forward_with_lse_into(&q, &k, &v, meta, &mut out_view, &mut lse.view_mut())
                    .map_err(err)?;
                *self.lse.lock().map_err(candle_core::Error::msg)? = Some(lse);
            } else {
                self.layer
                    .forward_into(&q, &k, &v, meta, &mut out_view)
                    .map_err(err)?;
            }
            Ok(())
        })?;
        Ok((
            T::to_cpu_storage_owned(out),
            Shape::from([b, sq, hq, d].as_slice()),
        ))
    }

    /// The gradients of `q`, `k`, `v` on the host.
    fn cpu_backward<T: Element + WithDType>(
        &self,
        t: [&Tensor; 5],
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let guards: Vec<_> = t.iter().map(|t| t.storage_and_layout()).collect();
        let mut views = Vec::with_capacity(5);
        for (storage, layout) in &guards {
            match &**storage {
                Storage::Cpu(s) => views.push(host_view::<T>(s, layout)?),
                _ => candle_core::bail!("sdpa: the backward's tensors must all be on the host"),
            }
        }
        let [q, k, v, out, dout] = [views[0], views[1], views[2], views[3], views[4]];
        let qs = q.layout().shape();
        let ks = k.layout().shape();
        let numel = |s: [usize; 4]| s.iter().product::<usize>();
        let mut dq = vec![T::zero(); numel(qs)];
        let mut dk = vec![T::zero(); numel(ks)];
        let mut dv = vec![T::zero(); numel(ks)];
        self.with_metadata(|meta| {
            let kept = self.lse.lock().map_err(candle_core::Error::msg)?.take();
            let lse = match kept {
                Some(lse) => lse,
                None => {
                    self.layer
                        .forward_with_lse(&q, &k, &v, meta)
                        .map_err(err)?
                        .1
                }
            };
            let inputs = BackwardInputs {
                out,
                dout,
                lse: lse.view(),
            };
            let mut grads = Gradients {
                dq: TensorViewMut::from_slice(&mut dq, qs).map_err(err)?,
                dk: TensorViewMut::from_slice(&mut dk, ks).map_err(err)?,
                dv: TensorViewMut::from_slice(&mut dv, ks).map_err(err)?,
            };
            let result = self
                .layer
                .backward_into(&q, &k, &v, meta, &inputs, &mut grads);
            // Kept for a second backward through the same graph.
            *self.lse.lock().map_err(candle_core::Error::msg)? = Some(lse);
            result.map_err(err)
        })?;
        drop(guards);
        let device = t[0].device();
        Ok((
            Tensor::from_vec(dq, qs.as_slice(), device)?,
            Tensor::from_vec(dk, ks.as_slice(), device)?,
            Tensor::from_vec(dv, ks.as_slice(), device)?,
        ))
    }
}

impl CustomOp3 for SdpaOp {
    fn name(&self) -> &'static str {
        "sdpa"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let args = ((s1, l1), (s2, l2), (s3, l3));
        match s1.dtype() {
            DType::F32 => self.cpu_forward::<f32>(args.0, args.1, args.2),
            DType::F16 => self.cpu_forward::<half::f16>(args.0, args.1, args.2),
            DType::BF16 => self.cpu_forward::<half::bf16>(args.0, args.1, args.2),
            other => {
                candle_core::bail!("sdpa: dtype {other:?} is not supported; pass f32, f16 or bf16")
            }
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The output gradient arrives in any layout (a broadcast for a sum).
        let dout = head_contiguous(&dout.to_dtype(out.dtype())?)?;
        let t = [q, k, v, out, &dout];
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.cpu_backward::<f32>(t)?,
            DType::F16 => self.cpu_backward::<half::f16>(t)?,
            DType::BF16 => self.cpu_backward::<half::bf16>(t)?,
            other => {
                candle_core::bail!("sdpa: dtype {other:?} is not supported; pass f32, f16 or bf16")
            }
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Candle's own attention, composed of candle ops (matmul, softmax, matmul)
/// on `[B, S, H, D]` tensors, for comparisons: it materialises the
/// `[B, Hq, Sq, Sk]` scores and is differentiable like any candle
/// expression.
///
/// `k` and `v` heads are repeated for grouped-query attention; `causal` hides
/// key `j` from query `i` when `j > i` (top-left, as [`forward`]); `mask` is
/// `[B, Sk]`, `[B, Sq, Sk]` or `[B, H, Sq, Sk]` of the full key length (no
/// front padding), integer (non-zero = attend) or floating (added to the
/// scores). Rows that see no key give NaN here (sdpa gives zeros).
pub fn naive_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    causal: bool,
) -> candle_core::Result<Tensor> {
    let (b, sq, hq, _) = q.dims4()?;
    let (_, sk, hkv, _) = k.dims4()?;
    let group = hq / hkv.max(1);
    let repeat = |t: &Tensor| -> candle_core::Result<Tensor> {
        // [B, S, Hkv, D] -> [B, Hq, S, D], each key/value head `group` times.
        let t = t.transpose(1, 2)?;
        if group == 1 {
            return t.contiguous();
        }
        let (b, h, s, d) = t.dims4()?;
        t.unsqueeze(2)?
            .broadcast_as((b, h, group, s, d))?
            .contiguous()?
            .reshape((b, h * group, s, d))
    };
    let q = q.transpose(1, 2)?.contiguous()?;
    let (k, v) = (repeat(k)?, repeat(v)?);
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    let dtype = scores.dtype();
    let device = scores.device().clone();
    let neg_inf =
        |shape: &[usize]| Tensor::full(f32::NEG_INFINITY, shape, &device)?.to_dtype(dtype);
    if causal {
        let hide: Vec<u8> = (0..sq)
            .flat_map(|i| (0..sk).map(move |j| u8::from(j > i)))
            .collect();
        let hide = Tensor::from_vec(hide, (sq, sk), &device)?.broadcast_as(scores.shape())?;
        scores = hide.where_cond(&neg_inf(scores.dims())?, &scores)?;
    }
    if let Some(mask) = mask {
        let mask = match mask.rank() {
            2 => mask.reshape((b, 1, 1, sk))?,
            3 => mask.reshape((b, 1, sq, sk))?,
            _ => mask.clone(),
        }
        .broadcast_as(scores.shape())?;
        scores = if mask.dtype().is_int() {
            mask.ne(0u32)?
                .where_cond(&scores, &neg_inf(scores.dims())?)?
        } else {
            (scores + mask.to_dtype(dtype)?)?
        };
    }
    let max = scores.max_keepdim(candle_core::D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)?;
    p.matmul(&v)?.transpose(1, 2)?.contiguous()
}

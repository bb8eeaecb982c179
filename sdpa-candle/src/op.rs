//! The custom op: sdpa's forward and backward as a candle [`CustomOp3`],
//! whichever device the tensors are on.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use sdpa_runtime::{
    AttentionImpl, AttentionMetadata, BackwardInputs, Gradients, SdpaImpl, SeqLens, TensorView,
    TensorViewMut, VarLen,
};

use crate::host;

/// Maps sdpa's error into candle's, keeping its message.
pub(crate) fn err(e: sdpa_runtime::SdpaError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The four dimensions of a rank-4 layout.
pub(crate) fn dims4(layout: &Layout) -> candle_core::Result<[usize; 4]> {
    layout.dims().try_into().map_err(|_| {
        candle_core::Error::msg(format!(
            "sdpa: rank-4 tensor expected, got {:?}",
            layout.dims()
        ))
    })
}

/// The four strides of a rank-4 layout, in elements.
pub(crate) fn strides4(layout: &Layout) -> candle_core::Result<[usize; 4]> {
    layout
        .stride()
        .try_into()
        .map_err(|_| candle_core::Error::msg("sdpa: rank-4 layout expected"))
}

/// The dtypes sdpa runs, as the error for any other.
fn unsupported(dtype: DType) -> candle_core::Error {
    candle_core::Error::msg(format!(
        "sdpa: dtype {dtype:?} is not supported; pass f32, f16 or bf16"
    ))
}

/// One side's cumulative sequence lengths (`B + 1` offsets).
pub(crate) enum Offsets {
    /// Read off the host tensor once, when the op was made.
    Host(Vec<i32>),
    /// A contiguous `i32` device tensor, read in place by the kernels.
    Device(Tensor),
}

impl Offsets {
    /// Runs `f` with the offsets as sdpa takes them.
    fn with<R>(
        &self,
        f: impl FnOnce(SeqLens<'_>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        match self {
            Offsets::Host(cu) => f(SeqLens::Host(cu)),
            #[cfg(feature = "cuda")]
            Offsets::Device(t) => crate::cuda::with_offsets(t, f),
            #[cfg(not(feature = "cuda"))]
            Offsets::Device(t) => candle_core::bail!(
                "sdpa: cu_seqlens on {:?} need sdpa-candle's `cuda` feature",
                t.device().location()
            ),
        }
    }
}

/// A packed batch's offsets and longest sequences.
pub(crate) struct Packed {
    pub(crate) cu_q: Offsets,
    pub(crate) cu_k: Offsets,
    pub(crate) max_seqlen: (usize, usize),
}

/// The layer, the mask or packed batch, and the forward's row
/// log-sum-exp for the backward.
pub(crate) struct SdpaOp {
    pub(crate) layer: SdpaImpl,
    pub(crate) mask: Option<Tensor>,
    pub(crate) packed: Option<Packed>,
    /// Whether the forward keeps the row log-sum-exp (autograd tracks an
    /// input).
    pub(crate) keep_lse: bool,
    pub(crate) lse: Mutex<Option<sdpa_runtime::Tensor>>,
}

impl SdpaOp {
    /// The row log-sum-exp's shape, `[B, Hq, Sq, 1]`, for `q`'s
    /// `[B, Sq, Hq, D]` (`[1, Hq, Tq, 1]` for a packed `[1, Tq, Hq, D]`).
    pub(crate) fn lse_shape(&self, [b, sq, hq, _]: [usize; 4]) -> [usize; 4] {
        [b, hq, sq, 1]
    }

    /// Runs `f` with the metadata holding the packed batch's offsets and
    /// the mask, each read in place where it lives.
    fn with_metadata<R>(
        &self,
        f: impl FnOnce(&AttentionMetadata<'_>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let Some(packed) = &self.packed else {
            return self.with_mask(AttentionMetadata::default(), f);
        };
        let (max_q, max_k) = packed.max_seqlen;
        packed.cu_q.with(|cu_q| {
            packed.cu_k.with(|cu_k| {
                let varlen = VarLen::new(cu_q, cu_k).with_max_seqlen(max_q, max_k);
                self.with_mask(AttentionMetadata::default().with_varlen(varlen), f)
            })
        })
    }

    /// Runs `f` with `meta` and the mask, if any.
    fn with_mask<R>(
        &self,
        meta: AttentionMetadata<'_>,
        f: impl FnOnce(&AttentionMetadata<'_>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let Some(mask) = &self.mask else {
            return f(&meta);
        };
        let (storage, layout) = mask.storage_and_layout();
        let offsets = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::msg("sdpa: the mask must be contiguous"))?;
        match &*storage {
            Storage::Cpu(s) => {
                let mask = host::mask(s, layout, offsets)?;
                f(&meta.with_mask(mask))
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => crate::cuda::with_mask(s, layout, offsets, meta, f),
            #[allow(unreachable_patterns)]
            _ => candle_core::bail!(
                "sdpa: the mask is on {:?}; this build runs host tensors{}",
                mask.device().location(),
                if cfg!(feature = "cuda") {
                    " and CUDA tensors"
                } else {
                    " only (turn on sdpa-candle's `cuda` feature for CUDA tensors)"
                }
            ),
        }
    }

    /// The forward into `out`, keeping the row log-sum-exp in `lse` when
    /// given.
    pub(crate) fn run_forward(
        &self,
        [q, k, v]: [TensorView<'_>; 3],
        mut out: TensorViewMut<'_>,
        lse: Option<sdpa_runtime::Tensor>,
    ) -> candle_core::Result<()> {
        self.with_metadata(|meta| match lse {
            Some(mut lse) => {
                self.layer
                    .forward_with_lse_into(&q, &k, &v, meta, &mut out, &mut lse.view_mut())
                    .map_err(err)?;
                *self.lse.lock().map_err(candle_core::Error::msg)? = Some(lse);
                Ok(())
            }
            None => self
                .layer
                .forward_into(&q, &k, &v, meta, &mut out)
                .map_err(err),
        })
    }

    /// The backward of `[q, k, v, out, dout]` into `grads`, with the row
    /// log-sum-exp the forward kept (or recomputed when it kept none).
    pub(crate) fn run_backward(
        &self,
        [q, k, v, out, dout]: [TensorView<'_>; 5],
        mut grads: Gradients<'_>,
    ) -> candle_core::Result<()> {
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
            let result = self
                .layer
                .backward_into(&q, &k, &v, meta, &inputs, &mut grads);
            // Kept for a second backward through the same graph.
            *self.lse.lock().map_err(candle_core::Error::msg)? = Some(lse);
            result.map_err(err)
        })
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
            DType::F32 => host::forward::<f32>(self, args.0, args.1, args.2),
            DType::F16 => host::forward::<half::f16>(self, args.0, args.1, args.2),
            DType::BF16 => host::forward::<half::bf16>(self, args.0, args.1, args.2),
            other => Err(unsupported(other)),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let args = ((s1, l1), (s2, l2), (s3, l3));
        match s1.dtype() {
            DType::F32 => crate::cuda::forward::<f32>(self, args.0, args.1, args.2),
            DType::F16 => crate::cuda::forward::<half::f16>(self, args.0, args.1, args.2),
            DType::BF16 => crate::cuda::forward::<half::bf16>(self, args.0, args.1, args.2),
            other => Err(unsupported(other)),
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
        let dout = crate::head_contiguous(&dout.to_dtype(out.dtype())?)?;
        let t = [q, k, v, out, &dout];
        let (dq, dk, dv) = match (q.device(), q.dtype()) {
            (candle_core::Device::Cpu, DType::F32) => host::backward::<f32>(self, t)?,
            (candle_core::Device::Cpu, DType::F16) => host::backward::<half::f16>(self, t)?,
            (candle_core::Device::Cpu, DType::BF16) => host::backward::<half::bf16>(self, t)?,
            #[cfg(feature = "cuda")]
            (candle_core::Device::Cuda(_), DType::F32) => crate::cuda::backward::<f32>(self, t)?,
            #[cfg(feature = "cuda")]
            (candle_core::Device::Cuda(_), DType::F16) => {
                crate::cuda::backward::<half::f16>(self, t)?
            }
            #[cfg(feature = "cuda")]
            (candle_core::Device::Cuda(_), DType::BF16) => {
                crate::cuda::backward::<half::bf16>(self, t)?
            }
            (candle_core::Device::Cpu, other) => return Err(unsupported(other)),
            #[allow(unreachable_patterns)]
            (device, _) => candle_core::bail!(
                "sdpa: tensors on {:?} are not supported by this build",
                device.location()
            ),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

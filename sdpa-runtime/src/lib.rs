//! Scaled-dot-product attention with FastVideo's backend API, specialised at
//! compile time.
//!
//! A consuming crate declares the variants its model needs; the
//! `#[sdpa_variants]` attribute instantiates a kernel for each and implements
//! [`AttentionBackend`] for the type:
//!
//! ```
//! use sdpa_runtime::prelude::*;
//!
//! #[sdpa_variants(head_sizes = [64], causal = [false], dtypes = [f32])]
//! pub struct MyAttention;
//!
//! # fn main() -> Result<(), SdpaError> {
//! let layer = MyAttention.build_impl(AttentionParams::new(4, 64))?;
//! let (b, s, h, d) = (1, 10, 4, 64);
//! let q = vec![0.5f32; b * s * h * d];
//! let q = TensorView::from_slice(&q, [b, s, h, d])?;
//! let out = layer.forward(&q, &q, &q, &AttentionMetadata::default())?;
//! assert_eq!(out.shape(), [b, s, h, d]);
//! # Ok(()) }
//! ```
//!
//! Semantics follow `torch.nn.functional.scaled_dot_product_attention`:
//! tensors are `[batch, seq, heads, head_dim]`, grouped-query attention when
//! `k`/`v` have fewer heads, a top-left causal mask, boolean, integer or
//! additive masks ([`AttnMask`]), and zeros for query rows that see no key.
//! Scores, softmax and accumulation run in `f32` for every element type.
//!
//! The backend is chosen per call ([`BackendKind`]): an explicit choice in
//! [`AttentionParams`] beats the `SDPA_BACKEND` environment variable, which
//! beats `auto`, which follows the memory: CPU kernels for host tensors, the
//! GPU kernels for tensors on a CUDA device ([`cuda`]).

mod backend;
pub mod cpu;
pub mod cuda;
mod cuda_libs;
pub mod distributed;
mod element;
mod error;
mod grad;
mod layout;
mod mask;
mod metadata;
mod params;
mod problem;
mod select;
mod storage;
mod tensor;
mod variant;
pub mod varlen;

pub use backend::{AttentionBackend, AttentionImpl, SdpaImpl};
pub use element::Element;
pub use error::{Result, SdpaError};
pub use grad::{BackwardInputs, Gradients};
pub use kernels_gen::ptx::Target;
pub use kernels_gen::{DType, VariantSpec};
pub use layout::Layout;
pub use mask::{AttnMask, CudaMaskData, KeyRuns, MaskData, MaskKind, OwnedMaskData, ResolvedMask};
pub use metadata::AttentionMetadata;
pub use params::AttentionParams;
pub use problem::Problem;
pub use sdpa_macros::sdpa_variants;
pub use select::{probe_cuda, select, BackendKind, CudaProbe, Selection, BACKEND_ENV};
pub use storage::{
    CudaData, CudaDataMut, CudaOwned, CudaRef, CudaRefMut, HostData, HostDataMut, OwnedData,
    Residence, Storage, StorageMut, TensorData,
};
pub use tensor::{Tensor, TensorView, TensorViewMut};
pub use variant::{
    CpuBackwardFn, CpuKernelFn, GpuBackward, GpuKernel, KernelFamily, Variant, VariantTable,
};
pub use varlen::{SeqBounds, SeqLens, VarLen};

/// Re-exported for the code the macro generates and for callers building
/// `f16`/`bf16` tensors.
pub use half;

/// Re-exported for callers building device tensors: the `cudarc` version
/// whose buffers [`TensorView::from_cuda`] takes.
pub use cudarc;

/// Everything a consuming crate needs: `use sdpa_runtime::prelude::*;`.
pub mod prelude {
    pub use crate::{
        sdpa_variants, AttentionBackend, AttentionImpl, AttentionMetadata, AttentionParams,
        AttnMask, BackendKind, DType, SdpaError, Tensor, TensorView, TensorViewMut, VarLen,
    };
    pub use half::{bf16, f16};
}

#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;

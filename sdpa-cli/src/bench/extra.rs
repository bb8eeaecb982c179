//! A bench case's mask or packed-batch offsets, drawn once before timing:
//! in host memory ([`HostExtra`]) and copied to the device for CUDA
//! ([`DeviceExtra`]), where a model on the GPU keeps them.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::Rng;
use sdpa_runtime::cudarc::driver::{CudaSlice, CudaStream};
use sdpa_runtime::prelude::*;
use sdpa_runtime::{AttnMask, OwnedMaskData, SdpaError, VarLen};

use super::args::Case;
use super::workload::{cu_seqlens, MaskArg, BOOL_KEEP};
use crate::error::{CliError, Result};

/// A case's mask or sequence offsets in host memory, drawn once before
/// timing.
pub(crate) struct HostExtra {
    /// The mask's elements and shape.
    mask: Option<(OwnedMaskData, Vec<usize>)>,
    /// `cu_seqlens` (the same for queries and keys) and the longest
    /// sequence.
    cu: Option<(Vec<i32>, usize)>,
}

impl HostExtra {
    /// Draws the mask of `case` from `rng` (after its tensors), or its
    /// offsets.
    pub(crate) fn new(case: &Case, rng: &mut StdRng) -> Result<HostExtra> {
        let s = &case.shape;
        let cu = match &case.varlen {
            Some(lens) => {
                let cu = cu_seqlens(lens)
                    .ok_or_else(|| CliError::Usage("--varlen packs too many tokens".into()))?;
                Some((cu, lens.iter().copied().max().unwrap_or(0)))
            }
            None => None,
        };
        let dense = s.batch * s.seq_q * s.seq_k;
        let mask = match case.mask {
            None => None,
            Some(m @ MaskArg::KeyPadding(_)) => {
                let kept = m.kept_keys(s.seq_k);
                let row = (0..s.seq_k).map(|j| j < kept);
                let data: Vec<bool> = (0..s.batch).flat_map(|_| row.clone()).collect();
                Some((OwnedMaskData::Bool(data), vec![s.batch, s.seq_k]))
            }
            Some(MaskArg::Bool) => {
                let data = (0..dense).map(|_| rng.random_bool(BOOL_KEEP)).collect();
                Some((
                    OwnedMaskData::Bool(data),
                    vec![s.batch, 1, s.seq_q, s.seq_k],
                ))
            }
            Some(MaskArg::Additive) => {
                let values = (0..dense).map(|_| rng.random_range(-2.0f32..2.0));
                let data = match case.dtype {
                    DType::F32 => OwnedMaskData::F32(values.collect()),
                    DType::F16 => OwnedMaskData::F16(values.map(f16::from_f32).collect()),
                    DType::BF16 => OwnedMaskData::BF16(values.map(bf16::from_f32).collect()),
                };
                Some((data, vec![s.batch, 1, s.seq_q, s.seq_k]))
            }
        };
        Ok(HostExtra { mask, cu })
    }

    /// The shapes of `q` and of `k`/`v`: packed `[1, T, H, D]` for
    /// `--varlen`, else the case's.
    pub(crate) fn shapes(&self, case: &Case) -> ([usize; 4], [usize; 4]) {
        let s = &case.shape;
        match &self.cu {
            Some((cu, _)) => {
                let t = cu.last().copied().unwrap_or(0) as usize;
                (
                    [1, t, s.heads_q, s.head_size],
                    [1, t, s.heads_kv, s.head_size],
                )
            }
            None => (
                [s.batch, s.seq_q, s.heads_q, s.head_size],
                [s.batch, s.seq_k, s.heads_kv, s.head_size],
            ),
        }
    }

    /// The call's metadata with the host mask or host offsets.
    pub(crate) fn metadata(&self) -> Result<AttentionMetadata<'_>> {
        let mut meta = AttentionMetadata::default();
        if let Some((data, shape)) = &self.mask {
            meta = meta.with_mask(AttnMask::new(data.as_data(), shape)?);
        }
        if let Some((cu, _)) = &self.cu {
            meta = meta.with_varlen(VarLen::new(cu, cu));
        }
        Ok(meta)
    }

    /// Copies the mask or the offsets to `stream`'s device, once.
    pub(crate) fn upload(&self, stream: &Arc<CudaStream>) -> Result<DeviceExtra> {
        let err = |e| CliError::Sdpa(SdpaError::Cuda(format!("copying the bench's mask: {e}")));
        let mask = match &self.mask {
            None => None,
            Some((data, shape)) => {
                let buf = match data {
                    OwnedMaskData::Bool(v) => DeviceMask::Bool(stream.clone_htod(v).map_err(err)?),
                    OwnedMaskData::F32(v) => DeviceMask::F32(stream.clone_htod(v).map_err(err)?),
                    OwnedMaskData::F16(v) => DeviceMask::F16(stream.clone_htod(v).map_err(err)?),
                    OwnedMaskData::BF16(v) => DeviceMask::BF16(stream.clone_htod(v).map_err(err)?),
                    _ => return Err(CliError::Usage("the bench draws no integer masks".into())),
                };
                Some((buf, shape.clone()))
            }
        };
        let cu = match &self.cu {
            None => None,
            Some((cu, longest)) => Some((stream.clone_htod(cu).map_err(err)?, *longest)),
        };
        Ok(DeviceExtra { mask, cu })
    }
}

/// A bench mask's elements on the device.
pub(crate) enum DeviceMask {
    /// `bool` elements.
    Bool(CudaSlice<bool>),
    /// `f32` bias.
    F32(CudaSlice<f32>),
    /// `f16` bias.
    F16(CudaSlice<f16>),
    /// `bf16` bias.
    BF16(CudaSlice<bf16>),
}

/// A case's mask or offsets in device memory: what a model on the GPU
/// passes (FastVideo's masks and FlashAttention's `cu_seqlens` are device
/// tensors).
pub(crate) struct DeviceExtra {
    mask: Option<(DeviceMask, Vec<usize>)>,
    cu: Option<(CudaSlice<i32>, usize)>,
}

impl DeviceExtra {
    /// The call's metadata with the device mask, or the device offsets and
    /// the longest sequence as `max_seqlen`.
    pub(crate) fn metadata(&self) -> Result<AttentionMetadata<'_>> {
        let mut meta = AttentionMetadata::default();
        if let Some((data, shape)) = &self.mask {
            let mask = match data {
                DeviceMask::Bool(b) => AttnMask::from_cuda(b, shape),
                DeviceMask::F32(b) => AttnMask::from_cuda(b, shape),
                DeviceMask::F16(b) => AttnMask::from_cuda(b, shape),
                DeviceMask::BF16(b) => AttnMask::from_cuda(b, shape),
            }?;
            meta = meta.with_mask(mask);
        }
        if let Some((cu, longest)) = &self.cu {
            meta = meta.with_varlen(VarLen::new(cu, cu).with_max_seqlen(*longest, *longest));
        }
        Ok(meta)
    }
}

//! What a bench case computes beyond its shape: a mask (`--mask`) or a
//! packed variable-length batch (`--varlen`), and the useful FLOPs that
//! its throughput counts.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::Rng;
use sdpa_runtime::cudarc::driver::{CudaSlice, CudaStream};
use sdpa_runtime::prelude::*;
use sdpa_runtime::{AttnMask, OwnedMaskData, SdpaError, VarLen};

use super::args::Case;
use crate::error::{CliError, Result};

/// The mask `--mask` asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MaskArg {
    /// `key-padding:F`: a `[B, Sk]` bool mask keeping the first
    /// `round(F · Sk)` keys of every batch entry (right padding, as a
    /// padded text batch has); throughput counts the kept keys only.
    KeyPadding(f64),
    /// `bool`: a dense `[B, 1, Sq, Sk]` bool mask keeping 90% of the keys
    /// at random.
    Bool,
    /// `additive`: a dense `[B, 1, Sq, Sk]` additive mask in q's dtype,
    /// uniform in `[-2, 2)`.
    Additive,
}

/// The share of keys a `bool` mask keeps.
pub const BOOL_KEEP: f64 = 0.9;

impl FromStr for MaskArg {
    type Err = String;

    fn from_str(text: &str) -> Result<MaskArg, String> {
        let usage = "pass key-padding:FRACTION (e.g. key-padding:0.9), bool or additive";
        match text {
            "bool" => Ok(MaskArg::Bool),
            "additive" => Ok(MaskArg::Additive),
            _ => match text.strip_prefix("key-padding:") {
                Some(f) => match f.parse::<f64>() {
                    Ok(f) if f > 0.0 && f <= 1.0 => Ok(MaskArg::KeyPadding(f)),
                    _ => Err(format!(
                        "{f:?} is not a share of keys to keep; pass a fraction in (0, 1], \
                         like key-padding:0.9"
                    )),
                },
                None => Err(format!("{text:?} is not a mask; {usage}")),
            },
        }
    }
}

impl fmt::Display for MaskArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaskArg::KeyPadding(x) => write!(f, "key-padding:{x}"),
            MaskArg::Bool => f.write_str("bool"),
            MaskArg::Additive => f.write_str("additive"),
        }
    }
}

impl MaskArg {
    /// The keys a key-padding mask keeps of `seq_k` (all for the others).
    pub fn kept_keys(&self, seq_k: usize) -> usize {
        match self {
            MaskArg::KeyPadding(f) => ((f * seq_k as f64).round() as usize).clamp(1, seq_k),
            MaskArg::Bool | MaskArg::Additive => seq_k,
        }
    }
}

/// Parses one sequence length of `--varlen 512,8192`.
pub fn parse_len(text: &str) -> Result<usize, String> {
    text.trim().parse::<usize>().map_err(|_| {
        format!("{text:?} is not a sequence length; pass token counts like 512,8192,0,4096")
    })
}

/// The useful FLOPs of a packed batch of `lens` sequences (each attending
/// within itself, `Sq = Sk = len`): `Σ 4·Hq·len²·D`, halved when causal.
pub fn varlen_flops(lens: &[usize], heads_q: usize, head_size: usize, causal: bool) -> f64 {
    let full: f64 = lens
        .iter()
        .map(|&n| 4.0 * heads_q as f64 * (n as f64) * (n as f64) * head_size as f64)
        .sum();
    if causal {
        full / 2.0
    } else {
        full
    }
}

/// `cu_seqlens` of `lens`: `[0, l0, l0 + l1, ...]`, or `None` when the
/// total does not fit an `i32`.
pub fn cu_seqlens(lens: &[usize]) -> Option<Vec<i32>> {
    let mut cu = Vec::with_capacity(lens.len() + 1);
    let mut total = 0i32;
    cu.push(0);
    for &n in lens {
        total = total.checked_add(i32::try_from(n).ok()?)?;
        cu.push(total);
    }
    Some(cu)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_parse_and_print_back() {
        for text in ["key-padding:0.9", "bool", "additive", "key-padding:1"] {
            let m: MaskArg = text.parse().unwrap();
            assert_eq!(m.to_string().parse::<MaskArg>().unwrap(), m);
        }
        for bad in [
            "key-padding:0",
            "key-padding:1.5",
            "key-padding:x",
            "dense",
            "",
        ] {
            let err = bad.parse::<MaskArg>().unwrap_err();
            assert!(err.contains("pass"), "{err}");
        }
    }

    #[test]
    fn kept_keys_round_and_stay_in_range() {
        assert_eq!(MaskArg::KeyPadding(0.9).kept_keys(32760), 29484);
        assert_eq!(MaskArg::KeyPadding(0.001).kept_keys(10), 1);
        assert_eq!(MaskArg::Bool.kept_keys(77), 77);
    }

    #[test]
    fn varlen_counts_each_sequence_alone() {
        let f = varlen_flops(&[2, 3, 0], 2, 8, false);
        assert_eq!(f, 4.0 * 2.0 * 8.0 * (4.0 + 9.0));
        assert_eq!(varlen_flops(&[2, 3], 2, 8, true), f / 2.0);
        assert_eq!(cu_seqlens(&[2, 3, 0]).unwrap(), vec![0, 2, 5, 5]);
        assert!(cu_seqlens(&[usize::MAX]).is_none());
    }
}

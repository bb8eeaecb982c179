//! What the kernels read beside the tensors: the sequence bounds
//! (`q_start`, `q_end`, `k_start`, `k_end`) and the mask, prepared for one
//! launch ([`prepare`]).
//!
//! - Packed batches: device `cu_seqlens` are passed in place (`start` the
//!   array, `end` the array plus one element); host ones are copied to the
//!   device first (`B + 1` integers).
//! - Key padding ([`crate::ResolvedMask::key_runs`]): the runs' starts and
//!   ends are copied to the device in one small buffer (`k_start` its
//!   first `B` integers, `k_end` the next `B`) and the mask is not passed.
//!   The kernels' causal rule is in local positions, so a causal call
//!   takes this path only where every run starts at key 0; otherwise the
//!   mask is read in place. Runs that see every key pass nothing at all.
//! - Anything else: no bounds, and the mask (if any) read in place
//!   ([`super::mask`]).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, SyncOnDrop};

use super::mask::{self, DeviceMask};
use crate::error::{Result, SdpaError};
use crate::problem::Problem;
use crate::storage::CudaRef;
use crate::varlen::{SeqBounds, SeqLens};

/// One side's bounds on the device.
#[derive(Debug)]
enum Side<'a> {
    /// None: whole batch entries.
    Whole,
    /// `cu_seqlens` in the caller's device memory.
    InPlace(CudaRef<'a, i32>),
    /// Host `cu_seqlens`, copied (`B + 1` integers).
    Cu(CudaSlice<i32>),
    /// Key runs, copied: `B` starts then `B` ends.
    Runs(CudaSlice<i32>, usize),
}

impl Side<'_> {
    /// The `start` and `end` addresses on `stream` (0, 0 for `Whole`) and
    /// the guard that records the kernels' read.
    fn device_ptrs<'s>(
        &'s self,
        stream: &'s CudaStream,
    ) -> Result<([u64; 2], Option<SyncOnDrop<'s>>)> {
        let cu = |(ptr, guard): (u64, SyncOnDrop<'s>)| ([ptr, ptr + 4], Some(guard));
        Ok(match self {
            Side::Whole => ([0, 0], None),
            Side::InPlace(r) => {
                if r.stream().context() != stream.context() {
                    return Err(SdpaError::Residence(format!(
                        "cu_seqlens live on CUDA device {} but the kernels run on device {}; \
                         pass them on the tensors' device",
                        r.stream().context().ordinal(),
                        stream.context().ordinal()
                    )));
                }
                cu(r.device_ptr(stream))
            }
            Side::Cu(s) => cu(s.device_ptr(stream)),
            Side::Runs(s, batch) => {
                let (ptr, guard) = s.device_ptr(stream);
                ([ptr, ptr + 4 * *batch as u64], Some(guard))
            }
        })
    }
}

/// The sequence bounds and the mask of one launch.
#[derive(Debug)]
pub(crate) struct Reads<'a> {
    q: Side<'a>,
    k: Side<'a>,
    /// The mask the kernels read, if any.
    pub(crate) mask: Option<DeviceMask<'a>>,
}

/// The device addresses of the sequence bounds (0 where absent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct BoundPtrs {
    pub(crate) q_start: u64,
    pub(crate) q_end: u64,
    pub(crate) k_start: u64,
    pub(crate) k_end: u64,
}

impl Reads<'_> {
    /// The bounds' addresses on `stream`, and the guards to drop after the
    /// launches.
    pub(crate) fn bound_ptrs<'s>(
        &'s self,
        stream: &'s CudaStream,
    ) -> Result<(BoundPtrs, [Option<SyncOnDrop<'s>>; 2])> {
        let ([q_start, q_end], gq) = self.q.device_ptrs(stream)?;
        let ([k_start, k_end], gk) = self.k.device_ptrs(stream)?;
        Ok((
            BoundPtrs {
                q_start,
                q_end,
                k_start,
                k_end,
            },
            [gq, gk],
        ))
    }

    /// Whether the keys are bounded by key-padding runs that hide some key
    /// (their `dk`, `dv` rows are then not written by the backward).
    pub(crate) fn hides_keys_by_runs(&self) -> bool {
        matches!(self.k, Side::Runs(..))
    }

    /// The mask's address on `stream` (0 for none) and its guard.
    pub(crate) fn mask_ptr<'s>(
        &'s self,
        stream: &'s CudaStream,
    ) -> Result<(u64, Option<SyncOnDrop<'s>>)> {
        Ok(match self.mask.as_ref() {
            None => (0, None),
            Some(m) => match m.device_ptr(stream)? {
                None => (0, None),
                Some((ptr, guard)) => (ptr, Some(guard)),
            },
        })
    }
}

/// Whether the CUDA launch of `p` bounds its keys by key-padding runs
/// instead of reading the mask: `p.k_seqs` holds runs, and the call is not
/// causal or every run starts at key 0.
pub(crate) fn uses_key_runs(p: &Problem<'_>, causal: bool) -> bool {
    match &p.k_seqs {
        SeqBounds::Runs(runs) => !causal || runs.all_start_at_zero(),
        _ => false,
    }
}

/// Prepares what the kernels of `p` (`causal` as the variant) read beside
/// the tensors, on `stream`: copies host bounds (and host masks) to the
/// device, takes device ones in place.
pub(crate) fn prepare<'a>(
    p: &Problem<'a>,
    causal: bool,
    stream: &Arc<CudaStream>,
) -> Result<Reads<'a>> {
    let upload = |what: &str, v: &[i32]| -> Result<CudaSlice<i32>> {
        stream.clone_htod(v).map_err(|e| {
            SdpaError::cuda(
                format_args!("copying {what} ({} bytes) to the device", v.len() * 4),
                e,
            )
        })
    };
    let packed = |what: &str, s: &SeqBounds<'a>| -> Result<Side<'a>> {
        Ok(match s {
            SeqBounds::Packed(SeqLens::Cuda(r)) => Side::InPlace(*r),
            SeqBounds::Packed(SeqLens::Host(cu)) => Side::Cu(upload(what, cu)?),
            _ => Side::Whole,
        })
    };
    let q = packed("cu_seqlens_q", &p.q_seqs)?;
    let mut k = packed("cu_seqlens_k", &p.k_seqs)?;
    let mut mask = p.mask.as_ref();
    if uses_key_runs(p, causal) {
        if let SeqBounds::Runs(runs) = &p.k_seqs {
            mask = None;
            if !runs.is_full(p.seq_k) {
                let buf = upload("the key-padding runs", &runs.starts_then_ends())?;
                k = Side::Runs(buf, runs.runs().len());
            }
        }
    }
    let mask = mask.map(|m| mask::prepare(m, stream)).transpose()?;
    Ok(Reads { q, k, mask })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::AttnMask;
    use crate::tensor::TensorView;

    #[test]
    fn causal_calls_take_runs_only_when_every_run_starts_at_zero() {
        let (q, k) = (vec![0.0f32; 2 * 3 * 8], vec![0.0f32; 2 * 4 * 8]);
        let qv = TensorView::from_slice(&q, [2, 3, 1, 8]).unwrap();
        let kv = TensorView::from_slice(&k, [2, 4, 1, 8]).unwrap();
        // Trailing padding: runs 0..3 and 0..2.
        let tail = [true, true, true, false, true, true, false, false];
        let mask = AttnMask::new(&tail[..], &[2, 4]).unwrap();
        let p = Problem::new(qv, kv, kv, Some(&mask), 1.0).unwrap();
        assert!(uses_key_runs(&p, false) && uses_key_runs(&p, true));
        // Leading padding in one entry: causal reads the mask instead.
        let lead = [false, true, true, true, true, true, false, false];
        let mask = AttnMask::new(&lead[..], &[2, 4]).unwrap();
        let p = Problem::new(qv, kv, kv, Some(&mask), 1.0).unwrap();
        assert!(uses_key_runs(&p, false));
        assert!(!uses_key_runs(&p, true));
        // No mask, no runs.
        let p = Problem::new(qv, kv, kv, None, 1.0).unwrap();
        assert!(!uses_key_runs(&p, false));
    }
}

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
    /// Key runs made on the device from a key-only device mask by the
    /// key-runs kernel ([`key_runs`]): `B` starts, `B` ends, then `B`
    /// flags saying which entries still read the mask.
    Derived(CudaSlice<i32>, usize),
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
            Side::Runs(s, batch) | Side::Derived(s, batch) => {
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
    /// The entries the mask applies to (0: all).
    pub(crate) mask_batches: u64,
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
        let mask_batches = match self.k {
            Side::Derived(_, batch) => k_end + 4 * batch as u64,
            _ => 0,
        };
        Ok((
            BoundPtrs {
                q_start,
                q_end,
                k_start,
                k_end,
                mask_batches,
            },
            [gq, gk],
        ))
    }

    /// Whether the keys are bounded by key-padding runs that hide some key
    /// (their `dk`, `dv` rows are then not written by the backward).
    pub(crate) fn hides_keys_by_runs(&self) -> bool {
        matches!(self.k, Side::Runs(..) | Side::Derived(..))
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

/// What a launch's kernels read of the contract's sequence parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reader {
    /// The forward kernels: they read `mask_batches`, so key-only device
    /// masks may run as key runs made on the device.
    Forward,
    /// The backward kernels: no `mask_batches`, so device masks are read
    /// in place as they are (runs whose entries still need the mask would
    /// shift its columns).
    Backward,
}

/// Prepares what the kernels of `p` (`causal` as the variant) read beside
/// the tensors, on `stream`: copies host bounds (and host masks) to the
/// device, takes device ones in place.
pub(crate) fn prepare<'a>(
    p: &Problem<'a>,
    causal: bool,
    reader: Reader,
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
    if let (Some(m), Some(dm)) = (p.mask.as_ref(), mask.as_ref()) {
        if reader == Reader::Forward && key_runs::applies(p, m) {
            k = key_runs::derive(p, dm, causal, stream)?;
        }
    }
    Ok(Reads { q, k, mask })
}

/// Key runs made on the device from a key-only mask in device memory:
/// the key-runs kernel (`kernels_gen::key_runs`) reads the mask in place
/// and writes each entry's run, or the whole keys and a flag where the
/// mask is not one run of plain attend/hide values.
mod key_runs {
    use std::sync::{Arc, OnceLock};

    use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
    use kernels_gen::key_runs::{generate, ENTRY, KEY_RUNS_PARAMS, SMEM_BYTES, THREADS};

    use super::super::mask::DeviceMask;
    use super::super::module_cache;
    use super::Side;
    use crate::error::{Result, SdpaError};
    use crate::mask::ResolvedMask;
    use crate::problem::Problem;
    use crate::variant::GpuKernel;
    use crate::Target;

    /// Whether `p`'s mask `m` gets device-made runs: it lives in device
    /// memory, depends on the batch entry and the key only, and `p` has
    /// whole sequences.
    pub(super) fn applies(p: &Problem<'_>, m: &ResolvedMask<'_>) -> bool {
        let [_, heads, queries] = m.dims();
        m.residence().is_cuda()
            && heads == 1
            && queries == 1
            && p.k_seqs.is_whole()
            && p.q_seqs.is_whole()
            && !m.is_empty()
            && p.batch > 0
    }

    /// The kernel, generated once per process (it depends on no variant).
    fn kernel() -> &'static GpuKernel {
        static KERNEL: OnceLock<GpuKernel> = OnceLock::new();
        KERNEL.get_or_init(|| {
            let ptx: &'static str = Box::leak(generate().into_boxed_str());
            GpuKernel::new(ptx, ENTRY, Target::Sm80, 1, THREADS, SMEM_BYTES)
        })
    }

    /// Launches the key-runs kernel on `stream` for `p`'s mask `dm`: one
    /// CTA per batch entry, into a fresh `3 · B` buffer.
    pub(super) fn derive<'a>(
        p: &Problem<'_>,
        dm: &DeviceMask<'_>,
        causal: bool,
        stream: &Arc<CudaStream>,
    ) -> Result<Side<'a>> {
        let batch = p.batch;
        let fits = |what: &str, n: usize| {
            u32::try_from(n).map_err(|_| {
                SdpaError::Shape(format!(
                    "{what} is {n}; the key-runs kernel takes at most 2^32 - 1"
                ))
            })
        };
        let n_batch = fits("the batch size", batch)?;
        let seq_k = fits("Sk", p.seq_k)?;
        let pad = fits("the mask's padding", dm.pad)?;
        let runs: CudaSlice<i32> = stream.alloc_zeros(3 * batch).map_err(|e| {
            SdpaError::cuda(
                format_args!("allocating the key runs ({} bytes)", 12 * batch),
                e,
            )
        })?;
        let Some((mask_ptr, _mask)) = dm.device_ptr(stream)? else {
            return Err(SdpaError::Mask(
                "the key-padding mask has no element".into(),
            ));
        };
        let function = module_cache::function(stream.context(), kernel())?;
        let (runs_ptr, runs_guard) = runs.device_ptr(stream);
        let kind = dm.kind.code();
        let stride_b = dm.strides[0] as u64;
        let causal = u32::from(causal);
        debug_assert_eq!(KEY_RUNS_PARAMS.len(), 8);
        let cfg = LaunchConfig {
            grid_dim: (n_batch, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: SMEM_BYTES,
        };
        let mut builder = stream.launch_builder(&function);
        builder
            .arg(&mask_ptr)
            .arg(&kind)
            .arg(&stride_b)
            .arg(&pad)
            .arg(&seq_k)
            .arg(&causal)
            .arg(&runs_ptr)
            .arg(&n_batch);
        // SAFETY: the arguments are the kernel's `KEY_RUNS_PARAMS`, in their
        // order and types (u64 pointer, u32, u64, u32, u32, u32, u64
        // pointer, u32). The mask is device memory of `stream`'s context
        // (checked by `device_ptr`) holding, for each entry `b < B` (or the
        // one broadcast row, stride 0), `Sk - pad` elements of its kind at
        // `b · stride_b` (the resolved mask's shape, checked when it was
        // made); the kernel reads keys `pad..Sk` of row `b` only. `runs`
        // holds `3 · B` i32 and the kernel writes entries `b`, `B + b`,
        // `2B + b` of CTA `b < B` only. The guards record the use on
        // `stream`, which orders the attention kernels after it.
        unsafe { builder.launch(cfg) }.map_err(|e| {
            SdpaError::cuda(
                format_args!("launching the key-runs kernel for {batch} entries"),
                e,
            )
        })?;
        drop(runs_guard);
        Ok(Side::Derived(runs, batch))
    }
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

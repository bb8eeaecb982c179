//! Variable-length batches, as FlashAttention's `varlen` functions take
//! them: the sequences of a batch concatenated along the token dimension
//! of one packed tensor, and `cu_seqlens` (cumulative sequence lengths)
//! saying where each starts.
//!
//! - `q`, `out` (and the backward's `dout`, `dq`) are `[1, Tq, Hq, D]`;
//!   `k`, `v` (and `dk`, `dv`) are `[1, Tk, Hkv, D]`; the row log-sum-exp
//!   is `[1, Hq, Tq, 1]`.
//! - `cu_seqlens_q` and `cu_seqlens_k` hold `B + 1` offsets each:
//!   sequence `b` is query tokens `cu_seqlens_q[b]..cu_seqlens_q[b + 1]`
//!   and key tokens `cu_seqlens_k[b]..cu_seqlens_k[b + 1]`.
//! - Every rule (causal top-left, rows that see no key) holds within each
//!   sequence, in its local positions; an empty sequence is allowed.
//!
//! Offsets in host memory are checked ([`SeqBounds`]'s rules: they start
//! at 0, never decrease and end at the token count). Offsets in device
//! memory are checked for their length only: reading them would wait for
//! the device; the kernels clamp every sequence to the tensor's tokens and
//! to the bound, so wrong offsets give wrong sequences, never a read or a
//! write outside the tensors.
//!
//! ```
//! use sdpa_runtime::{AttentionMetadata, VarLen};
//! // Three sequences of 5, 0 and 3 tokens, packed into 8.
//! let cu = [0, 5, 5, 8];
//! let meta = AttentionMetadata::new(0).with_varlen(VarLen::new(&cu[..], &cu[..]));
//! assert_eq!(meta.varlen.unwrap().batch(), 3);
//! ```

use std::ops::Range;

use cudarc::driver::{CudaSlice, CudaView};

use crate::error::{Result, SdpaError};
use crate::mask::KeyRuns;
use crate::storage::{on_device, CudaRef, Residence};

/// Cumulative sequence lengths (`B + 1` offsets, `i32`), in host or device
/// memory.
#[derive(Clone, Copy, Debug)]
pub enum SeqLens<'a> {
    /// Host memory: checked before the call.
    Host(&'a [i32]),
    /// Device memory: checked for its length only (the kernels clamp).
    Cuda(CudaRef<'a, i32>),
}

impl<'a> From<&'a [i32]> for SeqLens<'a> {
    fn from(s: &'a [i32]) -> Self {
        SeqLens::Host(s)
    }
}

impl<'a> From<&'a Vec<i32>> for SeqLens<'a> {
    fn from(s: &'a Vec<i32>) -> Self {
        SeqLens::Host(s)
    }
}

impl<'a, const N: usize> From<&'a [i32; N]> for SeqLens<'a> {
    fn from(s: &'a [i32; N]) -> Self {
        SeqLens::Host(s)
    }
}

impl<'a> From<CudaRef<'a, i32>> for SeqLens<'a> {
    fn from(s: CudaRef<'a, i32>) -> Self {
        SeqLens::Cuda(s)
    }
}

impl<'a> From<&'a CudaSlice<i32>> for SeqLens<'a> {
    fn from(s: &'a CudaSlice<i32>) -> Self {
        SeqLens::Cuda(s.into())
    }
}

impl<'a> From<&'a CudaView<'a, i32>> for SeqLens<'a> {
    fn from(s: &'a CudaView<'a, i32>) -> Self {
        SeqLens::Cuda(s.into())
    }
}

impl<'a> SeqLens<'a> {
    /// The number of offsets (`B + 1`).
    pub fn len(&self) -> usize {
        match self {
            SeqLens::Host(s) => s.len(),
            SeqLens::Cuda(s) => s.len(),
        }
    }

    /// Whether there is no offset at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The offsets, where they are in host memory.
    pub fn host(&self) -> Option<&'a [i32]> {
        match *self {
            SeqLens::Host(s) => Some(s),
            SeqLens::Cuda(_) => None,
        }
    }

    /// Where the offsets live.
    pub fn residence(&self) -> Residence {
        match self {
            SeqLens::Host(_) => Residence::Host,
            SeqLens::Cuda(s) => on_device(s.stream()),
        }
    }
}

/// A variable-length batch: the cumulative sequence lengths of both sides
/// and, optionally, the longest sequence of each (FlashAttention's
/// `max_seqlen_q` / `max_seqlen_k`), which bounds the kernels' grid.
#[derive(Clone, Copy, Debug)]
pub struct VarLen<'a> {
    /// `B + 1` query offsets into `q`'s token dimension.
    pub cu_seqlens_q: SeqLens<'a>,
    /// `B + 1` key offsets into `k`'s and `v`'s token dimension.
    pub cu_seqlens_k: SeqLens<'a>,
    /// The most query tokens a sequence has; computed from host offsets
    /// when `None`, else the token count `Tq`.
    pub max_seqlen_q: Option<usize>,
    /// The most key tokens a sequence has; as `max_seqlen_q`.
    pub max_seqlen_k: Option<usize>,
}

impl<'a> VarLen<'a> {
    /// A variable-length batch over `cu_q` and `cu_k` (host slices or
    /// device buffers of `i32`), without maximum lengths.
    pub fn new(cu_q: impl Into<SeqLens<'a>>, cu_k: impl Into<SeqLens<'a>>) -> Self {
        VarLen {
            cu_seqlens_q: cu_q.into(),
            cu_seqlens_k: cu_k.into(),
            max_seqlen_q: None,
            max_seqlen_k: None,
        }
    }

    /// Sets the longest sequence of each side. Pass it with device
    /// offsets: without it each sequence is bounded by the token count, so
    /// the grid covers `B · Tq` rows and the GPU backward's scratch holds
    /// `B · Hq · Tq · D` floats. A sequence longer than its maximum is an
    /// error with host offsets and cut to it with device offsets (its
    /// tokens past the maximum are then not written).
    pub fn with_max_seqlen(mut self, max_seqlen_q: usize, max_seqlen_k: usize) -> Self {
        self.max_seqlen_q = Some(max_seqlen_q);
        self.max_seqlen_k = Some(max_seqlen_k);
        self
    }

    /// The number of sequences, `B` (one less than the offsets; 0 for
    /// none).
    pub fn batch(&self) -> usize {
        self.cu_seqlens_q.len().saturating_sub(1)
    }
}

/// Which tokens of a tensor are batch entry `b`'s sequence, on one side
/// (queries or keys): the launch contract's sequence bounds
/// (`kernels_gen::attention::seqs`).
#[derive(Clone, Debug)]
pub enum SeqBounds<'a> {
    /// Entry `b` is all tokens `[0, S)` of batch `b` of a `[B, S, H, D]`
    /// tensor.
    Whole,
    /// Packed sequences: entry `b` is tokens `cu[b]..cu[b + 1]` of a
    /// `[1, T, H, D]` tensor.
    Packed(SeqLens<'a>),
    /// Key-padding runs (keys only): entry `b` sees keys
    /// `runs[b].start..runs[b].end` of batch `b` of a `[B, Sk, H, D]`
    /// tensor, read from a mask that depends on the batch and the key only
    /// ([`crate::ResolvedMask::key_runs`]); the problem keeps that mask too,
    /// and a backend uses one or the other.
    Runs(KeyRuns),
}

impl SeqBounds<'_> {
    /// Whether this is [`SeqBounds::Whole`].
    pub fn is_whole(&self) -> bool {
        matches!(self, SeqBounds::Whole)
    }

    /// Entry `b`'s tokens where the host knows them (`None` for offsets in
    /// device memory), under the kernels' clamping rule: the start within
    /// `[0, tokens]`, the end within `[start, tokens]`, at most `bound`
    /// tokens. For `Whole` that is `0..bound`.
    pub fn range(&self, b: usize, tokens: usize, bound: usize) -> Option<Range<usize>> {
        let clamp = |start: i64, end: i64| {
            let start = start.clamp(0, tokens as i64) as usize;
            let end = (end.clamp(start as i64, tokens as i64) as usize).min(start + bound);
            start..end
        };
        match self {
            SeqBounds::Whole => Some(0..bound),
            SeqBounds::Packed(SeqLens::Host(cu)) => {
                Some(clamp(i64::from(cu[b]), i64::from(cu[b + 1])))
            }
            SeqBounds::Packed(SeqLens::Cuda(_)) => None,
            SeqBounds::Runs(runs) => {
                let r = &runs.runs()[b];
                Some(clamp(r.start as i64, r.end as i64))
            }
        }
    }
}

/// The sizes a checked variable-length batch gives a problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Packed {
    /// `B`: the number of sequences.
    pub batch: usize,
    /// The grid's bound on query rows per sequence.
    pub seq_q: usize,
    /// The bound on keys per sequence.
    pub seq_k: usize,
}

/// Checks a variable-length batch against `q`'s and `k`'s shapes and where
/// `q` lives (`has_mask`: whether the call also has an `attn_mask`, which
/// is refused).
pub(crate) fn check(
    v: &VarLen<'_>,
    q_shape: [usize; 4],
    k_shape: [usize; 4],
    q_residence: Residence,
    has_mask: bool,
) -> Result<Packed> {
    if has_mask {
        return Err(SdpaError::Mask(
            "a variable-length batch (cu_seqlens) cannot take an attn_mask; drop the mask and \
             leave hidden keys out of the sequences in cu_seqlens_k, or pass padded \
             [B, S, H, D] tensors with the mask and no varlen"
                .into(),
        ));
    }
    for (name, shape, dims) in [("q", q_shape, "Tq, Hq"), ("k", k_shape, "Tk, Hkv")] {
        if shape[0] != 1 {
            return Err(SdpaError::Shape(format!(
                "with a variable-length batch (cu_seqlens), {name} has shape {shape:?}; pass \
                 packed tensors [1, {dims}, D] (batch dimension 1, the sequences concatenated \
                 along dimension 1)"
            )));
        }
    }
    let (nq, nk) = (v.cu_seqlens_q.len(), v.cu_seqlens_k.len());
    if nq == 0 {
        return Err(SdpaError::Shape(
            "cu_seqlens_q is empty; pass B + 1 offsets starting at 0 (at least [0])".into(),
        ));
    }
    if nq != nk {
        return Err(SdpaError::Shape(format!(
            "cu_seqlens_q has {nq} offsets but cu_seqlens_k has {nk}; both hold B + 1 offsets \
             for the same number of sequences B"
        )));
    }
    let seq_q = side(
        "q",
        &v.cu_seqlens_q,
        v.max_seqlen_q,
        q_shape[1],
        q_residence,
    )?;
    let seq_k = side(
        "k",
        &v.cu_seqlens_k,
        v.max_seqlen_k,
        k_shape[1],
        q_residence,
    )?;
    Ok(Packed {
        batch: nq - 1,
        seq_q,
        seq_k,
    })
}

/// Checks one side's offsets; returns its bound on tokens per sequence.
fn side(
    name: &str,
    cu: &SeqLens<'_>,
    max: Option<usize>,
    tokens: usize,
    q_residence: Residence,
) -> Result<usize> {
    if tokens > i32::MAX as usize {
        return Err(SdpaError::Shape(format!(
            "{name} has {tokens} tokens; cu_seqlens are i32, so a packed tensor holds at most \
             {} tokens: split the batch",
            i32::MAX
        )));
    }
    let cap = |m: usize| m.min(tokens);
    match cu {
        SeqLens::Host(cu) => {
            if cu[0] != 0 {
                return Err(SdpaError::Shape(format!(
                    "cu_seqlens_{name} starts at {}; the offsets must start at 0",
                    cu[0]
                )));
            }
            let mut longest = 0usize;
            for (b, w) in cu.windows(2).enumerate() {
                if w[1] < w[0] {
                    return Err(SdpaError::Shape(format!(
                        "cu_seqlens_{name} decreases from {} to {} at sequence {b}; the offsets \
                         must never decrease (each is the previous one plus a length >= 0)",
                        w[0], w[1]
                    )));
                }
                longest = longest.max((w[1] - w[0]) as usize);
            }
            let last = cu[cu.len() - 1];
            if last as usize != tokens || last < 0 {
                return Err(SdpaError::Shape(format!(
                    "cu_seqlens_{name} ends at {last} but {name} has {tokens} tokens \
                     (dimension 1); the last offset must be the token count"
                )));
            }
            match max {
                Some(m) if m < longest => Err(SdpaError::Shape(format!(
                    "max_seqlen_{name} is {m} but a sequence of cu_seqlens_{name} has {longest} \
                     tokens; pass at least {longest}, or no maximum to compute it"
                ))),
                Some(m) => Ok(cap(m)),
                None => Ok(longest),
            }
        }
        SeqLens::Cuda(_) => {
            let here = cu.residence();
            if here != q_residence {
                return Err(SdpaError::Residence(format!(
                    "cu_seqlens_{name} lives in {here} but q lives in {q_residence}; pass \
                     device offsets on q's device (or host offsets)"
                )));
            }
            Ok(max.map_or(tokens, cap))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_host(cu_q: &[i32], cu_k: &[i32], tq: usize, tk: usize) -> Result<Packed> {
        check(
            &VarLen::new(cu_q, cu_k),
            [1, tq, 2, 8],
            [1, tk, 1, 8],
            Residence::Host,
            false,
        )
    }

    #[test]
    fn host_offsets_give_the_batch_and_the_longest_sequences() {
        let p = check_host(&[0, 5, 5, 8], &[0, 2, 9, 9], 8, 9).unwrap();
        assert_eq!(
            p,
            Packed {
                batch: 3,
                seq_q: 5,
                seq_k: 7
            }
        );
        // A maximum at least the longest is kept (capped at the tokens).
        let v = VarLen::new(&[0, 5, 5, 8], &[0, 2, 9, 9]).with_max_seqlen(6, 100);
        let p = check(&v, [1, 8, 2, 8], [1, 9, 1, 8], Residence::Host, false).unwrap();
        assert_eq!((p.seq_q, p.seq_k), (6, 9));
        // No sequence at all.
        let p = check_host(&[0], &[0], 0, 0).unwrap();
        assert_eq!((p.batch, p.seq_q, p.seq_k), (0, 0, 0));
    }

    #[test]
    fn bad_host_offsets_say_what_to_change() {
        let err = |r: Result<Packed>| r.unwrap_err().to_string();
        let e = err(check_host(&[1, 5], &[0, 5], 5, 5));
        assert!(
            e.contains("cu_seqlens_q starts at 1; the offsets must start at 0"),
            "{e}"
        );
        let e = err(check_host(&[0, 5, 3, 8], &[0, 1, 2, 3], 8, 3));
        assert!(
            e.contains("cu_seqlens_q decreases from 5 to 3 at sequence 1"),
            "{e}"
        );
        let e = err(check_host(&[0, 5], &[0, 4], 5, 5));
        assert!(
            e.contains("cu_seqlens_k ends at 4 but k has 5 tokens"),
            "{e}"
        );
        let e = err(check_host(&[0, 5, 8], &[0, 8], 8, 8));
        assert!(
            e.contains("cu_seqlens_q has 3 offsets but cu_seqlens_k has 2"),
            "{e}"
        );
        let e = err(check_host(&[], &[], 0, 0));
        assert!(e.contains("cu_seqlens_q is empty"), "{e}");
        let v = VarLen::new(&[0, 5, 8], &[0, 4, 8]).with_max_seqlen(4, 4);
        let e = err(check(
            &v,
            [1, 8, 2, 8],
            [1, 8, 1, 8],
            Residence::Host,
            false,
        ));
        assert!(e.contains("max_seqlen_q is 4 but a sequence"), "{e}");
        assert!(e.contains("pass at least 5"), "{e}");
    }

    #[test]
    fn packed_tensors_and_no_mask_are_required() {
        let v = VarLen::new(&[0, 4], &[0, 4]);
        let e = check(&v, [2, 4, 2, 8], [1, 4, 1, 8], Residence::Host, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("pass packed tensors [1, Tq, Hq, D]"), "{e}");
        let e = check(&v, [1, 4, 2, 8], [2, 4, 1, 8], Residence::Host, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("k has shape [2, 4, 1, 8]"), "{e}");
        let e = check(&v, [1, 4, 2, 8], [1, 4, 1, 8], Residence::Host, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot take an attn_mask"), "{e}");
    }

    #[test]
    fn ranges_follow_the_kernels_clamping() {
        let cu = [0, 3, 3, 9];
        let s = SeqBounds::Packed(SeqLens::Host(&cu));
        assert_eq!(s.range(0, 9, 6), Some(0..3));
        assert_eq!(s.range(1, 9, 6), Some(3..3));
        // Longer than the bound: cut to it.
        assert_eq!(s.range(2, 9, 4), Some(3..7));
        assert_eq!(SeqBounds::Whole.range(5, 9, 4), Some(0..4));
        let wild = [-4, 20];
        let s = SeqBounds::Packed(SeqLens::Host(&wild));
        assert_eq!(s.range(0, 9, 100), Some(0..9));
    }
}

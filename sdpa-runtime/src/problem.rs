//! One attention call, checked: the tensors, their sizes, the resolved mask
//! and the scale. Kernels receive only problems that passed these checks.

use crate::error::{Result, SdpaError};
use crate::mask::{AttnMask, ResolvedMask};
use crate::select::Residence;
use crate::tensor::{TensorView, TensorViewMut};
use crate::varlen::{self, SeqBounds, SeqLens, VarLen};
use crate::DType;

/// A checked attention call. Built by [`crate::SdpaImpl`]; kernels read it.
///
/// Batch entry `b` is one sequence of queries and one of keys
/// ([`Problem::q_seqs`], [`Problem::k_seqs`]): for `[B, S, H, D]` tensors
/// batch `b` itself, for a variable-length batch ([`VarLen`]) the packed
/// tokens its `cu_seqlens` give, and for a key-padding mask
/// ([`ResolvedMask::key_runs`]) also the run of keys batch `b` sees.
#[derive(Clone, Debug)]
pub struct Problem<'a> {
    /// Queries `[B, Sq, Hq, D]`, or `[1, Tq, Hq, D]` packed.
    pub q: TensorView<'a>,
    /// Keys `[B, Sk, Hkv, D]`, or `[1, Tk, Hkv, D]` packed.
    pub k: TensorView<'a>,
    /// Values, shaped as `k`.
    pub v: TensorView<'a>,
    /// The mask, resolved against the sizes below (never with a packed
    /// batch).
    pub mask: Option<ResolvedMask<'a>>,
    /// Multiplies `q·kᵀ`.
    pub scale: f32,
    /// `B`: the tensors' batch size, or the number of packed sequences.
    pub batch: usize,
    /// `Sq`: the most query rows a sequence has (the tensors' `Sq`, or the
    /// packed batch's bound: `max_seqlen_q`, the longest host sequence, or
    /// `Tq`). The GPU grid and scratch buffers are sized by it.
    pub seq_q: usize,
    /// `Sk`: the most keys a sequence has, as `seq_q`.
    pub seq_k: usize,
    /// The query tensor's token count (dimension 1: `Sq`, or `Tq` packed).
    pub tokens_q: usize,
    /// The key tensor's token count (dimension 1: `Sk`, or `Tk` packed).
    pub tokens_k: usize,
    /// Which query tokens each batch entry has: [`SeqBounds::Whole`] or
    /// [`SeqBounds::Packed`].
    pub q_seqs: SeqBounds<'a>,
    /// Which keys each batch entry has: [`SeqBounds::Whole`],
    /// [`SeqBounds::Packed`], or [`SeqBounds::Runs`] where the mask is key
    /// padding (`mask` is then still set: a backend uses either).
    pub k_seqs: SeqBounds<'a>,
    /// `Hq`.
    pub heads_q: usize,
    /// `Hkv`; divides `Hq`.
    pub heads_kv: usize,
    /// `D`.
    pub head_size: usize,
}

impl<'a> Problem<'a> {
    /// Checks `q`, `k`, `v` and the mask against each other.
    pub fn new(
        q: TensorView<'a>,
        k: TensorView<'a>,
        v: TensorView<'a>,
        mask: Option<&AttnMask<'a>>,
        scale: f32,
    ) -> Result<Problem<'a>> {
        Self::with_varlen(q, k, v, mask, None, scale)
    }

    /// [`Problem::new`] for a variable-length batch too: with `varlen`,
    /// `q` and `k` are packed (`[1, T, H, D]`), the offsets are checked
    /// ([`crate::varlen`]) and a mask is refused.
    pub fn with_varlen(
        q: TensorView<'a>,
        k: TensorView<'a>,
        v: TensorView<'a>,
        mask: Option<&AttnMask<'a>>,
        varlen: Option<&VarLen<'a>>,
        scale: f32,
    ) -> Result<Problem<'a>> {
        let dtype = q.dtype();
        for (name, t) in [("k", &k), ("v", &v)] {
            if t.dtype() != dtype {
                return Err(SdpaError::DtypeMismatch {
                    tensor: name,
                    expected: dtype,
                    found: t.dtype(),
                });
            }
            if t.residence() != q.residence() {
                return Err(elsewhere(name, t.residence(), q.residence()));
            }
        }
        let [b, sq, hq, d] = q.layout().shape();
        let [bk, sk, hkv, dk] = k.layout().shape();
        if v.layout().shape() != k.layout().shape() {
            return Err(SdpaError::Shape(format!(
                "k has shape {:?} but v has shape {:?}; k and v must have the same [B, Sk, Hkv, D]",
                k.layout().shape(),
                v.layout().shape()
            )));
        }
        if bk != b || dk != d {
            return Err(SdpaError::Shape(format!(
                "q has shape {:?} and k has shape {:?}; their batch (dim 0) and head size \
                 (dim 3) must match",
                q.layout().shape(),
                k.layout().shape()
            )));
        }
        if hkv == 0 || !hq.is_multiple_of(hkv) {
            return Err(SdpaError::Shape(format!(
                "q has {hq} heads and k/v have {hkv}; the number of query heads must be a \
                 multiple of the number of key/value heads (GQA/MQA)"
            )));
        }
        if !scale.is_finite() {
            return Err(SdpaError::Param(format!(
                "softmax scale {scale} is not finite; pass a finite scale or none for 1/sqrt(D)"
            )));
        }
        if let Some(vl) = varlen {
            let packed = varlen::check(
                vl,
                q.layout().shape(),
                k.layout().shape(),
                q.residence(),
                mask.is_some(),
            )?;
            return Ok(Problem {
                q,
                k,
                v,
                mask: None,
                scale,
                batch: packed.batch,
                seq_q: packed.seq_q,
                seq_k: packed.seq_k,
                tokens_q: sq,
                tokens_k: sk,
                q_seqs: SeqBounds::Packed(vl.cu_seqlens_q),
                k_seqs: SeqBounds::Packed(vl.cu_seqlens_k),
                heads_q: hq,
                heads_kv: hkv,
                head_size: d,
            });
        }
        let mask = mask.map(|m| m.resolve(b, hq, sq, sk)).transpose()?;
        if let Some(m) = &mask {
            let here = m.residence();
            if here.is_cuda() && here != q.residence() {
                return Err(SdpaError::Residence(format!(
                    "the mask lives in {here} but q lives in {}; pass a device mask on q's \
                     device, or a host mask",
                    q.residence()
                )));
            }
        }
        let k_seqs = match mask.as_ref().and_then(|m| m.key_runs()) {
            Some(runs) => SeqBounds::Runs(runs),
            None => SeqBounds::Whole,
        };
        Ok(Problem {
            q,
            k,
            v,
            mask,
            scale,
            batch: b,
            seq_q: sq,
            seq_k: sk,
            tokens_q: sq,
            tokens_k: sk,
            q_seqs: SeqBounds::Whole,
            k_seqs,
            heads_q: hq,
            heads_kv: hkv,
            head_size: d,
        })
    }

    /// Whether the batch is packed ([`VarLen`]).
    pub fn is_packed(&self) -> bool {
        matches!(self.q_seqs, SeqBounds::Packed(_))
    }

    /// Whether some sequence bound lives in device memory (device
    /// `cu_seqlens`).
    pub fn has_device_seqlens(&self) -> bool {
        [&self.q_seqs, &self.k_seqs]
            .iter()
            .any(|s| matches!(s, SeqBounds::Packed(SeqLens::Cuda(_))))
    }

    /// Checks that the CPU backend can run this problem: host masks only.
    pub fn check_cpu(&self) -> Result<()> {
        if let Some(m) = &self.mask {
            if m.residence().is_cuda() {
                return Err(SdpaError::Residence(format!(
                    "the mask lives in {} but the CPU backend runs this call; pass a host \
                     mask (AttnMask::new), or CUDA tensors and the cuda or auto backend",
                    m.residence()
                )));
            }
        }
        Ok(())
    }

    /// The element type of every tensor.
    pub fn dtype(&self) -> DType {
        self.q.dtype()
    }

    /// The output shape: `q`'s, `[B, Sq, Hq, D]` or `[1, Tq, Hq, D]`
    /// packed.
    pub fn out_shape(&self) -> [usize; 4] {
        self.q.layout().shape()
    }

    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.heads_q / self.heads_kv
    }

    /// Where the tensors live (all in one place: [`Problem::new`] checks it).
    pub fn residence(&self) -> Residence {
        self.q.residence()
    }

    /// Checks that `out` can take this problem's output.
    pub fn check_output(&self, out: &TensorViewMut<'_>) -> Result<()> {
        if out.residence() != self.residence() {
            return Err(elsewhere("out", out.residence(), self.residence()));
        }
        if out.dtype() != self.dtype() {
            return Err(SdpaError::DtypeMismatch {
                tensor: "out",
                expected: self.dtype(),
                found: out.dtype(),
            });
        }
        if out.layout().shape() != self.out_shape() {
            return Err(SdpaError::Shape(format!(
                "the output has shape {:?} but the result has shape {:?} ([B, Sq, Hq, D] of q)",
                out.layout().shape(),
                self.out_shape()
            )));
        }
        Ok(())
    }
}

impl Problem<'_> {
    /// The shape of the row log-sum-exp, `[B, Hq, Sq, 1]` (`[B, Hq, Sq]`
    /// with a unit head dimension, so that it is a tensor like the others),
    /// or `[1, Hq, Tq, 1]` packed (row `t` is query token `t`).
    pub fn lse_shape(&self) -> [usize; 4] {
        [self.q.layout().shape()[0], self.heads_q, self.tokens_q, 1]
    }

    /// Checks that `lse` can take this problem's row log-sum-exp: `f32`,
    /// [`Problem::lse_shape`], in the same place as `q`.
    pub fn check_lse(&self, lse: &TensorViewMut<'_>) -> Result<()> {
        self.check_lse_parts(
            lse.residence(),
            lse.dtype(),
            lse.layout().shape(),
            "lse buffer",
        )
    }

    /// Checks a read-only `lse` (the backward's input) as
    /// [`Problem::check_lse`] does.
    pub fn check_lse_input(&self, lse: &TensorView<'_>) -> Result<()> {
        self.check_lse_parts(lse.residence(), lse.dtype(), lse.layout().shape(), "lse")
    }

    fn check_lse_parts(
        &self,
        residence: Residence,
        dtype: DType,
        shape: [usize; 4],
        what: &str,
    ) -> Result<()> {
        if residence != self.residence() {
            return Err(SdpaError::Residence(format!(
                "the {what} lives in {residence} but q lives in {}; pass an f32 {:?} lse \
                 where q lives ({})",
                self.residence(),
                self.lse_shape(),
                if self.residence().is_cuda() {
                    "device memory of q's device"
                } else {
                    "host memory"
                }
            )));
        }
        if dtype != DType::F32 {
            return Err(SdpaError::Lse(format!(
                "the {what} has dtype {dtype}; the log-sum-exp is always f32 whatever q's \
                 dtype: pass an f32 buffer of shape {:?}",
                self.lse_shape()
            )));
        }
        if shape != self.lse_shape() {
            return Err(SdpaError::Lse(format!(
                "the {what} has shape {shape:?} but the log-sum-exp has shape {:?} \
                 ([B, Hq, Sq, 1] of q; [1, Hq, Tq, 1] for a packed batch)",
                self.lse_shape()
            )));
        }
        Ok(())
    }
}

/// The error for a tensor that lives somewhere other than `q`.
fn elsewhere(name: &str, found: Residence, q: Residence) -> SdpaError {
    SdpaError::Residence(format!(
        "{name} lives in {found} but q lives in {q}; pass q, k, v and out in one place \
         (all in host memory or all on one CUDA device)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::varlen::VarLen;

    fn views<'a>(
        q: &'a [f32],
        k: &'a [f32],
        sq: [usize; 4],
        sk: [usize; 4],
    ) -> [TensorView<'a>; 2] {
        [
            TensorView::from_slice(q, sq).unwrap(),
            TensorView::from_slice(k, sk).unwrap(),
        ]
    }

    #[test]
    fn a_packed_problem_has_sequences_bounds_and_packed_shapes() {
        let (q, k) = (vec![0.0; 8 * 2 * 8], vec![0.0; 6 * 8]);
        let [qv, kv] = views(&q, &k, [1, 8, 2, 8], [1, 6, 1, 8]);
        let (cu_q, cu_k) = ([0, 5, 5, 8], [0, 1, 4, 6]);
        let vl = VarLen::new(&cu_q, &cu_k);
        let p = Problem::with_varlen(qv, kv, kv, None, Some(&vl), 1.0).unwrap();
        assert!(p.is_packed() && !p.has_device_seqlens());
        assert_eq!((p.batch, p.seq_q, p.seq_k), (3, 5, 3));
        assert_eq!((p.tokens_q, p.tokens_k), (8, 6));
        assert_eq!(p.out_shape(), [1, 8, 2, 8]);
        assert_eq!(p.lse_shape(), [1, 2, 8, 1]);
        assert_eq!(p.q_seqs.range(2, p.tokens_q, p.seq_q), Some(5..8));
        assert_eq!(p.k_seqs.range(0, p.tokens_k, p.seq_k), Some(0..1));
        // Host offsets run on the CPU.
        assert!(p.check_cpu().is_ok());
        // A mask with it is refused.
        let m = [true; 6];
        let mask = AttnMask::new(&m[..], &[1, 6]).unwrap();
        let err = Problem::with_varlen(qv, kv, kv, Some(&mask), Some(&vl), 1.0).unwrap_err();
        assert!(
            err.to_string().contains("cannot take an attn_mask"),
            "{err}"
        );
    }

    #[test]
    fn key_padding_masks_bound_the_keys_by_runs() {
        let (q, k) = (vec![0.0; 2 * 3 * 8], vec![0.0; 2 * 4 * 8]);
        let [qv, kv] = views(&q, &k, [2, 3, 1, 8], [2, 4, 1, 8]);
        let m = [true, true, true, false, false, true, true, false];
        let mask = AttnMask::new(&m[..], &[2, 4]).unwrap();
        let p = Problem::new(qv, kv, kv, Some(&mask), 1.0).unwrap();
        let SeqBounds::Runs(runs) = &p.k_seqs else {
            panic!("no runs: {:?}", p.k_seqs)
        };
        assert_eq!(runs.runs(), [0..3, 1..3]);
        assert!(p.mask.is_some() && p.q_seqs.is_whole());
        assert_eq!(p.k_seqs.range(1, 4, 4), Some(1..3));
        assert!(p.check_cpu().is_ok());
        // A mask over queries: no runs.
        let m = [true; 2 * 3 * 4];
        let mask = AttnMask::new(&m[..], &[2, 3, 4]).unwrap();
        let p = Problem::new(qv, kv, kv, Some(&mask), 1.0).unwrap();
        assert!(p.k_seqs.is_whole());
    }
}

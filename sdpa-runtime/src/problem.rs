//! One attention call, checked: the tensors, their sizes, the resolved mask
//! and the scale. Kernels receive only problems that passed these checks.

use crate::error::{Result, SdpaError};
use crate::mask::{AttnMask, ResolvedMask};
use crate::select::Residence;
use crate::tensor::{TensorView, TensorViewMut};
use crate::DType;

/// A checked attention call. Built by [`crate::SdpaImpl`]; kernels read it.
#[derive(Clone, Copy, Debug)]
pub struct Problem<'a> {
    /// Queries `[B, Sq, Hq, D]`.
    pub q: TensorView<'a>,
    /// Keys `[B, Sk, Hkv, D]`.
    pub k: TensorView<'a>,
    /// Values `[B, Sk, Hkv, D]`.
    pub v: TensorView<'a>,
    /// The mask, resolved against the sizes below.
    pub mask: Option<ResolvedMask<'a>>,
    /// Multiplies `q·kᵀ`.
    pub scale: f32,
    /// `B`.
    pub batch: usize,
    /// `Sq`.
    pub seq_q: usize,
    /// `Sk`.
    pub seq_k: usize,
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
        let mask = mask.map(|m| m.resolve(b, hq, sq, sk)).transpose()?;
        Ok(Problem {
            q,
            k,
            v,
            mask,
            scale,
            batch: b,
            seq_q: sq,
            seq_k: sk,
            heads_q: hq,
            heads_kv: hkv,
            head_size: d,
        })
    }

    /// The element type of every tensor.
    pub fn dtype(&self) -> DType {
        self.q.dtype()
    }

    /// The output shape `[B, Sq, Hq, D]`.
    pub fn out_shape(&self) -> [usize; 4] {
        [self.batch, self.seq_q, self.heads_q, self.head_size]
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
    /// with a unit head dimension, so that it is a tensor like the others).
    pub fn lse_shape(&self) -> [usize; 4] {
        [self.batch, self.heads_q, self.seq_q, 1]
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
                 ([B, Hq, Sq, 1] of q)",
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

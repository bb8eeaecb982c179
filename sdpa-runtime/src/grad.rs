//! The backward pass's extra inputs (the forward's output, its gradient and
//! the row log-sum-exp) and its outputs (the gradients of q, k and v), and
//! the checks that tie them to a [`Problem`].

use crate::error::{Result, SdpaError};
use crate::problem::Problem;
use crate::tensor::{TensorView, TensorViewMut};

/// What the backward pass reads besides q, k and v.
#[derive(Clone, Copy, Debug)]
pub struct BackwardInputs<'a> {
    /// The forward's output, `[B, Sq, Hq, D]`, q's dtype.
    pub out: TensorView<'a>,
    /// The gradient of the loss with respect to `out`, `[B, Sq, Hq, D]`,
    /// q's dtype.
    pub dout: TensorView<'a>,
    /// The forward's row log-sum-exp, `[B, Hq, Sq, 1]`, `f32`.
    pub lse: TensorView<'a>,
}

/// Where the backward pass writes: the gradients of q, k and v, each in
/// the shape and dtype of the tensor it is the gradient of (any
/// non-overlapping strides, the head dimension contiguous).
#[derive(Debug)]
pub struct Gradients<'a> {
    /// `[B, Sq, Hq, D]`.
    pub dq: TensorViewMut<'a>,
    /// `[B, Sk, Hkv, D]`, summed over each key/value head's query heads.
    pub dk: TensorViewMut<'a>,
    /// `[B, Sk, Hkv, D]`, summed likewise.
    pub dv: TensorViewMut<'a>,
}

impl Problem<'_> {
    /// Checks the backward's inputs and outputs against this problem:
    /// shapes, dtypes and where they live.
    pub fn check_backward(&self, x: &BackwardInputs<'_>, g: &Gradients<'_>) -> Result<()> {
        let kv_shape = self.k.layout().shape();
        let inputs = [("out", &x.out), ("dout", &x.dout)];
        for (name, t) in inputs {
            self.check_tensor(
                name,
                t.residence(),
                t.dtype(),
                t.layout().shape(),
                self.out_shape(),
            )?;
        }
        self.check_lse_input(&x.lse)?;
        let outputs = [
            ("dq", &g.dq, self.out_shape()),
            ("dk", &g.dk, kv_shape),
            ("dv", &g.dv, kv_shape),
        ];
        for (name, t, shape) in outputs {
            self.check_tensor(name, t.residence(), t.dtype(), t.layout().shape(), shape)?;
        }
        Ok(())
    }

    fn check_tensor(
        &self,
        name: &'static str,
        residence: crate::Residence,
        dtype: crate::DType,
        shape: [usize; 4],
        want: [usize; 4],
    ) -> Result<()> {
        if residence != self.residence() {
            return Err(SdpaError::Residence(format!(
                "{name} lives in {residence} but q lives in {}; pass every tensor of the \
                 backward in one place",
                self.residence()
            )));
        }
        if dtype != self.dtype() {
            return Err(SdpaError::DtypeMismatch {
                tensor: name,
                expected: self.dtype(),
                found: dtype,
            });
        }
        if shape != want {
            return Err(SdpaError::Shape(format!(
                "{name} has shape {shape:?} but the backward needs {want:?} (the shape of {})",
                if name == "dk" || name == "dv" {
                    "k and v"
                } else {
                    "q"
                }
            )));
        }
        Ok(())
    }
}

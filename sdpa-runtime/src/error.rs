//! The error type of every fallible call in this crate.

use crate::DType;

/// Everything that can go wrong in building or running attention.
///
/// Messages say what was wrong and what to change. Library code returns these
/// instead of panicking on bad input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SdpaError {
    /// The head size has no compiled variant.
    #[error(
        "head size {head_size} was not declared; this binary has kernels for head sizes \
         {declared:?}; {}",
        declare_advice(*.head_size)
    )]
    UndeclaredHeadSize {
        /// The head size that was asked for.
        head_size: usize,
        /// The head sizes that were declared.
        declared: Vec<usize>,
    },
    /// The causal flag has no compiled variant.
    #[error(
        "causal={causal} was not declared; this binary has kernels for causal {declared:?}; \
         add {causal} to `causal` in `#[sdpa_variants(...)]`"
    )]
    UndeclaredCausal {
        /// The causal flag that was asked for.
        causal: bool,
        /// The causal values that were declared.
        declared: Vec<bool>,
    },
    /// The element type has no compiled variant.
    #[error(
        "dtype {dtype} was not declared; this binary has kernels for dtypes {declared}; \
         add {dtype} to `dtypes` in `#[sdpa_variants(...)]`"
    )]
    UndeclaredDtype {
        /// The element type that was asked for.
        dtype: DType,
        /// The element types that were declared, comma separated.
        declared: String,
    },
    /// A tensor's shape, strides or buffer do not fit together or do not fit
    /// the other tensors.
    #[error("{0}")]
    Shape(String),
    /// Tensors of different element types were passed together.
    #[error(
        "{tensor} has dtype {found} but q has dtype {expected}; pass q, k, v and out in one dtype"
    )]
    DtypeMismatch {
        /// Which tensor was wrong.
        tensor: &'static str,
        /// The dtype of `q`.
        expected: DType,
        /// The dtype found.
        found: DType,
    },
    /// The attention mask cannot be applied.
    #[error("{0}")]
    Mask(String),
    /// A construction parameter is out of range.
    #[error("{0}")]
    Param(String),
    /// `dropout_p` other than 0 was asked for.
    #[error(
        "dropout_p = {0} is not supported (only inference without dropout is); pass dropout_p = 0"
    )]
    Dropout(f64),
    /// The `SDPA_BACKEND` environment variable holds an unknown value.
    #[error("SDPA_BACKEND={0:?} is not a backend; use auto, cpu or cuda")]
    BadBackendEnv(String),
    /// The backend asked for cannot run here.
    #[error("the {backend} backend is unavailable: {reason}")]
    BackendUnavailable {
        /// The backend's name.
        backend: &'static str,
        /// Why it cannot run, and what to do.
        reason: String,
    },
    /// The tensors of one call live in different places (host memory and a
    /// CUDA device, or two devices).
    #[error("{0}")]
    Residence(String),
    /// A row log-sum-exp buffer (the forward's optional output, the
    /// backward's input) has the wrong dtype or shape.
    #[error("{0}")]
    Lse(String),
    /// The backward pass was asked of a variant declared without it.
    #[error(
        "the backward pass of variant {variant} was not compiled; add `backward = true` to \
         `#[sdpa_variants(...)]` to build it"
    )]
    BackwardNotDeclared {
        /// The variant that was asked for.
        variant: crate::VariantSpec,
    },
    /// The CUDA driver refused a call: what was being done, then the
    /// driver's own message.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A feature this backend does not run (yet): what, and what to do
    /// instead.
    #[error("{0}")]
    Unsupported(String),
    /// A sequence-parallel exchange failed or was misused: what happened
    /// and what to change.
    #[error("{0}")]
    Communication(String),
}

impl SdpaError {
    /// Wraps a driver error with what was being done when it happened.
    pub(crate) fn cuda(doing: impl std::fmt::Display, e: cudarc::driver::DriverError) -> SdpaError {
        SdpaError::Cuda(format!("{doing}: {e}"))
    }
}

/// `Result` with [`SdpaError`].
pub type Result<T, E = SdpaError> = std::result::Result<T, E>;

/// What to declare for a head size that has no variant: the size itself
/// where kernels can be generated for it ([`kernels_gen::check_head_size`],
/// the rule the macro applies), else the next size that can be, with the
/// heads zero-padded to it and the scale of the true size.
fn declare_advice(head_size: usize) -> String {
    use kernels_gen::{HEAD_SIZE_STEP, MAX_HEAD_SIZE, MIN_HEAD_SIZE};
    if kernels_gen::check_head_size(head_size).is_ok() {
        return format!("add {head_size} to `head_sizes` in `#[sdpa_variants(...)]`");
    }
    let rule = format!(
        "head sizes are multiples of {HEAD_SIZE_STEP} from {MIN_HEAD_SIZE} to {MAX_HEAD_SIZE}"
    );
    match head_size.next_multiple_of(HEAD_SIZE_STEP) {
        padded @ MIN_HEAD_SIZE..=MAX_HEAD_SIZE => format!(
            "{head_size} cannot be declared ({rule}): zero-pad q, k and v to {padded}, add \
             {padded} to `head_sizes` in `#[sdpa_variants(...)]`, pass softmax_scale \
             1/sqrt({head_size}) and keep the first {head_size} values of each output head"
        ),
        _ => format!("{head_size} cannot be declared ({rule})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(head_size: usize) -> String {
        SdpaError::UndeclaredHeadSize {
            head_size,
            declared: vec![64, 128],
        }
        .to_string()
    }

    #[test]
    fn undeclared_head_sizes_suggest_only_sizes_that_can_be_declared() {
        assert!(message(96).ends_with("add 96 to `head_sizes` in `#[sdpa_variants(...)]`"));
        let odd = message(100);
        assert!(
            odd.contains("100 cannot be declared (head sizes are multiples of 8 from 8 to 256)")
                && odd.contains("zero-pad q, k and v to 104, add 104 to `head_sizes`")
                && odd.contains("softmax_scale 1/sqrt(100)")
                && !odd.contains("add 100"),
            "{odd}"
        );
        assert!(message(4).contains("pad q, k and v to 8"));
        for too_big in [0, 260, 512] {
            let msg = message(too_big);
            assert!(
                msg.contains("cannot be declared") && !msg.contains("add "),
                "{msg}"
            );
        }
    }
}

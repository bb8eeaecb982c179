//! What varies between kernels: the head size, the causal flag and the
//! element type, and the rules that say which combinations exist.

use std::fmt;

/// The smallest head size a kernel can be generated for.
pub const MIN_HEAD_SIZE: usize = 8;
/// The largest head size a kernel can be generated for.
pub const MAX_HEAD_SIZE: usize = 256;
/// Head sizes must be multiples of this: one 16-byte vector of `f16`/`bf16`,
/// the granule of every load the GPU kernels issue.
pub const HEAD_SIZE_STEP: usize = 8;

/// The element type of `q`, `k`, `v` and the output.
///
/// Scores, softmax and accumulation always run in `f32` whatever the element
/// type is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16: the upper half of an `f32`.
    BF16,
}

impl DType {
    /// Every element type, in the order the macro defaults to.
    pub const ALL: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

    /// The name used in `#[sdpa_variants(dtypes = [...])]`, on the command
    /// line and in kernel names: `f32`, `f16` or `bf16`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Parses a name as [`DType::name`] writes it.
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// The size of one element in bytes.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A variant that cannot be generated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The head size is outside `MIN_HEAD_SIZE..=MAX_HEAD_SIZE` or not a
    /// multiple of `HEAD_SIZE_STEP`.
    #[error(
        "head size {0} is not supported; declare a multiple of {step} from {min} to {max} \
         (8, 16, 24, ..., 256)",
        step = HEAD_SIZE_STEP,
        min = MIN_HEAD_SIZE,
        max = MAX_HEAD_SIZE
    )]
    HeadSize(usize),
}

/// Checks that kernels can be generated for head size `head_size`.
pub fn check_head_size(head_size: usize) -> Result<(), SpecError> {
    if (MIN_HEAD_SIZE..=MAX_HEAD_SIZE).contains(&head_size)
        && head_size.is_multiple_of(HEAD_SIZE_STEP)
    {
        Ok(())
    } else {
        Err(SpecError::HeadSize(head_size))
    }
}

/// One compile-time specialised kernel: everything that is baked into its
/// code rather than passed at launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VariantSpec {
    /// The head dimension `D` of `q`, `k` and `v`.
    pub head_size: usize,
    /// Whether query `i` sees only keys `j <= i` (top-left aligned, as
    /// PyTorch's `is_causal`).
    pub causal: bool,
    /// The element type of the tensors.
    pub dtype: DType,
}

impl VariantSpec {
    /// A variant, checked against the generator's rules.
    pub fn new(head_size: usize, causal: bool, dtype: DType) -> Result<VariantSpec, SpecError> {
        check_head_size(head_size)?;
        Ok(VariantSpec {
            head_size,
            causal,
            dtype,
        })
    }

    /// The kernel's symbol name, unique per variant:
    /// `sdpa_fwd_d{head_size}[_causal]_{dtype}`.
    pub fn kernel_name(&self) -> String {
        let causal = if self.causal { "_causal" } else { "" };
        format!("sdpa_fwd_d{}{}_{}", self.head_size, causal, self.dtype)
    }
}

impl fmt::Display for VariantSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "d={} causal={} dtype={}",
            self.head_size, self.causal, self.dtype
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_sizes_follow_the_rule() {
        let accepted: Vec<usize> = (0..=300).filter(|&d| check_head_size(d).is_ok()).collect();
        let expected: Vec<usize> = (1..=32).map(|i| i * 8).collect();
        assert_eq!(accepted, expected);
    }

    #[test]
    fn head_size_error_says_what_to_declare() {
        let msg = check_head_size(65).unwrap_err().to_string();
        assert!(msg.contains("65") && msg.contains("multiple of 8"), "{msg}");
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
        }
        assert_eq!(DType::from_name("f64"), None);
    }

    #[test]
    fn kernel_names_are_distinct() {
        let mut names = std::collections::HashSet::new();
        for d in [8, 64, 256] {
            for c in [false, true] {
                for t in DType::ALL {
                    assert!(names.insert(VariantSpec::new(d, c, t).unwrap().kernel_name()));
                }
            }
        }
    }
}

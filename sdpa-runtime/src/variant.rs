//! The variant table the `#[sdpa_variants]` macro emits: one entry per
//! declared (head size, causal, dtype), each holding its kernels.

use crate::error::{Result, SdpaError};
use crate::problem::Problem;
use crate::tensor::TensorViewMut;
use crate::{DType, VariantSpec};

/// A CPU kernel: one instantiation of [`crate::cpu::attention`].
pub type CpuKernelFn = fn(&Problem<'_>, &mut TensorViewMut<'_>) -> Result<()>;

/// One compiled variant: its spec and its kernels.
///
/// The GPU kernels (PTX text and launch metadata) join the CPU kernel here.
#[derive(Clone, Copy, Debug)]
pub struct Variant {
    spec: VariantSpec,
    cpu: CpuKernelFn,
}

impl Variant {
    /// A variant with its CPU kernel.
    pub const fn new(spec: VariantSpec, cpu: CpuKernelFn) -> Variant {
        Variant { spec, cpu }
    }
    /// What the variant is specialised for.
    pub fn spec(&self) -> &VariantSpec {
        &self.spec
    }
    /// The CPU kernel.
    pub fn cpu_kernel(&self) -> CpuKernelFn {
        self.cpu
    }
}

/// Every variant a backend type was declared with, and the declaration
/// itself (for error messages).
#[derive(Debug)]
pub struct VariantTable {
    variants: &'static [Variant],
    head_sizes: &'static [usize],
    causal: &'static [bool],
    dtypes: &'static [DType],
}

impl VariantTable {
    /// A table; the macro builds it from the declaration.
    pub const fn new(
        variants: &'static [Variant],
        head_sizes: &'static [usize],
        causal: &'static [bool],
        dtypes: &'static [DType],
    ) -> VariantTable {
        VariantTable {
            variants,
            head_sizes,
            causal,
            dtypes,
        }
    }
    /// Every variant.
    pub fn variants(&self) -> &'static [Variant] {
        self.variants
    }
    /// The declared head sizes.
    pub fn head_sizes(&self) -> &'static [usize] {
        self.head_sizes
    }
    /// The declared causal values.
    pub fn causal(&self) -> &'static [bool] {
        self.causal
    }
    /// The declared element types.
    pub fn dtypes(&self) -> &'static [DType] {
        self.dtypes
    }

    /// Checks that a head size and causal flag were declared.
    pub fn check_declared(&self, head_size: usize, causal: bool) -> Result<()> {
        if !self.head_sizes.contains(&head_size) {
            return Err(SdpaError::UndeclaredHeadSize {
                head_size,
                declared: self.head_sizes.to_vec(),
            });
        }
        if !self.causal.contains(&causal) {
            return Err(SdpaError::UndeclaredCausal {
                causal,
                declared: self.causal.to_vec(),
            });
        }
        Ok(())
    }

    /// The variant for a (head size, causal, dtype), or an error naming what
    /// was declared.
    pub fn find(&self, head_size: usize, causal: bool, dtype: DType) -> Result<&'static Variant> {
        self.check_declared(head_size, causal)?;
        self.variants
            .iter()
            .find(|v| {
                v.spec
                    == VariantSpec {
                        head_size,
                        causal,
                        dtype,
                    }
            })
            .ok_or_else(|| SdpaError::UndeclaredDtype {
                dtype,
                declared: self
                    .dtypes
                    .iter()
                    .map(|d| d.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

//! The variant table the `#[sdpa_variants]` macro emits: one entry per
//! declared (head size, causal, dtype), each holding its kernels.

use kernels_gen::contract::TensorMaps;

use crate::error::{Result, SdpaError};
use crate::problem::Problem;
use crate::tensor::TensorViewMut;
use crate::{DType, VariantSpec};

/// A CPU kernel: one instantiation of [`crate::cpu::attention`].
pub type CpuKernelFn = fn(&Problem<'_>, &mut TensorViewMut<'_>) -> Result<()>;

/// A GPU kernel generated at compile time: its PTX text and how to launch
/// it, following the launch contract of [`kernels_gen::contract`].
///
/// The `#[sdpa_variants]` macro runs the generator when it expands and
/// embeds the result as a static; the CUDA backend JIT-loads the PTX through
/// the driver the first time a device runs the variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuKernel {
    ptx: &'static str,
    entry: &'static str,
    target: &'static str,
    block_m: u32,
    threads: u32,
    smem_bytes: u32,
    tensor_maps: Option<TensorMaps>,
}

impl GpuKernel {
    /// A kernel: its PTX module text, the entry point's name, the
    /// architecture the PTX targets (`.target`, e.g. `"sm_80"`), query rows
    /// per CTA, threads per CTA and dynamic shared memory per CTA in bytes.
    pub const fn new(
        ptx: &'static str,
        entry: &'static str,
        target: &'static str,
        block_m: u32,
        threads: u32,
        smem_bytes: u32,
    ) -> GpuKernel {
        GpuKernel {
            ptx,
            entry,
            target,
            block_m,
            threads,
            smem_bytes,
            tensor_maps: None,
        }
    }
    /// The same kernel, taking the tensor maps of `q`, `k` and `v` after the
    /// contract's parameters, with boxes of `q_rows` tokens for `q` and
    /// `kv_rows` tokens for `k` and `v`.
    pub const fn with_tensor_maps(self, q_rows: u32, kv_rows: u32) -> GpuKernel {
        GpuKernel {
            tensor_maps: Some(TensorMaps { q_rows, kv_rows }),
            ..self
        }
    }
    /// The PTX module text.
    pub fn ptx(&self) -> &'static str {
        self.ptx
    }
    /// The entry point's name.
    pub fn entry(&self) -> &'static str {
        self.entry
    }
    /// The architecture the PTX targets, as its `.target` names it.
    pub fn target(&self) -> &'static str {
        self.target
    }
    /// Query rows per CTA: the grid has `ceil(Sq / block_m)` CTAs in x.
    pub fn block_m(&self) -> u32 {
        self.block_m
    }
    /// Threads per CTA.
    pub fn threads(&self) -> u32 {
        self.threads
    }
    /// Dynamic shared memory per CTA, in bytes.
    pub fn smem_bytes(&self) -> u32 {
        self.smem_bytes
    }
    /// The tensor maps the kernel takes after the contract's parameters
    /// (their boxes' tokens; [`TensorMaps`] says how the runtime encodes
    /// them), or `None` where it takes none.
    pub fn tensor_maps(&self) -> Option<TensorMaps> {
        self.tensor_maps
    }
}

/// One compiled variant: its spec and its kernels.
#[derive(Clone, Copy, Debug)]
pub struct Variant {
    spec: VariantSpec,
    cpu: CpuKernelFn,
    gpu: Option<GpuKernel>,
    gpu_sm90: Option<GpuKernel>,
}

impl Variant {
    /// A variant with its CPU kernel and no GPU kernel.
    pub const fn new(spec: VariantSpec, cpu: CpuKernelFn) -> Variant {
        Variant {
            spec,
            cpu,
            gpu: None,
            gpu_sm90: None,
        }
    }
    /// The same variant with a GPU kernel that runs on every supported
    /// device (sm_80 PTX).
    pub const fn with_gpu(self, gpu: GpuKernel) -> Variant {
        Variant {
            gpu: Some(gpu),
            ..self
        }
    }
    /// The same variant with a Hopper kernel (sm_90a PTX), used instead of
    /// the portable one on devices of compute capability 9.0.
    pub const fn with_gpu_sm90(self, gpu: GpuKernel) -> Variant {
        Variant {
            gpu_sm90: Some(gpu),
            ..self
        }
    }
    /// What the variant is specialised for.
    pub fn spec(&self) -> &VariantSpec {
        &self.spec
    }
    /// The CPU kernel.
    pub fn cpu_kernel(&self) -> CpuKernelFn {
        self.cpu
    }
    /// The portable GPU kernel, if one was generated.
    pub fn gpu_kernel(&self) -> Option<&GpuKernel> {
        self.gpu.as_ref()
    }
    /// The Hopper (sm_90a) kernel, if one was generated for this variant.
    pub fn gpu_kernel_sm90(&self) -> Option<&GpuKernel> {
        self.gpu_sm90.as_ref()
    }
    /// The kernel for a device of compute capability `(major, minor)`: the
    /// Hopper kernel on 9.0 where there is one, else the portable kernel.
    pub fn gpu_kernel_for(&self, capability: (i32, i32)) -> Option<&GpuKernel> {
        match (capability, &self.gpu_sm90) {
            ((9, 0), Some(k)) => Some(k),
            _ => self.gpu.as_ref(),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_maps_are_declared_in_a_const() {
        const PLAIN: GpuKernel = GpuKernel::new("", "k", "sm_90a", 128, 384, 1024);
        const MAPPED: GpuKernel = PLAIN.with_tensor_maps(128, 96);
        assert_eq!(PLAIN.tensor_maps(), None);
        assert_eq!(
            MAPPED.tensor_maps(),
            Some(TensorMaps {
                q_rows: 128,
                kv_rows: 96
            })
        );
        assert_eq!((MAPPED.entry(), MAPPED.block_m()), ("k", 128));
    }
}

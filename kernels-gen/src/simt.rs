//! The portable GPU kernel: f32 arithmetic on the CUDA cores, for every
//! element type. (Placeholder: being written.)

use crate::gpu::{declare_params, GpuKernel};
use crate::ptx::{Instr, Kernel, Module, Target};
use crate::VariantSpec;

/// Generates the CUDA-core kernel of `spec`.
pub fn generate(spec: &VariantSpec, target: Target) -> GpuKernel {
    let entry = spec.kernel_name();
    let mut k = Kernel::new(entry.clone());
    let _ = declare_params(&mut k);
    k.launch_bounds(128, None);
    k.push(Instr::Ret);
    GpuKernel {
        ptx: Module::new(target).kernel(k).to_string(),
        entry,
        target,
        block_m: 32,
        threads: 128,
        smem_bytes: 0,
    }
}

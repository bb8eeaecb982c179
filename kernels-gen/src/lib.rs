//! The attention kernel generator.
//!
//! `kernels-gen` is a plain library: it takes a [`VariantSpec`] (head size,
//! causal or not, element type) and describes the kernels to build for it. It
//! is called by the `#[sdpa_variants]` proc macro at expansion time and never
//! touches CUDA, so every rule it holds can be unit-tested on any machine.
//!
//! The rules about which variants exist live here, in one place, so that the
//! macro (which reports them as compile errors) and the runtime (which looks
//! variants up) agree:
//!
//! ```
//! use kernels_gen::{DType, VariantSpec};
//!
//! let spec = VariantSpec::new(128, true, DType::BF16).unwrap();
//! assert_eq!(spec.kernel_name(), "sdpa_fwd_d128_causal_bf16");
//! assert!(VariantSpec::new(65, false, DType::F32).is_err());
//! ```

pub mod attention;
pub mod backward;
pub mod contract;
pub mod fa2;
pub mod ptx;
mod simt;
pub mod sm90;
mod spec;

pub use backward::BackwardKernels;
pub use contract::GpuKernel;
use ptx::Target;

pub use spec::{
    check_head_size, DType, SpecError, VariantSpec, HEAD_SIZE_STEP, MAX_HEAD_SIZE, MIN_HEAD_SIZE,
};

/// Generates the portable GPU kernel of `spec` for `target`: the CUDA-core
/// kernel for `f32`, the `mma.sync` one for 16-bit types.
pub fn generate(spec: &VariantSpec, target: Target) -> GpuKernel {
    match spec.dtype {
        DType::F32 => simt::generate(spec, target),
        DType::F16 | DType::BF16 => fa2::generate(spec, target),
    }
}

/// Generates the Hopper (sm_90a, `wgmma`) kernel of `spec`, or `None` where
/// there is none (32-bit elements, head sizes not in
/// [`sm90::HEAD_SIZES`]: 48, 64, 80, 96, 112, 128, 160, 192, 224, 256):
/// use [`generate`] then. Same parameters and launch contract.
pub fn generate_sm90(spec: &VariantSpec) -> Option<GpuKernel> {
    sm90::generate(spec)
}

/// The GPU kernels of `spec`, by preference: the sm_90a kernel where
/// [`generate_sm90`] has one, then the portable sm_80 one. A runtime runs
/// the first whose [`GpuKernel::target`] the device can run
/// ([`Target::runs_on`]); the last one runs on every device of compute
/// capability 8.0 and later.
pub fn kernels(spec: &VariantSpec) -> Vec<GpuKernel> {
    generate_sm90(spec)
        .into_iter()
        .chain([generate(spec, Target::Sm80)])
        .collect()
}

/// The backward kernels of `spec` (for a variant declared with `backward
/// = true`): portable sm_80 PTX, run on every device of compute capability
/// 8.0 and later; [`backward`] holds their launch contract.
pub fn backward_kernels(spec: &VariantSpec) -> BackwardKernels {
    backward::generate(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_come_by_preference() {
        let hopper = VariantSpec::new(128, true, DType::BF16).unwrap();
        let ks = kernels(&hopper);
        let targets: Vec<Target> = ks.iter().map(|k| k.target).collect();
        assert_eq!(targets, [Target::Sm90a, Target::Sm80]);
        assert_eq!(ks[0], generate_sm90(&hopper).unwrap());
        assert_eq!(ks[1], generate(&hopper, Target::Sm80));
        // The first kernel a device can run: sm_90a on 9.0, sm_80 elsewhere.
        let pick = |major, minor| ks.iter().find(|k| k.target.runs_on(major, minor));
        assert_eq!(pick(9, 0).map(|k| k.target), Some(Target::Sm90a));
        assert_eq!(pick(8, 6).map(|k| k.target), Some(Target::Sm80));
        assert_eq!(pick(10, 0).map(|k| k.target), Some(Target::Sm80));
        assert!(pick(7, 5).is_none());
        for spec in [
            VariantSpec::new(128, false, DType::F32).unwrap(),
            VariantSpec::new(40, false, DType::F16).unwrap(),
        ] {
            let targets: Vec<Target> = kernels(&spec).iter().map(|k| k.target).collect();
            assert_eq!(targets, [Target::Sm80], "{}", spec.kernel_name());
        }
    }
}

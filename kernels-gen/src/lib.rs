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

pub mod fa2;
pub mod gpu;
pub mod ptx;
mod simt;
pub mod sm90;
mod spec;

pub use spec::{
    check_head_size, DType, SpecError, VariantSpec, HEAD_SIZE_STEP, MAX_HEAD_SIZE, MIN_HEAD_SIZE,
};

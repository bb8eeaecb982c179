//! Backends declared the way a consuming crate declares them.

use sdpa_runtime::prelude::*;

/// The declaration from the README, verbatim.
#[sdpa_variants(head_sizes = [64, 80, 128], causal = [false, true], dtypes = [bf16, f16, f32])]
pub struct WanAttention;

/// A wider declaration for the conformance suite: the smallest and largest
/// head sizes, sizes that are not powers of two, and the defaults for
/// `causal` and `dtypes`.
#[sdpa_variants(head_sizes = [8, 40, 64, 136, 256])]
pub struct ConformanceAttention;

/// A declaration with one dtype and one causal value, for the errors that
/// name what was declared.
#[sdpa_variants(head_sizes = [32], causal = [false], dtypes = [f32])]
pub struct NarrowAttention;

/// A training declaration: the backward kernels too, on head sizes that
/// cross the CPU paths' vector widths (8, 40 and 136 are not multiples of
/// 16).
#[sdpa_variants(head_sizes = [8, 40, 64, 136, 256], backward = true)]
pub struct TrainingAttention;

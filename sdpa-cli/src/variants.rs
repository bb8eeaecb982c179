//! The kernels compiled into the `sdpa` binary, declared as any user of the
//! library would.
//!
//! Every head size FastVideo's models use (and the common LLM and ViT ones),
//! both causal values and every element type: 13 × 2 × 3 = 78 variants,
//! each with its CPU and GPU backward kernels (`sdpa run --backward`,
//! `sdpa bench --backward`, on either backend).

use sdpa_runtime::prelude::*;

/// The attention backend of the `sdpa` command.
#[sdpa_variants(head_sizes = [32, 40, 48, 64, 72, 80, 96, 112, 128, 160, 192, 224, 256], causal = [false, true], dtypes = [bf16, f16, f32], backward = true)]
pub struct SdpaCli;

use sdpa_runtime::prelude::*;

#[sdpa_variants(head_sizes = [64], dtypes = [f16, bf16, f16])]
pub struct WanAttention;

fn main() {}

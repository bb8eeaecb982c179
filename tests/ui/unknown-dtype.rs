use sdpa_runtime::prelude::*;

#[sdpa_variants(head_sizes = [64], dtypes = [bf16, f64])]
pub struct WanAttention;

fn main() {}

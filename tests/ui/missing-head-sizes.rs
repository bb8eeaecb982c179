use sdpa_runtime::prelude::*;

#[sdpa_variants(causal = [true], dtypes = [f16])]
pub struct WanAttention;

fn main() {}

use sdpa_runtime::prelude::*;

#[sdpa_variants(head_sizes = [64], causal = [true, false, true])]
pub struct WanAttention;

fn main() {}

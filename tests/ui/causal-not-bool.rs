use sdpa_runtime::prelude::*;

#[sdpa_variants(head_sizes = [64], causal = [0, 1])]
pub struct WanAttention;

fn main() {}

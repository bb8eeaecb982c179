use sdpa_runtime::prelude::*;

#[sdpa_variants(head_sizes = [64, 128, 64])]
pub struct WanAttention;

fn main() {}

use sdpa_runtime::prelude::*;

#[sdpa_variants(head_sizes = [])]
pub struct WanAttention;

fn main() {}

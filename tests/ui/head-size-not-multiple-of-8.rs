use sdpa_runtime::prelude::*;

#[sdpa_variants(head_sizes = [64, 65])]
pub struct WanAttention;

fn main() {}

use sdpa_runtime::prelude::*;

#[sdpa_variants(head_sizes = [128, 512])]
pub struct WanAttention;

fn main() {}

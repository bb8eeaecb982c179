use sdpa_runtime::prelude::*;

#[sdpa_variants(head_sizes = [64u8])]
pub struct WanAttention;

fn main() {}

use sdpa_runtime::prelude::*;

#[sdpa_variants(head_sizes = [64], dtype = [f32])]
pub struct WanAttention;

fn main() {}

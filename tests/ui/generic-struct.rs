use sdpa_runtime::prelude::*;

#[sdpa_variants(head_sizes = [64])]
pub struct WanAttention<T>(T);

fn main() {}

use sdpa_runtime::prelude::*;

#[sdpa_variants(head_sizes = [64])]
pub enum WanAttention {
    Cpu,
}

fn main() {}

use sdpa_runtime::prelude::*;

#[sdpa_variants(head_sizes = [64], backward = 1)]
pub struct TrainedAttention;

fn main() {}

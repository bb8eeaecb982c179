use sdpa_runtime::prelude::*;

// Every bad entry is reported at once, not only the first.
#[sdpa_variants(
    head_sizes = [64, 65, 64, 1024],
    causal = [],
    dtypes = [bf16, f64, bf16],
    tile = [64],
)]
pub struct WanAttention;

fn main() {}

use sdpa_runtime::prelude::*;

// The struct is still emitted beside the error: uses of it raise no
// follow-on errors.
#[sdpa_variants(head_sizes = [65])]
pub struct WanAttention;

fn main() {
    let _attention = WanAttention;
}

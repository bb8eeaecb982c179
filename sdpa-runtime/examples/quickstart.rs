//! Declare the variants a model needs, build a layer and run it.
//!
//! `cargo run --release -p sdpa-runtime --example quickstart`

use sdpa_runtime::prelude::*;

/// The attention of a small video DiT: head size 64, bidirectional, bf16.
#[sdpa_variants(head_sizes = [64], causal = [false], dtypes = [bf16])]
pub struct DitAttention;

fn main() -> Result<(), SdpaError> {
    let (batch, seq, heads, head_size) = (1, 256, 8, 64);
    let layer =
        DitAttention.build_impl(AttentionParams::new(heads, head_size).prefix("blocks.0.attn"))?;

    let n = batch * seq * heads * head_size;
    let values: Vec<bf16> = (0..n)
        .map(|i| bf16::from_f32(((i % 97) as f32 - 48.0) / 48.0))
        .collect();
    let q = TensorView::from_slice(&values, [batch, seq, heads, head_size])?;

    let out = layer.forward(&q, &q, &q, &AttentionMetadata::new(0))?;
    let first: Vec<f32> = out.to_f32_vec()?.into_iter().take(4).collect();
    println!(
        "{} -> {:?}, first values {first:?}",
        DitAttention.name(),
        out.shape()
    );

    // The caller's buffer works too (FastVideo's accept_output_buffer).
    let mut buf = vec![bf16::ZERO; n];
    let mut out = TensorViewMut::from_slice(&mut buf, [batch, seq, heads, head_size])?;
    layer.forward_into(&q, &q, &q, &AttentionMetadata::new(0), &mut out)?;
    Ok(())
}

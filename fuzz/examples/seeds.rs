//! Writes the seed corpus of the `safetensors_case` target: valid cases of
//! every dtype, mask kind and metadata entry, cases `sdpa run` refuses, and
//! truncated copies of a valid file.
//!
//! `cargo +nightly run --example seeds [DIR]` (default
//! `corpus/safetensors_case`).

use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// One tensor of a seed: name, dtype, shape; its bytes are made up.
type Spec = (&'static str, Dtype, &'static [usize]);

/// A seed: its file name, tensors and metadata entries.
type Seed = (
    &'static str,
    Vec<Spec>,
    &'static [(&'static str, &'static str)],
);

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "corpus/safetensors_case".into()),
    );
    std::fs::create_dir_all(&dir).expect("create the corpus folder");
    let f32_ = Dtype::F32;
    let seeds: Vec<Seed> = vec![
        (
            "f32-plain",
            vec![
                ("q", f32_, &[1, 4, 2, 32]),
                ("k", f32_, &[1, 4, 2, 32]),
                ("v", f32_, &[1, 4, 2, 32]),
            ],
            &[],
        ),
        (
            "bf16-gqa-causal-bool-mask",
            vec![
                ("q", Dtype::BF16, &[1, 5, 4, 64]),
                ("k", Dtype::BF16, &[1, 7, 2, 64]),
                ("v", Dtype::BF16, &[1, 7, 2, 64]),
                ("attn_mask", Dtype::BOOL, &[1, 7]),
            ],
            &[("causal", "true"), ("scale", "0.125")],
        ),
        (
            "f16-u8-mask-3d",
            vec![
                ("q", Dtype::F16, &[2, 3, 2, 32]),
                ("k", Dtype::F16, &[2, 6, 2, 32]),
                ("v", Dtype::F16, &[2, 6, 2, 32]),
                ("attn_mask", Dtype::U8, &[2, 3, 6]),
            ],
            &[("causal", "False")],
        ),
        (
            "f32-float-mask-4d-broadcast",
            vec![
                ("q", f32_, &[1, 4, 2, 40]),
                ("k", f32_, &[1, 4, 2, 40]),
                ("v", f32_, &[1, 4, 2, 40]),
                ("attn_mask", f32_, &[1, 1, 4, 4]),
            ],
            &[("scale", "-0.5")],
        ),
        (
            "f32-short-i64-mask",
            vec![
                ("q", f32_, &[1, 2, 1, 48]),
                ("k", f32_, &[1, 5, 1, 48]),
                ("v", f32_, &[1, 5, 1, 48]),
                ("attn_mask", Dtype::I64, &[1, 3]),
            ],
            &[],
        ),
        (
            "i32-mask-bf16-head",
            vec![
                ("q", Dtype::BF16, &[1, 3, 3, 80]),
                ("k", Dtype::BF16, &[1, 3, 1, 80]),
                ("v", Dtype::BF16, &[1, 3, 1, 80]),
                ("attn_mask", Dtype::I32, &[1, 3, 1, 3]),
            ],
            &[("causal", "true")],
        ),
        (
            "empty-seq",
            vec![
                ("q", f32_, &[1, 0, 2, 32]),
                ("k", f32_, &[1, 0, 2, 32]),
                ("v", f32_, &[1, 0, 2, 32]),
            ],
            &[],
        ),
        (
            "refused-missing-v",
            vec![("q", f32_, &[1, 2, 1, 32]), ("k", f32_, &[1, 2, 1, 32])],
            &[],
        ),
        (
            "refused-rank-3-and-extra",
            vec![
                ("q", f32_, &[2, 1, 32]),
                ("k", f32_, &[1, 2, 1, 32]),
                ("v", f32_, &[1, 2, 1, 32]),
                ("bias", f32_, &[4]),
            ],
            &[],
        ),
        (
            "refused-int-q-bad-meta",
            vec![
                ("q", Dtype::I32, &[1, 2, 1, 32]),
                ("k", f32_, &[1, 2, 1, 32]),
                ("v", f32_, &[1, 2, 1, 32]),
            ],
            &[("causal", "maybe"), ("scale", "inf")],
        ),
        (
            "refused-head-size-undeclared",
            vec![
                ("q", f32_, &[1, 2, 1, 8]),
                ("k", f32_, &[1, 2, 1, 8]),
                ("v", f32_, &[1, 2, 1, 8]),
            ],
            &[],
        ),
    ];
    let mut count = 0;
    for (name, specs, metadata) in &seeds {
        let bytes = file(specs, metadata);
        std::fs::write(dir.join(name), &bytes).expect("write a seed");
        count += 1;
        // Truncated copies of the valid GQA case: inside the length prefix,
        // inside the header, and inside the data.
        if *name == "bf16-gqa-causal-bool-mask" {
            let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            for (what, at) in [
                ("prefix", 5),
                ("header", header / 2),
                ("data", header + (bytes.len() - header) / 2),
                ("last-byte", bytes.len() - 1),
            ] {
                std::fs::write(dir.join(format!("{name}-truncated-{what}")), &bytes[..at])
                    .expect("write a seed");
                count += 1;
            }
        }
    }
    println!("wrote {count} seeds to {}", dir.display());
}

/// A safetensors file holding `specs`, filled with small varied values, and
/// `metadata`.
fn file(specs: &[Spec], metadata: &[(&str, &str)]) -> Vec<u8> {
    let data: Vec<Vec<u8>> = specs
        .iter()
        .enumerate()
        .map(|(i, (_, dtype, shape))| {
            let size = dtype.bitsize() / 8;
            let n: usize = shape.iter().product::<usize>() * size;
            // A small LCG: varied bytes, the same every run. Masks get
            // small integers so that some rows attend and some do not.
            let mut x = 0x9e37_79b9_u32.wrapping_add(i as u32);
            (0..n)
                .map(|j| {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    match dtype {
                        Dtype::BOOL | Dtype::U8 => (x >> 31) as u8,
                        // Keep floats small: a clear high exponent byte.
                        _ if j % size == size - 1 => (x >> 24) as u8 & 0xbf,
                        _ => (x >> 24) as u8,
                    }
                })
                .collect()
        })
        .collect();
    let views: Vec<(&str, TensorView)> = specs
        .iter()
        .zip(&data)
        .map(|((name, dtype, shape), bytes)| {
            (
                *name,
                TensorView::new(*dtype, shape.to_vec(), bytes).expect("a consistent seed"),
            )
        })
        .collect();
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let metadata = (!metadata.is_empty()).then_some(metadata);
    safetensors::serialize(views, metadata).expect("serialise a seed")
}

//! The shapes `sdpa bench` times when no shape is given: attention layers of
//! the models FastVideo serves, one table per backend.
//!
//! The CUDA table is the GPU table of docs/benchmarks.md, full size, in bf16. The
//! CPU table keeps each model's heads and head size but shortens the
//! sequences so that a forward pass takes well under a second on two cores,
//! and runs every row in f32 and in bf16 (the two dtypes of the CPU
//! anchors).

use std::fmt;

use sdpa_runtime::{BackendKind, DType};

use crate::error::{CliError, Result};

/// The sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// `B`.
    pub batch: usize,
    /// `Hq`.
    pub heads_q: usize,
    /// `Hkv`; divides `Hq`.
    pub heads_kv: usize,
    /// `Sq`.
    pub seq_q: usize,
    /// `Sk`.
    pub seq_k: usize,
    /// `D`.
    pub head_size: usize,
    /// Top-left causal masking.
    pub causal: bool,
}

impl Shape {
    /// Multi-head attention with `Sq = Sk`, not causal.
    const fn mha(batch: usize, heads: usize, seq: usize, head_size: usize) -> Shape {
        Shape {
            batch,
            heads_q: heads,
            heads_kv: heads,
            seq_q: seq,
            seq_k: seq,
            head_size,
            causal: false,
        }
    }
    /// The same shape with `Sk` keys.
    const fn seq_k(self, seq_k: usize) -> Shape {
        Shape { seq_k, ..self }
    }
    /// The same shape with `Hkv` key/value heads.
    const fn kv_heads(self, heads_kv: usize) -> Shape {
        Shape { heads_kv, ..self }
    }
    /// The same shape, causal.
    const fn causal(self) -> Shape {
        Shape {
            causal: true,
            ..self
        }
    }

    /// The floating-point operations of one forward pass, counted as
    /// `4·B·Hq·Sq·Sk·D` (two matrix products), halved when causal.
    pub fn flops(&self) -> f64 {
        let full = 4.0
            * self.batch as f64
            * self.heads_q as f64
            * self.seq_q as f64
            * self.seq_k as f64
            * self.head_size as f64;
        if self.causal {
            full / 2.0
        } else {
            full
        }
    }

    /// `"BxHqxSqxSkxD"`, e.g. `"1x12x32760x32760x128"`.
    pub fn dims(&self) -> String {
        format!(
            "{}x{}x{}x{}x{}",
            self.batch, self.heads_q, self.seq_q, self.seq_k, self.head_size
        )
    }
}

/// [`Shape::dims`], followed by the key/value heads when they differ from
/// the query heads.
impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims = self.dims();
        if self.heads_kv == self.heads_q {
            f.pad(&dims)
        } else {
            f.pad(&format!("{dims} kv{}", self.heads_kv))
        }
    }
}

/// A named shape of the preset table.
#[derive(Clone, Copy, Debug)]
pub struct Preset {
    /// The name `--preset` takes.
    pub name: &'static str,
    /// What the shape is.
    pub about: &'static str,
    /// Its sizes.
    pub shape: Shape,
}

const fn preset(name: &'static str, about: &'static str, shape: Shape) -> Preset {
    Preset { name, about, shape }
}

/// Scaled-down model shapes for the CPU: each pass takes well under a
/// second on two cores.
pub const CPU_PRESETS: &[Preset] = &[
    preset(
        "wan-self",
        "Wan2.1 480p self-attention over one latent frame (1560 of 32760 tokens)",
        Shape::mha(1, 12, 1560, 128),
    ),
    preset(
        "wan-cross",
        "Wan cross-attention to 512 text tokens, one latent frame of queries",
        Shape::mha(1, 12, 1560, 128).seq_k(512),
    ),
    preset(
        "clip",
        "CLIP encoder layer, head size 80, batch 4",
        Shape::mha(4, 16, 257, 80),
    ),
    preset(
        "llm-causal-gqa",
        "causal LLM layer, 32 query / 8 kv heads, 1024 tokens",
        Shape::mha(1, 32, 1024, 128).kv_heads(8).causal(),
    ),
    preset(
        "decode",
        "decode step: one query against 4096 cached keys",
        Shape::mha(1, 8, 1, 128).seq_k(4096),
    ),
    preset(
        "anchor",
        "the CPU anchor shape (torch and candle measured on it, docs/benchmarks.md)",
        Shape::mha(1, 8, 2048, 128),
    ),
    preset(
        "anchor-causal",
        "the CPU anchor shape, causal",
        Shape::mha(1, 8, 2048, 128).causal(),
    ),
    preset(
        "anchor-4k",
        "the second CPU target shape: 4 heads, 4096 tokens",
        Shape::mha(1, 4, 4096, 128),
    ),
];

/// The GPU shapes of docs/benchmarks.md, full size.
pub const CUDA_PRESETS: &[Preset] = &[
    preset(
        "wan-self",
        "Wan2.1-1.3B 480p self-attention",
        Shape::mha(1, 12, 32760, 128),
    ),
    preset(
        "wan-cross",
        "Wan cross-attention to 512 text tokens",
        Shape::mha(1, 12, 32760, 128).seq_k(512),
    ),
    preset(
        "h24-d128",
        "24 heads, 16384 tokens, head size 128",
        Shape::mha(1, 24, 16384, 128),
    ),
    preset(
        "h24-d64",
        "24 heads, 16384 tokens, head size 64",
        Shape::mha(1, 24, 16384, 64),
    ),
    preset(
        "h8-d256",
        "8 heads, 16384 tokens, head size 256",
        Shape::mha(1, 8, 16384, 256),
    ),
    preset(
        "clip",
        "CLIP encoder layer, head size 80, batch 16",
        Shape::mha(16, 16, 257, 80),
    ),
    preset(
        "llm-causal",
        "causal LLM layer, batch 4, 4096 tokens",
        Shape::mha(4, 32, 4096, 128).causal(),
    ),
    preset(
        "llm-causal-gqa",
        "causal LLM layer, 32 query / 8 kv heads, 8192 tokens",
        Shape::mha(1, 32, 8192, 128).kv_heads(8).causal(),
    ),
];

/// The preset table for a backend that runs (`Cpu` or `Cuda`).
pub fn table(backend: BackendKind) -> &'static [Preset] {
    match backend {
        BackendKind::Cuda => CUDA_PRESETS,
        BackendKind::Cpu | BackendKind::Auto => CPU_PRESETS,
    }
}

/// The dtypes every preset row runs in on `backend`.
pub fn dtypes(backend: BackendKind) -> &'static [DType] {
    match backend {
        BackendKind::Cuda => &[DType::BF16],
        BackendKind::Cpu | BackendKind::Auto => &[DType::F32, DType::BF16],
    }
}

/// The preset `name` of `backend`'s table, or an error listing the names.
pub fn find(backend: BackendKind, name: &str) -> Result<&'static Preset> {
    let presets = table(backend);
    presets.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = presets.iter().map(|p| p.name).collect();
        CliError::Usage(format!(
            "no preset {name:?} for the {backend} backend; its presets are {} \
             (`sdpa bench --preset list` describes them)",
            names.join(", ")
        ))
    })
}

/// The text of `sdpa bench --preset list`: both tables.
pub fn listing() -> String {
    let width = CPU_PRESETS
        .iter()
        .chain(CUDA_PRESETS)
        .map(|p| p.shape.to_string().len())
        .max()
        .unwrap_or(0);
    let mut text = String::new();
    for (backend, heading) in [
        (
            BackendKind::Cpu,
            "sequences scaled down so that a pass takes well under a second on 2 cores",
        ),
        (
            BackendKind::Cuda,
            "full size, the GPU shapes of docs/benchmarks.md",
        ),
    ] {
        let dtypes: Vec<&str> = dtypes(backend).iter().map(|d| d.name()).collect();
        text += &format!(
            "{backend} presets (run in {}; {heading}), shape BxHqxSqxSkxD:\n",
            dtypes.join(" and ")
        );
        for p in table(backend) {
            let causal = if p.shape.causal { "causal" } else { "" };
            text += &format!(
                "  {:<16} {:<width$}  {causal:<6}  {}\n",
                p.name, p.shape, p.about
            );
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_follow_the_contract() {
        let s = Shape::mha(1, 12, 32760, 128);
        assert_eq!(s.flops(), 4.0 * 12.0 * 32760.0 * 32760.0 * 128.0);
        assert_eq!(s.causal().flops(), s.flops() / 2.0);
        assert_eq!(s.dims(), "1x12x32760x32760x128");
    }

    #[test]
    fn names_are_unique_per_table() {
        for presets in [CPU_PRESETS, CUDA_PRESETS] {
            let mut names: Vec<_> = presets.iter().map(|p| p.name).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), presets.len());
        }
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let err = find(BackendKind::Cpu, "nope").unwrap_err().to_string();
        assert!(err.contains("wan-self, wan-cross"), "{err}");
    }
}

//! What the fuzz targets run, shared with the tools in `examples/`.

pub mod structured;

use std::path::Path;

use sdpa_cli::safetensors_io::{read_case_bytes, Case};
use sdpa_cli::variants::SdpaCli;
use sdpa_runtime::prelude::*;
use sdpa_runtime::{select, Residence};

/// A tensor of more elements than this is read but not computed.
pub const MAX_ELEMENTS: usize = 1 << 16;
/// A case of more multiply-adds (`B * Hq * Sq * Sk * D`) than this is read
/// but not computed.
pub const MAX_WORK: usize = 1 << 22;

/// How far `sdpa run` got with one input.
#[derive(Debug)]
pub enum Outcome {
    /// The reader refused it (not safetensors, or not a case), with its
    /// message.
    NotACase(String),
    /// A case too big to compute quickly; not computed.
    TooBig,
    /// A case the runtime refused (with its message).
    Refused(String),
    /// Computed: `out` has `q`'s shape and dtype.
    Computed,
}

/// Reads `bytes` as `sdpa run` reads its input and, if they are a case of
/// a reasonable size, computes it on the CPU as `sdpa run` does. Panics
/// only where `sdpa run` would (or when `out` is not `q`-shaped).
pub fn run(bytes: &[u8]) -> Outcome {
    let case = match read_case_bytes(bytes, Path::new("fuzz.safetensors")) {
        Ok(case) => case,
        Err(err) => return Outcome::NotACase(err.to_string()),
    };
    if too_big(&case) {
        return Outcome::TooBig;
    }
    match compute(&case) {
        Ok(out) => {
            assert_eq!(out.shape(), case.q.shape(), "out must have q's shape");
            assert_eq!(out.dtype(), case.q.dtype(), "out must have q's dtype");
            Outcome::Computed
        }
        Err(err) => Outcome::Refused(err.to_string()),
    }
}

/// What `sdpa run` (sdpa-cli/src/run.rs) does between reading the case and
/// writing `out`, with the backend fixed to the CPU.
pub fn compute(case: &Case) -> Result<Tensor, SdpaError> {
    let layer = SdpaCli.build_impl(case.params().backend(BackendKind::Cpu))?;
    let metadata = case.metadata()?;
    let out = layer.forward(&case.q.view(), &case.k.view(), &case.v.view(), &metadata)?;
    select(layer.backend_request(), Residence::Host)?;
    Ok(out)
}

/// Whether computing `case` would take long: a tensor of more than
/// `MAX_ELEMENTS` elements or more than `MAX_WORK` multiply-adds. A shape
/// with a zero in it is never too big, however large its other sizes.
pub fn too_big(case: &Case) -> bool {
    let numel = |shape: &[usize]| shape.iter().fold(1usize, |a, &d| a.saturating_mul(d));
    let [b, sq, hq, d] = case.q.shape();
    let sk = case.k.shape()[1];
    let mask = case
        .mask
        .as_ref()
        .and_then(|m| m.as_attn_mask().ok())
        .map_or(0, |m| numel(m.shape()));
    let work = numel(&[b, hq, sq, sk, d]);
    [case.q.shape(), case.k.shape(), case.v.shape()]
        .iter()
        .any(|s| numel(s) > MAX_ELEMENTS)
        || mask > MAX_ELEMENTS
        || work > MAX_WORK
}

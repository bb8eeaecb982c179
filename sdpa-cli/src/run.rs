//! `sdpa run`: attention over the tensors of a safetensors file.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use sdpa_runtime::prelude::*;
use sdpa_runtime::{select, Residence};

use crate::error::Result;
use crate::options::BackendArg;
use crate::safetensors_io::{read_case, write_output};
use sdpa_cli::variants::SdpaCli;

/// The flags of `sdpa run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The case to compute: a safetensors file with tensors q, k, v
    /// ([B, S, H, D], all F32, F16 or BF16) and optionally attn_mask (BOOL,
    /// U8, I32, I64 or float; [B, Sk], [B, Sq, Sk] or [B, H, Sq, Sk]), and
    /// the metadata strings causal ("true"/"false", default false) and scale
    /// (default 1/sqrt(D)).
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// Where to write the result: a safetensors file with the tensor out
    /// ([B, Sq, Hq, D], in q's dtype). An existing file is replaced.
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// The backend to run on. Without this flag, the SDPA_BACKEND environment
    /// variable decides, else auto.
    #[arg(long, value_enum, value_name = "BACKEND")]
    pub backend: Option<BackendArg>,
}

/// Reads the case, computes attention and writes `out`.
pub fn run(args: &RunArgs) -> Result<()> {
    let case = read_case(&args.input)?;
    let mut params = case.params();
    if let Some(backend) = args.backend {
        params = params.backend(backend.into());
    }
    let layer = SdpaCli.build_impl(params)?;

    let metadata = case.metadata()?;
    let start = Instant::now();
    let out = layer.forward(&case.q.view(), &case.k.view(), &case.v.view(), &metadata)?;
    let elapsed = start.elapsed();
    let backend = select(layer.backend_request(), Residence::Host)?.backend;

    let scale = layer.params().scale();
    let written = HashMap::from([
        ("causal".to_string(), case.causal.to_string()),
        ("scale".to_string(), scale.to_string()),
        ("backend".to_string(), backend.to_string()),
    ]);
    write_output(&args.output, &out, written)?;
    println!(
        "wrote out {:?} {} to {} ({backend}, causal={}, scale={scale}, {:.3} ms)",
        out.shape(),
        out.dtype(),
        args.output.display(),
        case.causal,
        elapsed.as_secs_f64() * 1e3,
    );
    Ok(())
}

//! `sdpa run`: attention over the tensors of a safetensors file.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use sdpa_runtime::prelude::*;
use sdpa_runtime::{select, Residence, SdpaImpl};

use crate::error::CliError;
use crate::error::Result;
use crate::options::BackendArg;
use crate::safetensors_io::{read_case, write_tensors, Case};
use sdpa_cli::variants::SdpaCli;

/// The flags of `sdpa run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The case to compute: a safetensors file with tensors q, k, v
    /// ([B, S, H, D], all F32, F16 or BF16) and optionally attn_mask (BOOL,
    /// U8, I32, I64 or float; [B, Sk], [B, Sq, Sk] or [B, H, Sq, Sk]), and
    /// the metadata strings causal ("true"/"false", default false) and scale
    /// (default 1/sqrt(D)). A variable-length case holds packed q
    /// ([Tq, Hq, D]), k and v ([Tk, Hkv, D]) and the I32 tensors
    /// cu_seqlens_q and cu_seqlens_k ([B + 1]: 0, then each sequence's
    /// end); each sequence attends within itself.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// Where to write the result: a safetensors file with the tensor out
    /// ([B, Sq, Hq, D], in q's dtype; packed like q for a variable-length
    /// case). An existing file is replaced.
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// The backend to run on. Without this flag, the SDPA_BACKEND environment
    /// variable decides, else auto.
    #[arg(long, value_enum, value_name = "BACKEND")]
    pub backend: Option<BackendArg>,
    /// Also run the backward pass: the input must hold dout ([B, Sq, Hq, D],
    /// q's dtype); the output then holds out, dq, dk, dv (the input dtype)
    /// and lse ([B, Hq, Sq], F32: the log of each row's softmax
    /// denominator, -inf for a row that sees no key; [Hq, Tq] for a
    /// variable-length case, whose gradients are packed like their
    /// inputs). Runs on the backend
    /// the forward runs on (`--backend cuda`: the GPU kernels on device 0).
    #[arg(long)]
    pub backward: bool,
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
    if args.backward {
        return run_backward(args, &case, &layer, &metadata);
    }
    let start = Instant::now();
    let out = layer.forward(&case.q.view(), &case.k.view(), &case.v.view(), &metadata)?;
    let elapsed = start.elapsed();
    let (written, backend, scale) = run_metadata(&case, &layer)?;
    write_tensors(
        &args.output,
        &[("out", &out, case.written_shape(&out))],
        written,
    )?;
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

/// The metadata strings an output file carries (`causal`, `scale`, and the
/// backend that ran), with that backend and the scale.
fn run_metadata(
    case: &Case,
    layer: &SdpaImpl,
) -> Result<(HashMap<String, String>, BackendKind, f32)> {
    let backend = select(layer.backend_request(), Residence::Host)?.backend;
    let scale = layer.params().scale();
    let written = HashMap::from([
        ("causal".to_string(), case.causal.to_string()),
        ("scale".to_string(), scale.to_string()),
        ("backend".to_string(), backend.to_string()),
    ]);
    Ok((written, backend, scale))
}

/// `sdpa run --backward`: the forward with the log-sum-exp, then the
/// backward; writes `out`, `dq`, `dk`, `dv` and `lse`.
fn run_backward(
    args: &RunArgs,
    case: &Case,
    layer: &SdpaImpl,
    metadata: &AttentionMetadata<'_>,
) -> Result<()> {
    let dout = case.dout.as_ref().ok_or_else(|| {
        CliError::Input(format!(
            "{} has no tensor \"dout\"; sdpa run --backward needs the output gradient dout \
             ([B, Sq, Hq, D], q's dtype)",
            args.input.display()
        ))
    })?;
    let (q, k, v) = (case.q.view(), case.k.view(), case.v.view());
    let start = Instant::now();
    let (out, lse) = layer.forward_with_lse(&q, &k, &v, metadata)?;
    let (dq, dk, dv) =
        layer.backward(&q, &k, &v, &out.view(), &dout.view(), &lse.view(), metadata)?;
    let elapsed = start.elapsed();
    let (written, backend, scale) = run_metadata(case, layer)?;
    let [b, hq, sq, _] = lse.shape();
    let lse_shape = match case.cu_seqlens {
        Some(_) => vec![hq, sq],
        None => vec![b, hq, sq],
    };
    write_tensors(
        &args.output,
        &[
            ("out", &out, case.written_shape(&out)),
            ("dq", &dq, case.written_shape(&dq)),
            ("dk", &dk, case.written_shape(&dk)),
            ("dv", &dv, case.written_shape(&dv)),
            ("lse", &lse, Some(lse_shape)),
        ],
        written,
    )?;
    println!(
        "wrote out, dq, dk, dv {} and lse f32 to {} ({backend}, causal={}, scale={scale}, \
         forward and backward {:.3} ms)",
        out.dtype(),
        args.output.display(),
        case.causal,
        elapsed.as_secs_f64() * 1e3,
    );
    Ok(())
}

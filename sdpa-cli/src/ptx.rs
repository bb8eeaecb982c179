//! `sdpa ptx`: prints the PTX embedded for one compiled variant, the text
//! the CUDA driver JIT-compiles the first time the variant runs on a device.

use std::io::Write;

use clap::ValueEnum;
use sdpa_cli::variants::SdpaCli;
use sdpa_runtime::prelude::*;

use crate::error::{CliError, Result};
use crate::options::DTypeArg;

/// The value of `--arch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ArchArg {
    /// Ampere-style kernels (mma.sync, ldmatrix, cp.async); they run on
    /// sm_80 and every later GPU, H100 included.
    #[value(name = "sm_80")]
    Sm80,
    /// Hopper kernels (wgmma, TMA); not generated yet.
    #[value(name = "sm_90a")]
    Sm90a,
}

impl ArchArg {
    /// The `.target` name.
    fn name(self) -> &'static str {
        match self {
            ArchArg::Sm80 => "sm_80",
            ArchArg::Sm90a => "sm_90a",
        }
    }
}

/// The flags of `sdpa ptx`.
#[derive(Debug, clap::Args)]
pub struct PtxArgs {
    /// Head size D; one of the compiled sizes (`sdpa info` lists them).
    #[arg(long, value_name = "D")]
    pub head_size: usize,
    /// The causal variant (top-left: query i sees keys j <= i).
    #[arg(long)]
    pub causal: bool,
    /// Element type of q, k, v and the output.
    #[arg(long, value_enum, value_name = "DTYPE", default_value = "bf16")]
    pub dtype: DTypeArg,
    /// The architecture the PTX targets.
    #[arg(long, value_enum, value_name = "ARCH", default_value = "sm_80")]
    pub arch: ArchArg,
}

/// Prints the variant's PTX to stdout (a closed pipe, as in `sdpa ptx |
/// head`, ends the output quietly).
pub fn run(args: &PtxArgs) -> Result<()> {
    let text = ptx(args)?;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(CliError::Write {
            path: "<stdout>".into(),
            source: e.into(),
        }),
        _ => Ok(()),
    }
}

/// The variant's PTX text.
fn ptx(args: &PtxArgs) -> Result<&'static str> {
    if args.arch != ArchArg::Sm80 {
        return Err(CliError::Usage(format!(
            "--arch {} is not yet generated (Hopper wgmma/TMA kernels are future work); \
             --arch sm_80 PTX runs on sm_90 GPUs too",
            args.arch.name()
        )));
    }
    let variant =
        SdpaCli
            .variant_table()
            .find(args.head_size, args.causal, DType::from(args.dtype))?;
    let kernel = variant.gpu_kernel().ok_or_else(|| {
        CliError::Usage(format!(
            "variant {} has no GPU kernel in this binary",
            variant.spec()
        ))
    })?;
    Ok(kernel.ptx())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(head_size: usize, causal: bool, dtype: DTypeArg, arch: ArchArg) -> PtxArgs {
        PtxArgs {
            head_size,
            causal,
            dtype,
            arch,
        }
    }

    #[test]
    fn prints_the_declared_variant() {
        let text = ptx(&args(128, true, DTypeArg::Bf16, ArchArg::Sm80)).unwrap();
        assert!(
            text.contains(".target sm_80"),
            "{}",
            &text[..200.min(text.len())]
        );
        assert!(text.contains("sdpa_fwd_d128_causal_bf16"));
    }

    #[test]
    fn hopper_is_not_yet() {
        let err = ptx(&args(128, false, DTypeArg::Bf16, ArchArg::Sm90a))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sm_90a is not yet"), "{err}");
    }

    #[test]
    fn undeclared_head_sizes_name_the_declared_ones() {
        let err = ptx(&args(100, false, DTypeArg::F32, ArchArg::Sm80))
            .unwrap_err()
            .to_string();
        assert!(err.contains("head size 100 was not declared"), "{err}");
    }
}

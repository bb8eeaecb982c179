//! `sdpa ptx`: prints the PTX embedded for one compiled variant, the text
//! the CUDA driver JIT-compiles the first time the variant runs on a device.

use std::io::Write;

use clap::ValueEnum;
use sdpa_cli::variants::SdpaCli;
use sdpa_runtime::prelude::*;
use sdpa_runtime::Target;

use crate::error::{CliError, Result};
use crate::options::DTypeArg;

/// The value of `--arch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ArchArg {
    /// The portable kernel every variant has: mma.sync, ldmatrix and
    /// cp.async for bf16 and f16, the CUDA cores for f32; it runs on sm_80
    /// and every later GPU.
    #[value(name = "sm_80")]
    Sm80,
    /// The Hopper kernel (warp-specialised wgmma fed by TMA) that devices
    /// of compute capability 9.0 run instead: bf16 and f16 at the head
    /// sizes the Hopper kernels cover (others have none).
    #[value(name = "sm_90a")]
    Sm90a,
}

impl ArchArg {
    /// The kernel target of the architecture.
    fn target(self) -> Target {
        match self {
            ArchArg::Sm80 => Target::Sm80,
            ArchArg::Sm90a => Target::Sm90a,
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
    /// The kernel to print: sm_80, the portable kernel (every variant has
    /// one), or sm_90a, the Hopper kernel (bf16 and f16 variants whose head
    /// size has one; an error names the others).
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

/// The variant's PTX text for `--arch`: the kernel of that target among
/// the variant's GPU kernels, the ones the `sdpa` binary ships.
fn ptx(args: &PtxArgs) -> Result<&'static str> {
    let variant =
        SdpaCli
            .variant_table()
            .find(args.head_size, args.causal, DType::from(args.dtype))?;
    let target = args.arch.target();
    let kernel = variant
        .gpu_kernels()
        .iter()
        .find(|k| k.target() == target)
        .ok_or_else(|| {
            let has: Vec<&str> = variant
                .gpu_kernels()
                .iter()
                .map(|k| k.target().name())
                .collect();
            // The head sizes of this dtype and causal flag that have one.
            let spec = variant.spec();
            let sizes: Vec<String> = SdpaCli
                .variant_table()
                .variants()
                .iter()
                .filter(|v| v.spec().dtype == spec.dtype && v.spec().causal == spec.causal)
                .filter(|v| v.gpu_kernels().iter().any(|k| k.target() == target))
                .map(|v| v.spec().head_size.to_string())
                .collect();
            CliError::Usage(format!(
                "variant {spec} has no {} kernel (its GPU kernels: {}); {}; --arch sm_80 runs \
                 on every GPU from sm_80 on",
                target.name(),
                if has.is_empty() {
                    "none".to_owned()
                } else {
                    has.join(", ")
                },
                if sizes.is_empty() {
                    format!("no {} variant of this binary has one", spec.dtype)
                } else {
                    format!("{} has one at head sizes {}", spec.dtype, sizes.join(", "))
                }
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
    fn hopper_prints_the_kernel_that_ships() {
        let text = ptx(&args(128, false, DTypeArg::Bf16, ArchArg::Sm90a)).unwrap();
        assert!(
            text.contains(".target sm_90a"),
            "{}",
            &text[..200.min(text.len())]
        );
        assert!(text.contains("wgmma"));
        let variant = SdpaCli
            .variant_table()
            .find(128, false, DType::BF16)
            .unwrap();
        assert_eq!(Some(text), variant.gpu_kernel_sm90().map(|k| k.ptx()));
    }

    #[test]
    fn variants_without_a_hopper_kernel_say_so() {
        let err = ptx(&args(64, false, DTypeArg::F32, ArchArg::Sm90a))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("has no sm_90a kernel (its GPU kernels: sm_80)"),
            "{err}"
        );
        assert!(
            err.contains("no f32 variant of this binary has one"),
            "{err}"
        );
        let err = ptx(&args(40, true, DTypeArg::Bf16, ArchArg::Sm90a))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bf16 has one at head sizes 48, 64, 80"),
            "{err}"
        );
    }

    #[test]
    fn undeclared_head_sizes_name_the_declared_ones() {
        let err = ptx(&args(100, false, DTypeArg::F32, ArchArg::Sm80))
            .unwrap_err()
            .to_string();
        assert!(err.contains("head size 100 was not declared"), "{err}");
    }
}

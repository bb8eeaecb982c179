//! `sdpa`: run, time and inspect the compile-time specialised attention
//! kernels of `sdpa-runtime`.
//!
//! - `sdpa run` computes attention for the tensors of a safetensors file;
//! - `sdpa bench` times the forward pass on model shapes;
//! - `sdpa ptx` prints the PTX embedded for one compiled variant;
//! - `sdpa info` lists the compiled variants, the CUDA devices, the kernel
//!   family each variant runs here and the backend `auto` picks.
//!
//! Errors print as one line, `error: ...`, and exit with status 1. Logs go
//! to stderr, filtered by `RUST_LOG` (default `warn`).

mod bench;
mod info;
mod options;
mod presets;
mod ptx;
mod run;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
// In the library, so that the fuzz target reaches the same reading code.
use sdpa_cli::{error, safetensors_io};
use tracing_subscriber::EnvFilter;

/// Scaled-dot-product attention with kernels specialised at compile time.
#[derive(Debug, Parser)]
#[command(name = "sdpa", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Compute attention for the q, k, v (and attn_mask) of a safetensors
    /// file and write the tensor out.
    Run(run::RunArgs),
    /// Time the forward pass: the preset table of model shapes for the
    /// backend in use, one preset, or a shape given by flags.
    Bench(Box<bench::BenchArgs>),
    /// Print the PTX embedded for one compiled variant (what the CUDA
    /// driver JIT-compiles on first use): --arch sm_80 the portable kernel,
    /// --arch sm_90a the Hopper kernel.
    Ptx(ptx::PtxArgs),
    /// List the compiled variants, the CUDA devices, the kernel family each
    /// variant runs here, the backend auto would pick and why, and the CPU
    /// threads.
    Info,
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => run::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Ptx(args) => ptx::run(args),
        Command::Info => info::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = e.to_string().replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG`; `warn` when it is unset or
/// cannot be parsed.
fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

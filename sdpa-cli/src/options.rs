//! Flag values shared by the subcommands: the backend and the element type,
//! as clap value enums so that `--help` lists what is accepted.

use clap::ValueEnum;
use sdpa_runtime::{BackendKind, DType};

/// The value of `--backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// CUDA when a driver and device are present and the tensors live
    /// there, else the CPU (`sdpa run` reads host tensors: the CPU; `sdpa
    /// bench` puts them on device 0 when there is one).
    Auto,
    /// The CPU kernels.
    Cpu,
    /// The CUDA kernels on device 0 (host tensors are copied there and the
    /// result back); an error without a CUDA driver or device.
    Cuda,
}

impl From<BackendArg> for BackendKind {
    fn from(arg: BackendArg) -> BackendKind {
        match arg {
            BackendArg::Auto => BackendKind::Auto,
            BackendArg::Cpu => BackendKind::Cpu,
            BackendArg::Cuda => BackendKind::Cuda,
        }
    }
}

/// The value of `--dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// 32-bit IEEE floats.
    F32,
    /// 16-bit IEEE floats.
    F16,
    /// bfloat16.
    Bf16,
}

impl From<DTypeArg> for DType {
    fn from(arg: DTypeArg) -> DType {
        match arg {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

//! Backend selection, as FastVideo's selector: an explicit choice in code
//! beats the `SDPA_BACKEND` environment variable, which beats `auto`.

use std::fmt;
use std::str::FromStr;

use crate::error::{Result, SdpaError};

/// The environment variable that picks a backend when code does not.
pub const BACKEND_ENV: &str = "SDPA_BACKEND";

/// A backend request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum BackendKind {
    /// CUDA when a driver and device are present and the tensors live there,
    /// else CPU.
    #[default]
    Auto,
    /// The CPU kernels.
    Cpu,
    /// The CUDA kernels.
    Cuda,
}

impl BackendKind {
    /// The name used by `SDPA_BACKEND` and `--backend`.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
        }
    }

    /// The request in `SDPA_BACKEND`, if set and not empty.
    pub fn from_env() -> Result<Option<BackendKind>> {
        match std::env::var(BACKEND_ENV) {
            Ok(v) if v.trim().is_empty() => Ok(None),
            Ok(v) => v.parse().map(Some).map_err(|_| SdpaError::BadBackendEnv(v)),
            Err(_) => Ok(None),
        }
    }

    /// Resolves the precedence: `explicit`, else `SDPA_BACKEND`, else `auto`.
    pub fn resolve(explicit: Option<BackendKind>) -> Result<BackendKind> {
        match explicit {
            Some(k) => Ok(k),
            None => Ok(BackendKind::from_env()?.unwrap_or_default()),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = SdpaError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(BackendKind::Auto),
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" | "gpu" => Ok(BackendKind::Cuda),
            _ => Err(SdpaError::Param(format!(
                "{s:?} is not a backend; use auto, cpu or cuda"
            ))),
        }
    }
}

/// What this machine offers for CUDA, found without ever panicking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CudaProbe {
    /// No usable driver or device; the reason says which.
    Absent(String),
    /// A driver with this many devices.
    Present {
        /// Number of CUDA devices.
        devices: usize,
    },
}

/// Looks for a CUDA driver and devices.
///
/// `cudarc` loads `libcuda` dynamically and panics when it is missing, so
/// the library's presence is checked first.
pub fn probe_cuda() -> CudaProbe {
    // SAFETY: this only tries to open the driver library by its usual names
    // (running its initialisers, as any later use would) and closes it again.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return CudaProbe::Absent("no CUDA driver library (libcuda) was found".into());
    }
    if let Err(e) = cudarc::driver::result::init() {
        return CudaProbe::Absent(format!("the CUDA driver failed to initialise: {e}"));
    }
    match cudarc::driver::result::device::get_count() {
        Ok(0) => CudaProbe::Absent("the CUDA driver reports no devices".into()),
        Ok(n) => CudaProbe::Present {
            devices: n as usize,
        },
        Err(e) => CudaProbe::Absent(format!("the CUDA driver cannot count devices: {e}")),
    }
}

/// The backend that runs a call, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// `Cpu` or `Cuda`, never `Auto`.
    pub backend: BackendKind,
    /// Why, in words.
    pub reason: String,
}

/// Where tensors of a call live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residence {
    /// Host memory.
    Host,
}

/// Resolves a request for tensors that live at `residence`.
pub fn select(request: BackendKind, residence: Residence) -> Result<Selection> {
    match (request, residence) {
        (BackendKind::Cpu, Residence::Host) => Ok(Selection {
            backend: BackendKind::Cpu,
            reason: "the CPU backend was asked for".into(),
        }),
        (BackendKind::Auto, Residence::Host) => Ok(Selection {
            backend: BackendKind::Cpu,
            reason: "the tensors live in host memory".into(),
        }),
        (BackendKind::Cuda, _) => Err(SdpaError::BackendUnavailable {
            backend: "cuda",
            reason: "this version of sdpa-runtime has no CUDA kernels yet; \
                     use the cpu or auto backend"
                .into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        for k in [BackendKind::Auto, BackendKind::Cpu, BackendKind::Cuda] {
            assert_eq!(k.name().parse::<BackendKind>().unwrap(), k);
        }
        let err = "tpu".parse::<BackendKind>().unwrap_err().to_string();
        assert!(!err.contains(BACKEND_ENV), "{err}");
        assert!(err.contains("auto, cpu or cuda"), "{err}");
    }

    #[test]
    fn explicit_beats_everything() {
        assert_eq!(
            BackendKind::resolve(Some(BackendKind::Cpu)).unwrap(),
            BackendKind::Cpu
        );
    }

    #[test]
    fn probing_never_panics() {
        let _ = probe_cuda();
    }
}

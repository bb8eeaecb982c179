//! Backend selection, as FastVideo's selector: an explicit choice in code
//! beats the `SDPA_BACKEND` environment variable, which beats `auto`.
//!
//! | request | host tensors | CUDA tensors |
//! | --- | --- | --- |
//! | `auto` | CPU | CUDA, on the tensors' device |
//! | `cpu` | CPU | error: copy them to the host first |
//! | `cuda` | CUDA on device 0: inputs copied there, the result copied back; an error without a driver or device | CUDA |

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use crate::error::{Result, SdpaError};
/// Where tensors live is the storage's to say; named here too for the
/// modules that select a backend by it.
pub(crate) use crate::storage::Residence;

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

/// Looks for a CUDA driver and devices, once per process (later calls
/// return the first answer).
///
/// `cudarc` (loading `libcuda` at run time) panics when it is missing, so
/// the library's presence is checked first. Every CUDA path of this crate
/// calls this before touching the driver.
pub fn probe_cuda() -> CudaProbe {
    static PROBE: OnceLock<CudaProbe> = OnceLock::new();
    PROBE.get_or_init(probe_uncached).clone()
}

fn probe_uncached() -> CudaProbe {
    if !crate::cuda_libs::driver_present() {
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

/// Resolves a request for tensors that live at `residence`.
///
/// A `cuda` request for host tensors probes the driver ([`probe_cuda`]) and
/// is a [`SdpaError::BackendUnavailable`] saying why when there is no
/// driver or device; nothing here panics when `libcuda` is missing.
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
        (BackendKind::Cpu, Residence::Cuda { ordinal }) => Err(SdpaError::BackendUnavailable {
            backend: "cpu",
            reason: format!(
                "the tensors live on CUDA device {ordinal} and the CPU kernels read host \
                 memory; copy them to the host, or ask for the cuda or auto backend"
            ),
        }),
        (BackendKind::Auto, Residence::Cuda { ordinal }) => Ok(Selection {
            backend: BackendKind::Cuda,
            reason: format!("the tensors live on CUDA device {ordinal}"),
        }),
        (BackendKind::Cuda, Residence::Cuda { ordinal }) => Ok(Selection {
            backend: BackendKind::Cuda,
            reason: format!(
                "the CUDA backend was asked for and the tensors live on device {ordinal}"
            ),
        }),
        (BackendKind::Cuda, Residence::Host) => match probe_cuda() {
            CudaProbe::Present { .. } => Ok(Selection {
                backend: BackendKind::Cuda,
                reason: "the CUDA backend was asked for; the host tensors are copied to \
                         device 0 and the result back"
                    .into(),
            }),
            CudaProbe::Absent(reason) => Err(SdpaError::BackendUnavailable {
                backend: "cuda",
                reason: format!("{reason}; use the cpu or auto backend on this machine"),
            }),
        },
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

    #[test]
    fn auto_follows_the_memory() {
        let host = select(BackendKind::Auto, Residence::Host).unwrap();
        assert_eq!(host.backend, BackendKind::Cpu);
        let device = select(BackendKind::Auto, Residence::Cuda { ordinal: 1 }).unwrap();
        assert_eq!(device.backend, BackendKind::Cuda);
        assert!(device.reason.contains("device 1"), "{}", device.reason);
    }

    #[test]
    fn cpu_refuses_device_memory() {
        let err = select(BackendKind::Cpu, Residence::Cuda { ordinal: 0 }).unwrap_err();
        assert!(matches!(
            err,
            SdpaError::BackendUnavailable { backend: "cpu", .. }
        ));
        assert!(err.to_string().contains("copy them to the host"), "{err}");
    }

    #[test]
    fn cuda_on_host_tensors_needs_a_device() {
        match (probe_cuda(), select(BackendKind::Cuda, Residence::Host)) {
            (CudaProbe::Present { .. }, Ok(s)) => assert_eq!(s.backend, BackendKind::Cuda),
            (CudaProbe::Absent(why), Err(SdpaError::BackendUnavailable { backend, reason })) => {
                assert_eq!(backend, "cuda");
                assert!(reason.starts_with(&why), "{reason}");
            }
            (probe, other) => panic!("{probe:?} but select gave {other:?}"),
        }
    }
}

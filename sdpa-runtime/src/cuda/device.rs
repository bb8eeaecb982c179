//! The devices this process runs on: one context per device ordinal (the
//! device's primary context, which every `cudarc` user of that device
//! shares) and its default stream, made on first use, after the driver was
//! probed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaStream};

use crate::error::{Result, SdpaError};
use crate::select::{probe_cuda, CudaProbe};

/// A device's context and the stream the runtime uses for host tensors.
#[derive(Debug)]
pub(crate) struct Device {
    /// The device's primary context.
    pub(crate) ctx: Arc<CudaContext>,
    /// Its default stream.
    pub(crate) stream: Arc<CudaStream>,
}

/// The number of devices, or why the driver cannot be used. Every path that
/// touches the driver calls this first: `cudarc` panics when `libcuda` is
/// missing, this never does.
pub(crate) fn ensure_driver() -> Result<usize> {
    match probe_cuda() {
        CudaProbe::Present { devices } => Ok(devices),
        CudaProbe::Absent(reason) => Err(SdpaError::BackendUnavailable {
            backend: "cuda",
            reason,
        }),
    }
}

/// The device `ordinal`, made on first use.
pub(crate) fn device(ordinal: usize) -> Result<Arc<Device>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<Device>>>> = OnceLock::new();
    let count = ensure_driver()?;
    let mut devices = DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(device) = devices.get(&ordinal) {
        return Ok(device.clone());
    }
    if ordinal >= count {
        return Err(SdpaError::BackendUnavailable {
            backend: "cuda",
            reason: format!("there is no CUDA device {ordinal}; the driver reports {count}"),
        });
    }
    let ctx = CudaContext::new(ordinal)
        .map_err(|e| SdpaError::cuda(format_args!("creating a context on device {ordinal}"), e))?;
    let stream = ctx.default_stream();
    let device = Arc::new(Device { ctx, stream });
    devices.insert(ordinal, device.clone());
    Ok(device)
}

/// The context of CUDA device `ordinal`: the device's primary context, the
/// one the runtime itself uses for host tensors.
///
/// Allocate device tensors on it (or on any `cudarc` context of your own),
/// for instance on `context(0)?.default_stream()`. Returns
/// [`SdpaError::BackendUnavailable`] when there is no driver or no such
/// device; never panics when `libcuda` is missing.
pub fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    Ok(device(ordinal)?.ctx.clone())
}

/// A CUDA device, as `sdpa info` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceInfo {
    /// The device's ordinal.
    pub ordinal: usize,
    /// The device's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Compute capability (major, minor), e.g. (9, 0).
    pub compute_capability: (i32, i32),
    /// Global memory in bytes.
    pub total_memory: usize,
    /// The most dynamic shared memory one CTA may opt in to, in bytes.
    pub max_shared_memory_per_block: usize,
    /// Streaming multiprocessors.
    pub multiprocessors: usize,
}

/// Every CUDA device of this machine, or why the driver cannot be used.
pub fn devices() -> Result<Vec<DeviceInfo>> {
    let count = ensure_driver()?;
    (0..count)
        .map(|ordinal| {
            let ctx = context(ordinal)?;
            let what = |item: &str| format!("reading the {item} of device {ordinal}");
            let attr = |a: CUdevice_attribute, item: &str| {
                ctx.attribute(a)
                    .map(|v| v.max(0) as usize)
                    .map_err(|e| SdpaError::cuda(what(item), e))
            };
            Ok(DeviceInfo {
                ordinal,
                name: ctx.name().map_err(|e| SdpaError::cuda(what("name"), e))?,
                compute_capability: ctx
                    .compute_capability()
                    .map_err(|e| SdpaError::cuda(what("compute capability"), e))?,
                total_memory: ctx
                    .total_mem()
                    .map_err(|e| SdpaError::cuda(what("memory size"), e))?,
                max_shared_memory_per_block: attr(
                    CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                    "shared memory limit",
                )?,
                multiprocessors: attr(
                    CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                    "multiprocessor count",
                )?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_devices_are_an_error_not_a_panic() {
        match probe_cuda() {
            CudaProbe::Absent(reason) => {
                let err = devices().unwrap_err();
                assert!(err.to_string().contains(&reason), "{err}");
                assert!(context(0).is_err());
            }
            CudaProbe::Present { devices: n } => {
                assert_eq!(devices().unwrap().len(), n);
                let err = context(n).unwrap_err().to_string();
                assert!(err.contains(&format!("no CUDA device {n}")), "{err}");
            }
        }
    }
}

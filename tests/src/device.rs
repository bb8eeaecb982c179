//! Device 0 for the GPU suites: its default stream, or a visible skip on a
//! machine without a CUDA driver or device, and host-to-device copies.

use std::sync::{Arc, Once};

use sdpa_runtime::cudarc::driver::{CudaSlice, CudaStream};
use sdpa_runtime::{cuda, probe_cuda, CudaProbe, Element};

use crate::cases::say;

/// Device 0's default stream, or `None` after saying once per test binary
/// that the `suite` is skipped and why, when this machine has no CUDA
/// driver or device.
pub fn stream(suite: &str) -> Option<Arc<CudaStream>> {
    static SAID: Once = Once::new();
    match probe_cuda() {
        CudaProbe::Present { .. } => Some(
            cuda::context(0)
                .expect("device 0 is present")
                .default_stream(),
        ),
        CudaProbe::Absent(reason) => {
            SAID.call_once(|| say(&format!("skipping {suite}: {reason}")));
            None
        }
    }
}

/// A copy of `host` on `stream`'s device (one zero element for an empty
/// slice: the driver refuses empty allocations).
///
/// # Panics
///
/// When the copy fails: a test's device is broken.
pub fn upload<T: Element>(stream: &Arc<CudaStream>, host: &[T]) -> CudaSlice<T> {
    if host.is_empty() {
        return stream.alloc_zeros(1).expect("a one-element device buffer");
    }
    stream.clone_htod(host).expect("a copy to the device")
}

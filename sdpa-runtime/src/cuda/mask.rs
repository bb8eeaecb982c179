//! Masks on the device, in the launch contract's one format: a dense `f32`
//! additive bias whose rows hold exactly `Sk` entries, broadcast dimensions
//! with stride 0.
//!
//! Masks arrive as host data ([`crate::AttnMask`]: bool, integer or float,
//! rank 2 to 4, possibly shorter than `Sk`). They are normalised on the host
//! ([`crate::ResolvedMask::dense_bias`]: front padding filled with
//! "attend", booleans and integers turned into `0` / `-inf`, float masks
//! widened to `f32`) and copied to the device on the launch's stream, where
//! the buffer is freed in stream order after the kernel.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use crate::error::{Result, SdpaError};
use crate::mask::ResolvedMask;

/// A mask uploaded for one launch.
#[derive(Debug)]
pub(crate) struct DeviceMask {
    /// Row-major `[B', H', Sq', Sk]` bias, or `None` when it has no element
    /// (no key at all: the kernel reads nothing).
    pub(crate) bias: Option<CudaSlice<f32>>,
    /// Element strides of the batch, head and query dimensions.
    pub(crate) strides: [usize; 3],
}

/// Normalises `mask` and copies it to the device on `stream`.
pub(crate) fn upload(mask: &ResolvedMask<'_>, stream: &Arc<CudaStream>) -> Result<DeviceMask> {
    let (dense, strides) = mask.dense_bias();
    let bias = if dense.is_empty() {
        None
    } else {
        Some(stream.clone_htod(&dense).map_err(|e| {
            SdpaError::cuda(
                format_args!(
                    "copying the attention mask ({} bytes) to the device",
                    dense.len() * 4
                ),
                e,
            )
        })?)
    };
    Ok(DeviceMask { bias, strides })
}

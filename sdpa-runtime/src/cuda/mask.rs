//! Masks on the device, as the launch contract reads them: in place, in
//! their own element kind ([`MaskKind`]), with the resolved mask's strides
//! (0 where broadcast) and front padding.
//!
//! A mask in device memory ([`crate::AttnMask::from_cuda`]) is passed as
//! it is: its address, no copy. A host mask is copied to the device as it
//! is stored (no widening: a `bool` mask moves one byte per element), on
//! the launch's stream, and freed in stream order after the kernels.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr, SyncOnDrop};
use half::{bf16, f16};

use crate::error::{Result, SdpaError};
use crate::mask::{CudaMaskData, MaskData, MaskKind, ResolvedMask};

/// A host mask's elements, copied to the device.
#[derive(Debug)]
enum Uploaded {
    Bool(CudaSlice<bool>),
    U8(CudaSlice<u8>),
    I32(CudaSlice<i32>),
    I64(CudaSlice<i64>),
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
}

/// Where the kernels read a mask's elements.
#[derive(Debug)]
enum Elements<'a> {
    /// The caller's device memory.
    InPlace(CudaMaskData<'a>),
    /// A copy of a host mask made for this call.
    Uploaded(Uploaded),
}

/// A mask ready for one launch: the contract's `mask`, `mask_kind`,
/// `mask_pad` and `mask_stride_*`.
#[derive(Debug)]
pub(crate) struct DeviceMask<'a> {
    /// The elements, or `None` when there is none (no key at all: the
    /// kernels read nothing, and get a null pointer).
    elements: Option<Elements<'a>>,
    /// The element kind.
    pub(crate) kind: MaskKind,
    /// Element strides of the batch, head and query dimensions.
    pub(crate) strides: [usize; 3],
    /// Leading keys that always attend.
    pub(crate) pad: usize,
}

impl DeviceMask<'_> {
    /// The address for the kernels on `stream`, and the guard that records
    /// their read once dropped after the launches; `None` for no element.
    /// An in-place mask must live in `stream`'s context.
    pub(crate) fn device_ptr<'s>(
        &'s self,
        stream: &'s CudaStream,
    ) -> Result<Option<(u64, SyncOnDrop<'s>)>> {
        Ok(match &self.elements {
            None => None,
            Some(Elements::InPlace(d)) => {
                if d.stream().context() != stream.context() {
                    return Err(SdpaError::Residence(format!(
                        "the mask lives in {} but the kernels run on CUDA device {}; pass the \
                         mask on the tensors' device",
                        d.residence(),
                        stream.context().ordinal()
                    )));
                }
                Some(d.device_ptr(stream))
            }
            Some(Elements::Uploaded(u)) => Some(match u {
                Uploaded::Bool(s) => s.device_ptr(stream),
                Uploaded::U8(s) => s.device_ptr(stream),
                Uploaded::I32(s) => s.device_ptr(stream),
                Uploaded::I64(s) => s.device_ptr(stream),
                Uploaded::F32(s) => s.device_ptr(stream),
                Uploaded::F16(s) => s.device_ptr(stream),
                Uploaded::BF16(s) => s.device_ptr(stream),
            }),
        })
    }
}

/// `mask` as the kernels read it on `stream`: in place for a device mask,
/// else its elements copied to the device as stored.
pub(crate) fn prepare<'a>(
    mask: &ResolvedMask<'a>,
    stream: &Arc<CudaStream>,
) -> Result<DeviceMask<'a>> {
    let elements = if mask.is_empty() {
        None
    } else if let Some(d) = mask.cuda_data() {
        Some(Elements::InPlace(d))
    } else if let Some(h) = mask.host_data() {
        Some(Elements::Uploaded(upload(&h, stream)?))
    } else {
        None
    };
    Ok(DeviceMask {
        elements,
        kind: mask.kind(),
        strides: mask.strides(),
        pad: mask.pad(),
    })
}

/// Copies a host mask's elements to the device, as they are.
fn upload(data: &MaskData<'_>, stream: &Arc<CudaStream>) -> Result<Uploaded> {
    fn copy<T: DeviceRepr>(s: &[T], stream: &Arc<CudaStream>) -> Result<CudaSlice<T>> {
        stream.clone_htod(s).map_err(|e| {
            SdpaError::cuda(
                format_args!(
                    "copying the attention mask ({} bytes) to the device",
                    std::mem::size_of_val(s)
                ),
                e,
            )
        })
    }
    Ok(match *data {
        MaskData::Bool(s) => Uploaded::Bool(copy(s, stream)?),
        MaskData::U8(s) => Uploaded::U8(copy(s, stream)?),
        MaskData::I32(s) => Uploaded::I32(copy(s, stream)?),
        MaskData::I64(s) => Uploaded::I64(copy(s, stream)?),
        MaskData::F32(s) => Uploaded::F32(copy(s, stream)?),
        MaskData::F16(s) => Uploaded::F16(copy(s, stream)?),
        MaskData::BF16(s) => Uploaded::BF16(copy(s, stream)?),
    })
}

/// A float mask in device memory, copied to the host (waiting for it) so
/// that host rules can read it: the GPU backward's check for rows hidden
/// by large finite values. `None` for a host mask, or a device mask of
/// `bool` or integers (which hide with `-inf` only).
pub(crate) fn float_to_host(mask: &ResolvedMask<'_>) -> Result<Option<HostFloatMask>> {
    let Some(d) = mask.cuda_data() else {
        return Ok(None);
    };
    fn copy<T: DeviceRepr>(
        r: &crate::storage::CudaRef<'_, T>,
        stream: &Arc<CudaStream>,
    ) -> Result<Vec<T>> {
        let fail = |e| SdpaError::cuda("copying the float mask to the host for its check", e);
        let v = match r {
            crate::storage::CudaRef::Slice(s) => stream.clone_dtoh(*s),
            crate::storage::CudaRef::View(v) => stream.clone_dtoh(*v),
        }
        .map_err(fail)?;
        stream.synchronize().map_err(fail)?;
        Ok(v)
    }
    let stream = d.stream();
    Ok(Some(match d {
        CudaMaskData::F32(r) => HostFloatMask::F32(copy(&r, stream)?),
        CudaMaskData::F16(r) => HostFloatMask::F16(copy(&r, stream)?),
        CudaMaskData::BF16(r) => HostFloatMask::BF16(copy(&r, stream)?),
        _ => return Ok(None),
    }))
}

/// A float device mask's elements, copied to the host ([`float_to_host`]).
#[derive(Debug)]
pub(crate) enum HostFloatMask {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl HostFloatMask {
    /// The elements, borrowed as a host mask's.
    pub(crate) fn data(&self) -> MaskData<'_> {
        match self {
            HostFloatMask::F32(v) => MaskData::F32(v),
            HostFloatMask::F16(v) => MaskData::F16(v),
            HostFloatMask::BF16(v) => MaskData::BF16(v),
        }
    }
}

//! CUDA storage: borrowed and owned `cudarc` device buffers of one of the
//! element types, and the copies between them and the host.

use std::sync::Arc;

use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice,
    SyncOnDrop, ValidAsZeroBits,
};
use half::{bf16, f16};

use super::dispatch::dispatch;
use super::host::OwnedData;
use crate::error::{Result, SdpaError};
use crate::DType;

/// Borrowed CUDA device memory holding `T`: a whole [`CudaSlice`] or a
/// [`CudaView`] into one. Made with `From` from either; copying it copies
/// the borrow, not the memory.
#[derive(Debug)]
pub enum CudaRef<'a, T> {
    /// A whole allocation.
    Slice(&'a CudaSlice<T>),
    /// A view into an allocation.
    View(&'a CudaView<'a, T>),
}

impl<T> Clone for CudaRef<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for CudaRef<'_, T> {}

impl<'a, T> From<&'a CudaSlice<T>> for CudaRef<'a, T> {
    fn from(s: &'a CudaSlice<T>) -> Self {
        CudaRef::Slice(s)
    }
}
impl<'a, T> From<&'a CudaView<'a, T>> for CudaRef<'a, T> {
    fn from(v: &'a CudaView<'a, T>) -> Self {
        CudaRef::View(v)
    }
}

impl<'a, T> CudaRef<'a, T> {
    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            CudaRef::Slice(s) => s.len(),
            CudaRef::View(v) => v.len(),
        }
    }
    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The stream the memory was allocated on (its context is the memory's
    /// context).
    pub fn stream(&self) -> &'a Arc<CudaStream> {
        match *self {
            CudaRef::Slice(s) => s.stream(),
            CudaRef::View(v) => DeviceSlice::stream(v),
        }
    }
    /// The address for reading on `stream`, and the guard that records the
    /// read on `stream` once dropped after the work that reads it.
    pub(crate) fn device_ptr<'s>(&'s self, stream: &'s CudaStream) -> (u64, SyncOnDrop<'s>) {
        match self {
            CudaRef::Slice(s) => s.device_ptr(stream),
            CudaRef::View(v) => v.device_ptr(stream),
        }
    }
}

/// Mutably borrowed CUDA device memory holding `T`: a [`CudaViewMut`], made
/// with `From` from a `&mut` [`CudaSlice`] or a [`CudaViewMut`].
#[derive(Debug)]
pub struct CudaRefMut<'a, T>(pub(crate) CudaViewMut<'a, T>);

impl<'a, T> From<&'a mut CudaSlice<T>> for CudaRefMut<'a, T> {
    fn from(s: &'a mut CudaSlice<T>) -> Self {
        CudaRefMut(s.as_view_mut())
    }
}
impl<'a, T> From<CudaViewMut<'a, T>> for CudaRefMut<'a, T> {
    fn from(v: CudaViewMut<'a, T>) -> Self {
        CudaRefMut(v)
    }
}

impl<T> CudaRefMut<'_, T> {
    /// The number of elements.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The stream the memory was allocated on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        DeviceSlice::stream(&self.0)
    }
}

/// Borrowed CUDA device memory of one of the element types.
#[derive(Clone, Copy, Debug)]
pub enum CudaData<'a> {
    /// `f32` elements.
    F32(CudaRef<'a, f32>),
    /// `f16` elements.
    F16(CudaRef<'a, f16>),
    /// `bf16` elements.
    BF16(CudaRef<'a, bf16>),
}

impl<'a> CudaData<'a> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        dispatch!(self, CudaData(_) => dtype)
    }
    /// The number of elements.
    pub fn len(&self) -> usize {
        dispatch!(self, CudaData(d) => d.len())
    }
    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The stream the memory was allocated on.
    pub fn stream(&self) -> &'a Arc<CudaStream> {
        dispatch!(self, CudaData(d) => d.stream())
    }
    /// The address for reading on `stream`, and the guard that records the
    /// read on `stream` once dropped after the work that reads it.
    pub(crate) fn device_ptr<'s>(&'s self, stream: &'s CudaStream) -> (u64, SyncOnDrop<'s>) {
        dispatch!(self, CudaData(d) => d.device_ptr(stream))
    }
}

/// Mutably borrowed CUDA device memory of one of the element types.
#[derive(Debug)]
pub enum CudaDataMut<'a> {
    /// `f32` elements.
    F32(CudaRefMut<'a, f32>),
    /// `f16` elements.
    F16(CudaRefMut<'a, f16>),
    /// `bf16` elements.
    BF16(CudaRefMut<'a, bf16>),
}

impl CudaDataMut<'_> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        dispatch!(self, CudaDataMut(_) => dtype)
    }
    /// The number of elements.
    pub fn len(&self) -> usize {
        dispatch!(self, CudaDataMut(d) => d.len())
    }
    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The stream the memory was allocated on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        dispatch!(self, CudaDataMut(d) => d.stream())
    }
    /// The address for writing on `stream`, and the guard that records the
    /// write on `stream` once dropped after the work that writes it.
    pub(crate) fn device_ptr_mut<'s>(
        &'s mut self,
        stream: &'s CudaStream,
    ) -> (u64, SyncOnDrop<'s>) {
        dispatch!(self, CudaDataMut(d) => d.0.device_ptr_mut(stream))
    }
}

/// An owned CUDA device buffer of one of the element types.
#[derive(Debug)]
pub enum CudaOwned {
    /// `f32` elements.
    F32(CudaSlice<f32>),
    /// `f16` elements.
    F16(CudaSlice<f16>),
    /// `bf16` elements.
    BF16(CudaSlice<bf16>),
}

impl CudaOwned {
    /// The element type.
    pub fn dtype(&self) -> DType {
        dispatch!(self, CudaOwned(_) => dtype)
    }
    /// The number of elements of the allocation.
    pub fn len(&self) -> usize {
        dispatch!(self, CudaOwned(s) => s.len())
    }
    /// Whether the allocation holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The stream the memory was allocated on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        dispatch!(self, CudaOwned(s) => s.stream())
    }
    /// The buffer, borrowed.
    pub(crate) fn as_cuda(&self) -> CudaData<'_> {
        dispatch!(self, CudaOwned(s) -> CudaData(CudaRef::Slice(s)))
    }
    /// The buffer, borrowed mutably.
    pub(crate) fn as_cuda_mut(&mut self) -> CudaDataMut<'_> {
        dispatch!(self, CudaOwned(s) -> CudaDataMut(s.into()))
    }

    /// A buffer of `n` zeros of `dtype` on `stream` (of at least one
    /// element: the driver refuses empty allocations).
    pub(crate) fn zeros(stream: &Arc<CudaStream>, dtype: DType, n: usize) -> Result<CudaOwned> {
        fn alloc<T: DeviceRepr + ValidAsZeroBits>(
            stream: &Arc<CudaStream>,
            n: usize,
        ) -> Result<CudaSlice<T>> {
            stream.alloc_zeros::<T>(n.max(1)).map_err(|e| {
                SdpaError::cuda(
                    format_args!(
                        "allocating the output ({} bytes)",
                        n * std::mem::size_of::<T>()
                    ),
                    e,
                )
            })
        }
        Ok(dispatch!(dtype, T -> CudaOwned(alloc::<T>(stream, n)?)))
    }

    /// Copies the first `n` elements to the host, waiting for the work
    /// queued on the buffer's stream.
    pub fn to_host(&self, n: usize) -> Result<OwnedData> {
        fn copy<T: DeviceRepr>(s: &CudaSlice<T>, n: usize) -> Result<Vec<T>> {
            if n == 0 {
                return Ok(Vec::new());
            }
            if n > s.len() {
                return Err(SdpaError::Shape(format!(
                    "copying {n} elements of a device buffer of {}",
                    s.len()
                )));
            }
            let stream = s.stream();
            let v = stream
                .clone_dtoh(&s.slice(..n))
                .map_err(|e| SdpaError::cuda("copying a tensor to the host", e))?;
            stream
                .synchronize()
                .map_err(|e| SdpaError::cuda("waiting for a tensor's stream", e))?;
            Ok(v)
        }
        Ok(dispatch!(self, CudaOwned(s) -> OwnedData(copy(s, n)?)))
    }
}

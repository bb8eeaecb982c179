//! Where a tensor's elements live, below the tensor types: host memory or
//! CUDA device memory, each backend's buffers in their own module.
//!
//! - [`host`]: borrowed and owned host buffers ([`HostData`],
//!   [`HostDataMut`], [`OwnedData`]);
//! - [`cuda`]: `cudarc` device buffers ([`CudaRef`], [`CudaRefMut`],
//!   [`CudaData`], [`CudaDataMut`], [`CudaOwned`]), with their device
//!   addresses, allocation and the copy back to the host;
//! - `dispatch`: the one `match` over the element types that every buffer
//!   enum above goes through, and the generic code above that starts from a
//!   runtime [`DType`].
//!
//! This module joins them: [`Storage`] and [`StorageMut`] for views,
//! [`TensorData`] for owned tensors, and [`Residence`], where each one's
//! memory is. Nothing here knows the tensor types or backend selection.

pub(crate) mod cuda;
pub(crate) mod dispatch;
pub(crate) mod host;

pub use cuda::{CudaData, CudaDataMut, CudaOwned, CudaRef, CudaRefMut};
pub use host::{HostData, HostDataMut, OwnedData};

use std::fmt;

use crate::error::Result;
use crate::DType;

/// Where a tensor's elements live: host memory or which CUDA device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Residence {
    /// Host memory.
    Host,
    /// Memory of one CUDA device.
    Cuda {
        /// The device's ordinal.
        ordinal: usize,
    },
}

impl Residence {
    /// Whether this is CUDA device memory.
    pub fn is_cuda(self) -> bool {
        matches!(self, Residence::Cuda { .. })
    }
}

impl fmt::Display for Residence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Residence::Host => f.write_str("host memory"),
            Residence::Cuda { ordinal } => write!(f, "CUDA device {ordinal}"),
        }
    }
}

/// The residence of device memory whose stream is `stream`.
pub(crate) fn on_device(stream: &cudarc::driver::CudaStream) -> Residence {
    Residence::Cuda {
        ordinal: stream.context().ordinal(),
    }
}

/// Where a tensor's elements live.
///
/// More places may be added as further variants, so code that matches on
/// it must keep a wildcard arm.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum Storage<'a> {
    /// Host memory.
    Host(HostData<'a>),
    /// CUDA device memory.
    Cuda(CudaData<'a>),
}

impl Storage<'_> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Host(d) => d.dtype(),
            Storage::Cuda(d) => d.dtype(),
        }
    }
    /// The number of elements of the buffer.
    pub fn len(&self) -> usize {
        match self {
            Storage::Host(d) => d.len(),
            Storage::Cuda(d) => d.len(),
        }
    }
    /// Whether the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Where the memory is.
    pub fn residence(&self) -> Residence {
        match self {
            Storage::Host(_) => Residence::Host,
            Storage::Cuda(d) => on_device(d.stream()),
        }
    }
}

/// Where a writable tensor's elements live. See [`Storage`].
#[derive(Debug)]
#[non_exhaustive]
pub enum StorageMut<'a> {
    /// Host memory.
    Host(HostDataMut<'a>),
    /// CUDA device memory.
    Cuda(CudaDataMut<'a>),
}

impl StorageMut<'_> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            StorageMut::Host(d) => d.dtype(),
            StorageMut::Cuda(d) => d.dtype(),
        }
    }
    /// The number of elements of the buffer.
    pub fn len(&self) -> usize {
        match self {
            StorageMut::Host(d) => d.len(),
            StorageMut::Cuda(d) => d.len(),
        }
    }
    /// Whether the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Where the memory is.
    pub fn residence(&self) -> Residence {
        match self {
            StorageMut::Host(_) => Residence::Host,
            StorageMut::Cuda(d) => on_device(d.stream()),
        }
    }
}

/// The buffer of a [`Tensor`](crate::Tensor): host memory or CUDA device
/// memory.
#[derive(Debug)]
#[non_exhaustive]
pub enum TensorData {
    /// Host memory.
    Host(OwnedData),
    /// CUDA device memory.
    Cuda(CudaOwned),
}

impl TensorData {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::Host(d) => d.dtype(),
            TensorData::Cuda(d) => d.dtype(),
        }
    }
    /// Where the memory is.
    pub fn residence(&self) -> Residence {
        match self {
            TensorData::Host(_) => Residence::Host,
            TensorData::Cuda(d) => on_device(d.stream()),
        }
    }
    /// The buffer, borrowed.
    pub(crate) fn as_storage(&self) -> Storage<'_> {
        match self {
            TensorData::Host(d) => Storage::Host(d.as_host()),
            TensorData::Cuda(d) => Storage::Cuda(d.as_cuda()),
        }
    }
    /// The buffer, borrowed mutably.
    pub(crate) fn as_storage_mut(&mut self) -> StorageMut<'_> {
        match self {
            TensorData::Host(d) => StorageMut::Host(d.as_host_mut()),
            TensorData::Cuda(d) => StorageMut::Cuda(d.as_cuda_mut()),
        }
    }
    /// A host copy of the first `n` elements: a clone of host memory, or a
    /// device-to-host copy that waits for the work queued on the buffer's
    /// stream.
    pub(crate) fn to_host(&self, n: usize) -> Result<OwnedData> {
        match self {
            TensorData::Host(d) => Ok(d.clone()),
            TensorData::Cuda(d) => d.to_host(n),
        }
    }
}

//! Tensor views: a `[batch, seq, heads, head_dim]` layout over a buffer.
//!
//! Views borrow the caller's memory and never copy it. Any strides are
//! accepted for the batch, token and head dimensions (FastVideo hands over
//! transposed views); the last dimension must be contiguous.
//!
//! The memory is host memory ([`TensorView::from_slice`]) or CUDA device
//! memory allocated with `cudarc` ([`TensorView::from_cuda`], over a
//! [`CudaSlice`] or a [`CudaView`] into one); the same traits take both, and
//! the backend follows the memory (see [`crate::select()`]). The buffers
//! themselves, and the copies between devices, are the storage's
//! ([`Storage`], [`TensorData`]); the layout is a [`Layout`].
//!
//! ```
//! use sdpa_runtime::{Layout, TensorView};
//! # fn main() -> Result<(), sdpa_runtime::SdpaError> {
//! let data = vec![0.0f32; 2 * 16 * 4 * 64];
//! let q = TensorView::from_slice(&data, [2, 16, 4, 64])?;
//! assert_eq!(q.layout().heads(), 4);
//! // The same buffer read as [batch, heads, seq, dim] memory, seen as [B, S, H, D]:
//! let t = TensorView::with_strides(&data, [2, 16, 4, 64], [4 * 16 * 64, 64, 16 * 64, 1])?;
//! assert_eq!(t.layout().seq(), 16);
//! # Ok(()) }
//! ```
//!
//! [`CudaView`]: cudarc::driver::CudaView

use cudarc::driver::CudaSlice;

use crate::element::Element;
use crate::error::{Result, SdpaError};
use crate::layout::Layout;
use crate::storage::{
    CudaData, CudaDataMut, CudaOwned, CudaRef, CudaRefMut, HostData, HostDataMut, OwnedData,
    Residence, Storage, StorageMut, TensorData,
};
use crate::DType;

fn check_fits(layout: &Layout, len: usize, what: &str) -> Result<()> {
    let need = layout.required_len()?;
    if need > len {
        return Err(SdpaError::Shape(format!(
            "{what} of shape {:?} with strides {:?} needs a buffer of {need} elements, \
             but the buffer holds {len}",
            layout.shape(),
            layout.strides()
        )));
    }
    Ok(())
}

/// A read-only `[batch, seq, heads, head_dim]` tensor over borrowed memory.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    layout: Layout,
    storage: Storage<'a>,
}

impl<'a> TensorView<'a> {
    /// A contiguous view of `data` with `shape`.
    pub fn from_slice<T: Element>(data: &'a [T], shape: [usize; 4]) -> Result<Self> {
        Self::new(T::host(data), Layout::contiguous(shape))
    }

    /// A strided view of `data`; strides are in elements.
    pub fn with_strides<T: Element>(
        data: &'a [T],
        shape: [usize; 4],
        strides: [usize; 4],
    ) -> Result<Self> {
        Self::new(T::host(data), Layout::strided(shape, strides)?)
    }

    /// A view of type-erased host data, checked against the layout.
    pub fn new(data: HostData<'a>, layout: Layout) -> Result<Self> {
        Self::from_storage(Storage::Host(data), layout)
    }

    /// A contiguous view of CUDA device memory with `shape`: a
    /// `&CudaSlice<T>` or a `&CudaView<T>`.
    ///
    /// ```no_run
    /// use sdpa_runtime::{cuda, TensorView};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let stream = cuda::context(0)?.default_stream();
    /// let q = stream.alloc_zeros::<f32>(2 * 16 * 4 * 64)?;
    /// let view = TensorView::from_cuda(&q, [2, 16, 4, 64])?;
    /// assert!(view.residence().is_cuda());
    /// # Ok(()) }
    /// ```
    pub fn from_cuda<T: Element>(
        data: impl Into<CudaRef<'a, T>>,
        shape: [usize; 4],
    ) -> Result<Self> {
        Self::new_cuda(T::cuda(data.into()), Layout::contiguous(shape))
    }

    /// A strided view of CUDA device memory; strides are in elements.
    pub fn from_cuda_with_strides<T: Element>(
        data: impl Into<CudaRef<'a, T>>,
        shape: [usize; 4],
        strides: [usize; 4],
    ) -> Result<Self> {
        Self::new_cuda(T::cuda(data.into()), Layout::strided(shape, strides)?)
    }

    /// A view of type-erased device data, checked against the layout.
    pub fn new_cuda(data: CudaData<'a>, layout: Layout) -> Result<Self> {
        Self::from_storage(Storage::Cuda(data), layout)
    }

    fn from_storage(storage: Storage<'a>, layout: Layout) -> Result<Self> {
        check_fits(&layout, storage.len(), "a tensor")?;
        Ok(TensorView { layout, storage })
    }

    /// The shape and strides.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }
    /// Where the elements live.
    pub fn storage(&self) -> &Storage<'a> {
        &self.storage
    }
    /// Host memory or which CUDA device.
    pub fn residence(&self) -> Residence {
        self.storage.residence()
    }
    /// The host slice if the view holds `T` on the host.
    pub fn host_slice<T: Element>(&self) -> Option<&'a [T]> {
        match &self.storage {
            Storage::Host(d) => T::downcast(d),
            Storage::Cuda(_) => None,
        }
    }
    /// The device memory if the view is on a CUDA device.
    pub fn cuda_data(&self) -> Option<CudaData<'a>> {
        match self.storage {
            Storage::Cuda(d) => Some(d),
            Storage::Host(_) => None,
        }
    }
}

/// A writable `[batch, seq, heads, head_dim]` tensor over borrowed memory:
/// the caller's output buffer.
#[derive(Debug)]
pub struct TensorViewMut<'a> {
    layout: Layout,
    storage: StorageMut<'a>,
}

impl<'a> TensorViewMut<'a> {
    /// A contiguous writable view of `data` with `shape`.
    pub fn from_slice<T: Element>(data: &'a mut [T], shape: [usize; 4]) -> Result<Self> {
        Self::new(T::host_mut(data), Layout::contiguous(shape))
    }

    /// A strided writable view; strides are in elements and must not make two
    /// elements share memory.
    pub fn with_strides<T: Element>(
        data: &'a mut [T],
        shape: [usize; 4],
        strides: [usize; 4],
    ) -> Result<Self> {
        Self::new(T::host_mut(data), Layout::strided(shape, strides)?)
    }

    /// A writable view of type-erased host data, checked against the layout.
    pub fn new(data: HostDataMut<'a>, layout: Layout) -> Result<Self> {
        Self::from_storage(StorageMut::Host(data), layout)
    }

    /// A contiguous writable view of CUDA device memory with `shape`: a
    /// `&mut CudaSlice<T>` or a `CudaViewMut<T>`.
    pub fn from_cuda<T: Element>(
        data: impl Into<CudaRefMut<'a, T>>,
        shape: [usize; 4],
    ) -> Result<Self> {
        Self::new_cuda(T::cuda_mut(data.into()), Layout::contiguous(shape))
    }

    /// A strided writable view of CUDA device memory; strides are in
    /// elements and must not make two elements share memory.
    pub fn from_cuda_with_strides<T: Element>(
        data: impl Into<CudaRefMut<'a, T>>,
        shape: [usize; 4],
        strides: [usize; 4],
    ) -> Result<Self> {
        Self::new_cuda(T::cuda_mut(data.into()), Layout::strided(shape, strides)?)
    }

    /// A writable view of type-erased device data, checked against the
    /// layout.
    pub fn new_cuda(data: CudaDataMut<'a>, layout: Layout) -> Result<Self> {
        Self::from_storage(StorageMut::Cuda(data), layout)
    }

    fn from_storage(storage: StorageMut<'a>, layout: Layout) -> Result<Self> {
        check_fits(&layout, storage.len(), "the output")?;
        if !layout.is_non_overlapping() {
            return Err(SdpaError::Shape(format!(
                "the output's strides {:?} make elements of shape {:?} overlap; \
                 pass a buffer where every element has its own memory",
                layout.strides(),
                layout.shape()
            )));
        }
        Ok(TensorViewMut { layout, storage })
    }

    /// The shape and strides.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }
    /// Where the elements live.
    pub fn storage(&self) -> &StorageMut<'a> {
        &self.storage
    }
    /// Where the elements live, writable.
    pub fn storage_mut(&mut self) -> &mut StorageMut<'a> {
        &mut self.storage
    }
    /// Host memory or which CUDA device.
    pub fn residence(&self) -> Residence {
        self.storage.residence()
    }
    /// The host slice if the view holds `T` on the host.
    pub fn host_slice_mut<T: Element>(&mut self) -> Option<&mut [T]> {
        match &mut self.storage {
            StorageMut::Host(d) => T::downcast_mut(d),
            StorageMut::Cuda(_) => None,
        }
    }
}

/// An owned, contiguous `[batch, seq, heads, head_dim]` tensor: what
/// [`forward`](crate::AttentionImpl::forward) returns.
///
/// It lives where the call's `q` lives: host memory for host inputs
/// (whichever backend ran), device memory on `q`'s stream for CUDA inputs,
/// as PyTorch returns its result on the inputs' device. [`Tensor::to_host`]
/// copies a device tensor back.
#[derive(Debug)]
pub struct Tensor {
    shape: [usize; 4],
    data: TensorData,
}

impl Tensor {
    /// A host tensor of zeros.
    pub fn zeros(dtype: DType, shape: [usize; 4]) -> Tensor {
        Tensor {
            shape,
            data: TensorData::Host(OwnedData::zeros(dtype, shape.iter().product())),
        }
    }
    /// A host tensor owning `data`, which must hold exactly the shape's
    /// elements.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: [usize; 4]) -> Result<Tensor> {
        check_len(shape, data.len())?;
        Ok(Tensor {
            shape,
            data: TensorData::Host(T::owned(data)),
        })
    }
    /// A device tensor owning `data`, which must hold exactly the shape's
    /// elements.
    pub fn from_cuda<T: Element>(data: CudaSlice<T>, shape: [usize; 4]) -> Result<Tensor> {
        check_len(shape, data.len())?;
        Ok(Tensor {
            shape,
            data: TensorData::Cuda(T::cuda_owned(data)),
        })
    }
    /// A device tensor over a buffer the runtime allocated (at least one
    /// element, even for an empty shape).
    pub(crate) fn from_cuda_owned(data: CudaOwned, shape: [usize; 4]) -> Tensor {
        Tensor {
            shape,
            data: TensorData::Cuda(data),
        }
    }
    /// `[batch, seq, heads, head_dim]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }
    /// Host memory or which CUDA device.
    pub fn residence(&self) -> Residence {
        self.data.residence()
    }
    /// The owned buffer.
    pub fn data(&self) -> &TensorData {
        &self.data
    }
    /// Gives up the owned buffer.
    pub fn into_data(self) -> TensorData {
        self.data
    }
    /// The host buffer, if the tensor is in host memory.
    pub fn host_data(&self) -> Option<&OwnedData> {
        match &self.data {
            TensorData::Host(d) => Some(d),
            TensorData::Cuda(_) => None,
        }
    }
    /// The elements as `T`, if the tensor holds `T` in host memory.
    pub fn as_slice<T: Element>(&self) -> Option<&[T]> {
        self.host_data().and_then(T::downcast_owned)
    }
    /// The device buffer as `T`, if the tensor holds `T` on a CUDA device.
    pub fn cuda_slice<T: Element>(&self) -> Option<&CudaSlice<T>> {
        match &self.data {
            TensorData::Cuda(d) => T::downcast_cuda_owned(d),
            TensorData::Host(_) => None,
        }
    }
    /// A host copy: a clone of a host tensor, or a device-to-host copy
    /// (which waits for the work queued on the tensor's stream).
    pub fn to_host(&self) -> Result<Tensor> {
        Ok(Tensor {
            shape: self.shape,
            data: TensorData::Host(self.data.to_host(self.numel())?),
        })
    }
    /// The elements widened to `f32`, copied from the device if need be.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(match &self.data {
            TensorData::Host(d) => d.to_f32_vec(),
            TensorData::Cuda(_) => self.data.to_host(self.numel())?.to_f32_vec(),
        })
    }
    /// A read-only view.
    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            layout: Layout::contiguous(self.shape),
            storage: self.data.as_storage(),
        }
    }
    /// A writable view.
    pub fn view_mut(&mut self) -> TensorViewMut<'_> {
        TensorViewMut {
            layout: Layout::contiguous(self.shape),
            storage: self.data.as_storage_mut(),
        }
    }
}

/// Host tensors are equal when their shapes and elements are. A device
/// tensor is equal to nothing, itself included (reading it needs a copy
/// that may fail): compare [`Tensor::to_host`] copies instead.
impl PartialEq for Tensor {
    fn eq(&self, other: &Tensor) -> bool {
        match (&self.data, &other.data) {
            (TensorData::Host(a), TensorData::Host(b)) => self.shape == other.shape && a == b,
            _ => false,
        }
    }
}

fn check_len(shape: [usize; 4], len: usize) -> Result<()> {
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| SdpaError::Shape(format!("shape {shape:?} overflows")))?;
    if len != n {
        return Err(SdpaError::Shape(format!(
            "shape {shape:?} has {n} elements but the buffer holds {len}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_shapes_whose_other_sizes_overflow_address_nothing() {
        let huge = [0, usize::MAX / 2, 3, 64];
        let l = Layout::contiguous(huge);
        assert_eq!(l.numel(), 0);
        assert_eq!(l.required_len().unwrap(), 0);
        assert!(l.is_non_overlapping());
        assert!(Tensor::from_vec(Vec::<f32>::new(), huge).is_ok());
        assert!(Tensor::from_vec(vec![0.0f32], [1, usize::MAX / 2, 3, 64]).is_err());
    }

    #[test]
    fn short_buffers_are_refused() {
        let data = vec![0.0f32; 10];
        let err = TensorView::from_slice(&data, [1, 2, 1, 8]).unwrap_err();
        assert!(err.to_string().contains("16 elements"), "{err}");
    }

    #[test]
    fn host_tensors_copy_and_widen() {
        let t = Tensor::from_vec(vec![half::bf16::from_f32(1.5); 4], [1, 2, 1, 2]).unwrap();
        assert_eq!(t.to_f32_vec().unwrap(), [1.5; 4]);
        assert_eq!(t.to_host().unwrap(), t);
        assert_eq!(t.view().layout().shape(), [1, 2, 1, 2]);
    }
}

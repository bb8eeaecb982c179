//! Tensor views: a `[batch, seq, heads, head_dim]` layout over a buffer.
//!
//! Views borrow the caller's memory and never copy it. Any strides are
//! accepted for the batch, token and head dimensions (FastVideo hands over
//! transposed views); the last dimension must be contiguous.
//!
//! The memory is host memory ([`TensorView::from_slice`]) or CUDA device
//! memory allocated with `cudarc` ([`TensorView::from_cuda`], over a
//! [`CudaSlice`] or a [`CudaView`] into one); the same traits take both, and
//! the backend follows the memory (see [`crate::select`]).
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

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceSlice};
use half::{bf16, f16};

use crate::element::Element;
use crate::error::{Result, SdpaError};
use crate::select::Residence;
use crate::DType;

/// Shape and strides (in elements) of a `[batch, seq, heads, head_dim]`
/// tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    shape: [usize; 4],
    strides: [usize; 4],
}

impl Layout {
    /// The row-major layout of `shape`.
    pub fn contiguous(shape: [usize; 4]) -> Layout {
        let [_, s, h, d] = shape;
        // Saturating: sizes that overflow can only come with a zero size
        // elsewhere (no buffer holds them otherwise), and such a layout
        // addresses no element.
        let hd = h.saturating_mul(d);
        Layout {
            shape,
            strides: [s.saturating_mul(hd), hd, d, 1],
        }
    }

    /// A layout with explicit strides; the head dimension must have stride 1.
    pub fn strided(shape: [usize; 4], strides: [usize; 4]) -> Result<Layout> {
        if strides[3] != 1 && shape[3] > 1 {
            return Err(SdpaError::Shape(format!(
                "the head dimension must be contiguous (stride 1), found stride {}; \
                 call .contiguous() on the tensor first",
                strides[3]
            )));
        }
        let layout = Layout { shape, strides };
        layout.required_len()?;
        Ok(layout)
    }

    /// `[batch, seq, heads, head_dim]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }
    /// Strides in elements, in the order of [`Layout::shape`].
    pub fn strides(&self) -> [usize; 4] {
        self.strides
    }
    /// The batch size.
    pub fn batch(&self) -> usize {
        self.shape[0]
    }
    /// The number of tokens.
    pub fn seq(&self) -> usize {
        self.shape[1]
    }
    /// The number of heads.
    pub fn heads(&self) -> usize {
        self.shape[2]
    }
    /// The head dimension.
    pub fn head_size(&self) -> usize {
        self.shape[3]
    }
    /// The number of elements.
    pub fn numel(&self) -> usize {
        if self.shape.contains(&0) {
            return 0;
        }
        self.shape.iter().fold(1usize, |a, &n| a.saturating_mul(n))
    }

    /// The offset of element `[b, s, h, 0]`.
    #[inline(always)]
    pub fn offset(&self, b: usize, s: usize, h: usize) -> usize {
        b * self.strides[0] + s * self.strides[1] + h * self.strides[2]
    }

    /// The smallest buffer length that holds every element.
    pub fn required_len(&self) -> Result<usize> {
        if self.shape.contains(&0) {
            return Ok(0);
        }
        let mut last = 0usize;
        for (n, st) in self.shape.iter().zip(self.strides) {
            last = (n - 1)
                .checked_mul(st)
                .and_then(|x| x.checked_add(last))
                .ok_or_else(|| {
                    SdpaError::Shape(format!(
                        "shape {:?} with strides {:?} overflows the address space",
                        self.shape, self.strides
                    ))
                })?;
        }
        Ok(last + 1)
    }

    /// Whether no two elements share an offset (a precondition for writing).
    pub fn is_non_overlapping(&self) -> bool {
        // A tensor with no elements has nothing that could overlap.
        if self.numel() == 0 {
            return true;
        }
        let mut dims: Vec<(usize, usize)> = self
            .shape
            .iter()
            .zip(self.strides)
            .filter(|(&n, _)| n > 1)
            .map(|(&n, s)| (s, n))
            .collect();
        dims.sort_unstable();
        let mut span = 0usize;
        for (stride, n) in dims {
            if stride <= span {
                return false;
            }
            span += stride * (n - 1);
        }
        true
    }
}

/// Borrowed host memory of one of the element types.
#[derive(Clone, Copy, Debug)]
pub enum HostData<'a> {
    /// `f32` elements.
    F32(&'a [f32]),
    /// `f16` elements.
    F16(&'a [f16]),
    /// `bf16` elements.
    BF16(&'a [bf16]),
}

/// Mutably borrowed host memory of one of the element types.
#[derive(Debug)]
pub enum HostDataMut<'a> {
    /// `f32` elements.
    F32(&'a mut [f32]),
    /// `f16` elements.
    F16(&'a mut [f16]),
    /// `bf16` elements.
    BF16(&'a mut [bf16]),
}

/// An owned host buffer of one of the element types.
#[derive(Clone, Debug, PartialEq)]
pub enum OwnedData {
    /// `f32` elements.
    F32(Vec<f32>),
    /// `f16` elements.
    F16(Vec<f16>),
    /// `bf16` elements.
    BF16(Vec<bf16>),
}

impl HostData<'_> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::F16(_) => DType::F16,
            HostData::BF16(_) => DType::BF16,
        }
    }
    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(s) => s.len(),
            HostData::F16(s) => s.len(),
            HostData::BF16(s) => s.len(),
        }
    }
    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl HostDataMut<'_> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            HostDataMut::F32(_) => DType::F32,
            HostDataMut::F16(_) => DType::F16,
            HostDataMut::BF16(_) => DType::BF16,
        }
    }
    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostDataMut::F32(s) => s.len(),
            HostDataMut::F16(s) => s.len(),
            HostDataMut::BF16(s) => s.len(),
        }
    }
    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl OwnedData {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            OwnedData::F32(_) => DType::F32,
            OwnedData::F16(_) => DType::F16,
            OwnedData::BF16(_) => DType::BF16,
        }
    }
    fn as_host(&self) -> HostData<'_> {
        match self {
            OwnedData::F32(v) => HostData::F32(v),
            OwnedData::F16(v) => HostData::F16(v),
            OwnedData::BF16(v) => HostData::BF16(v),
        }
    }
    fn as_host_mut(&mut self) -> HostDataMut<'_> {
        match self {
            OwnedData::F32(v) => HostDataMut::F32(v),
            OwnedData::F16(v) => HostDataMut::F16(v),
            OwnedData::BF16(v) => HostDataMut::BF16(v),
        }
    }
    /// A buffer of `n` zeros of `dtype`.
    pub fn zeros(dtype: DType, n: usize) -> OwnedData {
        match dtype {
            DType::F32 => OwnedData::F32(vec![0.0; n]),
            DType::F16 => OwnedData::F16(vec![f16::ZERO; n]),
            DType::BF16 => OwnedData::BF16(vec![bf16::ZERO; n]),
        }
    }
}

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
        match self {
            CudaData::F32(_) => DType::F32,
            CudaData::F16(_) => DType::F16,
            CudaData::BF16(_) => DType::BF16,
        }
    }
    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            CudaData::F32(d) => d.len(),
            CudaData::F16(d) => d.len(),
            CudaData::BF16(d) => d.len(),
        }
    }
    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The stream the memory was allocated on.
    pub fn stream(&self) -> &'a Arc<CudaStream> {
        match self {
            CudaData::F32(d) => d.stream(),
            CudaData::F16(d) => d.stream(),
            CudaData::BF16(d) => d.stream(),
        }
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
        match self {
            CudaDataMut::F32(_) => DType::F32,
            CudaDataMut::F16(_) => DType::F16,
            CudaDataMut::BF16(_) => DType::BF16,
        }
    }
    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            CudaDataMut::F32(d) => d.len(),
            CudaDataMut::F16(d) => d.len(),
            CudaDataMut::BF16(d) => d.len(),
        }
    }
    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The stream the memory was allocated on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        match self {
            CudaDataMut::F32(d) => d.stream(),
            CudaDataMut::F16(d) => d.stream(),
            CudaDataMut::BF16(d) => d.stream(),
        }
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
        match self {
            CudaOwned::F32(_) => DType::F32,
            CudaOwned::F16(_) => DType::F16,
            CudaOwned::BF16(_) => DType::BF16,
        }
    }
    /// The stream the memory was allocated on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        match self {
            CudaOwned::F32(s) => s.stream(),
            CudaOwned::F16(s) => s.stream(),
            CudaOwned::BF16(s) => s.stream(),
        }
    }
    fn as_cuda(&self) -> CudaData<'_> {
        match self {
            CudaOwned::F32(s) => CudaData::F32(CudaRef::Slice(s)),
            CudaOwned::F16(s) => CudaData::F16(CudaRef::Slice(s)),
            CudaOwned::BF16(s) => CudaData::BF16(CudaRef::Slice(s)),
        }
    }
    fn as_cuda_mut(&mut self) -> CudaDataMut<'_> {
        match self {
            CudaOwned::F32(s) => CudaDataMut::F32(s.into()),
            CudaOwned::F16(s) => CudaDataMut::F16(s.into()),
            CudaOwned::BF16(s) => CudaDataMut::BF16(s.into()),
        }
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
    /// Where the memory is.
    pub fn residence(&self) -> Residence {
        match self {
            Storage::Host(_) => Residence::Host,
            Storage::Cuda(d) => Residence::Cuda {
                ordinal: d.stream().context().ordinal(),
            },
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
    /// Where the memory is.
    pub fn residence(&self) -> Residence {
        match self {
            StorageMut::Host(_) => Residence::Host,
            StorageMut::Cuda(d) => Residence::Cuda {
                ordinal: d.stream().context().ordinal(),
            },
        }
    }
}

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
        let len = match &storage {
            Storage::Host(d) => d.len(),
            Storage::Cuda(d) => d.len(),
        };
        check_fits(&layout, len, "a tensor")?;
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
        let len = match &storage {
            StorageMut::Host(d) => d.len(),
            StorageMut::Cuda(d) => d.len(),
        };
        check_fits(&layout, len, "the output")?;
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

/// The buffer of a [`Tensor`]: host memory or CUDA device memory.
#[derive(Debug)]
#[non_exhaustive]
pub enum TensorData {
    /// Host memory.
    Host(OwnedData),
    /// CUDA device memory.
    Cuda(CudaOwned),
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
        match &self.data {
            TensorData::Host(d) => d.dtype(),
            TensorData::Cuda(d) => d.dtype(),
        }
    }
    /// Host memory or which CUDA device.
    pub fn residence(&self) -> Residence {
        match &self.data {
            TensorData::Host(_) => Residence::Host,
            TensorData::Cuda(d) => Residence::Cuda {
                ordinal: d.stream().context().ordinal(),
            },
        }
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
        let data = match &self.data {
            TensorData::Host(d) => d.clone(),
            TensorData::Cuda(d) => crate::cuda::download(d, self.numel())?,
        };
        Ok(Tensor {
            shape: self.shape,
            data: TensorData::Host(data),
        })
    }
    /// The elements widened to `f32`, copied from the device if need be.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let host;
        let data = match &self.data {
            TensorData::Host(d) => d,
            TensorData::Cuda(d) => {
                host = crate::cuda::download(d, self.numel())?;
                &host
            }
        };
        Ok(match data {
            OwnedData::F32(v) => v.clone(),
            OwnedData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            OwnedData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        })
    }
    /// A read-only view.
    pub fn view(&self) -> TensorView<'_> {
        let storage = match &self.data {
            TensorData::Host(d) => Storage::Host(d.as_host()),
            TensorData::Cuda(d) => Storage::Cuda(d.as_cuda()),
        };
        TensorView {
            layout: Layout::contiguous(self.shape),
            storage,
        }
    }
    /// A writable view.
    pub fn view_mut(&mut self) -> TensorViewMut<'_> {
        let storage = match &mut self.data {
            TensorData::Host(d) => StorageMut::Host(d.as_host_mut()),
            TensorData::Cuda(d) => StorageMut::Cuda(d.as_cuda_mut()),
        };
        TensorViewMut {
            layout: Layout::contiguous(self.shape),
            storage,
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
    fn required_len_of_transposed_view() {
        let l = Layout::strided([2, 3, 4, 8], [96, 8, 24, 1]).unwrap();
        assert_eq!(l.required_len().unwrap(), 2 * 96);
        assert!(l.is_non_overlapping());
    }

    #[test]
    fn overlap_is_detected() {
        let l = Layout::strided([1, 4, 2, 8], [64, 8, 4, 1]).unwrap();
        assert!(!l.is_non_overlapping());
        let broadcast = Layout::strided([1, 4, 2, 8], [0, 0, 8, 1]).unwrap();
        assert!(!broadcast.is_non_overlapping());
        // No elements, nothing to overlap: an empty output is a valid buffer.
        assert!(Layout::contiguous([2, 0, 1, 64]).is_non_overlapping());
    }

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
    fn head_dim_must_be_contiguous() {
        assert!(Layout::strided([1, 1, 1, 8], [8, 8, 8, 2]).is_err());
    }

    #[test]
    fn short_buffers_are_refused() {
        let data = vec![0.0f32; 10];
        let err = TensorView::from_slice(&data, [1, 2, 1, 8]).unwrap_err();
        assert!(err.to_string().contains("16 elements"), "{err}");
    }

    #[test]
    fn overflowing_strides_are_refused() {
        assert!(Layout::strided([3, 2, 2, 8], [usize::MAX / 2, 8, 8, 1]).is_err());
    }
}

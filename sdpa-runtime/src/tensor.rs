//! Tensor views: a `[batch, seq, heads, head_dim]` layout over a buffer.
//!
//! Views borrow the caller's memory and never copy it. Any strides are
//! accepted for the batch, token and head dimensions (FastVideo hands over
//! transposed views); the last dimension must be contiguous.
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

use half::{bf16, f16};

use crate::element::Element;
use crate::error::{Result, SdpaError};
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
        Layout {
            shape,
            strides: [s * h * d, h * d, d, 1],
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
        self.shape.iter().product()
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

/// Where a tensor's elements live.
///
/// Only host memory exists today; device memory is added as further
/// variants, so code that matches on it must keep a wildcard arm.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum Storage<'a> {
    /// Host memory.
    Host(HostData<'a>),
}

/// Where a writable tensor's elements live. See [`Storage`].
#[derive(Debug)]
#[non_exhaustive]
pub enum StorageMut<'a> {
    /// Host memory.
    Host(HostDataMut<'a>),
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
        check_fits(&layout, data.len(), "a tensor")?;
        Ok(TensorView {
            layout,
            storage: Storage::Host(data),
        })
    }

    /// The shape and strides.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Host(d) => d.dtype(),
        }
    }
    /// Where the elements live.
    pub fn storage(&self) -> &Storage<'a> {
        &self.storage
    }
    /// The host slice if the view holds `T` on the host.
    pub fn host_slice<T: Element>(&self) -> Option<&'a [T]> {
        match &self.storage {
            Storage::Host(d) => T::downcast(d),
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
        check_fits(&layout, data.len(), "the output")?;
        if !layout.is_non_overlapping() {
            return Err(SdpaError::Shape(format!(
                "the output's strides {:?} make elements of shape {:?} overlap; \
                 pass a buffer where every element has its own memory",
                layout.strides(),
                layout.shape()
            )));
        }
        Ok(TensorViewMut {
            layout,
            storage: StorageMut::Host(data),
        })
    }

    /// The shape and strides.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        match &self.storage {
            StorageMut::Host(d) => d.dtype(),
        }
    }
    /// The host slice if the view holds `T` on the host.
    pub fn host_slice_mut<T: Element>(&mut self) -> Option<&mut [T]> {
        match &mut self.storage {
            StorageMut::Host(d) => T::downcast_mut(d),
        }
    }
}

/// An owned, contiguous `[batch, seq, heads, head_dim]` host tensor: what
/// [`forward`](crate::AttentionImpl::forward) returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: [usize; 4],
    data: OwnedData,
}

impl Tensor {
    /// A tensor of zeros.
    pub fn zeros(dtype: DType, shape: [usize; 4]) -> Tensor {
        Tensor {
            shape,
            data: OwnedData::zeros(dtype, shape.iter().product()),
        }
    }
    /// A tensor owning `data`, which must hold exactly the shape's elements.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: [usize; 4]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if data.len() != n {
            return Err(SdpaError::Shape(format!(
                "shape {shape:?} has {n} elements but the buffer holds {}",
                data.len()
            )));
        }
        Ok(Tensor {
            shape,
            data: T::owned(data),
        })
    }
    /// `[batch, seq, heads, head_dim]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }
    /// The owned buffer.
    pub fn data(&self) -> &OwnedData {
        &self.data
    }
    /// Gives up the owned buffer.
    pub fn into_data(self) -> OwnedData {
        self.data
    }
    /// The elements as `T`, if the tensor holds `T`.
    pub fn as_slice<T: Element>(&self) -> Option<&[T]> {
        T::downcast_owned(&self.data)
    }
    /// The elements widened to `f32`.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            OwnedData::F32(v) => v.clone(),
            OwnedData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            OwnedData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
    /// A read-only view.
    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            layout: Layout::contiguous(self.shape),
            storage: Storage::Host(self.data.as_host()),
        }
    }
    /// A writable view.
    pub fn view_mut(&mut self) -> TensorViewMut<'_> {
        TensorViewMut {
            layout: Layout::contiguous(self.shape),
            storage: StorageMut::Host(self.data.as_host_mut()),
        }
    }
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

//! Host storage: borrowed and owned host buffers of one of the element
//! types.

use half::{bf16, f16};

use super::dispatch::dispatch;
use crate::DType;

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
        dispatch!(self, HostData(_) => dtype)
    }
    /// The number of elements.
    pub fn len(&self) -> usize {
        dispatch!(self, HostData(s) => s.len())
    }
    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl HostDataMut<'_> {
    /// The element type.
    pub fn dtype(&self) -> DType {
        dispatch!(self, HostDataMut(_) => dtype)
    }
    /// The number of elements.
    pub fn len(&self) -> usize {
        dispatch!(self, HostDataMut(s) => s.len())
    }
    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl OwnedData {
    /// The element type.
    pub fn dtype(&self) -> DType {
        dispatch!(self, OwnedData(_) => dtype)
    }
    /// The number of elements.
    pub fn len(&self) -> usize {
        dispatch!(self, OwnedData(v) => v.len())
    }
    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The buffer, borrowed.
    pub(crate) fn as_host(&self) -> HostData<'_> {
        dispatch!(self, OwnedData(v) -> HostData(v))
    }
    /// The buffer, borrowed mutably.
    pub(crate) fn as_host_mut(&mut self) -> HostDataMut<'_> {
        dispatch!(self, OwnedData(v) -> HostDataMut(v))
    }
    /// A buffer of `n` zeros of `dtype`.
    pub fn zeros(dtype: DType, n: usize) -> OwnedData {
        // `Default` is zero for each element type.
        dispatch!(dtype, T -> OwnedData(vec![T::default(); n]))
    }
    /// The elements widened to `f32`.
    // The body is expanded once per element type; for `f32` the conversion
    // is the identity.
    #[allow(clippy::useless_conversion)]
    pub fn to_f32_vec(&self) -> Vec<f32> {
        dispatch!(self, OwnedData(v) => v.iter().map(|&x| f32::from(x)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_are_zero_in_every_dtype() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let z = OwnedData::zeros(dtype, 3);
            assert_eq!((z.dtype(), z.len()), (dtype, 3));
            assert_eq!(z.to_f32_vec(), [0.0; 3]);
            assert_eq!(z.as_host().len(), 3);
        }
    }
}

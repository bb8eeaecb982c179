//! The element types a tensor may hold, as one sealed trait.

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

use crate::storage::cuda::{CudaData, CudaDataMut, CudaOwned, CudaRef, CudaRefMut};
use crate::storage::host::{HostData, HostDataMut, OwnedData};
use crate::DType;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element type of `q`, `k`, `v` and the output: `f32`, [`half::f16`] or
/// [`half::bf16`]. Kernels compute in `f32` and convert at the edges.
///
/// Sealed: the kernels exist for these three types only.
pub trait Element:
    sealed::Sealed + Copy + Send + Sync + DeviceRepr + ValidAsZeroBits + 'static
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Widens to `f32` (exact for every type here).
    fn to_f32(self) -> f32;
    /// Narrows from `f32`, rounding to nearest even.
    fn from_f32(x: f32) -> Self;
    /// Wraps a slice as type-erased host data.
    fn host(data: &[Self]) -> HostData<'_>;
    /// Wraps a mutable slice as type-erased host data.
    fn host_mut(data: &mut [Self]) -> HostDataMut<'_>;
    /// Wraps an owned buffer.
    fn owned(data: Vec<Self>) -> OwnedData;
    /// The slice behind `data` if it holds this type.
    fn downcast<'a>(data: &HostData<'a>) -> Option<&'a [Self]>;
    /// The mutable slice behind `data` if it holds this type.
    fn downcast_mut<'s>(data: &'s mut HostDataMut<'_>) -> Option<&'s mut [Self]>;
    /// The owned buffer behind `data` if it holds this type.
    fn downcast_owned(data: &OwnedData) -> Option<&[Self]>;
    /// Wraps borrowed device memory as type-erased device data.
    fn cuda(data: CudaRef<'_, Self>) -> CudaData<'_>;
    /// Wraps mutably borrowed device memory as type-erased device data.
    fn cuda_mut(data: CudaRefMut<'_, Self>) -> CudaDataMut<'_>;
    /// Wraps an owned device buffer.
    fn cuda_owned(data: CudaSlice<Self>) -> CudaOwned;
    /// The device memory behind `data` if it holds this type.
    fn downcast_cuda<'a>(data: &CudaData<'a>) -> Option<CudaRef<'a, Self>>;
    /// The owned device buffer behind `data` if it holds this type.
    fn downcast_cuda_owned(data: &CudaOwned) -> Option<&CudaSlice<Self>>;
}

macro_rules! element {
    ($t:ty, $variant:ident, $to:expr, $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                ($to)(self)
            }
            #[inline(always)]
            fn from_f32(x: f32) -> Self {
                ($from)(x)
            }
            fn host(data: &[Self]) -> HostData<'_> {
                HostData::$variant(data)
            }
            fn host_mut(data: &mut [Self]) -> HostDataMut<'_> {
                HostDataMut::$variant(data)
            }
            fn owned(data: Vec<Self>) -> OwnedData {
                OwnedData::$variant(data)
            }
            fn downcast<'a>(data: &HostData<'a>) -> Option<&'a [Self]> {
                match *data {
                    HostData::$variant(s) => Some(s),
                    _ => None,
                }
            }
            fn downcast_mut<'s>(data: &'s mut HostDataMut<'_>) -> Option<&'s mut [Self]> {
                match data {
                    HostDataMut::$variant(s) => Some(&mut **s),
                    _ => None,
                }
            }
            fn downcast_owned(data: &OwnedData) -> Option<&[Self]> {
                match data {
                    OwnedData::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn cuda(data: CudaRef<'_, Self>) -> CudaData<'_> {
                CudaData::$variant(data)
            }
            fn cuda_mut(data: CudaRefMut<'_, Self>) -> CudaDataMut<'_> {
                CudaDataMut::$variant(data)
            }
            fn cuda_owned(data: CudaSlice<Self>) -> CudaOwned {
                CudaOwned::$variant(data)
            }
            fn downcast_cuda<'a>(data: &CudaData<'a>) -> Option<CudaRef<'a, Self>> {
                match *data {
                    CudaData::$variant(d) => Some(d),
                    _ => None,
                }
            }
            fn downcast_cuda_owned(data: &CudaOwned) -> Option<&CudaSlice<Self>> {
                match data {
                    CudaOwned::$variant(s) => Some(s),
                    _ => None,
                }
            }
        }
    };
}

element!(f32, F32, |x: f32| x, |x: f32| x);
element!(f16, F16, f16::to_f32, f16::from_f32);
element!(bf16, BF16, bf16::to_f32, bf16::from_f32);

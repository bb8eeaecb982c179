//! Tensor maps: the 128-byte `CUtensorMap` descriptors through which a
//! Hopper kernel loads its `q`, `k` and `v` tiles with the Tensor Memory
//! Accelerator (TMA).
//!
//! cudarc's safe layer has no tensor maps, so this module goes down to its
//! `sys` layer for the two calls it needs: `cuTensorMapEncodeTiled`, and
//! `cuDriverGetVersion` to make sure the driver has it (drivers before CUDA
//! 12.0 do not, and cudarc panics on a missing symbol).
//!
//! Encoding is host work: the driver fills the descriptor from the
//! arguments and queues nothing. A call takes three steps:
//!
//! 1. [`describe`] (pure) derives the encode arguments of one tensor from
//!    its [`Layout`], dtype and device address, as
//!    [`kernels_gen::contract::TensorMaps`] lays them out, or says in an
//!    [`Undescribable`] why no map can describe it;
//! 2. [`Tiled::encode`] hands them to the driver ([`for_inputs`] does both
//!    for `q`, `k` and `v`);
//! 3. the launch passes the three [`TensorMap`]s by value after the
//!    contract's parameters.
//!
//! A tensor that cannot be described runs the variant's portable kernel
//! instead (see `launch::choose`).

use std::sync::OnceLock;

use cudarc::driver::sys::{
    self, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave,
    CUtensorMapL2promotion, CUtensorMapSwizzle,
};
use cudarc::driver::{DeviceRepr, DriverError};
use kernels_gen::contract::{TensorMaps, TENSOR_MAP_BOX_COLUMNS};

use crate::layout::Layout;
use crate::problem::Problem;
use crate::tensor::TensorView;
use crate::DType;

/// The most entries a tensor map dimension may have (`2^32`).
const MAX_DIM: u64 = 1 << 32;
/// Byte strides of a tensor map are below `2^40`.
const MAX_STRIDE: u64 = 1 << 40;
/// Byte strides and the base address are multiples of this.
const ALIGN: u64 = 16;
/// The most entries of a box dimension.
const MAX_BOX: u32 = 256;
/// The stride given to a dimension of one entry whose own stride a map
/// cannot hold: the driver never multiplies it by a coordinate other than 0.
const UNUSED_STRIDE: u64 = ALIGN;
/// The first driver with tensor maps (CUDA 12.0).
const MIN_DRIVER: i32 = 12_000;

/// One encoded tensor map, ready to pass by value as a kernel parameter
/// (`.param .align 64 .b8 NAME[128]`).
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub(crate) struct TensorMap(sys::CUtensorMap);

const _: () = assert!(std::mem::size_of::<TensorMap>() == 128);
const _: () = assert!(std::mem::align_of::<TensorMap>() == 64);

// SAFETY: a `TensorMap` is 128 bytes of plain data (sixteen `u64`, no
// padding, no pointer into host memory; the size and alignment are
// asserted above), which is exactly what the kernel's
// `.param .align 64 .b8 [128]` parameter holds: the launch copies those
// bytes into the parameter space, and every bit pattern the driver wrote is
// one the kernel may read.
unsafe impl DeviceRepr for TensorMap {}

#[cfg(test)]
impl TensorMap {
    /// A map holding `tag` in its first word, for tests without a driver.
    pub(crate) fn tagged(tag: u64) -> TensorMap {
        let mut opaque = [0; 16];
        opaque[0] = tag;
        TensorMap(sys::CUtensorMap { opaque })
    }
    /// The tag of [`TensorMap::tagged`].
    pub(crate) fn tag(&self) -> u64 {
        self.0.opaque[0]
    }
}

/// Why a tensor cannot be described by a tensor map, so that the call runs
/// the variant's portable kernel instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Undescribable {
    /// The element type has no map here (only 16-bit types do).
    #[error("its dtype {0} has no tensor map; the TMA kernels take bf16 and f16")]
    Dtype(DType),
    /// The kernel declares a box the driver does not take.
    #[error("the kernel asks for boxes of {0} rows; a tensor map box has 1 to 256")]
    BoxRows(u32),
    /// The base address is not a multiple of 16 bytes.
    #[error("its device address {0:#x} is not 16-byte aligned")]
    Misaligned(u64),
    /// The head dimension is not contiguous.
    #[error("its head dimension has stride {0}; a tensor map needs stride 1")]
    HeadStride(usize),
    /// A dimension is empty or longer than `2^32`.
    #[error("its {dim} dimension has {size} entries; a tensor map takes 1 to 2^32")]
    Size {
        /// Which dimension: `head`, `token`, `heads` or `batch`.
        dim: &'static str,
        /// Its number of entries.
        size: usize,
    },
    /// A byte stride is not a multiple of 16.
    #[error("its {dim} stride is {bytes} bytes; a tensor map needs a multiple of 16")]
    StrideUnaligned {
        /// Which dimension: `token`, `heads` or `batch`.
        dim: &'static str,
        /// The stride in bytes.
        bytes: u64,
    },
    /// A byte stride is `2^40` or more.
    #[error("its {dim} stride is {elements} elements; a tensor map takes less than 2^40 bytes")]
    StrideTooLarge {
        /// Which dimension: `token`, `heads` or `batch`.
        dim: &'static str,
        /// The stride in elements.
        elements: usize,
    },
    /// The driver predates tensor maps.
    #[error("the CUDA driver is version {0}; tensor maps need 12000 (CUDA 12.0) or later")]
    OldDriver(i32),
    /// `cuTensorMapEncodeTiled` (or the driver-version query) refused.
    #[error("the driver refused to encode it: {0}")]
    Driver(DriverError),
}

/// The arguments of `cuTensorMapEncodeTiled` for one tensor: everything but
/// the options, which are the same for every map of
/// [`kernels_gen::contract::TensorMaps`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tiled {
    /// The element type.
    pub(crate) data_type: CUtensorMapDataType,
    /// The device address of element `[0, 0, 0, 0]`.
    pub(crate) address: u64,
    /// Entries per dimension, innermost first: `[D, S, H, B]`.
    pub(crate) dims: [u64; 4],
    /// Byte strides of `S`, `H` and `B` (`D` is contiguous).
    pub(crate) strides: [u64; 3],
    /// The box: `[64, rows, 1, 1]`.
    pub(crate) box_dim: [u32; 4],
}

/// The tensor map arguments of a tensor of `layout` holding `dtype` at
/// device `address`, with boxes of `rows` tokens; or why none describes it.
///
/// A dimension of one entry never moves the address, so where its stride
/// is one a map cannot hold (not a multiple of 16 bytes, or `2^40` bytes
/// or more) or 0 (broadcast), 16 bytes stand in for it. A dimension of
/// several entries keeps its stride, broadcast ones (0) too: the driver
/// takes them (seen with driver 580 on an H100); one that refused would
/// make [`Tiled::encode`] fail, and the call fall back.
pub(crate) fn describe(
    layout: &Layout,
    dtype: DType,
    address: u64,
    rows: u32,
) -> Result<Tiled, Undescribable> {
    let data_type = match dtype {
        DType::BF16 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F16 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::F32 => return Err(Undescribable::Dtype(dtype)),
    };
    if rows == 0 || rows > MAX_BOX {
        return Err(Undescribable::BoxRows(rows));
    }
    if !address.is_multiple_of(ALIGN) {
        return Err(Undescribable::Misaligned(address));
    }
    let [b, s, h, d] = layout.shape();
    let [stride_b, stride_s, stride_h, stride_d] = layout.strides();
    if d > 1 && stride_d != 1 {
        return Err(Undescribable::HeadStride(stride_d));
    }
    let sizes = [("head", d), ("token", s), ("heads", h), ("batch", b)];
    let mut dims = [0; 4];
    for (dim, (name, size)) in dims.iter_mut().zip(sizes) {
        *dim = match u64::try_from(size) {
            Ok(n) if (1..=MAX_DIM).contains(&n) => n,
            _ => return Err(Undescribable::Size { dim: name, size }),
        };
    }
    let elem = dtype.size_bytes() as u64;
    let mut strides = [0; 3];
    for (out, (dim, size, elements)) in strides.iter_mut().zip([
        ("token", s, stride_s),
        ("heads", h, stride_h),
        ("batch", b, stride_b),
    ]) {
        let bytes = u64::try_from(elements)
            .ok()
            .and_then(|e| e.checked_mul(elem))
            .filter(|&bytes| bytes < MAX_STRIDE);
        *out = match bytes {
            Some(bytes) if bytes.is_multiple_of(ALIGN) && (bytes > 0 || size > 1) => bytes,
            _ if size == 1 => UNUSED_STRIDE,
            Some(bytes) => return Err(Undescribable::StrideUnaligned { dim, bytes }),
            None => return Err(Undescribable::StrideTooLarge { dim, elements }),
        };
    }
    Ok(Tiled {
        data_type,
        address,
        dims,
        strides,
        box_dim: [TENSOR_MAP_BOX_COLUMNS, rows, 1, 1],
    })
}

impl Tiled {
    /// Encodes the map through the driver, with the options of
    /// [`kernels_gen::contract::TensorMaps`]: no interleave, the 128-byte
    /// swizzle, 256-byte L2 promotion, out-of-bounds elements read as zero.
    ///
    /// Needs a loaded driver (any context made by this crate proves one).
    pub(crate) fn encode(&self) -> Result<TensorMap, Undescribable> {
        let version = driver_version().map_err(Undescribable::Driver)?;
        if version < MIN_DRIVER {
            return Err(Undescribable::OldDriver(version));
        }
        let mut map = TensorMap(sys::CUtensorMap { opaque: [0; 16] });
        let element_strides = [1u32; 4];
        // SAFETY: the symbol exists (driver 12.0 or later, checked above);
        // `map` is a writable, 64-byte aligned `CUtensorMap`; the dims,
        // strides, box and element strides are arrays of the lengths rank
        // 4 asks for (4, 3, 4, 4) that outlive the call; the driver only
        // reads them and writes `map`, and never dereferences `address`
        // (a device address it stores in the map).
        let result = unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map.0,
                self.data_type,
                4,
                self.address as *mut std::ffi::c_void,
                self.dims.as_ptr(),
                self.strides.as_ptr(),
                self.box_dim.as_ptr(),
                element_strides.as_ptr(),
                CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        result.result().map_err(Undescribable::Driver)?;
        Ok(map)
    }
}

/// The maps of `p`'s `q`, `k` and `v`, at device `addresses` in that
/// order, with the boxes of `boxes`, each made by `encode` from its
/// [`describe`]d arguments ([`Tiled::encode`] on a device); or the first
/// tensor that has none, and why.
pub(crate) fn for_inputs(
    boxes: TensorMaps,
    p: &Problem<'_>,
    addresses: [u64; 3],
    encode: impl Fn(&Tiled) -> Result<TensorMap, Undescribable>,
) -> Result<[TensorMap; 3], (&'static str, Undescribable)> {
    let map = |name, t: &TensorView<'_>, address, rows| {
        describe(t.layout(), p.dtype(), address, rows)
            .and_then(|tiled| encode(&tiled))
            .map_err(|why| (name, why))
    };
    let [q, k, v] = addresses;
    Ok([
        map("q", &p.q, q, boxes.q_rows)?,
        map("k", &p.k, k, boxes.kv_rows)?,
        map("v", &p.v, v, boxes.kv_rows)?,
    ])
}

/// The driver's CUDA version, e.g. `12080`, asked once per process.
fn driver_version() -> Result<i32, DriverError> {
    static VERSION: OnceLock<Result<i32, DriverError>> = OnceLock::new();
    *VERSION.get_or_init(|| {
        let mut version = 0;
        // SAFETY: `cuDriverGetVersion` exists in every driver and only
        // writes the `int` it is given.
        unsafe { sys::cuDriverGetVersion(&mut version) }.result()?;
        Ok(version)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BF16: CUtensorMapDataType = CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;

    fn strided(shape: [usize; 4], strides: [usize; 4]) -> Layout {
        Layout::strided(shape, strides).unwrap()
    }

    #[test]
    fn a_contiguous_tensor_is_described_innermost_first() {
        let layout = Layout::contiguous([2, 1000, 12, 128]);
        let t = describe(&layout, DType::BF16, 0x7f00_0000, 128).unwrap();
        assert_eq!(
            t,
            Tiled {
                data_type: BF16,
                address: 0x7f00_0000,
                dims: [128, 1000, 12, 2],
                strides: [12 * 128 * 2, 128 * 2, 1000 * 12 * 128 * 2],
                box_dim: [64, 128, 1, 1],
            }
        );
        let f16 = describe(&layout, DType::F16, 0, 96).unwrap();
        assert_eq!(
            f16.data_type,
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16
        );
        assert_eq!(f16.box_dim, [64, 96, 1, 1]);
    }

    #[test]
    fn a_transposed_tensor_keeps_its_strides() {
        // [B, H, S, D] memory seen as [B, S, H, D].
        let (b, s, h, d) = (2, 333, 8, 80);
        let layout = strided([b, s, h, d], [h * s * d, d, s * d, 1]);
        let t = describe(&layout, DType::F16, 256, 64).unwrap();
        assert_eq!(t.dims, [80, 333, 8, 2]);
        assert_eq!(t.strides, [80 * 2, 333 * 80 * 2, 8 * 333 * 80 * 2]);
    }

    #[test]
    fn grouped_kv_heads_are_their_own_dimension() {
        // k of a GQA call: 2 kv heads for 16 query heads.
        let layout = Layout::contiguous([1, 4096, 2, 64]);
        let t = describe(&layout, DType::BF16, 0, 176).unwrap();
        assert_eq!(t.dims, [64, 4096, 2, 1]);
        assert_eq!(t.strides[..2], [2 * 64 * 2, 64 * 2]);
        assert_eq!(t.box_dim, [64, 176, 1, 1]);
    }

    #[test]
    fn dimensions_of_one_entry_take_any_stride() {
        // One batch, one token, one head, with strides no map could hold
        // or that say nothing: odd, past 2^40 and broadcast (0).
        let layout = strided([1, 1, 1, 64], [3, 1 << 41, 0, 1]);
        let t = describe(&layout, DType::BF16, 0, 64).unwrap();
        assert_eq!(t.dims, [64, 1, 1, 1]);
        assert_eq!(t.strides, [UNUSED_STRIDE; 3]);
        // Valid ones are kept.
        let decode = strided([1, 1, 8, 64], [4096, 1024, 64, 1]);
        assert_eq!(
            describe(&decode, DType::BF16, 0, 64).unwrap().strides,
            [2048, 128, 8192]
        );
        // A size-1 head dimension may have any stride too.
        let column = strided([2, 8, 1, 1], [64, 8, 5, 7]);
        let t = describe(&column, DType::BF16, 0, 64).unwrap();
        assert_eq!(
            (t.dims, t.strides),
            ([1, 8, 1, 2], [16, UNUSED_STRIDE, 128])
        );
    }

    #[test]
    fn a_stride_off_16_bytes_is_refused() {
        // Rows of 72 bf16 elements (144 bytes) are fine; 68 (136) are not.
        let ok = strided([1, 10, 1, 64], [720, 72, 72, 1]);
        assert!(describe(&ok, DType::BF16, 0, 64).is_ok());
        let odd = strided([1, 10, 1, 64], [680, 68, 68, 1]);
        assert_eq!(
            describe(&odd, DType::BF16, 0, 64),
            Err(Undescribable::StrideUnaligned {
                dim: "token",
                bytes: 136
            })
        );
        let heads = strided([2, 4, 3, 64], [4 * 3 * 64, 3 * 64, 68, 1]);
        assert!(matches!(
            describe(&heads, DType::BF16, 0, 64),
            Err(Undescribable::StrideUnaligned { dim: "heads", .. })
        ));
    }

    #[test]
    fn other_refusals_say_why() {
        let layout = Layout::contiguous([1, 16, 1, 64]);
        let refused = |dtype, address, rows| describe(&layout, dtype, address, rows).unwrap_err();
        assert_eq!(refused(DType::F32, 0, 64), Undescribable::Dtype(DType::F32));
        assert_eq!(refused(DType::BF16, 8, 64), Undescribable::Misaligned(8));
        assert_eq!(refused(DType::BF16, 0, 0), Undescribable::BoxRows(0));
        assert_eq!(refused(DType::BF16, 0, 257), Undescribable::BoxRows(257));
        let empty = Layout::contiguous([1, 0, 1, 64]);
        assert_eq!(
            describe(&empty, DType::BF16, 0, 64),
            Err(Undescribable::Size {
                dim: "token",
                size: 0
            })
        );
        // Two batches 2^40 bytes apart (no buffer needed to describe it).
        let far = strided([2, 1, 1, 64], [1 << 39, 64, 64, 1]);
        assert_eq!(
            describe(&far, DType::BF16, 0, 64),
            Err(Undescribable::StrideTooLarge {
                dim: "batch",
                elements: 1 << 39
            })
        );
        let message = Undescribable::StrideUnaligned {
            dim: "token",
            bytes: 136,
        }
        .to_string();
        assert_eq!(
            message,
            "its token stride is 136 bytes; a tensor map needs a multiple of 16"
        );
    }
}

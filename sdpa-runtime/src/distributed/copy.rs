//! Strided row copies between user tensors and communicator buffers: the
//! packing and unpacking around each exchange. Host buffers copy row by
//! row; device buffers take one `cuMemcpy2DAsync` on the buffer's stream.

use cudarc::driver::{sys, DevicePtr, DevicePtrMut};

use super::communicator::CommBuffer;
use crate::error::{Result, SdpaError};
use crate::storage::CudaRef;
use crate::Element;

/// Where a copy reads: a user's tensor memory or a communicator buffer.
#[derive(Clone, Copy)]
pub(crate) enum Src<'a, T> {
    /// Host memory.
    Host(&'a [T]),
    /// CUDA device memory.
    Cuda(CudaRef<'a, T>),
}

impl<'a, T> Src<'a, T> {
    pub(crate) fn of(buf: &'a CommBuffer<T>) -> Self {
        match buf {
            CommBuffer::Host(v) => Src::Host(v),
            CommBuffer::Cuda(s) => Src::Cuda(CudaRef::Slice(s)),
        }
    }

    fn len(&self) -> usize {
        match self {
            Src::Host(s) => s.len(),
            Src::Cuda(s) => s.len(),
        }
    }
}

/// `rows` rows of `row_len` elements: the first at `offset`, each next one
/// `pitch` elements further.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rows {
    pub offset: usize,
    pub pitch: usize,
}

fn check_extent(what: &str, at: Rows, row_len: usize, rows: usize, len: usize) -> Result<()> {
    let end = (rows - 1)
        .checked_mul(at.pitch)
        .and_then(|x| x.checked_add(at.offset))
        .and_then(|x| x.checked_add(row_len));
    if end.is_none_or(|end| end > len) {
        return Err(SdpaError::Shape(format!(
            "internal: a {what} of {rows} rows of {row_len} at offset {} pitch {} runs past \
             {len} elements",
            at.offset, at.pitch
        )));
    }
    Ok(())
}

/// Copies `rows` rows of `row_len` elements from `src` to `dst`.
pub(crate) fn copy_rows<T: Element>(
    src: Src<'_, T>,
    from: Rows,
    dst: &mut CommBuffer<T>,
    to: Rows,
    row_len: usize,
    rows: usize,
) -> Result<()> {
    if rows == 0 || row_len == 0 {
        return Ok(());
    }
    check_extent("copy source", from, row_len, rows, src.len())?;
    check_extent("copy target", to, row_len, rows, dst.len())?;
    match (src, dst) {
        (Src::Host(s), CommBuffer::Host(d)) => {
            for r in 0..rows {
                let (a, b) = (from.offset + r * from.pitch, to.offset + r * to.pitch);
                d[b..b + row_len].copy_from_slice(&s[a..a + row_len]);
            }
            Ok(())
        }
        (Src::Cuda(s), CommBuffer::Cuda(d)) => {
            let stream = d.stream().clone();
            let e = std::mem::size_of::<T>();
            let (sp, _read) = match s {
                CudaRef::Slice(s) => s.device_ptr(&stream),
                CudaRef::View(v) => v.device_ptr(&stream),
            };
            let (dp, _write) = d.device_ptr_mut(&stream);
            let width = row_len * e;
            let desc = sys::CUDA_MEMCPY2D {
                srcXInBytes: 0,
                srcY: 0,
                srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                srcHost: std::ptr::null(),
                srcDevice: sp + (from.offset * e) as u64,
                srcArray: std::ptr::null_mut(),
                srcPitch: (from.pitch * e).max(width),
                dstXInBytes: 0,
                dstY: 0,
                dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                dstHost: std::ptr::null_mut(),
                dstDevice: dp + (to.offset * e) as u64,
                dstArray: std::ptr::null_mut(),
                dstPitch: (to.pitch * e).max(width),
                WidthInBytes: width,
                Height: rows,
            };
            stream
                .context()
                .bind_to_thread()
                .map_err(|e| SdpaError::cuda("binding the device", e))?;
            // SAFETY: both ranges were checked against their buffers above,
            // and the guards keep the buffers' stream ordering until the
            // copy is queued.
            unsafe { sys::cuMemcpy2DAsync_v2(&desc, stream.cu_stream()) }
                .result()
                .map_err(|e| SdpaError::cuda("a strided device copy (cuMemcpy2DAsync)", e))
        }
        _ => Err(SdpaError::Residence(
            "a tensor and the communicator's buffers are in different places; pass host \
             tensors with a host communicator and device tensors with NCCL"
                .into(),
        )),
    }
}

/// Sets `len` elements from `offset` to zero.
pub(crate) fn zero<T: Element>(dst: &mut CommBuffer<T>, offset: usize, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    check_extent("zeroing", Rows { offset, pitch: len }, len, 1, dst.len())?;
    match dst {
        CommBuffer::Host(d) => {
            d[offset..offset + len].fill(T::from_f32(0.0));
            Ok(())
        }
        CommBuffer::Cuda(d) => {
            let stream = d.stream().clone();
            stream
                .memset_zeros(&mut d.slice_mut(offset..offset + len))
                .map_err(|e| SdpaError::cuda("zeroing padding rows", e))
        }
    }
}

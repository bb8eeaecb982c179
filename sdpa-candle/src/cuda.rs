//! CUDA tensors (feature `cuda`): candle's device buffers viewed in place,
//! sdpa's kernels queued on candle's stream.
//!
//! candle 0.11 and sdpa-runtime share cudarc 0.19, so a candle
//! `CudaStorage` holds the `CudaSlice` sdpa's views take: no copy, no
//! synchronisation. The outputs are allocated on candle's stream for the
//! device and handed back to candle as its own storage; sdpa launches on
//! the output's stream, and cudarc's events order any input made on another
//! stream.

use candle_core::backend::BackendStorage;
use candle_core::cuda::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, Shape, Storage, Tensor};
use sdpa_runtime::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use sdpa_runtime::{
    AttentionMetadata, AttnMask, CudaMaskData, CudaRef, Element, Gradients, SeqLens, TensorView,
    TensorViewMut,
};

use crate::op::{dims4, err, strides4, SdpaOp};

/// The element types both sides move on the device.
pub(crate) trait DeviceElement:
    Element + CudaDType + DeviceRepr + ValidAsZeroBits + candle_core::WithDType
{
}
impl<T: Element + CudaDType + DeviceRepr + ValidAsZeroBits + candle_core::WithDType> DeviceElement
    for T
{
}

/// The part of `storage` a layout reads: from its start offset to the end.
fn tail<'a, T: DeviceElement>(
    storage: &'a CudaStorage,
    layout: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    let slice = storage.as_cuda_slice::<T>()?;
    slice.try_slice(layout.start_offset()..).ok_or_else(|| {
        candle_core::Error::msg(format!(
            "sdpa: a layout starts at element {} of a device buffer of {}",
            layout.start_offset(),
            slice.len()
        ))
    })
}

/// An sdpa view of a device buffer through a candle layout.
fn view<'a, T: DeviceElement>(
    data: &'a CudaView<'a, T>,
    layout: &Layout,
) -> candle_core::Result<TensorView<'a>> {
    TensorView::from_cuda_with_strides(data, dims4(layout)?, strides4(layout)?).map_err(err)
}

/// A zeroed device buffer of `n` elements on `device`'s stream (at least
/// one: the driver refuses empty allocations).
fn zeros<T: DeviceElement>(device: &CudaDevice, n: usize) -> candle_core::Result<CudaSlice<T>> {
    device.alloc_zeros::<T>(n.max(1))
}

/// Runs `f` with `meta` also holding a device mask read in place
/// (`layout` contiguous from `start` to `end`).
pub(crate) fn with_mask<R>(
    storage: &CudaStorage,
    layout: &Layout,
    (start, end): (usize, usize),
    meta: AttentionMetadata<'_>,
    f: impl FnOnce(&AttentionMetadata<'_>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    macro_rules! run {
        ($t:ty, $kind:ident) => {{
            let all = storage.as_cuda_slice::<$t>()?;
            let elems = all.try_slice(start..end).ok_or_else(|| {
                candle_core::Error::msg("sdpa: the mask's layout lies outside its buffer")
            })?;
            let mask =
                AttnMask::from_cuda(CudaMaskData::$kind(CudaRef::View(&elems)), layout.dims())
                    .map_err(err)?;
            f(&meta.with_mask(mask))
        }};
    }
    match storage.dtype() {
        DType::U8 => run!(u8, U8),
        DType::I32 => run!(i32, I32),
        DType::I64 => run!(i64, I64),
        DType::F32 => run!(f32, F32),
        DType::F16 => run!(half::f16, F16),
        DType::BF16 => run!(half::bf16, BF16),
        other => candle_core::bail!("sdpa: a mask of dtype {other:?} is not supported"),
    }
}

/// Runs `f` with a contiguous `i32` device tensor of sequence offsets,
/// read in place.
pub(crate) fn with_offsets<R>(
    offsets: &Tensor,
    f: impl FnOnce(SeqLens<'_>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = offsets.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        candle_core::bail!("sdpa: device offsets expected");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::msg("sdpa: cu_seqlens must be contiguous"))?;
    let all = s.as_cuda_slice::<i32>()?;
    let elems = all.try_slice(start..end).ok_or_else(|| {
        candle_core::Error::msg("sdpa: the offsets' layout lies outside their buffer")
    })?;
    f(SeqLens::Cuda(CudaRef::View(&elems)))
}

/// The forward on the device: a new contiguous output on candle's stream.
pub(crate) fn forward<T: DeviceElement>(
    op: &SdpaOp,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (qd, kd, vd) = (tail::<T>(s1, l1)?, tail::<T>(s2, l2)?, tail::<T>(s3, l3)?);
    let (q, k, v) = (view(&qd, l1)?, view(&kd, l2)?, view(&vd, l3)?);
    let shape = q.layout().shape();
    let device = &s1.device;
    let mut out = zeros::<T>(device, shape.iter().product())?;
    // An empty problem keeps no log-sum-exp (an owned device tensor holds
    // exactly its shape's elements, and the driver allocates none); the
    // backward then recomputes it, as for an untracked forward.
    let lse_shape = op.lse_shape(shape);
    let lse_len: usize = lse_shape.iter().product();
    let lse = if op.keep_lse && lse_len > 0 {
        let data = zeros::<f32>(device, lse_len)?;
        Some(sdpa_runtime::Tensor::from_cuda(data, lse_shape).map_err(err)?)
    } else {
        None
    };
    let out_view = TensorViewMut::from_cuda(&mut out, shape).map_err(err)?;
    op.run_forward([q, k, v], out_view, lse)?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, device.clone()),
        Shape::from(shape.as_slice()),
    ))
}

/// The gradients of `q`, `k`, `v` on the device, from
/// `[q, k, v, out, dout]`.
pub(crate) fn backward<T: DeviceElement>(
    op: &SdpaOp,
    t: [&Tensor; 5],
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let guards: Vec<_> = t.iter().map(|t| t.storage_and_layout()).collect();
    let mut parts = Vec::with_capacity(5);
    for (storage, layout) in &guards {
        match &**storage {
            Storage::Cuda(s) => parts.push((tail::<T>(s, layout)?, *layout, s.device.clone())),
            _ => candle_core::bail!("sdpa: the backward's tensors must all be on one device"),
        }
    }
    let mut views = Vec::with_capacity(5);
    for (data, layout, _) in &parts {
        views.push(view(data, layout)?);
    }
    let views: [TensorView<'_>; 5] = views
        .try_into()
        .map_err(|_| candle_core::Error::msg("sdpa: the backward takes five tensors"))?;
    let device = parts[0].2.clone();
    let qs = views[0].layout().shape();
    let ks = views[1].layout().shape();
    let mut dq = zeros::<T>(&device, qs.iter().product())?;
    let mut dk = zeros::<T>(&device, ks.iter().product())?;
    let mut dv = zeros::<T>(&device, ks.iter().product())?;
    op.run_backward(
        views,
        Gradients {
            dq: TensorViewMut::from_cuda(&mut dq, qs).map_err(err)?,
            dk: TensorViewMut::from_cuda(&mut dk, ks).map_err(err)?,
            dv: TensorViewMut::from_cuda(&mut dv, ks).map_err(err)?,
        },
    )?;
    drop(parts);
    drop(guards);
    let tensor = |data: CudaSlice<T>, shape: [usize; 4]| {
        Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(data, device.clone())),
            shape.as_slice(),
            BackpropOp::none(),
            false,
        )
    };
    Ok((tensor(dq, qs), tensor(dk, ks), tensor(dv, ks)))
}

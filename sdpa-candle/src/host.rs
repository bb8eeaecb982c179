//! Host tensors: candle's CPU storage viewed in place.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Shape, Tensor, WithDType};
use sdpa_runtime::{AttnMask, Element, MaskData, TensorView, TensorViewMut};

use crate::op::{dims4, err, strides4, SdpaOp};

/// A view of host storage through a candle layout, without a copy.
fn view<'a, T: Element + WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<TensorView<'a>> {
    let data = storage.as_slice::<T>()?;
    let data = data.get(layout.start_offset()..).unwrap_or(&[]);
    TensorView::with_strides(data, dims4(layout)?, strides4(layout)?).map_err(err)
}

/// The mask's elements as sdpa reads them, borrowed from candle's storage
/// (`layout` contiguous).
pub(crate) fn mask<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    (start, end): (usize, usize),
) -> candle_core::Result<AttnMask<'a>> {
    let data = match storage {
        CpuStorage::U8(s) => MaskData::U8(&s[start..end]),
        CpuStorage::I32(s) => MaskData::I32(&s[start..end]),
        CpuStorage::I64(s) => MaskData::I64(&s[start..end]),
        CpuStorage::F32(s) => MaskData::F32(&s[start..end]),
        CpuStorage::F16(s) => MaskData::F16(&s[start..end]),
        CpuStorage::BF16(s) => MaskData::BF16(&s[start..end]),
        other => candle_core::bail!("sdpa: a mask of dtype {:?} is not supported", other.dtype()),
    };
    AttnMask::new(data, layout.dims()).map_err(err)
}

/// The forward on the host: a new contiguous output.
pub(crate) fn forward<T: Element + WithDType>(
    op: &SdpaOp,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (q, k, v) = (view::<T>(s1, l1)?, view::<T>(s2, l2)?, view::<T>(s3, l3)?);
    let shape = q.layout().shape();
    let mut out = vec![T::zero(); shape.iter().product()];
    let lse = op
        .keep_lse
        .then(|| sdpa_runtime::Tensor::zeros(sdpa_runtime::DType::F32, op.lse_shape(shape)));
    let out_view = TensorViewMut::from_slice(&mut out, shape).map_err(err)?;
    op.run_forward([q, k, v], out_view, lse)?;
    Ok((T::to_cpu_storage_owned(out), Shape::from(shape.as_slice())))
}

/// The gradients of `q`, `k`, `v` on the host, from `[q, k, v, out, dout]`.
pub(crate) fn backward<T: Element + WithDType>(
    op: &SdpaOp,
    t: [&Tensor; 5],
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let guards: Vec<_> = t.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(5);
    for (storage, layout) in &guards {
        match &**storage {
            candle_core::Storage::Cpu(s) => views.push(view::<T>(s, layout)?),
            _ => candle_core::bail!("sdpa: the backward's tensors must all be on one device"),
        }
    }
    let views: [TensorView<'_>; 5] = views
        .try_into()
        .map_err(|_| candle_core::Error::msg("sdpa: the backward takes five tensors"))?;
    let qs = views[0].layout().shape();
    let ks = views[1].layout().shape();
    let mut dq = vec![T::zero(); qs.iter().product()];
    let mut dk = vec![T::zero(); ks.iter().product()];
    let mut dv = vec![T::zero(); ks.iter().product()];
    op.run_backward(
        views,
        sdpa_runtime::Gradients {
            dq: TensorViewMut::from_slice(&mut dq, qs).map_err(err)?,
            dk: TensorViewMut::from_slice(&mut dk, ks).map_err(err)?,
            dv: TensorViewMut::from_slice(&mut dv, ks).map_err(err)?,
        },
    )?;
    drop(guards);
    let device = t[0].device();
    Ok((
        Tensor::from_vec(dq, qs.as_slice(), device)?,
        Tensor::from_vec(dk, ks.as_slice(), device)?,
        Tensor::from_vec(dv, ks.as_slice(), device)?,
    ))
}

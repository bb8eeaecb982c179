//! Variable-length batches and masks read in place on a GPU, against the
//! float64 reference: packed batches (`cu_seqlens` in host or device
//! memory, with or without `max_seqlen`) forward, log-sum-exp and
//! backward; key-padding masks launched as per-batch key runs (causal
//! too); device masks of every element kind and shape read in place, and
//! host masks copied as stored. Every output buffer is NaN-poisoned first.
//!
//! Every test here needs a CUDA driver and device; without one, each test
//! returns at once and the binary prints one line saying why.

use std::sync::Arc;

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::SeedableRng;
use sdpa_runtime::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use sdpa_runtime::prelude::*;
use sdpa_runtime::{
    AttentionBackend, BackwardInputs, CudaMaskData, Element, Gradients, OwnedMaskData, VarLen,
};
use sdpa_tests::cases::{run_seed, Case, CaseInputs, GenMask, Placement};
use sdpa_tests::device::upload;
use sdpa_tests::reference::rel_l2;
use sdpa_tests::training::{
    assert_lse_close, grad_tolerance, judge_grads, Grads, TrainingInputs, LSE_TOL,
};
use sdpa_tests::varlen::{key_padding_mask, random_mask, MaskElem, PackedCase, PackedInputs};

/// Head sizes 64 and 128, every dtype, causal or not, with the backward.
#[sdpa_variants(head_sizes = [64, 128], backward = true)]
struct VarlenAttention;

const DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

/// Device 0's default stream, or `None` (after saying why, once).
fn stream() -> Option<Arc<CudaStream>> {
    sdpa_tests::device::stream("GPU varlen tests")
}

/// Copies device memory back (waiting for it).
fn down<T: DeviceRepr + Clone>(stream: &Arc<CudaStream>, s: &CudaSlice<T>, len: usize) -> Vec<T> {
    let v: Vec<T> = stream.clone_dtoh(s).expect("a copy to the host");
    stream.synchronize().expect("the device's work");
    v[..len].to_vec()
}

fn to_f64<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f32() as f64).collect()
}

/// Where a packed call's `cu_seqlens` live, and whether it says the
/// longest sequences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cu {
    Host,
    HostWithMax,
    Device,
    DeviceWithMax,
}

const CUS: [Cu; 4] = [Cu::Host, Cu::HostWithMax, Cu::Device, Cu::DeviceWithMax];

/// Runs `pc` packed on device 0 (forward with the lse into poisoned
/// buffers, then the backward into poisoned gradients, from the GPU's
/// `out` and `lse`) and judges everything against the per-sequence
/// reference; `Err` says what failed.
fn packed<T: Element>(
    stream: &Arc<CudaStream>,
    pc: &PackedCase,
    cu: Cu,
    seed: u64,
) -> Result<(), String> {
    let x = PackedInputs::<T>::draw(pc, seed);
    let want = x.reference(pc);
    let case = pc.case();
    let (qs, ks, ls) = (pc.q_shape(), pc.k_shape(), pc.lse_shape());
    let (nq, nl) = (qs.iter().product::<usize>(), ls.iter().product::<usize>());
    let nan = T::from_f32(f32::NAN);
    let (q, k, v) = (
        upload(stream, &x.q.buf),
        upload(stream, &x.k.buf),
        upload(stream, &x.v.buf),
    );
    let dout = upload(stream, &x.dout.buf);
    let mut out = upload(stream, &vec![nan; nq]);
    let mut lse = upload(stream, &vec![f32::NAN; nl]);
    let (cu_q, cu_k) = (pc.cu_q(), pc.cu_k());
    let cu_q_d = stream.clone_htod(&cu_q).map_err(|e| e.to_string())?;
    let cu_k_d = stream.clone_htod(&cu_k).map_err(|e| e.to_string())?;
    let varlen = match cu {
        Cu::Host | Cu::HostWithMax => VarLen::new(&cu_q, &cu_k),
        Cu::Device | Cu::DeviceWithMax => VarLen::new(&cu_q_d, &cu_k_d),
    };
    let varlen = match cu {
        Cu::HostWithMax | Cu::DeviceWithMax => varlen.with_max_seqlen(pc.max_q(), pc.max_k()),
        _ => varlen,
    };
    let meta = AttentionMetadata::new(0).with_varlen(varlen);
    let layer = VarlenAttention
        .build_impl(case.params())
        .map_err(|e| e.to_string())?;
    let err = |e: SdpaError| e.to_string();
    let qv = TensorView::from_cuda(&q, qs).map_err(err)?;
    let kv = TensorView::from_cuda(&k, ks).map_err(err)?;
    let vv = TensorView::from_cuda(&v, ks).map_err(err)?;
    {
        let mut ov = TensorViewMut::from_cuda(&mut out, qs).map_err(err)?;
        let mut lv = TensorViewMut::from_cuda(&mut lse, ls).map_err(err)?;
        layer
            .forward_with_lse_into(&qv, &kv, &vv, &meta, &mut ov, &mut lv)
            .map_err(|e| format!("forward: {e}"))?;
    }
    let got_out = to_f64(&down(stream, &out, nq));
    let got_lse: Vec<f64> = down(stream, &lse, nl).iter().map(|&x| x as f64).collect();
    let rel = rel_l2(&got_out, &want.out);
    if rel.is_nan() || rel > case.tolerance() {
        return Err(format!(
            "out: relative error {rel:.3e} > {:.1e}",
            case.tolerance()
        ));
    }
    // Rows that see no key: exactly zero.
    let d = pc.d;
    for (t, row) in got_out.chunks(pc.heads_q * d).enumerate() {
        for h in 0..pc.heads_q {
            if want.lse[h * pc.tokens_q() + t] == f64::NEG_INFINITY
                && row[h * d..(h + 1) * d].iter().any(|x| *x != 0.0)
            {
                return Err(format!(
                    "out of token {t}, head {h} sees no key but is not 0"
                ));
            }
        }
    }
    let lse_ok = std::panic::catch_unwind(|| assert_lse_close(&got_lse, &want.lse, LSE_TOL, "lse"));
    if lse_ok.is_err() {
        return Err("lse differs from the reference (see the panic above)".into());
    }

    let grads = gradients_on_device(
        stream,
        &layer,
        [&qv, &kv, &vv],
        &meta,
        [&out, &dout],
        &lse,
        [qs, ks, ls],
    )?;
    judge_grads(&case, &want, &grads, grad_tolerance(pc.dtype)).map(drop)
}

/// The backward of `layer` on the device into NaN-poisoned gradients of
/// shapes `qs` (dq) and `ks` (dk, dv), read back as f64.
#[allow(clippy::too_many_arguments)]
fn gradients_on_device<T: Element>(
    stream: &Arc<CudaStream>,
    layer: &sdpa_runtime::SdpaImpl,
    [qv, kv, vv]: [&TensorView<'_>; 3],
    meta: &AttentionMetadata<'_>,
    [out, dout]: [&CudaSlice<T>; 2],
    lse: &CudaSlice<f32>,
    [qs, ks, ls]: [[usize; 4]; 3],
) -> Result<Grads, String> {
    let err = |e: SdpaError| e.to_string();
    let nan = T::from_f32(f32::NAN);
    let (nq, nk) = (qs.iter().product(), ks.iter().product());
    let mut dq = upload(stream, &vec![nan; nq]);
    let mut dk = upload(stream, &vec![nan; nk]);
    let mut dv = upload(stream, &vec![nan; nk]);
    {
        let inputs = BackwardInputs {
            out: TensorView::from_cuda(out, qs).map_err(err)?,
            dout: TensorView::from_cuda(dout, qs).map_err(err)?,
            lse: TensorView::from_cuda(lse, ls).map_err(err)?,
        };
        let mut g = Gradients {
            dq: TensorViewMut::from_cuda(&mut dq, qs).map_err(err)?,
            dk: TensorViewMut::from_cuda(&mut dk, ks).map_err(err)?,
            dv: TensorViewMut::from_cuda(&mut dv, ks).map_err(err)?,
        };
        layer
            .backward_into(qv, kv, vv, meta, &inputs, &mut g)
            .map_err(|e| format!("backward: {e}"))?;
    }
    Ok(Grads {
        dq: to_f64(&down(stream, &dq, nq)),
        dk: to_f64(&down(stream, &dk, nk)),
        dv: to_f64(&down(stream, &dv, nk)),
    })
}

fn packed_any(stream: &Arc<CudaStream>, pc: &PackedCase, cu: Cu, seed: u64) {
    let r = match pc.dtype {
        DType::F32 => packed::<f32>(stream, pc, cu, seed),
        DType::F16 => packed::<f16>(stream, pc, cu, seed),
        DType::BF16 => packed::<bf16>(stream, pc, cu, seed),
    };
    if let Err(e) = r {
        panic!("{pc:?} with {cu:?} cu_seqlens (seed {seed}): {e}");
    }
}

#[test]
fn packed_batches_match_the_reference_per_sequence() {
    let Some(stream) = stream() else { return };
    let seed = run_seed();
    let mut n = 0;
    for dtype in DTYPES {
        for d in [64, 128] {
            for causal in [false, true] {
                // GQA (4 query heads on 2), an empty query sequence, a
                // sequence without keys, more queries than keys and fewer.
                let pc = PackedCase {
                    lens_q: vec![5, 0, 37, 130, 6, 64],
                    lens_k: vec![9, 3, 37, 70, 0, 200],
                    heads_q: 4,
                    heads_kv: 2,
                    d,
                    causal,
                    dtype,
                };
                packed_any(&stream, &pc, CUS[n % 4], seed + n as u64);
                n += 1;
            }
        }
    }
}

#[test]
fn every_place_of_cu_seqlens_gives_the_same_answer() {
    let Some(stream) = stream() else { return };
    let seed = run_seed();
    for (n, cu) in CUS.into_iter().enumerate() {
        let pc = PackedCase {
            lens_q: vec![1, 17, 0, 90],
            lens_k: vec![1, 130, 5, 90],
            heads_q: 2,
            heads_kv: 1,
            d: 64,
            causal: n % 2 == 0,
            dtype: DType::BF16,
        };
        packed_any(&stream, &pc, cu, seed ^ n as u64);
    }
}

#[test]
fn packed_host_tensors_run_through_device_0() {
    let Some(_stream) = stream() else { return };
    let seed = run_seed();
    let pc = PackedCase {
        lens_q: vec![7, 0, 33],
        lens_k: vec![12, 4, 33],
        heads_q: 2,
        heads_kv: 2,
        d: 64,
        causal: true,
        dtype: DType::F32,
    };
    let x = PackedInputs::<f32>::draw(&pc, seed);
    let want = x.reference(&pc);
    let layer = VarlenAttention
        .build_impl(pc.case().params().backend(BackendKind::Cuda))
        .unwrap();
    let (cu_q, cu_k) = (pc.cu_q(), pc.cu_k());
    let meta = AttentionMetadata::new(0).with_varlen(VarLen::new(&cu_q, &cu_k));
    let qv = TensorView::from_slice(&x.q.buf, pc.q_shape()).unwrap();
    let kv = TensorView::from_slice(&x.k.buf, pc.k_shape()).unwrap();
    let vv = TensorView::from_slice(&x.v.buf, pc.k_shape()).unwrap();
    let (out, lse) = layer.forward_with_lse(&qv, &kv, &vv, &meta).unwrap();
    assert_eq!(lse.shape(), pc.lse_shape());
    let got = out.to_f32_vec().unwrap();
    let got: Vec<f64> = got.iter().map(|&x| x as f64).collect();
    let rel = rel_l2(&got, &want.out);
    assert!(rel <= 1e-5, "out: {rel:.3e} (seed {seed})");
    let got_lse: Vec<f64> = lse
        .to_f32_vec()
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect();
    assert_lse_close(&got_lse, &want.lse, LSE_TOL, "lse");
    let dov = TensorView::from_slice(&x.dout.buf, pc.q_shape()).unwrap();
    let (dq, dk, dv) = layer
        .backward(&qv, &kv, &vv, &out.view(), &dov, &lse.view(), &meta)
        .unwrap();
    let f = |t: &sdpa_runtime::Tensor| -> Vec<f64> {
        t.to_f32_vec().unwrap().iter().map(|&x| x as f64).collect()
    };
    let grads = Grads {
        dq: f(&dq),
        dk: f(&dk),
        dv: f(&dv),
    };
    judge_grads(&pc.case(), &want, &grads, grad_tolerance(DType::F32))
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
}

#[test]
fn device_cu_seqlens_on_the_host_path_are_refused() {
    let Some(stream) = stream() else { return };
    let cu = stream.clone_htod(&[0i32, 4]).unwrap();
    let q = vec![0.0f32; 4 * 64];
    let qv = TensorView::from_slice(&q, [1, 4, 1, 64]).unwrap();
    let layer = VarlenAttention
        .build_impl(AttentionParams::new(1, 64))
        .unwrap();
    let meta = AttentionMetadata::new(0).with_varlen(VarLen::new(&cu, &cu));
    let err = layer.forward(&qv, &qv, &qv, &meta).unwrap_err().to_string();
    assert!(err.contains("cu_seqlens_q lives in"), "{err}");
}

/// The forward with the lse (and, with `backward`, the backward from the
/// GPU forward's `out` and `lse`) of a `[B, S, H, D]` case with `mask` on
/// device 0, the mask in device memory when `on_device`, else host memory;
/// judged against the reference.
fn masked<T: Element>(
    stream: &Arc<CudaStream>,
    case: &Case,
    mask: GenMask,
    on_device: bool,
    backward: bool,
    seed: u64,
) -> Result<(), String> {
    let (b, sq, sk, hq, hkv, d) = case.dims();
    let (qs, ks, ls) = ([b, sq, hq, d], [b, sk, hkv, d], [b, hq, sq, 1]);
    let mut t = TrainingInputs::<T>::draw(case, seed);
    t.x.mask = Some(mask);
    let want = t.reference(case);
    let x: &CaseInputs<T> = &t.x;
    let m = x.mask.as_ref().unwrap();
    let err = |e: SdpaError| e.to_string();
    // The device copy of the mask, as stored.
    fn put<U: DeviceRepr>(stream: &Arc<CudaStream>, v: &[U]) -> CudaSlice<U> {
        stream.clone_htod(v).expect("a copy to the device")
    }
    enum Dev {
        Bool(CudaSlice<bool>),
        U8(CudaSlice<u8>),
        I32(CudaSlice<i32>),
        I64(CudaSlice<i64>),
        F32(CudaSlice<f32>),
        F16(CudaSlice<f16>),
        Bf16(CudaSlice<bf16>),
    }
    let dev = match &m.data {
        OwnedMaskData::Bool(v) => Dev::Bool(put(stream, v)),
        OwnedMaskData::U8(v) => Dev::U8(put(stream, v)),
        OwnedMaskData::I32(v) => Dev::I32(put(stream, v)),
        OwnedMaskData::I64(v) => Dev::I64(put(stream, v)),
        OwnedMaskData::F32(v) => Dev::F32(put(stream, v)),
        OwnedMaskData::F16(v) => Dev::F16(put(stream, v)),
        OwnedMaskData::BF16(v) => Dev::Bf16(put(stream, v)),
    };
    let dev_data: CudaMaskData<'_> = match &dev {
        Dev::Bool(s) => s.into(),
        Dev::U8(s) => s.into(),
        Dev::I32(s) => s.into(),
        Dev::I64(s) => s.into(),
        Dev::F32(s) => s.into(),
        Dev::F16(s) => s.into(),
        Dev::Bf16(s) => s.into(),
    };
    let attn_mask = if on_device {
        AttnMask::from_cuda(dev_data, &m.shape).map_err(err)?
    } else {
        AttnMask::new(m.data.as_data(), &m.shape).map_err(err)?
    };
    let meta = AttentionMetadata::new(0).with_mask(attn_mask);
    let layer = VarlenAttention.build_impl(case.params()).map_err(err)?;
    let (nq, nl) = (qs.iter().product::<usize>(), ls.iter().product::<usize>());
    let nan = T::from_f32(f32::NAN);
    let (q, k, v) = (
        upload(stream, &x.q.buf),
        upload(stream, &x.k.buf),
        upload(stream, &x.v.buf),
    );
    let mut out = upload(stream, &vec![nan; nq]);
    let mut lse = upload(stream, &vec![f32::NAN; nl]);
    let qv = TensorView::from_cuda(&q, qs).map_err(err)?;
    let kv = TensorView::from_cuda(&k, ks).map_err(err)?;
    let vv = TensorView::from_cuda(&v, ks).map_err(err)?;
    {
        let mut ov = TensorViewMut::from_cuda(&mut out, qs).map_err(err)?;
        let mut lv = TensorViewMut::from_cuda(&mut lse, ls).map_err(err)?;
        layer
            .forward_with_lse_into(&qv, &kv, &vv, &meta, &mut ov, &mut lv)
            .map_err(|e| format!("forward: {e}"))?;
    }
    let got_out = to_f64(&down(stream, &out, nq));
    let rel = rel_l2(&got_out, &want.out);
    if rel.is_nan() || rel > case.tolerance() {
        return Err(format!(
            "out: relative error {rel:.3e} > {:.1e}",
            case.tolerance()
        ));
    }
    let got_lse: Vec<f64> = down(stream, &lse, nl).iter().map(|&x| x as f64).collect();
    if std::panic::catch_unwind(|| assert_lse_close(&got_lse, &want.lse, LSE_TOL, "lse")).is_err() {
        return Err("lse differs from the reference (see the panic above)".into());
    }
    if !backward {
        return Ok(());
    }
    let dout = upload(stream, &t.dout.buf);
    let grads = gradients_on_device(
        stream,
        &layer,
        [&qv, &kv, &vv],
        &meta,
        [&out, &dout],
        &lse,
        [qs, ks, ls],
    )?;
    judge_grads(case, &want, &grads, grad_tolerance(case.dtype)).map(drop)
}

fn masked_any(
    stream: &Arc<CudaStream>,
    case: &Case,
    mask: GenMask,
    on_device: bool,
    backward: bool,
    seed: u64,
) {
    let what = format!(
        "{case:?} with a {} mask {:?} of {:?} (seed {seed})",
        if on_device { "device" } else { "host" },
        mask.shape,
        std::mem::discriminant(&mask.data)
    );
    let r = match case.dtype {
        DType::F32 => masked::<f32>(stream, case, mask, on_device, backward, seed),
        DType::F16 => masked::<f16>(stream, case, mask, on_device, backward, seed),
        DType::BF16 => masked::<bf16>(stream, case, mask, on_device, backward, seed),
    };
    if let Err(e) = r {
        panic!("{what}: {e}");
    }
}

/// Key-padding runs per batch entry of `sk` keys: trailing padding only
/// (every run starts at 0) or leading and trailing, with an entry that
/// sees nothing.
fn runs(sk: usize, leading: bool) -> Vec<(usize, usize)> {
    if leading {
        vec![(3, sk - 5), (0, 0), (sk / 2, sk), (1, 2)]
    } else {
        vec![(0, sk - 5), (0, 0), (0, sk), (0, 1)]
    }
}

#[test]
fn key_padding_masks_run_as_key_runs_forward_and_backward() {
    // Host and device masks, forward and backward.
    let Some(stream) = stream() else { return };
    let seed = run_seed();
    let mut n = 0u64;
    for dtype in DTYPES {
        for d in [64, 128] {
            for causal in [false, true] {
                for (leading, on_device) in
                    [(false, false), (true, false), (false, true), (true, true)]
                {
                    // Leading padding under causal reads the mask instead:
                    // both paths are judged alike. Host masks find their
                    // runs on the host; device masks through the key-runs
                    // kernel, which flags entries that must read the mask.
                    let case = Case::new(4, 45, 77, 4, d)
                        .kv_heads(2)
                        .dtype(dtype)
                        .causal(causal);
                    let elem = MaskElem::ALL[n as usize % MaskElem::ALL.len()];
                    let mask = key_padding_mask(elem, 77, &runs(77, leading));
                    masked_any(&stream, &case, mask, on_device, true, seed + n);
                    n += 1;
                }
            }
        }
    }
}

/// The shapes every mask kind is tried in, for `[B=2, Hq=4, Sq, Sk]`:
/// key padding, per query, per head, broadcast batch and head, and short
/// last dimensions (front padding).
fn shapes(sq: usize, sk: usize) -> Vec<Vec<usize>> {
    vec![
        vec![2, sk],
        vec![2, sq, sk],
        vec![2, 4, sq, sk],
        vec![1, 1, sq, sk],
        vec![2, 1, 1, sk - 7],
        vec![1, sq, sk - 20],
        vec![2, 4, 1, sk - 1],
    ]
}

fn every_kind_and_shape(on_device: bool) {
    let Some(stream) = stream() else { return };
    let seed = run_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let (sq, sk) = (33, 45);
    let mut n = 0u64;
    for dtype in [DType::BF16, DType::F32] {
        for causal in [false, true] {
            for elem in MaskElem::ALL {
                for shape in shapes(sq, sk) {
                    let case = Case::new(2, sq, sk, 4, 64)
                        .kv_heads(2)
                        .dtype(dtype)
                        .causal(causal)
                        .placement(Placement::Contiguous, Placement::Contiguous);
                    let mask = random_mask(elem, &shape, &mut rng);
                    // The backward too on the full-size masks.
                    let backward = shape.len() == 4 && shape[0] == 2 && shape[1] == 4;
                    masked_any(&stream, &case, mask, on_device, backward, seed + n);
                    n += 1;
                }
            }
        }
    }
}

#[test]
fn device_masks_of_every_kind_and_shape_are_read_in_place() {
    every_kind_and_shape(true);
}

#[test]
fn host_masks_of_every_kind_and_shape_are_copied_as_stored() {
    every_kind_and_shape(false);
}

#[test]
fn float_device_masks_that_hide_rows_with_large_values_are_refused_in_the_backward() {
    let Some(stream) = stream() else { return };
    let (b, s, h, d) = (1, 8, 1, 64);
    let q = upload(&stream, &vec![bf16::from_f32(0.25); b * s * h * d]);
    let mut m = vec![0.0f32; s];
    m.iter_mut().for_each(|x| *x = -1e9);
    let mask_d = stream.clone_htod(&m).unwrap();
    let lse = upload(&stream, &vec![0.0f32; b * h * s]);
    let mut g = [0, 1, 2].map(|_| upload(&stream, &vec![bf16::ZERO; b * s * h * d]));
    let layer = VarlenAttention
        .build_impl(AttentionParams::new(h, d))
        .unwrap();
    let qv = TensorView::from_cuda(&q, [b, s, h, d]).unwrap();
    let meta = AttentionMetadata::new(0).with_mask(AttnMask::from_cuda(&mask_d, &[1, s]).unwrap());
    let inputs = BackwardInputs {
        out: qv,
        dout: qv,
        lse: TensorView::from_cuda(&lse, [b, h, s, 1]).unwrap(),
    };
    let [dq, dk, dv] = &mut g;
    let mut grads = Gradients {
        dq: TensorViewMut::from_cuda(dq, [b, s, h, d]).unwrap(),
        dk: TensorViewMut::from_cuda(dk, [b, s, h, d]).unwrap(),
        dv: TensorViewMut::from_cuda(dv, [b, s, h, d]).unwrap(),
    };
    let err = layer
        .backward_into(&qv, &qv, &qv, &meta, &inputs, &mut grads)
        .unwrap_err();
    assert!(matches!(err, SdpaError::Mask(_)), "{err}");
    assert!(err.to_string().contains("hide keys with -inf"), "{err}");
}

#[test]
fn device_masks_on_the_cpu_backend_are_refused() {
    let Some(stream) = stream() else { return };
    let keep = stream.clone_htod(&[true; 4]).unwrap();
    let q = vec![0.0f32; 4 * 64];
    let qv = TensorView::from_slice(&q, [1, 4, 1, 64]).unwrap();
    let layer = VarlenAttention
        .build_impl(AttentionParams::new(1, 64).backend(BackendKind::Cpu))
        .unwrap();
    let meta = AttentionMetadata::new(0).with_mask(AttnMask::from_cuda(&keep, &[1, 4]).unwrap());
    let err = layer.forward(&qv, &qv, &qv, &meta).unwrap_err().to_string();
    assert!(err.contains("the mask lives in"), "{err}");
}

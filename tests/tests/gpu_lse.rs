//! The row log-sum-exp on a GPU: `forward_with_lse_into` and
//! `forward_with_lse` on device tensors, and on host tensors staged through
//! device 0 by the `cuda` backend, against the float64 reference, with the
//! output and the lse poisoned (NaN) first and the lse at strides of its
//! own. Every kernel family the device runs is exercised: the Hopper kernel
//! at the head sizes it takes (on compute capability 9.0), the `mma.sync`
//! kernel for the other 16-bit variants and the CUDA-core kernel for `f32`
//! (`SDPA_CUDA_KERNEL=sm80` runs the portable ones everywhere).
//!
//! Every test here needs a CUDA driver and device; without one, each test
//! returns at once and the binary prints one line saying why.

use std::sync::Arc;

use half::{bf16, f16};
use sdpa_runtime::cudarc::driver::CudaStream;
use sdpa_runtime::prelude::*;
use sdpa_runtime::Element;
use sdpa_tests::cases::{run_seed, Case, CaseInputs, IntType, LargeValue, MaskKind, Placement};
use sdpa_tests::consumer::{ConformanceAttention, WanAttention};
use sdpa_tests::device::upload;
use sdpa_tests::reference::{self, RefInputs};
use sdpa_tests::training::{assert_lse_close, read_view, LSE_TOL};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Device 0's default stream, or `None` (after saying why, once).
fn stream() -> Option<Arc<CudaStream>> {
    sdpa_tests::device::stream("GPU lse tests")
}

/// The declaration whose variants a case's head size is in.
fn backend_for(d: usize) -> &'static dyn AttentionBackend {
    match d {
        80 | 128 => &WanAttention,
        _ => &ConformanceAttention,
    }
}

/// How the lse buffer `[B, Hq, Sq, 1]` is laid out in its buffer.
#[derive(Clone, Copy, Debug)]
enum LseLayout {
    /// Row-major.
    Contiguous,
    /// A gap of 3 after each head's rows.
    Gapped,
    /// Heads outermost, then batch, every other element: `(b, h, i)` at
    /// `h · (2 · B · Sq + 1) + b · 2 · Sq + 2i`.
    HeadMajorStrided,
}

impl LseLayout {
    const ALL: [LseLayout; 3] = [
        LseLayout::Contiguous,
        LseLayout::Gapped,
        LseLayout::HeadMajorStrided,
    ];

    /// Strides for `[b, hq, sq, 1]` and the buffer length they need.
    fn strides(self, [b, hq, sq, _]: [usize; 4]) -> ([usize; 4], usize) {
        let strides = match self {
            LseLayout::Contiguous => [hq * sq, sq, 1, 1],
            LseLayout::Gapped => [hq * (sq + 3), sq + 3, 1, 1],
            LseLayout::HeadMajorStrided => [2 * sq, 2 * b * sq + 1, 2, 1],
        };
        let len = if b * hq * sq == 0 {
            0
        } else {
            (b - 1) * strides[0] + (hq - 1) * strides[1] + (sq - 1) * strides[2] + 1
        };
        (strides, len)
    }
}

/// The float64 reference of `x`: the output `[B, Sq, Hq, D]` and the row
/// log-sum-exp `[B, Hq, Sq]`, with the masked scores rounded to `f32` as
/// the kernels hold them (a row hidden by a large finite mask on every key
/// is uniform over its keys).
fn reference_of<T>(case: &Case, x: &CaseInputs<T>) -> (Vec<f64>, Vec<f64>) {
    let (b, sq, sk, hq, hkv, d) = case.dims();
    let mask = &x.mask;
    let bias_fn =
        |bi: usize, hi: usize, i: usize, j: usize| mask.as_ref().unwrap().bias_at(sk, bi, hi, i, j);
    let r = RefInputs {
        q: &x.q.values,
        k: &x.k.values,
        v: &x.v.values,
        batch: b,
        seq_q: sq,
        seq_k: sk,
        heads_q: hq,
        heads_kv: hkv,
        d,
        scale: case.scale.map_or(1.0 / (d as f64).sqrt(), |s| s as f64),
        causal: case.causal,
        f32_scores: true,
        bias: if mask.is_some() { Some(&bias_fn) } else { None },
    };
    (reference::attention(&r), reference::lse(&r))
}

/// Judges an output and an lse read back from their poisoned buffers (at
/// `out_strides`, `lse_strides`) against [`reference_of`]; returns them as
/// read.
fn judge<T: Element>(
    case: &Case,
    x: &CaseInputs<T>,
    (out_buf, out_strides): (&[T], [usize; 4]),
    (lse_buf, lse_strides): (&[f32], [usize; 4]),
    what: &str,
) -> (Vec<f64>, Vec<f64>) {
    let (b, sq, _, hq, _, d) = case.dims();
    let (want_out, want_lse) = reference_of(case, x);
    let out = read_view(out_buf, [b, sq, hq, d], out_strides, what);
    let err = reference::rel_l2(&out, &want_out);
    assert!(
        err <= case.tolerance(),
        "{what}: output relative error {err:.3e} > {:.0e}",
        case.tolerance()
    );
    let lse = read_view(lse_buf, [b, hq, sq, 1], lse_strides, what);
    judge_lse(case, &lse, &want_lse, what);
    (out, lse)
}

/// Checks `got` against the reference `want`: `-inf` exactly where the
/// reference has it, within [`LSE_TOL`] relative elsewhere; and where a
/// large finite mask makes the lse huge, within four `f32` steps at its
/// size (the kernels hold scores times `log2(e)` in `f32`: the mask's
/// product, the sum with `lg2` of the row sum and the product with `ln 2`
/// each round once).
fn judge_lse(case: &Case, got: &[f64], want: &[f64], what: &str) {
    assert_lse_close(got, want, LSE_TOL, what);
    if matches!(case.mask, MaskKind::LargeAdditive { .. }) {
        for (n, (g, w)) in got.iter().zip(want).enumerate() {
            if w.is_finite() {
                let x = w.abs() as f32;
                let step = (f32::from_bits(x.to_bits() + 1) - x) as f64;
                assert!(
                    (g - w).abs() <= 4.0 * step + 1e-4,
                    "{what}: lse[{n}] = {g}, want {w} (four f32 steps: {:.1e})",
                    4.0 * step
                );
            }
        }
    }
}

/// Runs `case` with q, k, v, the output and the lse in device memory
/// (`forward_with_lse_into`, then `forward_with_lse`) and judges both
/// against the reference.
fn device_case<T: Element>(
    stream: &Arc<CudaStream>,
    case: &Case,
    lse_layout: LseLayout,
    seed: u64,
) {
    let what = format!("{case:?} with a {lse_layout:?} lse on device tensors (seed {seed})");
    let (b, sq, sk, hq, hkv, d) = case.dims();
    let x = CaseInputs::<T>::draw(case, seed);
    let (dq, dk, dv) = (
        upload(stream, &x.q.buf),
        upload(stream, &x.k.buf),
        upload(stream, &x.v.buf),
    );
    let out_shape = [b, sq, hq, d];
    let (out_strides, out_len) = case.out_placement.strides(out_shape);
    let mut dout = upload(stream, &vec![T::from_f32(f32::NAN); out_len]);
    let lse_shape = [b, hq, sq, 1];
    let (lse_strides, lse_len) = lse_layout.strides(lse_shape);
    let mut dlse = upload(stream, &vec![f32::NAN; lse_len]);
    let layer = backend_for(d).build_impl(case.params()).unwrap();
    let meta = x.metadata().unwrap();
    let qv = TensorView::from_cuda_with_strides(&dq, [b, sq, hq, d], x.q.strides).unwrap();
    let kv = TensorView::from_cuda_with_strides(&dk, [b, sk, hkv, d], x.k.strides).unwrap();
    let vv = TensorView::from_cuda_with_strides(&dv, [b, sk, hkv, d], x.v.strides).unwrap();
    {
        let mut ov =
            TensorViewMut::from_cuda_with_strides(&mut dout, out_shape, out_strides).unwrap();
        let mut lv =
            TensorViewMut::from_cuda_with_strides(&mut dlse, lse_shape, lse_strides).unwrap();
        layer
            .forward_with_lse_into(&qv, &kv, &vv, &meta, &mut ov, &mut lv)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    let out_buf: Vec<T> = stream.clone_dtoh(&dout).unwrap();
    let lse_buf: Vec<f32> = stream.clone_dtoh(&dlse).unwrap();
    stream.synchronize().unwrap();
    // The uploads keep at least one element; judge the views' spans only.
    let (out, lse) = judge(
        case,
        &x,
        (&out_buf[..out_len], out_strides),
        (&lse_buf[..lse_len], lse_strides),
        &what,
    );

    // The fresh form: device tensors, the same kernel, the same bits.
    let (out2, lse2) = layer.forward_with_lse(&qv, &kv, &vv, &meta).unwrap();
    assert!(
        out2.residence().is_cuda() && lse2.residence().is_cuda(),
        "{what}"
    );
    assert_eq!(lse2.shape(), lse_shape, "{what}");
    assert_eq!(lse2.dtype(), DType::F32, "{what}");
    let lse2 = lse2.to_f32_vec().unwrap();
    for (n, (a, c)) in lse2.iter().zip(&lse).enumerate() {
        assert!(
            a.to_bits() == (*c as f32).to_bits() || (a.is_nan() && c.is_nan()),
            "{what}: forward_with_lse's lse[{n}] = {a} but forward_with_lse_into wrote {c}"
        );
    }
    let out2 = out2.to_f32_vec().unwrap();
    for (n, (a, c)) in out2.iter().zip(&out).enumerate() {
        assert!(
            a.to_bits() == (*c as f32).to_bits() || (a.is_nan() && c.is_nan()),
            "{what}: forward_with_lse's out[{n}] = {a} but forward_with_lse_into wrote {c}"
        );
    }
}

/// Runs `case` on host tensors with the `cuda` backend (staged through
/// device 0) and judges the output and the strided lse.
fn staged_case<T: Element>(case: &Case, lse_layout: LseLayout, seed: u64) {
    let what = format!("{case:?} with a {lse_layout:?} lse on host tensors (seed {seed})");
    let (b, sq, sk, hq, hkv, d) = case.dims();
    let x = CaseInputs::<T>::draw(case, seed);
    let layer = backend_for(d)
        .build_impl(case.params().backend(BackendKind::Cuda))
        .unwrap();
    let meta = x.metadata().unwrap();
    let qv = TensorView::with_strides(&x.q.buf, [b, sq, hq, d], x.q.strides).unwrap();
    let kv = TensorView::with_strides(&x.k.buf, [b, sk, hkv, d], x.k.strides).unwrap();
    let vv = TensorView::with_strides(&x.v.buf, [b, sk, hkv, d], x.v.strides).unwrap();
    let out_shape = [b, sq, hq, d];
    let (out_strides, out_len) = case.out_placement.strides(out_shape);
    let mut out_buf = vec![T::from_f32(f32::NAN); out_len];
    let lse_shape = [b, hq, sq, 1];
    let (lse_strides, lse_len) = lse_layout.strides(lse_shape);
    let mut lse_buf = vec![f32::NAN; lse_len];
    {
        let mut ov = TensorViewMut::with_strides(&mut out_buf, out_shape, out_strides).unwrap();
        let mut lv = TensorViewMut::with_strides(&mut lse_buf, lse_shape, lse_strides).unwrap();
        layer
            .forward_with_lse_into(&qv, &kv, &vv, &meta, &mut ov, &mut lv)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    let (_, lse) = judge(
        case,
        &x,
        (&out_buf, out_strides),
        (&lse_buf, lse_strides),
        &what,
    );
    let (out2, lse2) = layer.forward_with_lse(&qv, &kv, &vv, &meta).unwrap();
    assert!(
        !out2.residence().is_cuda() && !lse2.residence().is_cuda(),
        "{what}"
    );
    let lse2 = lse2.to_f32_vec().unwrap();
    for (n, (a, c)) in lse2.iter().zip(&lse).enumerate() {
        assert!(
            a.to_bits() == (*c as f32).to_bits() || (a.is_nan() && c.is_nan()),
            "{what}: forward_with_lse's lse[{n}] = {a} but forward_with_lse_into wrote {c}"
        );
    }
}

fn on_device(stream: &Arc<CudaStream>, case: &Case, lse_layout: LseLayout, seed: u64) {
    match case.dtype {
        DType::F32 => device_case::<f32>(stream, case, lse_layout, seed),
        DType::F16 => device_case::<f16>(stream, case, lse_layout, seed),
        DType::BF16 => device_case::<bf16>(stream, case, lse_layout, seed),
    }
}

fn staged(case: &Case, lse_layout: LseLayout, seed: u64) {
    match case.dtype {
        DType::F32 => staged_case::<f32>(case, lse_layout, seed),
        DType::F16 => staged_case::<f16>(case, lse_layout, seed),
        DType::BF16 => staged_case::<bf16>(case, lse_layout, seed),
    }
}

/// Every declared head size (odd multiples of 8 among them) and dtype,
/// causal or not, with GQA and ragged `Sq` ≠ `Sk` (more than one query and
/// key block), the lse in each layout in turn.
#[test]
fn lse_on_device_tensors_matches_the_reference() {
    let Some(stream) = stream() else { return };
    let seed = run_seed();
    let mut layouts = LseLayout::ALL.iter().cycle();
    for dtype in DTYPES {
        for causal in [false, true] {
            for d in [8, 40, 64, 80, 128, 136, 256] {
                let case = Case::new(2, 77, 130, 4, d)
                    .kv_heads(2)
                    .causal(causal)
                    .dtype(dtype);
                on_device(&stream, &case, *layouts.next().unwrap(), seed ^ d as u64);
            }
        }
    }
}

/// Causal with more and fewer queries than keys (rows past `Sk` see every
/// key), multi-query heads, an explicit scale, and strided inputs and
/// outputs.
#[test]
fn lse_on_device_tensors_causal_lengths_heads_and_views() {
    let Some(stream) = stream() else { return };
    let seed = run_seed();
    for dtype in DTYPES {
        for (sq, sk) in [(150, 30), (30, 150), (129, 129), (1, 300)] {
            for d in [40, 64, 128] {
                let case = Case::new(1, sq, sk, 3, d)
                    .kv_heads(1)
                    .causal(true)
                    .dtype(dtype);
                on_device(&stream, &case, LseLayout::Gapped, seed ^ (sq * sk) as u64);
            }
        }
        let scaled = Case::new(2, 33, 40, 2, 64).scale(0.3).dtype(dtype);
        on_device(&stream, &scaled, LseLayout::HeadMajorStrided, seed);
        for (input, output) in [
            (Placement::HeadMajor, Placement::Gapped),
            (Placement::Gapped, Placement::HeadMajor),
        ] {
            let case = Case::new(2, 40, 50, 4, 136)
                .kv_heads(2)
                .placement(input, output)
                .dtype(dtype);
            on_device(&stream, &case, LseLayout::HeadMajorStrided, seed);
        }
    }
}

/// The masks FastVideo passes: key padding, bool and integer masks, an
/// additive one with `-inf`, rows hidden from every key (their lse is
/// `-inf`, their output zeros), and large finite masks (`-1e9`; `f16`'s
/// most negative value).
#[test]
fn lse_on_device_tensors_with_masks() {
    let Some(stream) = stream() else { return };
    let seed = run_seed();
    for dtype in DTYPES {
        let mut masks = vec![
            MaskKind::KeyPadding {
                short: 3,
                broadcast_batch: true,
            },
            MaskKind::Bool3,
            MaskKind::Int3(IntType::I64),
            MaskKind::Additive4 {
                broadcast_heads: false,
                short: 5,
                with_neg_inf: true,
            },
            MaskKind::HideRows,
        ];
        // `-1e9` is `-inf` in f16; f16's own minimum stands in for it. (The
        // kernels scale the mask by log2(e) in f32, where `f32::MIN` and
        // `bf16::MIN` overflow to `-inf`: those rows read as hidden.)
        let large = match dtype {
            DType::F16 => LargeValue::DtypeMin,
            _ => LargeValue::MinusBillion,
        };
        for key_padding in [false, true] {
            for whole_rows in [true, false] {
                masks.push(MaskKind::LargeAdditive {
                    value: large,
                    key_padding,
                    whole_rows,
                });
            }
        }
        for mask in masks {
            for (d, causal) in [(64, true), (40, false), (128, false)] {
                let case = Case::new(2, 30, 45, 2, d)
                    .mask(mask)
                    .causal(causal)
                    .dtype(dtype);
                on_device(&stream, &case, LseLayout::Gapped, seed ^ d as u64);
            }
        }
    }
}

/// Host tensors with the `cuda` backend: staged through device 0, the lse
/// scattered back into the host view's strides (inputs and outputs at odd
/// strides too, which the staging packs).
#[test]
fn lse_of_host_tensors_staged_through_the_gpu() {
    let Some(_) = stream() else { return };
    let seed = run_seed();
    let mut layouts = LseLayout::ALL.iter().cycle();
    for dtype in DTYPES {
        for d in [8, 64, 136, 256] {
            let case = Case::new(2, 37, 70, 4, d)
                .kv_heads(2)
                .causal(d == 64)
                .placement(Placement::Unaligned, Placement::Unaligned)
                .dtype(dtype);
            staged(&case, *layouts.next().unwrap(), seed ^ d as u64);
        }
        let masked = Case::new(2, 30, 45, 2, 40)
            .mask(MaskKind::HideRows)
            .causal(true)
            .dtype(dtype);
        staged(&masked, LseLayout::HeadMajorStrided, seed);
    }
}

/// The output of `case` on device tensors from `forward_into`, then from
/// `forward_with_lse_into`, as bits.
fn outputs_without_and_with_lse<T: Element>(
    stream: &Arc<CudaStream>,
    case: &Case,
) -> [Vec<u32>; 2] {
    let (b, sq, sk, hq, hkv, d) = case.dims();
    let x = CaseInputs::<T>::draw(case, 7);
    let (dq, dk, dv) = (
        upload(stream, &x.q.buf),
        upload(stream, &x.k.buf),
        upload(stream, &x.v.buf),
    );
    let qv = TensorView::from_cuda_with_strides(&dq, [b, sq, hq, d], x.q.strides).unwrap();
    let kv = TensorView::from_cuda_with_strides(&dk, [b, sk, hkv, d], x.k.strides).unwrap();
    let vv = TensorView::from_cuda_with_strides(&dv, [b, sk, hkv, d], x.v.strides).unwrap();
    let layer = backend_for(d).build_impl(case.params()).unwrap();
    let meta = x.metadata().unwrap();
    let mut dlse = stream.alloc_zeros::<f32>(b * hq * sq).unwrap();
    [false, true].map(|with_lse| {
        let mut dout = upload(stream, &vec![T::from_f32(f32::NAN); b * sq * hq * d]);
        {
            let mut ov = TensorViewMut::from_cuda(&mut dout, [b, sq, hq, d]).unwrap();
            if with_lse {
                let mut lv = TensorViewMut::from_cuda(&mut dlse, [b, hq, sq, 1]).unwrap();
                layer
                    .forward_with_lse_into(&qv, &kv, &vv, &meta, &mut ov, &mut lv)
                    .unwrap();
            } else {
                layer.forward_into(&qv, &kv, &vv, &meta, &mut ov).unwrap();
            }
        }
        let out: Vec<T> = stream.clone_dtoh(&dout).unwrap();
        out.iter().map(|x| x.to_f32().to_bits()).collect()
    })
}

/// The lse changes nothing else: `forward_into` and
/// `forward_with_lse_into` write the same output bits (one kernel; the lse
/// is one more store per row).
#[test]
fn the_output_is_the_same_with_and_without_the_lse() {
    let Some(stream) = stream() else { return };
    for dtype in DTYPES {
        for d in [40, 128] {
            let case = Case::new(2, 100, 120, 4, d)
                .kv_heads(2)
                .causal(true)
                .mask(MaskKind::HideRows)
                .dtype(dtype);
            let [plain, with_lse] = match dtype {
                DType::F32 => outputs_without_and_with_lse::<f32>(&stream, &case),
                DType::F16 => outputs_without_and_with_lse::<f16>(&stream, &case),
                DType::BF16 => outputs_without_and_with_lse::<bf16>(&stream, &case),
            };
            assert!(plain == with_lse, "{case:?}: the lse changed the output");
        }
    }
}

/// An lse the device kernel cannot write is an error that says what to
/// pass, before anything runs: in host memory with device tensors, of
/// another dtype, or of the wrong shape.
#[test]
fn an_lse_the_gpu_cannot_write_is_an_error_saying_what_to_pass() {
    let Some(stream) = stream() else { return };
    let (b, s, h, d) = (1, 16, 2, 64);
    let host = vec![bf16::from_f32(0.5); b * s * h * d];
    let dq = stream.clone_htod(&host).unwrap();
    let layer = ConformanceAttention
        .build_impl(AttentionParams::new(h, d))
        .unwrap();
    let qv = TensorView::from_cuda(&dq, [b, s, h, d]).unwrap();
    let meta = AttentionMetadata::default();
    let mut dout = stream.alloc_zeros::<bf16>(host.len()).unwrap();
    let mut ov = TensorViewMut::from_cuda(&mut dout, [b, s, h, d]).unwrap();

    let mut host_lse = vec![0.0f32; b * h * s];
    let mut lv = TensorViewMut::from_slice(&mut host_lse, [b, h, s, 1]).unwrap();
    let e = layer
        .forward_with_lse_into(&qv, &qv, &qv, &meta, &mut ov, &mut lv)
        .unwrap_err();
    assert!(matches!(e, SdpaError::Residence(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("host memory") && msg.contains("CUDA device 0"),
        "{msg}"
    );
    assert!(
        msg.contains("pass an f32 [1, 2, 16, 1] lse where q lives (device memory of q's device)"),
        "{msg}"
    );

    let mut lse16 = stream.alloc_zeros::<bf16>(b * h * s).unwrap();
    let mut lv = TensorViewMut::from_cuda(&mut lse16, [b, h, s, 1]).unwrap();
    let e = layer
        .forward_with_lse_into(&qv, &qv, &qv, &meta, &mut ov, &mut lv)
        .unwrap_err();
    assert!(matches!(e, SdpaError::Lse(_)), "{e:?}");
    assert!(
        e.to_string()
            .contains("has dtype bf16; the log-sum-exp is always f32"),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("pass an f32 buffer of shape [1, 2, 16, 1]"),
        "{e}"
    );

    let mut lse = stream.alloc_zeros::<f32>(b * h * s).unwrap();
    let mut lv = TensorViewMut::from_cuda(&mut lse, [b, s, h, 1]).unwrap();
    let e = layer
        .forward_with_lse_into(&qv, &qv, &qv, &meta, &mut ov, &mut lv)
        .unwrap_err();
    assert!(matches!(e, SdpaError::Lse(_)), "{e:?}");
    assert!(e.to_string().contains("[1, 2, 16, 1]"), "{e}");
}

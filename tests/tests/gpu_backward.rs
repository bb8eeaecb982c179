//! The backward pass on a GPU: `dq`, `dk` and `dv` from the CUDA kernels
//! against the float64 reference backward, for device tensors (with their
//! own strides) and for host tensors staged through device 0, with every
//! gradient buffer poisoned (NaN) first.
//!
//! `out` and `lse` come from the CPU forward (`forward_with_lse`), uploaded
//! for the device cases; where the CUDA forward writes the log-sum-exp,
//! one test also takes that route. The gradients are judged as the CPU
//! backward's are (`sdpa_tests::training::judge_grads`).
//!
//! Every test here needs a CUDA driver and device; without one, each test
//! returns at once and the binary prints one line saying why.

use std::sync::Arc;

use half::{bf16, f16};
use sdpa_runtime::cudarc::driver::{CudaSlice, CudaStream};
use sdpa_runtime::prelude::*;
use sdpa_runtime::{AttentionBackend, BackwardInputs, Element, Gradients, Residence};
use sdpa_tests::cases::{run_seed, Case, IntType, LargeValue, MaskKind, Placement};
use sdpa_tests::consumer::TrainingAttention;
use sdpa_tests::device::upload;
use sdpa_tests::training::{
    grad_tolerance, judge_backward, read_view, run_backward_on, through_layer, Grads,
    TrainingInputs,
};

/// The head sizes `TrainingAttention` does not declare, with the backward.
#[sdpa_variants(head_sizes = [80, 128], backward = true)]
struct GpuTraining;

const DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

/// Device 0's default stream, or `None` (after saying why, once).
fn stream() -> Option<Arc<CudaStream>> {
    sdpa_tests::device::stream("GPU backward tests")
}

/// The declaration whose variants include the case's head size.
fn backend_for(case: &Case) -> &'static dyn AttentionBackend {
    let (.., d) = case.dims();
    if matches!(d, 80 | 128) {
        &GpuTraining
    } else {
        &TrainingAttention
    }
}

/// Where a case's tensors live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// Device memory of device 0, with the case's strides.
    Device,
    /// Host memory, staged through device 0 by the `cuda` backend.
    Host,
}

/// Runs the backward of `case` with every tensor on device 0 (the case's
/// input placement for q, k, v and dout, its output placement for out and
/// the gradients, the lse with a gap after each head's rows), the
/// gradients poisoned first; returns them as float64, checking that nothing
/// outside the views was written.
fn device_backward<T: Element>(
    stream: &Arc<CudaStream>,
    case: &Case,
    seed: u64,
) -> Result<Grads, SdpaError> {
    let what = format!("{case:?} on the device (seed {seed})");
    let (b, sq, sk, hq, hkv, d) = case.dims();
    let (qs, ks) = ([b, sq, hq, d], [b, sk, hkv, d]);
    let t = TrainingInputs::<T>::draw(case, seed);
    let x = &t.x;
    let backend = backend_for(case);
    let cpu = backend.build_impl(case.params().backend(BackendKind::Cpu))?;
    let layer = backend.build_impl(case.params())?;
    let meta = x.metadata()?;
    let (out, lse) = {
        let qv = TensorView::with_strides(&x.q.buf, qs, x.q.strides)?;
        let kv = TensorView::with_strides(&x.k.buf, ks, x.k.strides)?;
        let vv = TensorView::with_strides(&x.v.buf, ks, x.v.strides)?;
        cpu.forward_with_lse(&qv, &kv, &vv, &meta)?
    };
    // out in the output placement, lse with gaps, NaN between elements.
    let (out_strides, out_len) = case.out_placement.strides(qs);
    let mut out_buf = vec![T::from_f32(f32::NAN); out_len];
    let out_vals = out.to_f32_vec()?;
    let mut n = 0;
    for bi in 0..b {
        for i in 0..sq {
            for h in 0..hq {
                let base = bi * out_strides[0] + i * out_strides[1] + h * out_strides[2];
                for e in 0..d {
                    out_buf[base + e] = T::from_f32(out_vals[n]);
                    n += 1;
                }
            }
        }
    }
    let gap = 3;
    let lse_shape = [b, hq, sq, 1];
    let lse_strides = [hq * (sq + gap), sq + gap, 1, 1];
    let mut lse_buf = vec![f32::NAN; b * hq * (sq + gap)];
    for (n, v) in lse.to_f32_vec()?.into_iter().enumerate() {
        lse_buf[(n / sq) * (sq + gap) + n % sq] = v;
    }
    let (q_d, k_d, v_d) = (
        upload(stream, &x.q.buf),
        upload(stream, &x.k.buf),
        upload(stream, &x.v.buf),
    );
    let (dout_d, out_d, lse_d) = (
        upload(stream, &t.dout.buf),
        upload(stream, &out_buf),
        upload(stream, &lse_buf),
    );
    let (q_strides, q_len) = case.out_placement.strides(qs);
    let (k_strides, k_len) = case.out_placement.strides(ks);
    let mut dq_d = upload(stream, &vec![T::from_f32(f32::NAN); q_len]);
    let mut dk_d = upload(stream, &vec![T::from_f32(f32::NAN); k_len]);
    let mut dv_d = upload(stream, &vec![T::from_f32(f32::NAN); k_len]);
    {
        let qv = TensorView::from_cuda_with_strides(&q_d, qs, x.q.strides)?;
        let kv = TensorView::from_cuda_with_strides(&k_d, ks, x.k.strides)?;
        let vv = TensorView::from_cuda_with_strides(&v_d, ks, x.v.strides)?;
        assert_eq!(qv.residence(), Residence::Cuda { ordinal: 0 });
        let inputs = BackwardInputs {
            out: TensorView::from_cuda_with_strides(&out_d, qs, out_strides)?,
            dout: TensorView::from_cuda_with_strides(&dout_d, qs, t.dout.strides)?,
            lse: TensorView::from_cuda_with_strides(&lse_d, lse_shape, lse_strides)?,
        };
        let mut grads = Gradients {
            dq: TensorViewMut::from_cuda_with_strides(&mut dq_d, qs, q_strides)?,
            dk: TensorViewMut::from_cuda_with_strides(&mut dk_d, ks, k_strides)?,
            dv: TensorViewMut::from_cuda_with_strides(&mut dv_d, ks, k_strides)?,
        };
        layer.backward_into(&qv, &kv, &vv, &meta, &inputs, &mut grads)?;
    }
    let down = |s: &CudaSlice<T>, len: usize| -> Vec<T> {
        let v: Vec<T> = stream.clone_dtoh(s).unwrap();
        stream.synchronize().unwrap();
        // The upload keeps at least one element; read the view's span.
        v[..len].to_vec()
    };
    Ok(Grads {
        dq: read_view(&down(&dq_d, q_len), qs, q_strides, &what),
        dk: read_view(&down(&dk_d, k_len), ks, k_strides, &what),
        dv: read_view(&down(&dv_d, k_len), ks, k_strides, &what),
    })
}

/// The gradients of `case` on the GPU, with its tensors in `place`.
fn gpu_grads<T: Element>(
    stream: &Arc<CudaStream>,
    case: &Case,
    seed: u64,
    place: Place,
) -> Result<Grads, SdpaError> {
    match place {
        Place::Device => device_backward::<T>(stream, case, seed),
        Place::Host => run_backward_on::<T>(
            backend_for(case),
            BackendKind::Cuda,
            case,
            seed,
            &through_layer,
        ),
    }
}

/// Runs `case` on the GPU in `place` and judges its gradients against the
/// float64 reference; panics with the case, place and seed on a mismatch.
fn check_in<T: Element>(stream: &Arc<CudaStream>, case: &Case, seed: u64, place: Place) -> Grads {
    let what = format!("{case:?} in {place:?} memory (seed {seed})");
    let grads = gpu_grads::<T>(stream, case, seed, place)
        .unwrap_or_else(|e| panic!("{what}: the call failed: {e}"));
    if let Err(e) = judge_backward::<T>(case, seed, &grads, grad_tolerance(case.dtype)) {
        panic!("{what}: {e}");
    }
    grads
}

/// [`check_in`] for the case's dtype, in device memory (where its
/// placements are 16-byte aligned, as device tensors must be) and in host
/// memory. Returns the device gradients, else the host ones.
fn check(stream: &Arc<CudaStream>, case: &Case, seed: u64) -> Grads {
    let aligned = ![case.placement, case.out_placement].contains(&Placement::Unaligned);
    let places: &[Place] = if aligned {
        &[Place::Host, Place::Device]
    } else {
        &[Place::Host]
    };
    let mut last = None;
    for &place in places {
        last = Some(match case.dtype {
            DType::F32 => check_in::<f32>(stream, case, seed, place),
            DType::F16 => check_in::<f16>(stream, case, seed, place),
            DType::BF16 => check_in::<bf16>(stream, case, seed, place),
        });
    }
    last.expect("at least the host place runs")
}

#[test]
fn every_dtype_head_size_and_causal_value() {
    let Some(s) = stream() else { return };
    let seed = run_seed();
    for d in [8, 40, 64, 80, 128, 256] {
        for causal in [false, true] {
            for dtype in DTYPES {
                // Ragged: not multiples of the blocks.
                let case = Case::new(2, 37, 70, 2, d).causal(causal).dtype(dtype);
                check(&s, &case, seed ^ d as u64);
            }
        }
    }
}

#[test]
fn grouped_and_multi_query_heads_sum_over_their_group() {
    let Some(s) = stream() else { return };
    let seed = run_seed();
    for (hq, hkv) in [(4, 2), (6, 1), (8, 4)] {
        for causal in [false, true] {
            for dtype in DTYPES {
                let case = Case::new(2, 50, 66, hq, 64)
                    .kv_heads(hkv)
                    .causal(causal)
                    .dtype(dtype);
                check(&s, &case, seed);
            }
        }
    }
}

#[test]
fn causal_with_more_or_fewer_queries_than_keys() {
    let Some(s) = stream() else { return };
    let seed = run_seed();
    for (sq, sk) in [(130, 40), (40, 130), (1, 70), (70, 1), (65, 65), (257, 100)] {
        for dtype in DTYPES {
            let case = Case::new(1, sq, sk, 3, 64).causal(true).dtype(dtype);
            check(&s, &case, seed);
        }
    }
}

#[test]
fn ragged_lengths_around_the_blocks() {
    let Some(s) = stream() else { return };
    let seed = run_seed();
    for sq in [1, 33, 100, 257] {
        for sk in [1, 33, 100, 257] {
            for causal in [false, true] {
                let case = Case::new(1, sq, sk, 2, 64)
                    .causal(causal)
                    .dtype(DType::BF16);
                check(&s, &case, seed);
            }
        }
    }
    // Many key blocks, each waiting for the previous one's dq sums.
    for dtype in DTYPES {
        check(&s, &Case::new(1, 300, 1000, 2, 128).dtype(dtype), seed);
    }
}

#[test]
fn every_mask_kind_and_shape() {
    let Some(s) = stream() else { return };
    let seed = run_seed();
    let masks = [
        MaskKind::KeyPadding {
            short: 0,
            broadcast_batch: false,
        },
        MaskKind::KeyPadding {
            short: 9,
            broadcast_batch: true,
        },
        MaskKind::Bool3,
        MaskKind::Int3(IntType::U8),
        MaskKind::Int3(IntType::I64),
        MaskKind::Additive4 {
            broadcast_heads: true,
            short: 0,
            with_neg_inf: false,
        },
        MaskKind::Additive4 {
            broadcast_heads: false,
            short: 11,
            with_neg_inf: true,
        },
        // Whole rows hidden: they see no key, and their dq is zero.
        MaskKind::HideRows,
    ];
    for mask in masks {
        for causal in [false, true] {
            for dtype in DTYPES {
                let case = Case::new(2, 45, 80, 4, 64)
                    .kv_heads(2)
                    .mask(mask)
                    .causal(causal)
                    .dtype(dtype);
                check(&s, &case, seed);
            }
        }
    }
}

#[test]
fn large_finite_masks_run_unless_they_hide_whole_rows() {
    let Some(s) = stream() else { return };
    let seed = run_seed();
    for value in [LargeValue::MinusBillion, LargeValue::DtypeMin] {
        for dtype in [DType::BF16, DType::F32] {
            // Padded keys hidden by a large finite value (the Hugging Face
            // convention), every row still seeing some key: as the CPU.
            let seen = Case::new(2, 33, 70, 2, 64)
                .dtype(dtype)
                .mask(MaskKind::LargeAdditive {
                    value,
                    key_padding: false,
                    whole_rows: false,
                });
            check(&s, &seen, seed);
            // Whole rows hidden by it: a typed error naming the fix.
            let hidden = Case::new(2, 33, 70, 2, 64)
                .dtype(dtype)
                .mask(MaskKind::LargeAdditive {
                    value,
                    key_padding: true,
                    whole_rows: true,
                });
            let err = match dtype {
                DType::F32 => device_backward::<f32>(&s, &hidden, seed),
                _ => device_backward::<bf16>(&s, &hidden, seed),
            }
            .unwrap_err();
            assert!(matches!(err, SdpaError::Mask(_)), "{err:?}");
            assert!(err.to_string().contains("-inf"), "{err}");
        }
    }
}

#[test]
fn strided_inputs_and_outputs() {
    let Some(s) = stream() else { return };
    let seed = run_seed();
    let placements = [
        Placement::Contiguous,
        Placement::HeadMajor,
        Placement::Gapped,
        Placement::Unaligned,
    ];
    for inputs in placements {
        for outputs in placements {
            for dtype in [DType::BF16, DType::F32] {
                let case = Case::new(2, 40, 70, 4, 40)
                    .kv_heads(2)
                    .causal(true)
                    .dtype(dtype)
                    .placement(inputs, outputs);
                // Device tensors with unaligned rows are refused (below);
                // host ones are packed before staging.
                check(&s, &case, seed);
            }
        }
    }
}

#[test]
fn device_tensors_with_unaligned_rows_are_a_typed_error() {
    let Some(s) = stream() else { return };
    let seed = run_seed();
    let case = Case::new(1, 20, 30, 2, 64)
        .dtype(DType::BF16)
        .placement(Placement::Unaligned, Placement::Contiguous);
    let err = device_backward::<bf16>(&s, &case, seed).unwrap_err();
    assert!(matches!(err, SdpaError::Shape(_)), "{err:?}");
    assert!(err.to_string().contains("16-byte"), "{err}");
}

#[test]
fn empty_problems_give_zero_gradients_without_a_launch() {
    let Some(s) = stream() else { return };
    let seed = run_seed();
    for place in [Place::Device, Place::Host] {
        // No key: dq is zero.
        let g = gpu_grads::<f32>(&s, &Case::new(1, 20, 0, 2, 64), seed, place).unwrap();
        assert!(
            g.dq.iter().all(|x| *x == 0.0) && !g.dq.is_empty(),
            "{place:?}"
        );
        // No query: nothing reads the keys, so dk and dv are zero.
        let case = Case::new(1, 0, 20, 2, 64).placement(Placement::Contiguous, Placement::Gapped);
        let g = gpu_grads::<bf16>(&s, &case, seed, place).unwrap();
        assert!(g.dk.iter().chain(&g.dv).all(|x| *x == 0.0), "{place:?}");
        assert!(!g.dk.is_empty());
    }
}

#[test]
fn two_runs_give_the_same_bits() {
    let Some(s) = stream() else { return };
    let seed = run_seed();
    for dtype in DTYPES {
        let case =
            Case::new(2, 150, 700, 4, 64)
                .kv_heads(2)
                .dtype(dtype)
                .mask(MaskKind::Additive4 {
                    broadcast_heads: false,
                    short: 3,
                    with_neg_inf: true,
                });
        for place in [Place::Device, Place::Host] {
            let run = || match dtype {
                DType::F32 => gpu_grads::<f32>(&s, &case, seed, place),
                DType::F16 => gpu_grads::<f16>(&s, &case, seed, place),
                DType::BF16 => gpu_grads::<bf16>(&s, &case, seed, place),
            };
            let first = run().unwrap();
            for _ in 0..3 {
                let again = run().unwrap();
                let same =
                    |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same(&first.dq, &again.dq)
                        && same(&first.dk, &again.dk)
                        && same(&first.dv, &again.dv),
                    "{case:?} in {place:?} memory: two runs differ"
                );
            }
        }
    }
}

/// `backward` on device tensors returns device tensors on `q`'s device,
/// with the bits `backward_into` writes.
#[test]
fn fresh_gradients_live_on_the_device_and_match_backward_into() {
    let Some(s) = stream() else { return };
    let seed = run_seed();
    let case = Case::new(2, 70, 90, 4, 64).kv_heads(2).causal(true);
    let (b, sq, sk, hq, hkv, d) = case.dims();
    let t = TrainingInputs::<f32>::draw(&case, seed);
    let x = &t.x;
    let cpu = TrainingAttention
        .build_impl(case.params().backend(BackendKind::Cpu))
        .unwrap();
    let layer = TrainingAttention.build_impl(case.params()).unwrap();
    let meta = x.metadata().unwrap();
    let (qs, ks) = ([b, sq, hq, d], [b, sk, hkv, d]);
    let host = |buf, shape, strides| TensorView::with_strides(buf, shape, strides).unwrap();
    let (out, lse) = cpu
        .forward_with_lse(
            &host(&x.q.buf, qs, x.q.strides),
            &host(&x.k.buf, ks, x.k.strides),
            &host(&x.v.buf, ks, x.v.strides),
            &meta,
        )
        .unwrap();
    let dev = |buf: &[f32]| upload(&s, buf);
    let (q_d, k_d, v_d, dout_d) = (
        dev(&x.q.buf),
        dev(&x.k.buf),
        dev(&x.v.buf),
        dev(&t.dout.buf),
    );
    let (out_d, lse_d) = (dev(out.as_slice().unwrap()), dev(lse.as_slice().unwrap()));
    let qv = TensorView::from_cuda_with_strides(&q_d, qs, x.q.strides).unwrap();
    let kv = TensorView::from_cuda_with_strides(&k_d, ks, x.k.strides).unwrap();
    let vv = TensorView::from_cuda_with_strides(&v_d, ks, x.v.strides).unwrap();
    let ov = TensorView::from_cuda(&out_d, qs).unwrap();
    let dov = TensorView::from_cuda_with_strides(&dout_d, qs, t.dout.strides).unwrap();
    let lv = TensorView::from_cuda(&lse_d, [b, hq, sq, 1]).unwrap();
    let (dq, dk, dv) = layer
        .backward(&qv, &kv, &vv, &ov, &dov, &lv, &meta)
        .unwrap();
    for g in [&dq, &dk, &dv] {
        assert_eq!(g.residence(), Residence::Cuda { ordinal: 0 });
    }
    assert_eq!((dq.shape(), dk.shape(), dv.shape()), (qs, ks, ks));
    let fresh = Grads {
        dq: dq
            .to_f32_vec()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect(),
        dk: dk
            .to_f32_vec()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect(),
        dv: dv
            .to_f32_vec()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect(),
    };
    judge_backward::<f32>(&case, seed, &fresh, grad_tolerance(DType::F32))
        .unwrap_or_else(|e| panic!("{case:?}: {e}"));
    let into = device_backward::<f32>(&s, &case, seed).unwrap();
    assert_eq!(fresh, into, "backward and backward_into differ");
}

/// Where the CUDA forward writes the log-sum-exp, the whole training step
/// runs on the device: its lse feeds the GPU backward.
#[test]
fn the_cuda_forward_lse_feeds_the_backward() {
    let Some(s) = stream() else { return };
    let seed = run_seed();
    for dtype in DTYPES {
        let case = Case::new(2, 70, 90, 4, 64)
            .kv_heads(2)
            .causal(true)
            .dtype(dtype)
            .mask(MaskKind::HideRows);
        let result = match dtype {
            DType::F32 => on_device_lse::<f32>(&s, &case, seed),
            DType::F16 => on_device_lse::<f16>(&s, &case, seed),
            DType::BF16 => on_device_lse::<bf16>(&s, &case, seed),
        };
        match result {
            Err(e) => panic!("{case:?}: {e}"),
            Ok(grads) => {
                let tol = grad_tolerance(dtype);
                let judged = match dtype {
                    DType::F32 => judge_backward::<f32>(&case, seed, &grads, tol),
                    DType::F16 => judge_backward::<f16>(&case, seed, &grads, tol),
                    DType::BF16 => judge_backward::<bf16>(&case, seed, &grads, tol),
                };
                judged.unwrap_or_else(|e| panic!("{case:?}: {e}"));
            }
        }
    }
}

/// The forward with the lse and the backward, both on device 0, for
/// contiguous device tensors.
fn on_device_lse<T: Element>(
    s: &Arc<CudaStream>,
    case: &Case,
    seed: u64,
) -> Result<Grads, SdpaError> {
    let (b, sq, sk, hq, hkv, d) = case.dims();
    let (qs, ks) = ([b, sq, hq, d], [b, sk, hkv, d]);
    let t = TrainingInputs::<T>::draw(case, seed);
    let x = &t.x;
    let layer = backend_for(case).build_impl(case.params())?;
    let meta = x.metadata()?;
    let (q_d, k_d, v_d, dout_d) = (
        upload(s, &x.q.buf),
        upload(s, &x.k.buf),
        upload(s, &x.v.buf),
        upload(s, &t.dout.buf),
    );
    let qv = TensorView::from_cuda_with_strides(&q_d, qs, x.q.strides)?;
    let kv = TensorView::from_cuda_with_strides(&k_d, ks, x.k.strides)?;
    let vv = TensorView::from_cuda_with_strides(&v_d, ks, x.v.strides)?;
    let dov = TensorView::from_cuda_with_strides(&dout_d, qs, t.dout.strides)?;
    let (out, lse) = layer.forward_with_lse(&qv, &kv, &vv, &meta)?;
    let (dq, dk, dv) = layer.backward(&qv, &kv, &vv, &out.view(), &dov, &lse.view(), &meta)?;
    let f64s = |t: &Tensor| -> Result<Vec<f64>, SdpaError> {
        Ok(t.to_f32_vec()?.into_iter().map(f64::from).collect())
    };
    Ok(Grads {
        dq: f64s(&dq)?,
        dk: f64s(&dk)?,
        dv: f64s(&dv)?,
    })
}

//! The training calls: the forward with the row log-sum-exp and the
//! backward pass, clause by clause against the float64 reference (whose
//! gradients are checked by finite differences in `tests/src/reference.rs`),
//! on every CPU path, with every output buffer poisoned first.

use sdpa_runtime::prelude::*;
use sdpa_runtime::{cpu, BackwardInputs, Element, Gradients, Problem, SdpaImpl};
use sdpa_tests::cases::{run_seed, Case, IntType, LargeValue, MaskKind, Placement};
use sdpa_tests::consumer::{ConformanceAttention, NarrowAttention, TrainingAttention};
use sdpa_tests::training::{
    check_backward, check_lse, grad_tolerance, judge_grads, run_backward, through_layer, Grads,
    TrainingInputs,
};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

#[test]
fn lse_matches_the_reference_with_groups_causal_and_masks() {
    let seed = run_seed();
    let b = &ConformanceAttention;
    for dtype in DTYPES {
        check_lse(
            b,
            &Case::new(2, 37, 70, 4, 64).kv_heads(2).dtype(dtype),
            seed,
        );
    }
    for (sq, sk) in [(50, 20), (20, 50)] {
        check_lse(
            b,
            &Case::new(1, sq, sk, 3, 40).kv_heads(1).causal(true),
            seed,
        );
    }
    check_lse(b, &Case::new(1, 33, 40, 2, 8).scale(0.3), seed);
    for mask in [
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
    ] {
        let case = Case::new(2, 30, 45, 2, 64).mask(mask).causal(true);
        check_lse(b, &case, seed);
    }
    let strided = Case::new(2, 40, 50, 4, 64)
        .kv_heads(2)
        .placement(Placement::HeadMajor, Placement::Unaligned);
    check_lse(b, &strided, seed);
}

#[test]
fn bad_lse_buffers_are_errors_that_say_what_to_pass() {
    let (b, s, h, d) = (1, 5, 2, 8);
    let layer = ConformanceAttention
        .build_impl(AttentionParams::new(h, d).backend(BackendKind::Cpu))
        .unwrap();
    let x = vec![0.25f32; b * s * h * d];
    let q = TensorView::from_slice(&x, [b, s, h, d]).unwrap();
    let meta = AttentionMetadata::default();
    let mut out = vec![0.0f32; x.len()];
    let mut ov = TensorViewMut::from_slice(&mut out, [b, s, h, d]).unwrap();
    // Wrong shape ([B, Sq, Hq, 1] instead of [B, Hq, Sq, 1]).
    let mut lse = vec![0.0f32; b * s * h];
    let mut lv = TensorViewMut::from_slice(&mut lse, [b, s, h, 1]).unwrap();
    let e = layer
        .forward_with_lse_into(&q, &q, &q, &meta, &mut ov, &mut lv)
        .unwrap_err();
    assert!(matches!(e, SdpaError::Lse(_)), "{e:?}");
    assert!(e.to_string().contains("[1, 2, 5, 1]"), "{e}");
    // Wrong dtype.
    let mut lse16 = vec![half::f16::ZERO; b * s * h];
    let mut lv = TensorViewMut::from_slice(&mut lse16, [b, h, s, 1]).unwrap();
    let e = layer
        .forward_with_lse_into(&q, &q, &q, &meta, &mut ov, &mut lv)
        .unwrap_err();
    assert!(matches!(e, SdpaError::Lse(_)), "{e:?}");
    assert!(e.to_string().contains("f32"), "{e}");
}

/// The CPU backward kernel called directly (no variant table), `D = 64`.
fn kernel_call<const CAUSAL: bool>(
    layer: &SdpaImpl,
    [q, k, v]: [&TensorView<'_>; 3],
    meta: &AttentionMetadata<'_>,
    x: &BackwardInputs<'_>,
    g: &mut Gradients<'_>,
) -> Result<(), SdpaError> {
    let p = Problem::new(*q, *k, *v, meta.attn_mask.as_ref(), layer.params().scale())?;
    match q.dtype() {
        DType::F32 => cpu::backward::<64, CAUSAL, f32>(&p, x, g),
        DType::F16 => cpu::backward::<64, CAUSAL, half::f16>(&p, x, g),
        DType::BF16 => cpu::backward::<64, CAUSAL, half::bf16>(&p, x, g),
    }
}

#[test]
fn the_cpu_kernel_matches_the_reference_gradients() {
    let seed = run_seed();
    let b = &ConformanceAttention;
    for dtype in DTYPES {
        let case = Case::new(2, 70, 150, 4, 64).kv_heads(2).dtype(dtype);
        check_backward(b, &case, seed, &kernel_call::<false>);
        let case = case.causal(true).mask(MaskKind::HideRows);
        check_backward(b, &case, seed, &kernel_call::<true>);
    }
}

#[test]
fn backward_without_the_attribute_is_an_error_naming_it() {
    let (b, s, h, d) = (1, 4, 2, 32);
    let layer = NarrowAttention
        .build_impl(AttentionParams::new(h, d).backend(BackendKind::Cpu))
        .unwrap();
    let x = vec![0.5f32; b * s * h * d];
    let q = TensorView::from_slice(&x, [b, s, h, d]).unwrap();
    let meta = AttentionMetadata::default();
    // The forward with the log-sum-exp needs no attribute.
    let (out, lse) = layer.forward_with_lse(&q, &q, &q, &meta).unwrap();
    let e = layer
        .backward(&q, &q, &q, &out.view(), &q, &lse.view(), &meta)
        .unwrap_err();
    assert!(matches!(e, SdpaError::BackwardNotDeclared { .. }), "{e:?}");
    assert!(e.to_string().contains("add `backward = true`"), "{e}");
}

#[test]
fn the_declared_backward_runs_through_the_layer() {
    let seed = run_seed();
    let case = Case::new(2, 70, 90, 4, 64).kv_heads(2).causal(true);
    check_backward(&TrainingAttention, &case, seed, &through_layer);
}

/// The backward through `TrainingAttention`'s layer, checked on every CPU
/// path.
fn grads(case: &Case, seed: u64) -> Grads {
    check_backward(&TrainingAttention, case, seed, &through_layer)
}

#[test]
fn every_head_size_dtype_and_causal_value() {
    let seed = run_seed();
    for d in [8, 40, 64, 136, 256] {
        for causal in [false, true] {
            for dtype in DTYPES {
                // Ragged: not multiples of the 64-row and 64-key blocks.
                grads(
                    &Case::new(2, 37, 70, 2, d).causal(causal).dtype(dtype),
                    seed ^ d as u64,
                );
            }
        }
    }
}

#[test]
fn grouped_and_multi_query_heads_sum_over_their_group() {
    let seed = run_seed();
    for (hq, hkv) in [(4, 2), (6, 1), (8, 4)] {
        for causal in [false, true] {
            grads(
                &Case::new(2, 50, 66, hq, 40).kv_heads(hkv).causal(causal),
                seed,
            );
        }
    }
}

#[test]
fn causal_is_top_left_with_more_or_fewer_queries_than_keys() {
    let seed = run_seed();
    for (sq, sk) in [(130, 40), (40, 130), (1, 70), (70, 1), (65, 65)] {
        for dtype in [DType::F32, DType::BF16] {
            grads(&Case::new(1, sq, sk, 3, 64).causal(true).dtype(dtype), seed);
        }
    }
}

#[test]
fn blocks_have_ragged_edges_and_many_blocks() {
    let seed = run_seed();
    let (bq, bk) = (cpu::BACKWARD_BLOCK_Q, cpu::BACKWARD_BLOCK_K);
    for causal in [false, true] {
        grads(&Case::new(1, bq + 1, bk + 1, 2, 64).causal(causal), seed);
        grads(
            &Case::new(1, 3 * bq - 1, 2 * bk + 5, 1, 8).causal(causal),
            seed,
        );
        grads(&Case::new(1, bq, bk, 1, 136).causal(causal), seed);
    }
}

#[test]
fn keys_split_into_chunks_of_equal_work_some_empty() {
    // One (batch, key/value head) pair: its keys are split into chunks
    // (each with its own partial of dq, summed in order), here 11 key
    // blocks over 8 chunks of one or two; causal, the first block holds
    // most of the work and six chunks are empty; with 16 pairs or more,
    // one chunk each.
    let seed = run_seed();
    let bk = cpu::BACKWARD_BLOCK_K;
    for causal in [false, true] {
        grads(
            &Case::new(1, 70, 10 * bk + 5, 2, 64)
                .kv_heads(1)
                .causal(causal),
            seed,
        );
        grads(&Case::new(4, 40, 2 * bk + 3, 4, 40).causal(causal), seed);
    }
}

#[test]
fn an_explicit_scale_is_used() {
    let seed = run_seed();
    for scale in [0.05, 0.5, 1.7, -0.4] {
        grads(&Case::new(1, 33, 47, 2, 40).scale(scale), seed);
    }
}

#[test]
fn every_mask_kind_and_shape() {
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
        MaskKind::Int3(IntType::I32),
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
        MaskKind::HideRows,
    ];
    for mask in masks {
        for causal in [false, true] {
            let case = Case::new(2, 45, 80, 4, 40)
                .kv_heads(2)
                .mask(mask)
                .causal(causal);
            grads(&case, seed);
        }
        grads(
            &Case::new(1, 30, 70, 2, 64).mask(mask).dtype(DType::BF16),
            seed,
        );
        grads(
            &Case::new(1, 30, 70, 2, 64).mask(mask).dtype(DType::F16),
            seed,
        );
    }
}

/// Large finite additive masks (`torch.finfo(dtype).min`, `-1e9`), the
/// Hugging Face convention: a row hidden by one on every key is uniform
/// over its keys (its `f32` masked scores are all equal), and its lse
/// (`≈ -1e9`) is too large for `f32` to hold `ln Sk` in it, so the
/// backward recomputes that row's statistics. `[B, H, Sq, Sk]` and
/// `[B, Sk]` masks, whole rows hidden and some keys hidden; lse checked
/// with an absolute tolerance as well.
#[test]
fn large_finite_masks_give_the_reference_gradients() {
    let seed = run_seed();
    for dtype in DTYPES {
        for value in [LargeValue::DtypeMin, LargeValue::MinusBillion] {
            for key_padding in [false, true] {
                for whole_rows in [true, false] {
                    let mask = MaskKind::LargeAdditive {
                        value,
                        key_padding,
                        whole_rows,
                    };
                    let case = Case::new(2, 37, 70, 2, 64).mask(mask).dtype(dtype);
                    check_lse(&ConformanceAttention, &case, seed);
                    grads(&case, seed);
                    grads(&case.causal(true).kv_heads(1), seed);
                }
            }
        }
    }
}

/// The judge itself: the reference gradients (exact, and rounded to the
/// element type) pass; zero, doubled or halved gradients, or one head of
/// them wrong, fail, for every dtype.
#[test]
fn the_judge_rejects_wrong_gradients() {
    fn reference<T: Element>(case: &Case, seed: u64) -> sdpa_tests::training::Reference {
        TrainingInputs::<T>::draw(case, seed).reference(case)
    }
    let seed = run_seed();
    for dtype in DTYPES {
        let case = Case::new(2, 37, 70, 2, 64).dtype(dtype);
        let want = match dtype {
            DType::F32 => reference::<f32>(&case, seed),
            DType::F16 => reference::<half::f16>(&case, seed),
            DType::BF16 => reference::<half::bf16>(&case, seed),
        };
        let tol = grad_tolerance(dtype);
        let exact = Grads {
            dq: want.dq.clone(),
            dk: want.dk.clone(),
            dv: want.dv.clone(),
        };
        let judge = |g: &Grads| judge_grads(&case, &want, g, tol);
        assert!(judge(&exact).is_ok(), "{dtype:?}: exact reference rejected");
        let round = |v: &[f64]| -> Vec<f64> {
            v.iter()
                .map(|&x| match dtype {
                    DType::F32 => x as f32 as f64,
                    DType::F16 => half::f16::from_f64(x).to_f64(),
                    DType::BF16 => half::bf16::from_f64(x).to_f64(),
                })
                .collect()
        };
        let rounded = Grads {
            dq: round(&want.dq),
            dk: round(&want.dk),
            dv: round(&want.dv),
        };
        if let Err(e) = judge(&rounded) {
            panic!("{dtype:?}: the reference rounded to the dtype rejected: {e}");
        }
        let scaled = |v: &[f64], by: f64| v.iter().map(|x| x * by).collect::<Vec<_>>();
        // One (batch, head) slice of a [B, S, H, D] tensor times `by`.
        let one_head = |v: &[f64], s_n: usize, by: f64| {
            let (d, h_n) = (64, 2);
            let mut v = v.to_vec();
            for s in 0..s_n {
                for x in &mut v[((s_n + s) * h_n + 1) * d..][..d] {
                    *x *= by; // batch 1, head 1
                }
            }
            v
        };
        let wrong = [
            ("dq = 0", scaled(&want.dq, 0.0), 0),
            ("dq × 2", scaled(&want.dq, 2.0), 0),
            ("dq × 0.5", scaled(&want.dq, 0.5), 0),
            ("dq of one head = 0", one_head(&want.dq, 37, 0.0), 0),
            ("dk = 0", scaled(&want.dk, 0.0), 1),
            ("dk × 2", scaled(&want.dk, 2.0), 1),
            ("dk × 0.5", scaled(&want.dk, 0.5), 1),
            ("dk of one head × 0.5", one_head(&want.dk, 70, 0.5), 1),
            ("dv = 0", scaled(&want.dv, 0.0), 2),
            ("dv × 2", scaled(&want.dv, 2.0), 2),
            ("dv × 0.5", scaled(&want.dv, 0.5), 2),
            ("dv of one head = 0", one_head(&want.dv, 70, 0.0), 2),
        ];
        for (what, v, which) in wrong {
            let mut g = Grads {
                dq: want.dq.clone(),
                dk: want.dk.clone(),
                dv: want.dv.clone(),
            };
            match which {
                0 => g.dq = v,
                1 => g.dk = v,
                _ => g.dv = v,
            }
            assert!(judge(&g).is_err(), "{dtype:?}: {what} accepted");
        }
    }
}

#[test]
fn rows_that_see_no_key_get_zero_gradients() {
    let seed = run_seed();
    // Every row of some heads hidden, and no keys at all.
    let g = grads(&Case::new(2, 40, 50, 3, 64).mask(MaskKind::HideRows), seed);
    assert!(g.dq.iter().all(|x| x.is_finite()));
    let g = grads(&Case::new(1, 20, 0, 2, 64), seed);
    assert!(g.dq.iter().all(|x| *x == 0.0));
    // Sq = 0: nothing reads the keys, so their gradients are zero.
    let g = grads(&Case::new(1, 0, 20, 2, 64), seed);
    assert!(g.dk.iter().chain(&g.dv).all(|x| *x == 0.0) && !g.dk.is_empty());
}

#[test]
fn strided_and_transposed_views() {
    let seed = run_seed();
    let placements = [
        Placement::Contiguous,
        Placement::HeadMajor,
        Placement::Gapped,
        Placement::Unaligned,
    ];
    for inputs in placements {
        for outputs in placements {
            let case = Case::new(2, 40, 70, 4, 40)
                .kv_heads(2)
                .causal(true)
                .placement(inputs, outputs);
            grads(&case, seed);
        }
    }
}

#[test]
fn two_runs_give_the_same_bits_on_every_path_and_thread_count() {
    let seed = run_seed();
    for dtype in DTYPES {
        let case =
            Case::new(2, 150, 170, 4, 64)
                .kv_heads(2)
                .dtype(dtype)
                .mask(MaskKind::Additive4 {
                    broadcast_heads: false,
                    short: 3,
                    with_neg_inf: true,
                });
        for isa in cpu::Isa::supported() {
            let run = || match dtype {
                DType::F32 => run_backward::<f32>(&TrainingAttention, &case, seed, &through_layer),
                DType::F16 => {
                    run_backward::<half::f16>(&TrainingAttention, &case, seed, &through_layer)
                }
                DType::BF16 => {
                    run_backward::<half::bf16>(&TrainingAttention, &case, seed, &through_layer)
                }
            };
            let bits = |g: Grads| -> Vec<u64> {
                g.dq.iter()
                    .chain(&g.dk)
                    .chain(&g.dv)
                    .map(|x| x.to_bits())
                    .collect()
            };
            let first = bits(cpu::with_isa(isa, run).unwrap().unwrap());
            let second = bits(cpu::with_isa(isa, run).unwrap().unwrap());
            assert!(first == second, "{case:?} on {isa}: two runs differ");
            let one_thread = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap()
                .install(|| bits(cpu::with_isa(isa, run).unwrap().unwrap()));
            assert!(first == one_thread, "{case:?} on {isa}: one thread differs");
        }
    }
}

#[test]
fn the_fresh_backward_equals_backward_into() {
    let seed = run_seed();
    let case = Case::new(1, 40, 60, 4, 64).kv_heads(2).causal(true);
    let t = TrainingInputs::<f32>::draw(&case, seed);
    let (b, sq, sk, hq, hkv, d) = case.dims();
    let layer = TrainingAttention.build_impl(case.params()).unwrap();
    let q = TensorView::from_slice(&t.x.q.buf, [b, sq, hq, d]).unwrap();
    let k = TensorView::from_slice(&t.x.k.buf, [b, sk, hkv, d]).unwrap();
    let v = TensorView::from_slice(&t.x.v.buf, [b, sk, hkv, d]).unwrap();
    let dout = TensorView::from_slice(&t.dout.buf, [b, sq, hq, d]).unwrap();
    let meta = AttentionMetadata::default();
    let (out, lse) = layer.forward_with_lse(&q, &k, &v, &meta).unwrap();
    let (dq, dk, dv) = layer
        .backward(&q, &k, &v, &out.view(), &dout, &lse.view(), &meta)
        .unwrap();
    assert_eq!((dq.shape(), dk.shape()), ([b, sq, hq, d], [b, sk, hkv, d]));
    let into = run_backward::<f32>(&TrainingAttention, &case, seed, &through_layer).unwrap();
    let same = |a: &Tensor, want: &[f64]| {
        let a = a.to_f32_vec().unwrap();
        a.len() == want.len()
            && a.iter()
                .zip(want)
                .all(|(x, y)| x.to_bits() == (*y as f32).to_bits())
    };
    assert!(same(&dq, &into.dq) && same(&dk, &into.dk) && same(&dv, &into.dv));
    // And the plain forward gives the same output as the forward with lse.
    let plain = layer.forward(&q, &k, &v, &meta).unwrap();
    assert!(plain == out);
}

#[test]
fn bad_backward_buffers_are_errors_that_say_what_to_pass() {
    let (b, s, h, d) = (1, 6, 2, 8);
    let layer = TrainingAttention
        .build_impl(AttentionParams::new(h, d).backend(BackendKind::Cpu))
        .unwrap();
    let x = vec![0.25f32; b * s * h * d];
    let q = TensorView::from_slice(&x, [b, s, h, d]).unwrap();
    let meta = AttentionMetadata::default();
    let (out, lse) = layer.forward_with_lse(&q, &q, &q, &meta).unwrap();
    let short = vec![0.0f32; b * (s - 1) * h * d];
    let short_v = TensorView::from_slice(&short, [b, s - 1, h, d]).unwrap();
    // dout of the wrong shape.
    let e = layer
        .backward(&q, &q, &q, &out.view(), &short_v, &lse.view(), &meta)
        .unwrap_err();
    assert!(
        matches!(e, SdpaError::Shape(_)) && e.to_string().contains("dout"),
        "{e}"
    );
    // out of another dtype.
    let x16 = vec![half::f16::ZERO; x.len()];
    let out16 = TensorView::from_slice(&x16, [b, s, h, d]).unwrap();
    let e = layer
        .backward(&q, &q, &q, &out16, &q, &lse.view(), &meta)
        .unwrap_err();
    assert!(
        matches!(e, SdpaError::DtypeMismatch { tensor: "out", .. }),
        "{e}"
    );
    // lse of the wrong shape.
    let lse_bad = vec![0.0f32; b * h * s];
    let lse_bad = TensorView::from_slice(&lse_bad, [b, s, h, 1]).unwrap();
    let e = layer
        .backward(&q, &q, &q, &out.view(), &q, &lse_bad, &meta)
        .unwrap_err();
    assert!(matches!(e, SdpaError::Lse(_)), "{e}");
    // A dk buffer of q's shape where k has fewer tokens.
    let kv = vec![0.25f32; b * (s - 1) * h * d];
    let k = TensorView::from_slice(&kv, [b, s - 1, h, d]).unwrap();
    let (out, lse) = layer.forward_with_lse(&q, &k, &k, &meta).unwrap();
    let (mut dq, mut dk, mut dv) = (x.clone(), x.clone(), kv.clone());
    let mut g = Gradients {
        dq: TensorViewMut::from_slice(&mut dq, [b, s, h, d]).unwrap(),
        dk: TensorViewMut::from_slice(&mut dk, [b, s, h, d]).unwrap(),
        dv: TensorViewMut::from_slice(&mut dv, [b, s - 1, h, d]).unwrap(),
    };
    let inputs = BackwardInputs {
        out: out.view(),
        dout: q,
        lse: lse.view(),
    };
    let e = layer
        .backward_into(&q, &k, &k, &meta, &inputs, &mut g)
        .unwrap_err();
    assert!(
        matches!(e, SdpaError::Shape(_)) && e.to_string().contains("dk"),
        "{e}"
    );
}

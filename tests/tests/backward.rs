//! The training calls: the forward with the row log-sum-exp and the
//! backward pass, clause by clause against the float64 reference (whose
//! gradients are checked by finite differences in `tests/src/reference.rs`),
//! on every CPU path, with every output buffer poisoned first.

use sdpa_runtime::prelude::*;
use sdpa_runtime::{cpu, BackwardInputs, Gradients, Problem, SdpaImpl};
use sdpa_tests::cases::{run_seed, Case, IntType, MaskKind, Placement};
use sdpa_tests::consumer::{ConformanceAttention, NarrowAttention, TrainingAttention};
use sdpa_tests::training::{check_backward, check_lse, through_layer};

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

//! Tests of the tensor-core kernel: its text, and the kernels run in the
//! PTX interpreter ([`crate::interp`]) against a float64 reference.
use super::*;
use crate::attention::mask::MaskKind;
use crate::interp::forward::{self, case, Case, Launch, MaskShape, Seqs};

fn ptx(d: usize, causal: bool, dtype: DType) -> GpuKernel {
    generate(&VariantSpec::new(d, causal, dtype).unwrap(), Target::Sm80)
}

#[test]
fn pitch_is_an_odd_number_of_chunks() {
    for d in (8..=256).step_by(8) {
        let c = Fa2Config::new(&VariantSpec::new(d, false, DType::BF16).unwrap());
        assert_eq!((c.pitch / 16) % 2, 1, "d={d}");
        assert!(c.pitch >= d * 2);
    }
}

#[test]
fn uses_tensor_cores_and_async_copies() {
    let k = ptx(128, false, DType::BF16);
    assert!(k
        .ptx
        .contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
    assert!(k
        .ptx
        .contains("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"));
    assert!(k.ptx.contains("cp.async.cg.shared.global"));
    assert!(k.ptx.contains("ex2.approx.ftz.f32"));
    assert!(!k.ptx.contains("m16n8k8"), "128 needs no k8 tail");
    assert_eq!(k.block_m, 128);
    assert_eq!(k.smem_bytes, (128 + 2 * 32) * 272);
}

#[test]
fn odd_multiples_of_eight_use_exact_tails() {
    let k = ptx(40, true, DType::F16);
    assert!(k
        .ptx
        .contains("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32"));
    assert!(k
        .ptx
        .contains("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16"));
    assert!(k.ptx.contains("cvt.rn.f16x2.f32"));
}

// ---- kernels in the interpreter ----

/// Runs the kernel of `c` in the interpreter against the reference
/// ([`forward::check`]); returns the relative L2 error.
fn check(c: Case) -> f64 {
    let s = VariantSpec::new(c.d, c.causal, c.dtype).unwrap();
    let cfg = Fa2Config::new(&s);
    let kernel = Emitter::new(&s.kernel_name(), cfg).emit();
    let launch = Launch {
        threads: cfg.threads(),
        block_m: cfg.block_m,
        smem_bytes: cfg.smem_bytes(),
    };
    forward::check(c, &kernel, launch)
}

/// `check` for each of the variants: every combination of head size,
/// element type and causal.
fn check_each(ds: &[usize], dtypes: &[DType], c: Case) {
    for &d in ds {
        for &dtype in dtypes {
            for causal in [false, true] {
                check(Case {
                    d,
                    dtype,
                    causal,
                    scale: 1.0 / (d as f32).sqrt(),
                    ..c
                });
            }
        }
    }
}

#[test]
fn interpreted_kernel_matches_the_reference() {
    // Ragged Sq and Sk: two query blocks (the last one partly past Sq), more
    // than one key block (the last one ragged), GQA (4 query heads over 2).
    // 40 takes the k8 tail, 256 the 8-warp shape.
    check_each(
        &[64, 128],
        &[DType::BF16, DType::F16],
        case(0, false, DType::BF16, 133, 77),
    );
    check_each(
        &[40, 256],
        &[DType::F16],
        case(0, false, DType::F16, 21, 70),
    );
}

#[test]
fn causal_with_unequal_lengths_and_mqa() {
    // Sq > Sk: rows past Sk see every key; Sq < Sk: later keys unseen.
    for (sq, sk) in [(150, 30), (20, 100)] {
        check(case(64, true, DType::BF16, sq, sk));
    }
    let mut c = case(128, true, DType::F16, 70, 1);
    c.hkv = 1;
    c.b = 1;
    check(c);
    // No lse asked for: nothing is stored through the null pointer.
    c.causal = false;
    c.lse = false;
    check(c);
}

#[test]
fn masks_fully_masked_rows_and_nan() {
    for (d, dtype) in [(64, DType::BF16), (128, DType::F16)] {
        let mut c = case(d, d == 64, dtype, 35, 70);
        c.mask = MaskShape::Dense;
        c.nan_q = true;
        check(c);
    }
}

#[test]
fn packed_variable_lengths_with_an_empty_sequence() {
    // cu_seqlens over packed tensors (batch strides 0): ragged lengths, an
    // empty query sequence, an empty key sequence, one longer than a CTA.
    let seqs = Seqs::Packed {
        q: [37, 0, 150, 5],
        k: [45, 12, 70, 0],
    };
    let mut c = case(64, false, DType::BF16, 0, 0);
    c.b = 4;
    c.seqs = seqs;
    check_each(&[64], &[DType::BF16], c);
    check_each(&[128], &[DType::F16], c);
}

#[test]
fn key_runs_over_a_padded_layout() {
    // k_start/k_end pick each entry's keys out of the padded [B, Sk]
    // layout; the padding holds NaN, which must never be read.
    let mut c = case(64, false, DType::BF16, 33, 80);
    c.seqs = Seqs::KeyRuns {
        k: [(5, 72), (0, 80)],
    };
    check_each(&[64], &[DType::BF16], c);
    c.seqs = Seqs::KeyRuns {
        k: [(80, 80), (17, 18)],
    };
    check_each(&[128], &[DType::F16], c);
}

#[test]
fn every_mask_kind_with_front_padding_and_broadcasts() {
    for kind in MaskKind::ALL {
        for (shape, pad) in [
            (MaskShape::Dense, 7),
            (MaskShape::PerBatch, 3),
            (MaskShape::Keys, 11),
        ] {
            let mut c = case(64, shape == MaskShape::Keys, DType::BF16, 35, 70);
            c.mask = shape;
            c.mask_kind = kind;
            c.mask_pad = pad;
            check(c);
        }
    }
    let mut c = case(128, true, DType::F16, 20, 90);
    c.mask = MaskShape::Dense;
    c.mask_kind = MaskKind::I64;
    c.mask_pad = 5;
    check(c);
}

#[test]
fn mask_batches_flag_the_entries_the_mask_applies_to() {
    // Key runs from a key-only mask: flagged entries keep their whole keys
    // and the mask; an entry flagged 0 has its run and ignores the mask
    // (its row 1 of a dense mask, fully masked, must not come out zero).
    for (d, dtype, causal) in [(64, DType::BF16, false), (128, DType::F16, true)] {
        for (shape, kind) in [
            (MaskShape::Keys, MaskKind::U8),
            (MaskShape::Dense, MaskKind::F32),
        ] {
            for flags in [[1, 0, 0, 0], [0, 7, 0, 0]] {
                let mut c = case(d, causal, dtype, 33, 80);
                c.mask = shape;
                c.mask_kind = kind;
                c.mask_pad = 2;
                let run = |f: i32, part| if f != 0 { (0, 80) } else { part };
                c.seqs = Seqs::KeyRuns {
                    k: [run(flags[0], (3, 50)), run(flags[1], (10, 77))],
                };
                c.mask_batches = Some(flags);
                check(c);
            }
        }
    }
}

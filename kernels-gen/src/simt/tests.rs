//! Tests of the CUDA-core kernel: its text, its plans, ptxas when available,
//! and the kernels run in the PTX interpreter ([`crate::interp`]) against a
//! float64 reference.
use super::*;
use crate::attention::mask::MaskKind;
use crate::contract::PARAMS;
use crate::interp::forward::{self, case, Case, Launch, MaskShape, Seqs};

fn spec(d: usize, causal: bool, dtype: DType) -> VariantSpec {
    VariantSpec::new(d, causal, dtype).unwrap()
}

/// The variants the ptxas check covers: a sample of head sizes, or
/// every one when `SIMT_ALL_HEAD_SIZES` is set.
fn sample() -> Vec<VariantSpec> {
    let mut out = Vec::new();
    let all = std::env::var_os("SIMT_ALL_HEAD_SIZES").is_some();
    let sizes: Vec<usize> = if all {
        (8..=256).step_by(8).collect()
    } else {
        vec![8, 40, 64, 72, 80, 128, 136, 144, 256]
    };
    for d in sizes {
        for causal in [false, true] {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                out.push(spec(d, causal, dtype));
            }
        }
    }
    out
}

/// Assembles the sample with `ptxas`: every variant must assemble for
/// sm_80 and sm_90 without spilling, and the registers are reported. Needs
/// `SDPA_PTXAS`, so it runs on request (`SDPA_PTXAS=/path/to/ptxas cargo
/// test -p kernels-gen simt -- --ignored`); CI's check of every declared
/// variant is `sdpa-cli/tests/ptxas.rs`.
#[test]
#[ignore = "needs SDPA_PTXAS; CI assembles every variant in sdpa-cli/tests/ptxas.rs"]
fn assembles_without_spills() {
    let ptxas = std::env::var_os("SDPA_PTXAS").expect("set SDPA_PTXAS to a ptxas binary");
    let dir = std::env::temp_dir().join(format!("simt-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut report = String::new();
    let mut failures = Vec::new();
    for s in sample() {
        let k = generate(&s, Target::Sm80);
        let path = dir.join(format!("{}.ptx", k.entry));
        std::fs::write(&path, &k.ptx).unwrap();
        for arch in ["sm_80", "sm_90"] {
            let out = std::process::Command::new(&ptxas)
                .arg(format!("-arch={arch}"))
                .arg("-v")
                .arg(&path)
                .arg("-o")
                .arg(dir.join(format!("{}.{arch}.cubin", k.entry)))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stderr).to_string();
            if !out.status.success() || !text.contains("0 bytes spill stores, 0 bytes spill loads")
            {
                failures.push(format!("{} {arch}: {text}", k.entry));
            }
            let regs = text
                .split("Used ")
                .nth(1)
                .and_then(|t| t.split(' ').next())
                .unwrap_or("?");
            report.push_str(&format!(
                "{} {arch}: {regs} registers, smem {} B, block_m {}\n",
                k.entry, k.smem_bytes, k.block_m
            ));
        }
    }
    std::fs::write(dir.join("report.txt"), &report).unwrap();
    eprintln!("{report}(files in {})", dir.display());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Writes the sample's PTX and a `manifest.json` of launch metadata
/// (the format of `tests/gpu/ptx_harness.py`) into `SIMT_PTX_DIR` when
/// that is set, for running these kernels on a GPU.
#[test]
fn writes_ptx_for_the_gpu_harness_when_asked() {
    let Some(dir) = std::env::var_os("SIMT_PTX_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    // `SIMT_PLAN=lanes,rows` overrides the plan (for experiments).
    let forced: Option<(u32, u32)> = std::env::var("SIMT_PLAN").ok().map(|p| {
        let v: Vec<u32> = p.split(',').map(|x| x.parse().unwrap()).collect();
        (v[0], v[1])
    });
    let mut manifest = Vec::new();
    for s in sample() {
        let mut k = generate(&s, Target::Sm80);
        if let Some((lanes, rows)) = forced {
            let d = s.head_size as u32;
            if !d.is_multiple_of(lanes * 2) {
                continue;
            }
            let plan = Plan::with(d, lanes, rows);
            k.ptx = Module::new(Target::Sm80)
                .kernel(build(&s, plan))
                .to_string();
            k.block_m = plan.block_m();
            k.smem_bytes = plan.smem_bytes();
        }
        std::fs::write(dir.join(format!("{}.ptx", k.entry)), &k.ptx).unwrap();
        manifest.push(format!(
            "{{\"entry\": \"{}\", \"head_size\": {}, \"causal\": {}, \"dtype\": \"{}\", \
             \"block_m\": {}, \"threads\": {}, \"smem_bytes\": {}}}",
            k.entry, s.head_size, s.causal, s.dtype, k.block_m, k.threads, k.smem_bytes
        ));
    }
    let text = format!("[\n{}\n]\n", manifest.join(",\n"));
    std::fs::write(dir.join("manifest.json"), text).unwrap();
}

// ---- text checks ----

#[test]
fn the_text_has_the_contract_entry_and_the_expected_forms() {
    for (d, causal, dtype) in [
        (64, false, DType::F32),
        (128, true, DType::F16),
        (256, false, DType::BF16),
        (8, true, DType::F32),
    ] {
        let s = spec(d, causal, dtype);
        let k = generate(&s, Target::Sm80);
        assert_eq!(k.entry, s.kernel_name());
        assert_eq!(k.threads, THREADS);
        assert!(k.smem_bytes <= 48 * 1024);
        assert_eq!(k.block_m, Plan::new(d as u32).block_m());
        let t = &k.ptx;
        assert!(t.contains(&format!(".visible .entry {}(", k.entry)), "{t}");
        assert_eq!(t.matches(".param ").count(), PARAMS.len() + 1);
        assert!(t.contains(".maxntid 128, 1, 1"));
        assert!(t.contains(".extern .shared .align 16 .b8 smem[];"));
        assert!(t.contains("mov.u32 %r") && t.contains(", smem;"));
        assert!(t.contains("ex2.approx.ftz.f32"));
        assert!(t.contains("shfl.sync.bfly.b32"));
        assert!(t.contains("bar.sync 0;"));
        assert!(t.contains("rcp.rn.f32"));
        assert!(t.contains("mul.wide.u32") && t.contains("mad.lo.u64"));
        assert!(!t.contains("mma") && !t.contains("ldmatrix") && !t.contains("cp.async"));
        assert!(!t.contains(".aligned"));
        // Shuffles are never predicated.
        assert!(!t
            .lines()
            .any(|l| l.trim_start().starts_with('@') && l.contains("shfl")));
        match dtype {
            DType::F32 => {
                assert!(t.contains("ld.global.nc.v4.f32") || t.contains("ld.global.nc.v2.f32"))
            }
            DType::F16 => {
                assert!(t.contains("cvt.f32.f16") && t.contains("cvt.rn.f16x2.f32"));
                assert!(t.contains("mov.b32 {%h"));
            }
            DType::BF16 => {
                assert!(t.contains("cvt.rn.bf16x2.f32"));
                // PTX 7.0 has no cvt.f32.bf16: the widening is a shift.
                assert!(!t.contains("cvt.f32.bf16"));
            }
        }
    }
}

#[test]
fn plans_fit_the_limits() {
    for d in (8..=256).step_by(8) {
        let p = Plan::new(d);
        assert_eq!(d % (p.lanes * p.width), 0, "{p:?}");
        assert!(p.smem_bytes() <= TILE_BYTES, "{p:?}");
        assert_eq!(p.tile % p.group, 0, "{p:?}");
        assert!(p.block_m() >= 32 && p.block_m() <= 128, "{p:?}");
        // q and the accumulators in registers stay within budget.
        assert!(
            p.rows * d / p.lanes <= 72 && p.rows * p.group <= 32,
            "{p:?}"
        );
    }
    let shape = |d| {
        let p = Plan::new(d);
        (p.lanes, p.rows, p.width, p.tile, p.block_m())
    };
    assert_eq!(shape(64), (4, 4, 4, 64, 128));
    assert_eq!(shape(128), (8, 4, 4, 32, 64));
    assert_eq!(shape(256), (16, 4, 4, 16, 32));
    assert_eq!(shape(80), (8, 4, 2, 48, 64));
    assert_eq!(shape(136), (4, 2, 2, 24, 64));
}

// ---- kernels in the interpreter ----

/// Runs the kernel of `c` in the interpreter against the reference
/// ([`forward::check`]); returns the relative L2 error.
fn check(c: Case) -> f64 {
    let s = spec(c.d, c.causal, c.dtype);
    let plan = Plan::new(c.d as u32);
    let launch = Launch {
        threads: THREADS as usize,
        block_m: plan.block_m() as usize,
        smem_bytes: plan.smem_bytes() as usize,
    };
    forward::check(c, &build(&s, plan), launch)
}

#[test]
fn interpreted_kernel_matches_the_reference_f32() {
    for d in [8, 40, 64, 80, 128, 136, 256] {
        for causal in [false, true] {
            // Ragged Sq and Sk, more than one key tile.
            let plan = Plan::new(d as u32);
            let sk = plan.tile as usize + 13;
            check(case(d, causal, DType::F32, 37, sk));
        }
    }
}

#[test]
fn interpreted_kernel_matches_the_reference_16_bit() {
    for dtype in [DType::F16, DType::BF16] {
        for d in [8, 48, 128, 136, 160] {
            check(case(d, d % 16 == 0, dtype, 21, 45));
        }
    }
}

#[test]
fn causal_with_unequal_lengths() {
    // Sq > Sk: rows past Sk see every key; Sq < Sk: later keys unseen.
    for (sq, sk) in [(150, 30), (20, 100), (129, 129)] {
        check(case(64, true, DType::F32, sq, sk));
        check(case(128, true, DType::F32, sq, sk));
    }
}

#[test]
fn masks_fully_masked_rows_and_nan() {
    for d in [16, 96, 192] {
        for causal in [false, true] {
            let mut c = case(d, causal, DType::F32, 35, 41);
            c.mask = MaskShape::Dense;
            check(c);
            c.mask = MaskShape::PerBatch;
            check(c);
            c.mask = MaskShape::None;
            c.nan_q = true;
            check(c);
        }
    }
    let mut c = case(64, false, DType::BF16, 33, 70);
    c.mask = MaskShape::Dense;
    c.nan_q = true;
    check(c);
}

#[test]
fn mqa_and_one_key() {
    let mut c = case(32, false, DType::F32, 5, 1);
    c.hkv = 1;
    check(c);
    // No lse asked for: nothing is stored through the null pointer (the
    // interpreter would refuse the access).
    c.lse = false;
    check(c);
    let mut c = case(32, true, DType::F16, 70, 1);
    c.hkv = 1;
    c.b = 1;
    check(c);
}

#[test]
fn packed_variable_lengths_with_an_empty_sequence() {
    // cu_seqlens over packed tensors (batch strides 0): ragged lengths, an
    // empty query sequence, an empty key sequence, one longer than a CTA.
    let seqs = Seqs::Packed {
        q: [37, 0, 150, 5],
        k: [45, 12, 70, 0],
    };
    for causal in [false, true] {
        for (d, dtype) in [(64, DType::F32), (128, DType::F16)] {
            let mut c = case(d, causal, dtype, 0, 0);
            c.b = 4;
            c.seqs = seqs;
            check(c);
        }
    }
    // Causal with more keys than queries and the reverse, in one batch.
    let mut c = case(40, true, DType::BF16, 0, 0);
    c.b = 3;
    c.seqs = Seqs::Packed {
        q: [9, 70, 33, 0],
        k: [60, 20, 33, 0],
    };
    check(c);
}

#[test]
fn key_runs_over_a_padded_layout() {
    // k_start/k_end pick each entry's keys out of the padded [B, Sk]
    // layout; the padding holds NaN, which must never be read.
    for causal in [false, true] {
        let mut c = case(64, causal, DType::F32, 33, 80);
        c.seqs = Seqs::KeyRuns {
            k: [(5, 62), (0, 80)],
        };
        check(c);
        c.dtype = DType::BF16;
        c.seqs = Seqs::KeyRuns {
            k: [(80, 80), (17, 18)],
        };
        check(c);
    }
}

#[test]
fn every_mask_kind_with_front_padding_and_broadcasts() {
    for kind in MaskKind::ALL {
        for (shape, pad) in [
            (MaskShape::Dense, 0),
            (MaskShape::Dense, 7),
            (MaskShape::PerBatch, 3),
            (MaskShape::Keys, 11),
        ] {
            let mut c = case(32, shape == MaskShape::Keys, DType::F32, 35, 41);
            c.mask = shape;
            c.mask_kind = kind;
            c.mask_pad = pad;
            check(c);
        }
    }
    // A 16-bit variant and more than one key tile.
    let mut c = case(128, false, DType::F16, 20, 90);
    c.mask = MaskShape::Dense;
    c.mask_kind = MaskKind::Bf16;
    c.mask_pad = 5;
    check(c);
    c.mask_kind = MaskKind::U8;
    check(c);
}

#[test]
fn mask_batches_flag_the_entries_the_mask_applies_to() {
    // Key runs from a key-only mask: the flagged entry keeps its whole keys
    // and the mask; the entry flagged 0 has its run and ignores the mask.
    for (d, dtype, causal) in [(64, DType::F32, false), (128, DType::BF16, true)] {
        for flags in [[1, 0, 0, 0], [0, 3, 0, 0]] {
            let mut c = case(d, causal, dtype, 33, 80);
            c.mask = MaskShape::Dense;
            c.mask_kind = MaskKind::I32;
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

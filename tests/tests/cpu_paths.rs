//! The CPU kernel's code paths (AVX-512, AVX2+FMA, portable): each runs the
//! cases that cross its tile, panel, block and task boundaries, and keeps the
//! semantics that the error-path tests check on the default path (NaN stays
//! in its row, no keys give zeros). `check` runs every supported path.

use sdpa_runtime::cpu::{
    active_isa, block_k, detected_isa, max_task_rows, task_rows, with_isa, Isa, PANEL,
};
use sdpa_runtime::prelude::*;
use sdpa_tests::cases::{check, run_seed, Case, MaskKind};
use sdpa_tests::consumer::ConformanceAttention;

fn on_cpu(case: &Case, seed: u64) {
    check(&ConformanceAttention, BackendKind::Cpu, case, seed);
}

#[test]
fn the_detected_path_is_supported_and_every_path_can_be_forced() {
    assert!(detected_isa().is_supported());
    assert!(Isa::supported().contains(&Isa::Portable));
    for isa in Isa::ALL {
        match with_isa(isa, active_isa) {
            Ok(active) => assert_eq!(active, isa),
            Err(e) => {
                assert!(!isa.is_supported());
                assert!(e.to_string().contains(isa.name()), "{e}");
            }
        }
    }
}

#[test]
fn tasks_are_whole_panels_within_the_workspace() {
    for d in [8, 64, 80, 128, 256] {
        for (sq, heads) in [(1, 8), (257, 64), (2048, 8), (4096, 1), (300, 2)] {
            let rows = task_rows(d, sq, heads, 2);
            assert!(
                rows.is_multiple_of(PANEL) && rows <= max_task_rows(d),
                "{d} {sq} {heads}"
            );
        }
    }
    // CLIP's 257 tokens stay one task; the anchor shape makes 4 per head.
    assert_eq!(task_rows(80, 257, 64, 2), 288);
    assert_eq!(task_rows(128, 2048, 8, 2), 512);
    // A single head is split so that both threads have work.
    assert!(2048usize.div_ceil(task_rows(128, 2048, 1, 2)) >= 8);
}

#[test]
fn query_blocks_panels_and_key_blocks_have_ragged_edges() {
    let seed = run_seed();
    let d = 64;
    let bk = block_k(d);
    // Two tasks with a ragged second one (16 heads need no further split),
    // a panel and one row, and key tails of one.
    for causal in [false, true] {
        let case = Case::new(2, max_task_rows(d) + 1, 2 * bk + 1, 8, d).causal(causal);
        on_cpu(&case, seed);
        let case = Case::new(2, PANEL + 1, bk - 1, 1, d).causal(causal);
        on_cpu(&case, seed);
    }
    // Fewer queries than a vector, on every head size class.
    for (sq, d) in [(1, 8), (3, 136), (5, 256), (17, 40)] {
        on_cpu(&Case::new(1, sq, 2 * block_k(d) + 5, 2, d), seed);
    }
}

#[test]
fn causal_with_masks_and_groups_on_every_path() {
    let seed = run_seed();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let case = Case::new(2, 70, 150, 4, 136)
            .kv_heads(2)
            .causal(true)
            .dtype(dtype)
            .mask(MaskKind::Additive4 {
                broadcast_heads: true,
                short: 7,
                with_neg_inf: true,
            });
        on_cpu(&case, seed);
        on_cpu(
            &Case::new(1, 40, 300, 2, 256)
                .dtype(dtype)
                .mask(MaskKind::HideRows),
            seed,
        );
    }
}

#[test]
fn nan_in_one_query_row_stays_in_that_row_on_every_path() {
    let layer = ConformanceAttention
        .build_impl(AttentionParams::new(2, 64).backend(BackendKind::Cpu))
        .unwrap();
    let (sq, sk) = (300, 70);
    let mut q: Vec<f32> = (0..sq * 2 * 64)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let k: Vec<f32> = (0..sk * 2 * 64)
        .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
        .collect();
    // Row 260 lies in the second task; head 1, element 5.
    let poisoned_row = 260 * 2 + 1;
    q[poisoned_row * 64 + 5] = f32::NAN;
    let qv = TensorView::from_slice(&q, [1, sq, 2, 64]).unwrap();
    let kv = TensorView::from_slice(&k, [1, sk, 2, 64]).unwrap();
    for isa in Isa::supported() {
        let out = with_isa(isa, || {
            layer.forward(&qv, &kv, &kv, &AttentionMetadata::default())
        })
        .unwrap()
        .unwrap();
        let out = out.as_slice::<f32>().unwrap();
        for (row, chunk) in out.chunks(64).enumerate() {
            if row == poisoned_row {
                assert!(chunk.iter().all(|x| x.is_nan()), "{isa}: the NaN row");
            } else {
                assert!(chunk.iter().all(|x| x.is_finite()), "{isa}: row {row}");
            }
        }
    }
}

#[test]
fn no_keys_give_zeros_on_every_path() {
    let layer = ConformanceAttention
        .build_impl(AttentionParams::new(2, 40).backend(BackendKind::Cpu))
        .unwrap();
    let q = vec![1.0f32; 3 * 2 * 40];
    let q = TensorView::from_slice(&q, [1, 3, 2, 40]).unwrap();
    let kv = TensorView::from_slice::<f32>(&[], [1, 0, 2, 40]).unwrap();
    for isa in Isa::supported() {
        let mut buf = vec![f32::NAN; 3 * 2 * 40];
        let mut out = TensorViewMut::from_slice(&mut buf, [1, 3, 2, 40]).unwrap();
        with_isa(isa, || {
            layer.forward_into(&q, &kv, &kv, &AttentionMetadata::default(), &mut out)
        })
        .unwrap()
        .unwrap();
        assert!(buf.iter().all(|&x| x == 0.0), "{isa}");
    }
}

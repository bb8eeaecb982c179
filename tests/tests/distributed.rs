//! Sequence-parallel attention over the in-process communicator: for every
//! rank count 1–4, each rank's output must equal attention over the whole
//! sequence (float64 reference), and the ranks together must equal the
//! single-process layer.

use std::time::Duration;

use half::bf16;
use sdpa_runtime::distributed::{
    Communicator, DistributedAttention, SequenceParallel, ThreadCommunicator,
};
use sdpa_runtime::prelude::*;
use sdpa_runtime::{Element, SdpaError};
use sdpa_tests::cases::{run_seed, Placement};
use sdpa_tests::consumer::ConformanceAttention;
use sdpa_tests::reference::rel_l2;
use sdpa_tests::sequence_parallel::{
    concat_ranks, forward_rank, on_ranks, whole_sequence, RankOutput, SpCase, SpInputs,
};

/// Runs `case` on `case.world` threads; returns each rank's outputs.
fn run_ranks<T: Element>(case: &SpCase, x: &SpInputs) -> Result<Vec<RankOutput>, SdpaError> {
    let ranks = ThreadCommunicator::group_with_timeout(case.world, Duration::from_secs(60))?;
    on_ranks(ranks, |comm| {
        let bufs = x.rank_buffers::<T>(case, comm.rank());
        let layer =
            DistributedAttention::new(&ConformanceAttention, case.params(BackendKind::Cpu), comm)?;
        let views = bufs
            .iter()
            .zip(case.rank_shapes())
            .map(|((buf, strides), shape)| TensorView::with_strides(buf, shape, *strides))
            .collect::<Result<Vec<_>, _>>()?;
        forward_rank(&layer, case, x, &views)
    })
}

/// Runs `case` and judges every rank against the float64 reference.
fn check<T: Element>(case: SpCase) {
    let seed = run_seed();
    let x = SpInputs::draw::<T>(&case, seed);
    let outs = run_ranks::<T>(&case, &x).unwrap_or_else(|e| panic!("{case:?}: {e}"));
    let (want, want_rep) = x.expected(&case);
    let per_rank: Vec<Vec<f32>> = outs.iter().map(|(o, _)| o.clone()).collect();
    let got = concat_ranks(&case, &per_rank);
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{case:?} seed {seed}: a non-finite output"
    );
    let err = rel_l2(&got, &want);
    assert!(
        err <= case.tolerance(),
        "{case:?} seed {seed}: rel err {err:.3e}"
    );
    // Padding rows come back as exact zeros.
    if let Some(n) = case.original_seq_len {
        let row = case.heads * case.d;
        let seq = case.world * case.seq_local;
        for bi in 0..case.batch {
            let pad = &got[(bi * seq + n) * row..(bi + 1) * seq * row];
            assert!(
                pad.iter().all(|&v| v == 0.0),
                "{case:?}: padding rows not zero"
            );
        }
    }
    for (rank, (_, rep)) in outs.iter().enumerate() {
        match rep {
            Some(rep) => {
                let rep: Vec<f64> = rep.iter().map(|&v| v as f64).collect();
                assert!(
                    rep.iter().all(|v| v.is_finite()),
                    "{case:?}: non-finite replicated"
                );
                let err = rel_l2(&rep, &want_rep);
                assert!(
                    err <= case.tolerance(),
                    "{case:?} seed {seed}: rank {rank} replicated rel err {err:.3e}"
                );
            }
            None => assert_eq!(case.replicated + case.replicated_kv, 0),
        }
    }
}

#[test]
fn every_rank_count_matches_whole_sequence_attention() {
    for world in 1..=4 {
        check::<f32>(SpCase::new(world, 2, 7, 12, 40));
    }
}

#[test]
fn causal_and_grouped_query_heads() {
    for world in 1..=4 {
        let kv_heads = if world == 3 { 6 } else { 4 };
        let case = SpCase {
            causal: true,
            kv_heads,
            ..SpCase::new(world, 1, 9, 12, 64)
        };
        check::<f32>(case);
    }
}

#[test]
fn bf16_with_strided_inputs() {
    for world in [2, 3] {
        let case = SpCase {
            dtype: DType::BF16,
            placement: Placement::Gapped,
            ..SpCase::new(world, 2, 6, 6, 40)
        };
        check::<bf16>(case);
    }
    let head_major = SpCase {
        placement: Placement::HeadMajor,
        ..SpCase::new(4, 1, 5, 8, 8)
    };
    check::<f32>(head_major);
}

#[test]
fn padding_is_trimmed_and_returned_as_zeros() {
    for (world, original) in [(1, 5), (2, 11), (3, 13), (4, 17)] {
        let case = SpCase {
            original_seq_len: Some(original),
            ..SpCase::new(world, 2, 6, 12, 40)
        };
        check::<f32>(case);
    }
}

#[test]
fn replicated_tokens_join_every_rank_and_gather_over_heads() {
    for world in 1..=4 {
        let case = SpCase {
            replicated: 3,
            replicated_kv: 3,
            ..SpCase::new(world, 2, 5, 12, 40)
        };
        check::<f32>(case);
    }
    // With padding, GQA and causal at once; replicated keys outnumber
    // replicated queries.
    let case = SpCase {
        replicated: 2,
        replicated_kv: 4,
        original_seq_len: Some(14),
        kv_heads: 4,
        causal: true,
        ..SpCase::new(4, 1, 4, 8, 64)
    };
    check::<f32>(case);
}

#[test]
fn key_padding_masks_cover_the_sequence_each_rank_sees() {
    for world in 1..=4 {
        let case = SpCase {
            key_padding: true,
            ..SpCase::new(world, 2, 6, 12, 40)
        };
        check::<f32>(case);
    }
    // With trimming, replicated tokens, GQA and causal: the mask covers the
    // trimmed sequence followed by the replicated keys.
    let case = SpCase {
        key_padding: true,
        original_seq_len: Some(13),
        replicated: 2,
        replicated_kv: 3,
        kv_heads: 4,
        causal: true,
        ..SpCase::new(4, 2, 4, 8, 64)
    };
    check::<f32>(case);
}

#[test]
fn cross_attention_keeps_its_own_key_length() {
    let case = SpCase {
        seq_kv_local: 3,
        ..SpCase::new(2, 1, 8, 4, 40)
    };
    check::<f32>(case);
}

#[test]
fn equals_the_single_process_layer() {
    // The ranks' outputs, put together, equal one process running the whole
    // sequence on the same CPU kernel.
    let case = SpCase::new(4, 1, 8, 8, 64);
    let seed = run_seed();
    let x = SpInputs::draw::<f32>(&case, seed);
    let outs = run_ranks::<f32>(&case, &x).unwrap();
    let got = concat_ranks(&case, &outs.into_iter().map(|(o, _)| o).collect::<Vec<_>>());
    let layer = ConformanceAttention
        .build_impl(case.params(BackendKind::Cpu))
        .unwrap();
    let one = whole_sequence::<f32>(&layer, &case, &x);
    let err = rel_l2(&got, &one);
    assert!(
        err <= 1e-6,
        "seed {seed}: {err:.3e} from the single-process layer"
    );
}

#[test]
fn heads_that_do_not_split_are_refused() {
    let comm = ThreadCommunicator::group(4).unwrap().remove(0);
    let err = DistributedAttention::new(&ConformanceAttention, AttentionParams::new(6, 64), comm)
        .unwrap_err();
    assert!(matches!(err, SdpaError::Param(_)), "{err}");
    assert!(err.to_string().contains("num_heads = 6"), "{err}");
    let comm = ThreadCommunicator::group(2).unwrap().remove(0);
    let params = AttentionParams::new(8, 64).num_kv_heads(1);
    let err = DistributedAttention::new(&ConformanceAttention, params, comm).unwrap_err();
    assert!(err.to_string().contains("num_kv_heads = 1"), "{err}");
}

#[test]
fn bad_calls_are_errors() {
    let comm = ThreadCommunicator::group(1).unwrap().remove(0);
    let layer =
        DistributedAttention::new(&ConformanceAttention, AttentionParams::new(2, 8), comm).unwrap();
    let x = vec![0.5f32; 4 * 2 * 8];
    let x = TensorView::from_slice(&x, [1, 4, 2, 8]).unwrap();
    let meta = AttentionMetadata::default();
    // Too long an original length.
    let sp = SequenceParallel {
        original_seq_len: Some(5),
        replicated: None,
    };
    let err = layer.forward(&x, &x, &x, &sp, &meta).unwrap_err();
    assert!(err.to_string().contains("original_seq_len = 5"), "{err}");
    // A tensor with the wrong number of heads.
    let y = vec![0.5f32; 4 * 8];
    let y = TensorView::from_slice(&y, [1, 4, 1, 8]).unwrap();
    let err = layer
        .forward(&y, &x, &x, &SequenceParallel::default(), &meta)
        .unwrap_err();
    assert!(matches!(err, SdpaError::Shape(_)), "{err}");
    // A mask per head (each rank holds only some heads).
    let keep = vec![true; 2 * 4 * 4];
    let masked =
        AttentionMetadata::default().with_mask(AttnMask::new(&keep, &[1, 2, 4, 4]).unwrap());
    let err = layer
        .forward(&x, &x, &x, &SequenceParallel::default(), &masked)
        .unwrap_err();
    assert!(matches!(err, SdpaError::Mask(_)), "{err}");
    assert!(err.to_string().contains("shared by all heads"), "{err}");
    // A mask of the wrong length names what the local layer expected.
    let keep = vec![true; 5];
    let masked = AttentionMetadata::default().with_mask(AttnMask::new(&keep, &[1, 5]).unwrap());
    let err = layer
        .forward(&x, &x, &x, &SequenceParallel::default(), &masked)
        .unwrap_err();
    assert!(matches!(err, SdpaError::Mask(_)), "{err}");
}

//! Sequence-parallel attention over NCCL on 2 and 4 GPUs: each rank's output
//! must match the float64 reference over the whole sequence, and the ranks
//! together must match single-GPU attention, within the conformance
//! tolerance. Skips, saying why, without NCCL or enough devices.

use half::bf16;
use sdpa_runtime::distributed::{
    nccl_available, Communicator, DistributedAttention, NcclCommunicator, NcclId,
};
use sdpa_runtime::prelude::*;
use sdpa_runtime::{probe_cuda, CudaProbe, Element, SdpaError};
use sdpa_tests::cases::{run_seed, say, Placement};
use sdpa_tests::consumer::WanAttention;
use sdpa_tests::reference::rel_l2;
use sdpa_tests::sequence_parallel::{
    concat_ranks, forward_rank, on_ranks, whole_sequence, RankOutput, SpCase, SpInputs,
};

/// The rank counts this machine can run, or why none.
fn worlds() -> Vec<usize> {
    let devices = match probe_cuda() {
        CudaProbe::Present { devices } => devices,
        CudaProbe::Absent(reason) => {
            say(&format!(
                "skipping multi-GPU sequence parallelism: {reason}"
            ));
            return vec![];
        }
    };
    if !nccl_available() {
        say("skipping multi-GPU sequence parallelism: libnccl.so is not on the loader path");
        return vec![];
    }
    let worlds: Vec<usize> = [2, 4].into_iter().filter(|&w| w <= devices).collect();
    if worlds.is_empty() {
        say(&format!(
            "skipping multi-GPU sequence parallelism: {devices} CUDA device(s), 2 needed"
        ));
    }
    worlds
}

/// Runs `case` on a group made in one call (`for_devices`).
fn run_ranks<T: Element>(case: &SpCase, x: &SpInputs) -> Result<Vec<RankOutput>, SdpaError> {
    let ordinals: Vec<usize> = (0..case.world).collect();
    run_on::<T>(NcclCommunicator::for_devices(&ordinals)?, case, x)
}

/// Runs `case` on the ranks of `comms`, one thread each.
fn run_on<T: Element>(
    comms: Vec<NcclCommunicator>,
    case: &SpCase,
    x: &SpInputs,
) -> Result<Vec<RankOutput>, SdpaError> {
    on_ranks(comms, |comm| {
        let stream = comm.stream().clone();
        let bufs = x
            .rank_buffers::<T>(case, comm.rank())
            .into_iter()
            .map(|(buf, strides)| {
                let dev = stream
                    .clone_htod(&buf)
                    .map_err(|e| SdpaError::Cuda(format!("upload: {e}")))?;
                Ok((dev, strides))
            })
            .collect::<Result<Vec<_>, SdpaError>>()?;
        let layer = DistributedAttention::new(&WanAttention, case.params(BackendKind::Cuda), comm)?;
        let views = bufs
            .iter()
            .zip(case.rank_shapes())
            .map(|((dev, strides), shape)| TensorView::from_cuda_with_strides(dev, shape, *strides))
            .collect::<Result<Vec<_>, _>>()?;
        forward_rank(&layer, case, x, &views)
    })
}

/// Runs `case` on its GPUs and judges it against the float64 reference;
/// returns the global output for further comparison.
fn check<T: Element>(case: SpCase, seed: u64, x: &SpInputs) -> Vec<f64> {
    let outs = run_ranks::<T>(&case, x).unwrap_or_else(|e| panic!("{case:?}: {e}"));
    let (want, want_rep) = x.expected(&case);
    let per_rank: Vec<Vec<f32>> = outs.iter().map(|(o, _)| o.clone()).collect();
    let got = concat_ranks(&case, &per_rank);
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{case:?}: a non-finite output"
    );
    let err = rel_l2(&got, &want);
    say(&format!(
        "NCCL {} ranks {:?} causal={} pad={:?} replicated={}: rel err {err:.2e}",
        case.world, case.dtype, case.causal, case.original_seq_len, case.replicated
    ));
    assert!(
        err <= case.tolerance(),
        "{case:?} seed {seed}: rel err {err:.3e}"
    );
    for (rank, (_, rep)) in outs.iter().enumerate() {
        if let Some(rep) = rep {
            let rep: Vec<f64> = rep.iter().map(|&v| v as f64).collect();
            let err = rel_l2(&rep, &want_rep);
            assert!(
                err <= case.tolerance(),
                "{case:?}: rank {rank} replicated {err:.3e}"
            );
        }
    }
    got
}

#[test]
fn nccl_ranks_match_whole_sequence_attention() {
    for world in worlds() {
        let seed = run_seed();
        let cases = [
            SpCase {
                dtype: DType::BF16,
                ..SpCase::new(world, 1, 96, 8, 128)
            },
            SpCase {
                dtype: DType::BF16,
                causal: true,
                kv_heads: 4,
                placement: Placement::Gapped,
                ..SpCase::new(world, 2, 40, 8, 64)
            },
            SpCase {
                dtype: DType::BF16,
                original_seq_len: Some(world * 50 - 7),
                replicated: 24,
                replicated_kv: 24,
                ..SpCase::new(world, 1, 50, 8, 128)
            },
            SpCase {
                dtype: DType::BF16,
                key_padding: true,
                ..SpCase::new(world, 2, 40, 8, 64)
            },
        ];
        for case in cases {
            let x = SpInputs::draw::<bf16>(&case, seed);
            check::<bf16>(case, seed, &x);
        }
        let f32_case = SpCase::new(world, 1, 33, 4, 80);
        let x = SpInputs::draw::<f32>(&f32_case, seed);
        check::<f32>(f32_case, seed, &x);
    }
}

#[test]
fn nccl_ranks_match_single_gpu_attention() {
    for world in worlds() {
        let seed = run_seed();
        let case = SpCase {
            dtype: DType::BF16,
            ..SpCase::new(world, 1, 256, 8, 128)
        };
        let x = SpInputs::draw::<bf16>(&case, seed);
        let got = check::<bf16>(case, seed, &x);
        // One GPU over the whole sequence.
        let layer = WanAttention
            .build_impl(case.params(BackendKind::Cuda))
            .unwrap();
        let one = whole_sequence::<bf16>(&layer, &case, &x);
        let err = rel_l2(&got, &one);
        say(&format!(
            "NCCL {world} ranks against one GPU: rel diff {err:.2e}"
        ));
        assert!(
            err <= case.tolerance(),
            "seed {seed}: {err:.3e} from one GPU"
        );
    }
}

#[test]
fn nccl_ranks_joined_by_a_unique_id() {
    // One process per GPU in production; here one thread per rank joins
    // with the id's bytes, as a launcher would pass them.
    for world in worlds() {
        let seed = run_seed();
        let id = NcclId::new().unwrap().to_bytes();
        let comms = on_ranks((0..world).collect(), |rank| {
            NcclCommunicator::for_rank(rank, rank, world, &NcclId::from_bytes(id))
        })
        .unwrap();
        assert!(comms
            .iter()
            .enumerate()
            .all(|(r, c)| c.rank() == r && c.world_size() == world));
        let case = SpCase {
            dtype: DType::BF16,
            causal: true,
            ..SpCase::new(world, 1, 64, 8, 128)
        };
        let x = SpInputs::draw::<bf16>(&case, seed);
        let outs = run_on::<bf16>(comms, &case, &x).unwrap();
        let got = concat_ranks(&case, &outs.into_iter().map(|(o, _)| o).collect::<Vec<_>>());
        let err = rel_l2(&got, &x.expected(&case).0);
        say(&format!(
            "NCCL {world} ranks joined by id: rel err {err:.2e}"
        ));
        assert!(err <= case.tolerance(), "seed {seed}: rel err {err:.3e}");
    }
}

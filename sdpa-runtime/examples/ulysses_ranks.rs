//! One process per GPU: sequence-parallel attention the way a launcher such
//! as `torchrun` or `mpirun` starts it, one process per rank.
//!
//! Rank 0 makes the NCCL unique id and writes its 128 bytes to a file every
//! rank can read; the others wait for the file, then all join the group.
//!
//! ```sh
//! cargo build --release -p sdpa-runtime --example ulysses_ranks
//! for r in 0 1; do
//!   RANK=$r WORLD_SIZE=2 NCCL_ID_FILE=/tmp/sdpa-nccl-id \
//!     target/release/examples/ulysses_ranks &
//! done; wait
//! ```
//!
//! Each rank holds `[1, S/P, 16, 128]` bf16 tokens, attends over the whole
//! sequence for `16/P` heads and prints its output's checksum. NCCL is opened
//! as `libnccl.so` (see `sdpa_runtime::distributed`).

use std::time::{Duration, Instant};

use sdpa_runtime::distributed::{
    Communicator, DistributedAttention, NcclCommunicator, NcclId, SequenceParallel,
};
use sdpa_runtime::prelude::*;

#[sdpa_variants(head_sizes = [128], causal = [false], dtypes = [bf16])]
pub struct VideoAttention;

fn env(name: &str) -> Result<String, Box<dyn std::error::Error>> {
    std::env::var(name).map_err(|_| format!("set {name} (see the example's header)").into())
}

/// Rank 0 writes the id; the others poll for it (a launcher would pass it
/// through its own store instead).
fn shared_id(rank: usize, path: &str) -> Result<NcclId, Box<dyn std::error::Error>> {
    if rank == 0 {
        let id = NcclId::new()?;
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, id.to_bytes())?;
        std::fs::rename(tmp, path)?; // appears whole or not at all
        return Ok(id);
    }
    let start = Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(path) {
            let bytes: [u8; 128] = bytes
                .try_into()
                .map_err(|_| format!("{path} does not hold a 128-byte NCCL id"))?;
            return Ok(NcclId::from_bytes(bytes));
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(format!("rank 0 did not write {path} within 60 s").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rank: usize = env("RANK")?.parse()?;
    let world: usize = env("WORLD_SIZE")?.parse()?;
    let ordinal = std::env::var("LOCAL_RANK").map_or(Ok(rank), |v| v.parse())?;
    let id = shared_id(rank, &env("NCCL_ID_FILE")?)?;
    let comm = NcclCommunicator::for_rank(ordinal, rank, world, &id)?;

    let (b, s, h, d) = (1, 4096, 16, 128);
    let s_local = s / world;
    let stream = comm.stream().clone();
    // Each rank's tokens: a deterministic pattern that differs by position.
    let host: Vec<bf16> = (0..b * s_local * h * d)
        .map(|i| bf16::from_f32((((i + rank * 7919) % 251) as f32 - 125.0) / 125.0))
        .collect();
    let x = stream.clone_htod(&host)?;
    let layer = DistributedAttention::new(&VideoAttention, AttentionParams::new(h, d), comm)?;
    let xv = TensorView::from_cuda(&x, [b, s_local, h, d])?;
    let out = layer.forward(
        &xv,
        &xv,
        &xv,
        &SequenceParallel::default(),
        &AttentionMetadata::default(),
    )?;
    let values = out.output.to_f32_vec()?;
    let checksum: f64 = values.iter().map(|&v| v as f64).sum();
    println!(
        "rank {rank}/{} on device {ordinal}: output {:?}, checksum {checksum:.6}",
        layer.communicator().world_size(),
        out.output.shape()
    );
    Ok(())
}

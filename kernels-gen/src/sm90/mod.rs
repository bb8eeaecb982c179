//! The Hopper (sm_90a) forward kernel for 16-bit element types: `wgmma`
//! products from 128-byte-swizzled shared memory, fed by TMA from a
//! producer warpgroup, and an online softmax in registers. It keeps the
//! launch contract of [`crate::contract`], plus the tensor maps of
//! [`crate::contract::TensorMaps`].
//!
//! # Structure
//!
//! A CTA of `wgs` consumer warpgroups computes `64 · wgs` query rows of one
//! (batch, head); consumer warpgroup `w` owns rows `64w..64w + 63`, and
//! warp `i` of it rows `16i..16i + 15` of those, so a row of the scores
//! lives in the four lanes of a quad exactly as with `mma.sync`. K and V
//! stream through `block_n`-key blocks in shared-memory stages:
//!
//! - `S = Q·K(n)ᵀ`: `wgmma m64n{block_n}k16`, A (Q) and B (K) both K-major
//!   from shared-memory descriptors;
//! - masking where needed (ragged ends, the causal diagonal, a mask
//!   tensor), online softmax, `P` packed to 16 bits: the accumulator
//!   layout of two adjacent n8 slices is the register A fragment of a
//!   `wgmma`;
//! - `O += P·V(n)`: `wgmma m64n{d}k16` with A from registers and B (V, a
//!   `[keys, d]` row-major tile) N-major, read through the transpose bit.
//!
//! Block `n + 1`'s `Q·Kᵀ` is issued together with block `n`'s `P·V`, and
//! the softmax of `n + 1` runs while the `P·V` is in flight.
//!
//! Rows and keys are local to the batch entry's sequences
//! ([`crate::attention::seqs`]): TMA boxes are addressed at token `start +
//! local` (and at batch 0 of a packed tensor, whose batch stride is 0); the
//! rows a box brings in past a sequence's end are its neighbours' tokens,
//! hidden as `-inf` for keys (the blocks reaching past the key sequence's
//! end take the masking path) and never stored for queries. A tile whose
//! rows all lie past its sequence's end leaves before its mbarriers exist.
//!
//! The kernel is warp-specialised: warpgroup 0 is a producer that gives
//! its registers to the consumers (`setmaxnreg`) and whose one thread
//! loads Q, then each block's K and V, with TMA onto per-stage mbarriers;
//! the consumers hand stages back through empty mbarriers and never meet
//! at a CTA barrier. Two or three consumers by head size; measured on an
//! H100 (`docs/hopper.md`): 640 TFLOP/s on the Wan2.1 480p self-attention
//! through the runtime. The options tried and left off (ping-pong
//! consumers, `cp.async` loads with or without a producer, persistent
//! CTAs, staged output stores, ...) were deleted; commit 0365c48 holds
//! them and `docs/hopper.md` their measurements.
//!
//! # Parts
//!
//! The kernel is composed the way a FlashAttention-3 kernel is: a tile
//! scheduler, a mainloop (the producer's loads, the consumers' products
//! and softmax) and an epilogue, in [`generate_with`]:
//!
//! - `config`: [`Sm90Config`], what production varies, checked;
//! - `schedule`: the tile scheduler (one tile per CTA; the seam for a
//!   persistent one);
//! - `emitter`: the kernel under construction and the consumers' registers;
//! - `prologue`: parameters, coordinates, shared-memory layout,
//!   descriptors;
//! - `barriers`: the stages' mbarriers and shared-memory offsets;
//! - `producer`: the TMA producer warpgroup;
//! - `mainloop`: the consumers' loop over key blocks;
//! - `products`: the two `wgmma` products and their descriptors;
//! - `softmax`: masking, the online softmax, the output's rescale, P;
//! - `epilogue`: the output stores and, where asked for, the rows'
//!   log-sum-exp.
//!
//! # Shared memory
//!
//! Every tile (Q, K, V) is stored as `ceil(d / 64)` column panels of 64 elements
//! (128 bytes a row); inside a panel, rows are 128 bytes apart and the
//! 16-byte chunk `c` of row `r` sits at chunk `c ^ (r % 8)`: the 128-byte
//! swizzle, whose atom (8 rows, 1024 bytes) the descriptors step over with
//! a stride byte offset of 1024. Panels start 1024-byte aligned (the base is
//! aligned at run time), so the hardware's swizzle, computed from address
//! bits, matches the one the loads write.
//!
//! - A K-major operand (Q, K) at k-step `kk` starts at panel `kk / 4`, byte
//!   `32 · (kk % 4)` of the row; the leading byte offset is unused.
//! - V as an N-major B: a k-step (16 keys) is 2048 bytes; the leading byte
//!   offset is the distance between 64-column panels.
//! - Where `d` is not a multiple of 64 the columns past `d` are read as
//!   zeros (TMA boxes past the tensor's end) but not used: `Q·Kᵀ` runs
//!   `d / 16` k-steps, and `P·V` is `m64n{d}` over a partial last panel
//!   (checked on an H100 at d=80, 96, 112, 160 and 224).

use crate::contract::{GpuKernel, TensorMaps};
use crate::ptx::{Cmp, Instr, Kernel, Module, Operand, Target, Ty};
use crate::VariantSpec;

mod barriers;
mod config;
mod emitter;
mod epilogue;
mod mainloop;
mod producer;
mod products;
mod prologue;
mod schedule;
mod softmax;
#[cfg(test)]
mod tests;

pub use config::{ConfigError, Sm90Config, SMEM_LIMIT};
use emitter::Emitter;
use mainloop::Operands;
use producer::Loads;
use schedule::TileScheduler;

/// The head sizes whose sm_90a kernel is checked on an H100 and measured
/// faster than the sm_80 one (`docs/hopper.md`). d=32 is correct but
/// slower (197-220 TFLOP/s against 219-225).
pub const HEAD_SIZES: [usize; 10] = [48, 64, 80, 96, 112, 128, 160, 192, 224, 256];

/// Generates the sm_90a kernel of a variant, or `None` where there is none
/// (32-bit elements, head sizes not in [`HEAD_SIZES`]).
pub fn generate(spec: &VariantSpec) -> Option<GpuKernel> {
    if !HEAD_SIZES.contains(&spec.head_size) {
        return None;
    }
    Sm90Config::new(spec).map(generate_with)
}

/// Generates the sm_90a kernel of `cfg`'s variant ([`Sm90Config::spec`])
/// with `cfg`'s tiles.
pub fn generate_with(cfg: Sm90Config) -> GpuKernel {
    let entry = cfg.spec().kernel_name();
    let k = compose(Emitter::new(&entry, cfg), TileScheduler::OneTilePerCta);
    GpuKernel {
        ptx: Module::new(Target::Sm90a).kernel(k).to_string(),
        entry,
        target: Target::Sm90a,
        block_m: cfg.block_m() as u32,
        threads: cfg.threads() as u32,
        smem_bytes: cfg.smem_bytes() as u32,
        mask_smem_bytes: 0,
        tensor_maps: Some(TensorMaps {
            q_rows: cfg.block_m() as u32,
            kv_rows: cfg.block_n() as u32,
        }),
    }
}

/// The kernel from its parts: the prologue both roles run, then the
/// consumers (mainloop, epilogue, the scheduler's next tile) and the
/// producer (its loads, the scheduler's next tile).
fn compose(mut e: Emitter, sched: TileScheduler) -> Kernel {
    let p = e.prologue(sched);
    let producer = e.k.label("producer");
    let sbar = e.barrier_base(p.sk0);
    e.init_barriers(sbar, p.tid);

    // The roles part: warpgroup 0 produces, the others consume with the
    // registers it gives up.
    let is_producer = e.k.setp(Cmp::Eq, Ty::U32, p.wg, Operand::U(0));
    e.k.branch_if(is_producer, false, &producer);
    e.k.push(Instr::SetMaxNReg {
        inc: true,
        regs: e.cfg.consumer_regs(),
    });
    let ops = Operands {
        sbar,
        k_desc0: p.k_desc0,
        v_desc0: p.v_desc0,
        n_blocks: p.n_blocks,
    };
    e.mainloop(&p.core, &ops);
    e.epilogue(&p.core, &p.out, &p.args, sched);
    sched.consumer_tile_done(&mut e.k);

    let loads = Loads {
        maps: &p.maps,
        sbar,
        sq: p.sq,
        sk0: p.sk0,
        tid: p.tid,
        q0: p.q0,
        q_start: p.q_start,
        k_start: p.k_start,
        batch_strides: p.batch_strides,
        head: p.tile.head,
        kv_head: p.kv_head,
        batch: p.tile.batch,
        n_blocks: p.n_blocks,
    };
    e.producer(sched, &loads, &producer);
    e.k
}

//! The tile scheduler: which tile, a `(query block, head, batch)`, each
//! CTA computes, where it lies, and what each role does when its tile is
//! done.
//!
//! Today there is one scheduler, [`TileScheduler::OneTilePerCta`]: the
//! launch grid is the tiles. A persistent scheduler (CTAs looping over
//! tiles, the producer loading the next tile's Q and K/V while the
//! consumers finish the current one) is a second variant of the enum: it
//! answers the same questions from a tile index instead of the grid, and
//! loops where this one returns. Its earlier, slower form is in commit
//! 0365c48 (`docs/hopper.md`).

use crate::contract::{cta_coords, cta_head_batch, kv_head};
use crate::ptx::{BinOp, Cmp, Instr, Kernel, Operand, Reg, Ty};

/// Which tiles a CTA computes, and in what order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TileScheduler {
    /// One CTA per tile, from the contract's grid: `x` the query block,
    /// `y` the head, `z` the batch. Causal kernels take query blocks last
    /// first ([`crate::contract::cta_coords`]).
    OneTilePerCta,
}

/// The tile of a CTA, where it lies in the tensors.
#[derive(Clone, Copy, Debug)]
pub(super) struct Tile {
    /// The query head.
    pub(super) head: Reg,
    /// The batch entry.
    pub(super) batch: Reg,
    /// The tile's query block (not yet in rows).
    pub(super) qblock: Reg,
}

/// The producer's count of its progress over the tiles, on which its
/// stages and barrier phases continue from tile to tile.
#[derive(Clone, Copy, Debug)]
pub(super) struct ProducerTiles {
    /// Key blocks loaded for earlier tiles of this CTA.
    pub(super) blocks_before: Reg,
}

impl TileScheduler {
    /// The thread index and this CTA's (first) tile.
    pub(super) fn first_tile(self, k: &mut Kernel, causal: bool) -> (Reg, Tile) {
        match self {
            TileScheduler::OneTilePerCta => {
                let (tid, qblock, head, batch) = cta_coords(k, causal);
                (
                    tid,
                    Tile {
                        head,
                        batch,
                        qblock,
                    },
                )
            }
        }
    }

    /// The consumer's current tile's query head and batch entry, for its
    /// epilogue: with one tile per CTA, read from the grid again, so that
    /// no register holds them across the mainloop.
    pub(super) fn epilogue_head_batch(self, k: &mut Kernel) -> (Reg, Reg) {
        match self {
            TileScheduler::OneTilePerCta => cta_head_batch(k),
        }
    }

    /// The tile's first query row (`block_m` rows a block) and its K/V
    /// head (`group` query heads share one).
    pub(super) fn rows(self, k: &mut Kernel, t: &Tile, block_m: usize, group: Reg) -> (Reg, Reg) {
        let q0 = k.bin(BinOp::Mul, Ty::U32, t.qblock, Operand::U(block_m as u64));
        let kv_head = kv_head(k, t.head, group);
        (q0, kv_head)
    }

    /// The producer's start: its progress counters (a looping scheduler
    /// would also open its tile loop here).
    pub(super) fn producer_start(self, k: &mut Kernel) -> ProducerTiles {
        match self {
            TileScheduler::OneTilePerCta => {
                // One tile: no key block was loaded before it.
                let blocks_before = k.mov(Ty::U32, Operand::U(0));
                ProducerTiles { blocks_before }
            }
        }
    }

    /// The producer, before loading a tile of `n_blocks` key blocks: a tile
    /// without keys loads nothing (with one tile per CTA, the producer
    /// leaves).
    pub(super) fn producer_skip_empty(self, k: &mut Kernel, n_blocks: Reg) {
        match self {
            TileScheduler::OneTilePerCta => {
                let none = k.setp(Cmp::Eq, Ty::U32, n_blocks, Operand::U(0));
                k.guard(none, false, Instr::Ret);
            }
        }
    }

    /// The producer, once it has issued the tile's loads: on to the next
    /// tile (with one tile per CTA, it leaves).
    pub(super) fn producer_tile_done(self, k: &mut Kernel) {
        match self {
            TileScheduler::OneTilePerCta => k.push(Instr::Ret),
        }
    }

    /// A consumer, once it has stored the tile's output: on to the next
    /// tile (with one tile per CTA, it leaves).
    pub(super) fn consumer_tile_done(self, k: &mut Kernel) {
        match self {
            TileScheduler::OneTilePerCta => k.push(Instr::Ret),
        }
    }
}

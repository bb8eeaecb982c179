//! The producer warpgroup: it gives its registers to the consumers, and
//! one thread of it loads the tile's Q, then each key block's K and V,
//! with TMA (`cp.async.bulk.tensor`) onto the stages' mbarriers.

use super::barriers::Bar;
use super::config::PRODUCER_REGS;
use super::emitter::Emitter;
use super::schedule::TileScheduler;
use crate::ptx::{BinOp, Cmp, Instr, Operand, Param, Reg, Ty};

/// What the producer loads from and into, and which tile.
#[derive(Clone, Copy, Debug)]
pub(super) struct Loads<'a> {
    /// The tensor maps of Q, K and V ([`crate::contract::TENSOR_MAP_PARAMS`]).
    pub(super) maps: &'a [Param],
    /// The first mbarrier ([`super::barriers`]).
    pub(super) sbar: Reg,
    /// Q's shared tile.
    pub(super) sq: Reg,
    /// Stage 0's K tile (V follows it).
    pub(super) sk0: Reg,
    /// The thread index.
    pub(super) tid: Reg,
    /// The tile's first query row, local to its sequence.
    pub(super) q0: Reg,
    /// The query sequence's first token.
    pub(super) q_start: Reg,
    /// The key sequence's first token.
    pub(super) k_start: Reg,
    /// The batch strides of `q`, `k` and `v`: a tensor whose batch stride
    /// is 0 (packed sequences) is read at batch coordinate 0.
    pub(super) batch_strides: [Reg; 3],
    /// The query head.
    pub(super) head: Reg,
    /// The K/V head.
    pub(super) kv_head: Reg,
    /// The batch entry.
    pub(super) batch: Reg,
    /// The tile's key blocks.
    pub(super) n_blocks: Reg,
}

impl Emitter {
    /// The producer, from its `label`: `setmaxnreg` down, all but one
    /// thread leave; per tile Q's box, then per block, once its stage is
    /// free, K's and V's panels, each tile completing its bytes on its own
    /// full barrier.
    pub(super) fn producer(&mut self, sched: TileScheduler, ld: &Loads, label: &str) {
        let cfg = self.cfg;
        let (stages, bn, bm) = (cfg.stages(), cfg.block_n(), cfg.block_m());
        let panels = cfg.d_pad() / 64;
        let tile = cfg.kv_tile();
        let Loads {
            maps,
            sbar,
            sq,
            sk0,
            tid,
            q0,
            q_start,
            k_start,
            batch_strides,
            head,
            kv_head,
            batch,
            n_blocks,
        } = *ld;
        let k = &mut self.k;
        k.push(Instr::Label(label.to_string()));
        k.push(Instr::SetMaxNReg {
            inc: false,
            regs: PRODUCER_REGS,
        });
        let leader = k.setp(Cmp::Eq, Ty::U32, tid, Operand::U(0));
        k.guard(leader, true, Instr::Ret);
        let map: Vec<Reg> = maps
            .iter()
            .map(|p| {
                let r = k.reg(Ty::B64);
                k.push(Instr::CvtaParam {
                    dst: r,
                    param: p.clone(),
                });
                r
            })
            .collect();
        let progress = sched.producer_start(k);
        sched.producer_skip_empty(k, n_blocks);
        // Boxes are addressed at token `start + local` of each sequence, and
        // at batch 0 of a packed tensor (batch stride 0).
        let [q_batch, k_batch, v_batch] = batch_strides.map(|stride| {
            let packed = k.setp(Cmp::Eq, Ty::U64, stride, Operand::U(0));
            k.selp(Ty::U32, Operand::U(0), batch, packed)
        });
        let q_token = k.bin(BinOp::Add, Ty::U32, q_start, q0);
        // Q: one box of `bm` rows per panel.
        let q_bar = self.q_full(sbar);
        let arrive = self.arrival(q_bar, Some((bm * cfg.d_pad() * 2) as u32));
        let k = &mut self.k;
        k.push(arrive);
        for p in 0..panels {
            let dst = k.bin(BinOp::Add, Ty::U32, sq, Self::u(p * bm * 128));
            k.push(Instr::TmaLoad {
                dst,
                map: map[0],
                coords: vec![Self::u(64 * p), q_token.into(), head.into(), q_batch.into()],
                mbar: q_bar,
            });
        }
        let b = k.mov(Ty::U32, Operand::U(0));
        let key = k.mov(Ty::U32, k_start);
        let top = k.label("produce");
        k.push(Instr::Label(top.clone()));
        // Blocks count over the CTA's run for their stage and phase.
        let gb = k.bin(BinOp::Add, Ty::U32, b, progress.blocks_before);
        let s = k.bin(BinOp::Rem, Ty::U32, gb, Self::u(stages));
        let off = k.bin(BinOp::Mul, Ty::U32, s, Self::u(2 * tile));
        let k_dst = k.bin(BinOp::Add, Ty::U32, sk0, off);
        // Block gb reuses the stage of block gb - stages.
        let reuse = k.setp(Cmp::Ge, Ty::U32, gb, Self::u(stages));
        let free = k.label("stage_free");
        k.branch_if(reuse, true, &free);
        let old = k.bin(BinOp::Sub, Ty::U32, gb, Self::u(stages));
        self.wait_stage(sbar, old, Bar::Empty);
        self.k.push(Instr::Label(free));
        for (which, bar, m, b_coord) in [
            (0, Bar::Full, map[1], k_batch),
            (1, Bar::VFull, map[2], v_batch),
        ] {
            let full = self.stage_barrier(sbar, gb, bar);
            let arrive = self.arrival(full, Some(tile as u32));
            let k = &mut self.k;
            k.push(arrive);
            for p in 0..panels {
                let dst = k.bin(
                    BinOp::Add,
                    Ty::U32,
                    k_dst,
                    Self::u(which * tile + p * bn * 128),
                );
                k.push(Instr::TmaLoad {
                    dst,
                    map: m,
                    coords: vec![Self::u(64 * p), key.into(), kv_head.into(), b_coord.into()],
                    mbar: full,
                });
            }
        }
        let k = &mut self.k;
        k.bin_to(BinOp::Add, Ty::U32, b, b, Operand::U(1));
        k.bin_to(BinOp::Add, Ty::U32, key, key, Self::u(bn));
        let again = k.setp(Cmp::Lt, Ty::U32, b, n_blocks);
        k.branch_if(again, false, &top);
        sched.producer_tile_done(k);
    }
}

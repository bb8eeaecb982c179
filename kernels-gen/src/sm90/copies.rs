//! `cp.async` copies of Q, K and V by the consumer threads themselves (the
//! kernel of [`super::Sm90Config::cp_async`] and the `cp.async` producer),
//! and the stage arithmetic of their pipeline.

use super::Emitter;
use crate::ptx::{Addr, BinOp, Cmp, Instr, Operand, Reg, Ty};

impl Emitter {
    /// Issues this thread's `cp.async` copies of `rows` rows of a tile:
    /// global row `grow` (and every `rpp` after it) from `src` (stepping
    /// `pass_step` bytes) into shared `dst` (stepping `rpp · 128` bytes).
    /// Rows at or past `seq` are zero-filled without reading memory.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn load_tile(
        &mut self,
        rows: usize,
        rpp: usize,
        src: Reg,
        pass_step: Reg,
        grow: Reg,
        seq: Reg,
        dst: Reg,
        enable: Option<Reg>,
    ) {
        let lrow = self.lrow.expect("loader set up");
        let k = &mut self.k;
        let mut s = src;
        for pass in 0..rows.div_ceil(rpp) {
            if pass > 0 {
                s = k.bin(BinOp::Add, Ty::U64, s, pass_step);
            }
            let row = k.bin(BinOp::Add, Ty::U32, grow, Self::u(pass * rpp));
            let valid = k.setp(Cmp::Lt, Ty::U32, row, seq);
            let size = k.selp(Ty::U32, Operand::U(16), Operand::U(0), valid);
            let cp = Instr::CpAsync16 {
                dst: Addr::at(dst, (pass * rpp * 128) as i64),
                src: s.into(),
                src_size: size.into(),
            };
            // A last, partial pass: only the threads of its rows copy.
            let mut go = enable;
            if (pass + 1) * rpp > rows {
                let fits = k.setp(Cmp::Lt, Ty::U32, lrow, Self::u(rows - pass * rpp));
                if let Some(e) = enable {
                    k.bin_to(BinOp::And, Ty::Pred, fits, fits, e);
                }
                go = Some(fits);
            }
            // Chunks past the head size are never read: not copied.
            if let Some(ok) = self.chunk_ok {
                go = Some(match go {
                    Some(e) => {
                        let both = k.reg(Ty::Pred);
                        k.bin_to(BinOp::And, Ty::Pred, both, e, ok);
                        both
                    }
                    None => ok,
                });
            }
            match go {
                Some(e) => k.guard(e, false, cp),
                None => k.push(cp),
            }
        }
    }

    /// Issues the copies of the next K and V block into the stage at byte
    /// offset `stage` (a register), then moves the pointers on a block.
    pub(super) fn load_block(&mut self, ld: &Loads, stage: Reg, enable: Option<Reg>) {
        let (bn, tile) = (self.cfg.block_n, self.cfg.kv_tile());
        let k_dst = self.k.bin(BinOp::Add, Ty::U32, ld.k_dst0, stage);
        let v_dst = self.k.bin(BinOp::Add, Ty::U32, k_dst, Self::u(tile));
        self.load_tile(
            bn, ld.rpp, ld.k_src, ld.k_pass, ld.grow, ld.seq_k, k_dst, enable,
        );
        self.load_tile(
            bn, ld.rpp, ld.v_src, ld.v_pass, ld.v_grow, ld.seq_k, v_dst, enable,
        );
        let k = &mut self.k;
        k.push(Instr::CpAsyncCommit);
        k.bin_to(BinOp::Add, Ty::U64, ld.k_src, ld.k_src, ld.k_block);
        k.bin_to(BinOp::Add, Ty::U64, ld.v_src, ld.v_src, ld.v_block);
        k.bin_to(BinOp::Add, Ty::U32, ld.grow, ld.grow, Self::u(bn));
        if ld.v_grow != ld.grow {
            k.bin_to(BinOp::Add, Ty::U32, ld.v_grow, ld.v_grow, Self::u(bn));
        }
    }

    /// Split stages: issues the copies of the next K block into the K
    /// slot at byte offset `slot` (a register) and moves its pointer on
    /// (no commit).
    pub(super) fn load_k(&mut self, ld: &Loads, slot: Reg, enable: Option<Reg>) {
        let bn = self.cfg.block_n;
        let dst = self.k.bin(BinOp::Add, Ty::U32, ld.k_dst0, slot);
        self.load_tile(
            bn, ld.rpp, ld.k_src, ld.k_pass, ld.grow, ld.seq_k, dst, enable,
        );
        let k = &mut self.k;
        k.bin_to(BinOp::Add, Ty::U64, ld.k_src, ld.k_src, ld.k_block);
        k.bin_to(BinOp::Add, Ty::U32, ld.grow, ld.grow, Self::u(bn));
    }

    /// Split stages: the same for the next V block, into the V slot at
    /// byte offset `slot` (the V slots follow the two K slots).
    pub(super) fn load_v(&mut self, ld: &Loads, slot: Reg, enable: Option<Reg>) {
        let (bn, tile) = (self.cfg.block_n, self.cfg.kv_tile());
        let dst = self.k.bin(BinOp::Add, Ty::U32, ld.k_dst0, slot);
        let dst = self.k.bin(BinOp::Add, Ty::U32, dst, Self::u(2 * tile));
        self.load_tile(
            bn, ld.rpp, ld.v_src, ld.v_pass, ld.v_grow, ld.seq_k, dst, enable,
        );
        let k = &mut self.k;
        k.bin_to(BinOp::Add, Ty::U64, ld.v_src, ld.v_src, ld.v_block);
        k.bin_to(BinOp::Add, Ty::U32, ld.v_grow, ld.v_grow, Self::u(bn));
    }

    /// Split stages: the byte offset of the slot of block `n + plus`, and
    /// the same in descriptor units.
    pub(super) fn slot_of(&mut self, n: Reg, plus: usize) -> (Reg, Reg) {
        let tile = self.cfg.kv_tile();
        let k = &mut self.k;
        let m = k.bin(BinOp::Add, Ty::U32, n, Self::u(plus));
        let s = k.bin(BinOp::And, Ty::U32, m, Operand::U(1));
        let bytes = k.bin(BinOp::Mul, Ty::U32, s, Self::u(tile));
        let s64 = k.cvt(None, Ty::U64, Ty::U32, s);
        let units = k.bin(BinOp::Mul, Ty::U64, s64, Self::u(tile >> 4));
        (bytes, units)
    }

    /// Byte offset of the stage of block `n`, and the same in descriptor
    /// units.
    pub(super) fn stage_of(&mut self, n: Reg, plus: usize) -> (Reg, Reg) {
        let stages = self.cfg.stages();
        let stride = 2 * self.cfg.kv_tile();
        let k = &mut self.k;
        let m = if plus > 0 {
            k.bin(BinOp::Add, Ty::U32, n, Self::u(plus))
        } else {
            n
        };
        let s = k.bin(BinOp::Rem, Ty::U32, m, Self::u(stages));
        let bytes = k.bin(BinOp::Mul, Ty::U32, s, Self::u(stride));
        let s64 = k.cvt(None, Ty::U64, Ty::U32, s);
        let units = k.bin(BinOp::Mul, Ty::U64, s64, Self::u(stride >> 4));
        (bytes, units)
    }

    /// Waits for this thread's copies (all but the newest `pending`
    /// groups), hands them to the async proxy, and meets the CTA.
    pub(super) fn landed(&mut self, pending: u32) {
        self.k.push(Instr::CpAsyncWait(pending));
        self.k.push(Instr::FenceProxyAsync);
        self.k.push(Instr::BarSync(0));
    }
}

/// A thread's share of the K and V copies.
pub(super) struct Loads {
    pub(super) k_src: Reg,
    pub(super) v_src: Reg,
    pub(super) k_pass: Reg,
    pub(super) v_pass: Reg,
    pub(super) k_block: Reg,
    pub(super) v_block: Reg,
    /// Global key row of this thread's first copy in the next K block.
    pub(super) grow: Reg,
    /// The same for the next V block (`grow` itself unless K and V
    /// stages are split).
    pub(super) v_grow: Reg,
    pub(super) seq_k: Reg,
    /// Shared address of this thread's first K chunk in stage 0.
    pub(super) k_dst0: Reg,
    /// Rows per pass.
    pub(super) rpp: usize,
}

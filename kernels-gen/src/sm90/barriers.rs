//! The mbarriers that hand stages and Q between the producer and the
//! consumers, and the stages' shared-memory arithmetic.
//!
//! Layout from `sbar` (after the last stage): K-full per stage, V-full
//! per stage, empty per stage, then Q-full: `3 · stages + 1` mbarriers.

use super::emitter::Emitter;
use crate::ptx::{Addr, BinOp, Cmp, Instr, Operand, Reg, Ty};

/// Which mbarrier of a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Bar {
    /// K has landed (the producer's arrival and the bytes).
    Full,
    /// V has landed.
    VFull,
    /// Every consumer thread is done with the stage.
    Empty,
}

impl Emitter {
    /// The first mbarrier: after the last stage's V tile, from stage 0's K
    /// tile at `sk0`.
    pub(super) fn barrier_base(&mut self, sk0: Reg) -> Reg {
        let stages_end = 2 * self.cfg.stages() * self.cfg.kv_tile();
        self.k.bin(BinOp::Add, Ty::U32, sk0, Self::u(stages_end))
    }

    /// Initialises the barriers at `sbar` (thread 0; K-full, V-full and
    /// Q-full count the producer's one arrival, empty every consumer
    /// thread), fences them for TMA and meets the CTA.
    pub(super) fn init_barriers(&mut self, sbar: Reg, tid: Reg) {
        let (stages, wgs) = (self.cfg.stages(), self.cfg.wgs());
        let k = &mut self.k;
        let first = k.setp(Cmp::Eq, Ty::U32, tid, Operand::U(0));
        for s in 0..3 * stages + 1 {
            let count = if (2 * stages..3 * stages).contains(&s) {
                (128 * wgs) as u32
            } else {
                1
            };
            let init = Instr::MbarInit {
                addr: Addr::at(sbar, (8 * s) as i64),
                count,
            };
            k.guard(first, false, init);
        }
        k.guard(first, false, Instr::FenceMbarrierInit);
        k.push(Instr::BarSync(0));
    }

    /// Q's full barrier.
    pub(super) fn q_full(&mut self, sbar: Reg) -> Reg {
        let at = 24 * self.cfg.stages();
        self.k.bin(BinOp::Add, Ty::U32, sbar, Self::u(at))
    }

    /// Waits until the mbarrier at `addr` has completed the phase of
    /// parity `parity`.
    pub(super) fn mbar_wait(&mut self, addr: Reg, parity: Reg) {
        let k = &mut self.k;
        let top = k.label("mbar_wait");
        k.push(Instr::Label(top.clone()));
        let done = k.reg(Ty::Pred);
        k.push(Instr::MbarTryWait {
            done,
            addr: addr.into(),
            parity: parity.into(),
        });
        k.branch_if(done, true, &top);
    }

    /// The address of the mbarrier `bar` of block `blk`'s stage (`blk` a
    /// register).
    pub(super) fn stage_barrier(&mut self, sbar: Reg, blk: Reg, bar: Bar) -> Reg {
        let stages = self.cfg.stages();
        let row = match bar {
            Bar::Full => 0,
            Bar::VFull => 1,
            Bar::Empty => 2,
        };
        let k = &mut self.k;
        let s = k.bin(BinOp::Rem, Ty::U32, blk, Self::u(stages));
        let base = if row > 0 {
            k.bin(BinOp::Add, Ty::U32, sbar, Self::u(8 * stages * row))
        } else {
            sbar
        };
        k.mad(Ty::U32, s, Operand::U(8), base)
    }

    /// Waits on the mbarrier `bar` of block `blk`'s stage until it has
    /// completed the phase of block `blk` (the parity of `blk / stages`).
    pub(super) fn wait_stage(&mut self, sbar: Reg, blk: Reg, bar: Bar) {
        let addr = self.stage_barrier(sbar, blk, bar);
        let k = &mut self.k;
        let round = k.bin(BinOp::Div, Ty::U32, blk, Self::u(self.cfg.stages()));
        let parity = k.bin(BinOp::And, Ty::U32, round, Operand::U(1));
        self.mbar_wait(addr, parity);
    }

    /// An arrival on the mbarrier at `addr`, announcing `expect_tx` bytes
    /// to come if given (its state register is fresh and unread).
    pub(super) fn arrival(&mut self, addr: Reg, expect_tx: Option<u32>) -> Instr {
        let state = self.k.reg(Ty::B64);
        Instr::MbarArrive {
            state,
            addr: addr.into(),
            expect_tx,
        }
    }

    /// The offset of the stage of block `n + plus` from stage 0, in
    /// descriptor units (16 bytes), for the `wgmma` descriptors.
    pub(super) fn stage_of(&mut self, n: Reg, plus: usize) -> Reg {
        let stages = self.cfg.stages();
        let stride = 2 * self.cfg.kv_tile();
        let k = &mut self.k;
        let m = if plus > 0 {
            k.bin(BinOp::Add, Ty::U32, n, Self::u(plus))
        } else {
            n
        };
        let s = k.bin(BinOp::Rem, Ty::U32, m, Self::u(stages));
        let s64 = k.cvt(None, Ty::U64, Ty::U32, s);
        k.bin(BinOp::Mul, Ty::U64, s64, Self::u(stride >> 4))
    }
}

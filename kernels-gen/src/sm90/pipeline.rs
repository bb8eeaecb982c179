//! Warp specialisation: the mbarrier hand-over of stages between the
//! producer and the consumers, the consumers' loop, the `cp.async` and TMA
//! producers, ping-pong, and the tile loop of persistent kernels.

use super::config::PRODUCER_REGS;
use super::copies::Loads;
use super::{Core, Emitter};
use crate::ptx::{BinOp, Cmp, Instr, Operand, Param, Reg, Special, Ty};

impl Emitter {
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

    /// The stage of block `blk` (a register): the address of its mbarrier
    /// `bar` and the parity of the phase block `blk` completes.
    pub(super) fn stage_barrier(&mut self, sbar: Reg, blk: Reg, bar: Bar) -> (Reg, Reg) {
        let stages = self.cfg.stages();
        let row = match bar {
            Bar::Full => 0,
            Bar::VFull => 1,
            Bar::Empty if self.cfg.tma => 2,
            Bar::Empty => 1,
        };
        let k = &mut self.k;
        let s = k.bin(BinOp::Rem, Ty::U32, blk, Self::u(stages));
        let base = if row > 0 {
            k.bin(BinOp::Add, Ty::U32, sbar, Self::u(8 * stages * row))
        } else {
            sbar
        };
        let addr = k.mad(Ty::U32, s, Operand::U(8), base);
        let round = k.bin(BinOp::Div, Ty::U32, blk, Self::u(stages));
        let parity = k.bin(BinOp::And, Ty::U32, round, Operand::U(1));
        (addr, parity)
    }

    /// Ping-pong (round robin over the consumers): waits for the previous
    /// consumer warpgroup to have issued its products (`sync`), or lets
    /// the next one issue (`arrive`). Consumer `c` waits on barrier
    /// `1 + c` and arrives on `1 + (c + 1) % wgs`.
    pub(super) fn ping_pong(&mut self, cwg: Reg, arrive: bool) {
        if !self.cfg.ping_pong {
            return;
        }
        let wgs = self.cfg.wgs;
        let k = &mut self.k;
        let id = if arrive {
            let next = k.bin(BinOp::Add, Ty::U32, cwg, Operand::U(1));
            let next = k.bin(BinOp::Rem, Ty::U32, next, Self::u(wgs));
            k.bin(BinOp::Add, Ty::U32, next, Operand::U(1))
        } else {
            k.bin(BinOp::Add, Ty::U32, cwg, Operand::U(1))
        };
        k.push(Instr::NamedBarrier {
            arrive,
            id: id.into(),
            threads: 256,
        });
    }

    /// A consumer's arrival on the mbarrier at `addr` (giving back a stage
    /// or Q): every thread's, or with a releaser, its warpgroup leader's.
    pub(super) fn release(&mut self, addr: Reg) {
        let arrive = self.arrival(addr, None);
        match self.releaser {
            Some(leader) => self.k.guard(leader, false, arrive),
            None => self.k.push(arrive),
        }
    }

    /// An arrival on the mbarrier at `addr`, announcing `expect_tx` bytes
    /// to come if given (its state register is fresh and unread).
    fn arrival(&mut self, addr: Reg, expect_tx: Option<u32>) -> Instr {
        let state = self.k.reg(Ty::B64);
        Instr::MbarArrive {
            state,
            addr: addr.into(),
            expect_tx,
        }
    }

    /// `cp.async` producer: once all but the newest `pending` copy groups
    /// have landed, hands block `b - 1`'s stage to the consumers.
    fn hand_over(&mut self, sbar: Reg, b: Reg, pending: u32) {
        let k = &mut self.k;
        k.push(Instr::CpAsyncWait(pending));
        k.push(Instr::FenceProxyAsync);
        let prev = k.bin(BinOp::Sub, Ty::U32, b, Operand::U(1));
        let (full, _) = self.stage_barrier(sbar, prev, Bar::Full);
        let arrive = self.arrival(full, None);
        self.k.push(arrive);
    }

    /// Block `n` of the tile counted over the CTA's whole run (persistent),
    /// for its stage and barrier phase.
    pub(super) fn gblk(&mut self, n: Reg) -> Reg {
        match self.g0 {
            Some(g0) => self.k.bin(BinOp::Add, Ty::U32, n, g0),
            None => n,
        }
    }

    /// The consumer warpgroups' side of the warp-specialised kernel: Q,
    /// then per block wait for its stage, products in turns with the other
    /// consumer, softmax under the P·V, release of the stage.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn ws_consumer(
        &mut self,
        c: &Core,
        rpp: usize,
        q: (Reg, Reg, Reg, usize, Reg),
        sbar: Reg,
        cwg: Reg,
        n_blocks: Reg,
        k_desc0: Reg,
        v_desc0: Reg,
    ) {
        let cfg = self.cfg;
        let bn = cfg.block_n;
        let (q_src, q_pass, q_grow, q_rows, q_dst) = q;
        if !cfg.tma {
            self.load_tile(q_rows, rpp, q_src, q_pass, q_grow, c.seq_q, q_dst, None);
            let k = &mut self.k;
            k.push(Instr::CpAsyncCommit);
            k.push(Instr::CpAsyncWait(0));
            k.push(Instr::FenceProxyAsync);
            // (Barriers 1..=wgs are the ping-pong's.)
            k.push(Instr::BarSyncCount {
                id: 15,
                threads: (128 * cfg.wgs) as u32,
            });
        }
        let k = &mut self.k;
        let n = k.mov(Ty::U32, Operand::U(0));
        let j0 = k.mov(Ty::U32, Operand::U(0));
        let done = k.label("consumed");
        let none = k.setp(Cmp::Eq, Ty::U32, n_blocks, Operand::U(0));
        k.branch_if(none, false, &done);
        if cfg.tma {
            // Q's box lands on the barrier after the stages'.
            let q_bar = k.bin(BinOp::Add, Ty::U32, sbar, Self::u(24 * cfg.stages()));
            let parity = match self.q_phase {
                Some(ph) => k.bin(BinOp::And, Ty::U32, ph, Operand::U(1)),
                None => n,
            };
            self.mbar_wait(q_bar, parity);
        }
        let k = &mut self.k;
        // Consumer 0 goes first: the last consumer lets it.
        let is_last = k.setp(Cmp::Eq, Ty::U32, cwg, Self::u(cfg.wgs - 1));
        if cfg.ping_pong {
            k.guard(
                is_last,
                false,
                Instr::NamedBarrier {
                    arrive: true,
                    id: Operand::U(1),
                    threads: 256,
                },
            );
        }

        // Block 0: scores and softmax.
        let g = self.gblk(n);
        let (full, parity) = self.stage_barrier(sbar, g, Bar::Full);
        self.mbar_wait(full, parity);
        self.ping_pong(cwg, false);
        let k_first = match self.g0 {
            Some(_) => {
                let (_, at) = self.stage_of(g, 0);
                self.k.bin(BinOp::Add, Ty::U64, k_desc0, at)
            }
            None => k_desc0,
        };
        self.k.push(Instr::WgmmaFence);
        self.s_gemm(c, k_first);
        self.k.push(Instr::WgmmaCommit);
        self.ping_pong(cwg, true);
        self.k.push(Instr::WgmmaWait(0));
        let alpha = self.softmax(c, j0);
        self.rescale_and_pack(c, alpha);
        let tail = self.k.label("last_block");
        let single = self.k.setp(Cmp::Le, Ty::U32, n_blocks, Operand::U(1));
        self.k.branch_if(single, false, &tail);

        // Block n + 1's scores with block n's P·V.
        let loop_top = self.k.label("key_block");
        self.k.push(Instr::Label(loop_top.clone()));
        let n1 = self.k.bin(BinOp::Add, Ty::U32, n, Operand::U(1));
        let g1 = self.gblk(n1);
        let (full, parity) = self.stage_barrier(sbar, g1, Bar::Full);
        self.mbar_wait(full, parity);
        let g = self.gblk(n);
        if cfg.tma {
            let (full, parity) = self.stage_barrier(sbar, g, Bar::VFull);
            self.mbar_wait(full, parity);
        }
        self.ping_pong(cwg, false);
        let (_, cur) = self.stage_of(g, 0);
        let (_, next) = self.stage_of(g, 1);
        let k = &mut self.k;
        k.bin_to(BinOp::Add, Ty::U32, j0, j0, Self::u(bn));
        let k_desc = k.bin(BinOp::Add, Ty::U64, k_desc0, next);
        let v_desc = k.bin(BinOp::Add, Ty::U64, v_desc0, cur);
        k.push(Instr::WgmmaFence);
        self.s_gemm(c, k_desc);
        self.k.push(Instr::WgmmaCommit);
        self.pv_gemm(c, v_desc);
        self.k.push(Instr::WgmmaCommit);
        self.ping_pong(cwg, true);
        self.k.push(Instr::WgmmaWait(1));
        let alpha = self.softmax(c, j0);
        let k = &mut self.k;
        k.bin_to(BinOp::Add, Ty::U32, n, n, Operand::U(1));
        let n1 = k.bin(BinOp::Add, Ty::U32, n, Operand::U(1));
        let again = k.setp(Cmp::Lt, Ty::U32, n1, n_blocks);
        let leave = k.label("last_pack");
        k.branch_if(again, true, &leave);
        // (A basic block of its own: see the non-specialised loop.)
        for last in [false, true] {
            if last {
                self.k.push(Instr::Label(leave.clone()));
            }
            self.k.push(Instr::WgmmaWait(0));
            let prev = self.k.bin(BinOp::Sub, Ty::U32, n, Operand::U(1));
            let prev = self.gblk(prev);
            let (empty, _) = self.stage_barrier(sbar, prev, Bar::Empty);
            self.release(empty);
            self.rescale_and_pack(c, alpha);
            if !last {
                self.k.push(Instr::Bra {
                    target: loop_top.clone(),
                    uni: true,
                });
            }
        }

        // The last block's P·V.
        self.k.push(Instr::Label(tail));
        let g = self.gblk(n);
        if self.g0.is_some() {
            // Every Q·Kᵀ of the tile is done: Q's buffer may take the
            // next tile's.
            let k = &mut self.k;
            let q_empty = k.bin(
                BinOp::Add,
                Ty::U32,
                sbar,
                Self::u(8 * (3 * cfg.stages() + 1)),
            );
            self.release(q_empty);
        }
        if cfg.tma {
            let (full, parity) = self.stage_barrier(sbar, g, Bar::VFull);
            self.mbar_wait(full, parity);
        }
        self.ping_pong(cwg, false);
        let (_, cur) = self.stage_of(g, 0);
        let v_desc = self.k.bin(BinOp::Add, Ty::U64, v_desc0, cur);
        self.k.push(Instr::WgmmaFence);
        self.pv_gemm(c, v_desc);
        self.k.push(Instr::WgmmaCommit);
        // The last consumer has no one left to let go.
        if cfg.ping_pong {
            let k = &mut self.k;
            let next = k.bin(BinOp::Add, Ty::U32, cwg, Operand::U(2));
            k.guard(
                is_last,
                true,
                Instr::NamedBarrier {
                    arrive: true,
                    id: next.into(),
                    threads: 256,
                },
            );
        }
        self.k.push(Instr::WgmmaWait(0));
        if self.g0.is_some() {
            // The last block's stage goes back to the producer, who moves
            // on to the next tile.
            let (empty, _) = self.stage_barrier(sbar, g, Bar::Empty);
            self.release(empty);
        }
        self.k.push(Instr::Label(done));
    }

    /// The producer warpgroup's side: per block, wait until its stage is
    /// free, copy K and V into it, and once the previous block's copies
    /// have landed, hand that block's stage over.
    pub(super) fn ws_producer(&mut self, ld: &Loads, sbar: Reg, n_blocks: Reg, label: &str) {
        let stages = self.cfg.stages();
        let stride = 2 * self.cfg.kv_tile();
        let k = &mut self.k;
        k.push(Instr::Label(label.to_string()));
        k.push(Instr::SetMaxNReg {
            inc: false,
            regs: PRODUCER_REGS,
        });
        let none = k.setp(Cmp::Eq, Ty::U32, n_blocks, Operand::U(0));
        k.guard(none, false, Instr::Ret);
        let b = k.mov(Ty::U32, Operand::U(0));
        let top = k.label("produce");
        k.push(Instr::Label(top.clone()));
        let s = k.bin(BinOp::Rem, Ty::U32, b, Self::u(stages));
        let off = k.bin(BinOp::Mul, Ty::U32, s, Self::u(stride));
        // Block b reuses the stage of block b - stages.
        let reuse = k.setp(Cmp::Ge, Ty::U32, b, Self::u(stages));
        let free = k.label("stage_free");
        k.branch_if(reuse, true, &free);
        let old = k.bin(BinOp::Sub, Ty::U32, b, Self::u(stages));
        let (empty, parity) = self.stage_barrier(sbar, old, Bar::Empty);
        self.mbar_wait(empty, parity);
        self.k.push(Instr::Label(free));
        self.load_block(ld, off, None);
        let k = &mut self.k;
        let later = k.setp(Cmp::Ne, Ty::U32, b, Operand::U(0));
        let skip = k.label("first_block");
        k.branch_if(later, true, &skip);
        self.hand_over(sbar, b, 1);
        let k = &mut self.k;
        k.push(Instr::Label(skip));
        k.bin_to(BinOp::Add, Ty::U32, b, b, Operand::U(1));
        let again = k.setp(Cmp::Lt, Ty::U32, b, n_blocks);
        k.branch_if(again, false, &top);
        self.hand_over(sbar, b, 0);
        self.k.push(Instr::Ret);
    }

    /// Persistent: moves the tile registers of `t` to tile `idx`, the
    /// order of the non-persistent grid (query block fastest, then head,
    /// then batch; causal query blocks last first).
    pub(super) fn locate(&mut self, t: &Tiles, idx: Reg) {
        let cfg = self.cfg;
        let (bm, bn) = (cfg.block_m(), cfg.block_n);
        let k = &mut self.k;
        let x = k.bin(BinOp::Rem, Ty::U32, idx, t.nq);
        let rest = k.bin(BinOp::Div, Ty::U32, idx, t.nq);
        let head = k.bin(BinOp::Rem, Ty::U32, rest, t.heads);
        k.mov_to(Ty::U32, t.head, head);
        let batch = k.bin(BinOp::Div, Ty::U32, rest, t.heads);
        k.mov_to(Ty::U32, t.batch, batch);
        let qblock = if cfg.causal {
            let last = k.bin(BinOp::Sub, Ty::U32, t.nq, Operand::U(1));
            k.bin(BinOp::Sub, Ty::U32, last, x)
        } else {
            x
        };
        let q0 = k.bin(BinOp::Mul, Ty::U32, qblock, Self::u(bm));
        k.mov_to(Ty::U32, t.q0, q0);
        let kv_head = k.bin(BinOp::Div, Ty::U32, head, t.group);
        k.mov_to(Ty::U32, t.kv_head, kv_head);
        let key_end = if cfg.causal {
            let last = k.bin(BinOp::Add, Ty::U32, q0, Self::u(bm));
            k.bin(BinOp::Min, Ty::U32, last, t.seq_k)
        } else {
            t.seq_k
        };
        let n = k.bin(BinOp::Add, Ty::U32, key_end, Self::u(bn - 1));
        let n = k.bin(BinOp::Div, Ty::U32, n, Self::u(bn));
        k.mov_to(Ty::U32, t.n_blocks, n);
    }

    /// Persistent: the next tile of this CTA, and the loop back to `top`
    /// (which leaves once the tiles run out).
    pub(super) fn next_tile(&mut self, idx: Reg, top: &str) {
        let k = &mut self.k;
        let step = k.mov(Ty::U32, Operand::Special(Special::NCtaIdX));
        k.bin_to(BinOp::Add, Ty::U32, idx, idx, step);
        k.push(Instr::Bra {
            target: top.to_string(),
            uni: false,
        });
    }

    /// The TMA producer: warpgroup 0 gives its registers away and one
    /// thread of it issues every copy. Per tile, once Q's buffer is free,
    /// Q's box; then per block, once its stage is free, K's and V's
    /// panels, each tile completing its bytes on its own full barrier.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn tma_producer(
        &mut self,
        maps: &[Param],
        sbar: Reg,
        sq: Reg,
        sk0: Reg,
        tid: Reg,
        t: &Tiles,
        label: &str,
    ) {
        let cfg = self.cfg;
        let (stages, bn, bm) = (cfg.stages(), cfg.block_n, cfg.block_m());
        let panels = cfg.d_pad() / 64;
        let tile = cfg.kv_tile();
        let (q0, head, kv_head, batch, n_blocks) = (t.q0, t.head, t.kv_head, t.batch, t.n_blocks);
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
        // Persistent: this CTA's tile, tiles with keys so far, blocks so far.
        let (idx, done, g) = (
            k.mov(Ty::U32, Operand::Special(Special::CtaIdX)),
            k.mov(Ty::U32, Operand::U(0)),
            k.mov(Ty::U32, Operand::U(0)),
        );
        let tile_top = k.label("produce_tile");
        let next = k.label("next_tile");
        k.push(Instr::Label(tile_top.clone()));
        if cfg.persistent {
            let over = k.setp(Cmp::Ge, Ty::U32, idx, t.total);
            k.guard(over, false, Instr::Ret);
            self.locate(t, idx);
        }
        let k = &mut self.k;
        let none = k.setp(Cmp::Eq, Ty::U32, n_blocks, Operand::U(0));
        if cfg.persistent {
            k.branch_if(none, false, &next);
            // Q's buffer is free once the consumers are past the previous
            // tile's last Q·Kᵀ.
            let first = k.setp(Cmp::Eq, Ty::U32, done, Operand::U(0));
            let q_free = k.label("q_free");
            k.branch_if(first, false, &q_free);
            let q_empty = k.bin(BinOp::Add, Ty::U32, sbar, Self::u(8 * (3 * stages + 1)));
            let prev = k.bin(BinOp::Sub, Ty::U32, done, Operand::U(1));
            let parity = k.bin(BinOp::And, Ty::U32, prev, Operand::U(1));
            self.mbar_wait(q_empty, parity);
            self.k.push(Instr::Label(q_free));
        } else {
            k.guard(none, false, Instr::Ret);
        }
        // Q: one box of `bm` rows per panel.
        let k = &mut self.k;
        let q_bar = k.bin(BinOp::Add, Ty::U32, sbar, Self::u(24 * stages));
        let arrive = self.arrival(q_bar, Some((bm * cfg.d_pad() * 2) as u32));
        let k = &mut self.k;
        k.push(arrive);
        for p in 0..panels {
            let dst = k.bin(BinOp::Add, Ty::U32, sq, Self::u(p * bm * 128));
            k.push(Instr::TmaLoad {
                dst,
                map: map[0],
                coords: vec![Self::u(64 * p), q0.into(), head.into(), batch.into()],
                mbar: q_bar,
            });
        }
        let b = k.mov(Ty::U32, Operand::U(0));
        let key = k.mov(Ty::U32, Operand::U(0));
        let top = k.label("produce");
        k.push(Instr::Label(top.clone()));
        // Blocks count over the CTA's run for their stage and phase.
        let gb = k.bin(BinOp::Add, Ty::U32, b, g);
        let s = k.bin(BinOp::Rem, Ty::U32, gb, Self::u(stages));
        let off = k.bin(BinOp::Mul, Ty::U32, s, Self::u(2 * tile));
        let k_dst = k.bin(BinOp::Add, Ty::U32, sk0, off);
        // Block gb reuses the stage of block gb - stages.
        let reuse = k.setp(Cmp::Ge, Ty::U32, gb, Self::u(stages));
        let free = k.label("stage_free");
        k.branch_if(reuse, true, &free);
        let old = k.bin(BinOp::Sub, Ty::U32, gb, Self::u(stages));
        let (empty, parity) = self.stage_barrier(sbar, old, Bar::Empty);
        self.mbar_wait(empty, parity);
        self.k.push(Instr::Label(free));
        for (which, bar, m) in [(0, Bar::Full, map[1]), (1, Bar::VFull, map[2])] {
            let (full, _) = self.stage_barrier(sbar, gb, bar);
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
                    coords: vec![Self::u(64 * p), key.into(), kv_head.into(), batch.into()],
                    mbar: full,
                });
            }
        }
        let k = &mut self.k;
        k.bin_to(BinOp::Add, Ty::U32, b, b, Operand::U(1));
        k.bin_to(BinOp::Add, Ty::U32, key, key, Self::u(bn));
        let again = k.setp(Cmp::Lt, Ty::U32, b, n_blocks);
        k.branch_if(again, false, &top);
        if cfg.persistent {
            k.bin_to(BinOp::Add, Ty::U32, g, g, n_blocks);
            k.bin_to(BinOp::Add, Ty::U32, done, done, Operand::U(1));
            k.push(Instr::Label(next));
            self.next_tile(idx, &tile_top);
        } else {
            k.push(Instr::Ret);
        }
    }
}

/// Persistent kernels: the tile count and the registers that say where the
/// current tile lies, which [`Emitter::locate`] moves from tile to tile.
pub(super) struct Tiles {
    /// Tiles in all: `nq · heads · batch`.
    pub(super) total: Reg,
    /// Query blocks per (head, batch).
    pub(super) nq: Reg,
    pub(super) heads: Reg,
    pub(super) group: Reg,
    pub(super) seq_k: Reg,
    pub(super) head: Reg,
    pub(super) batch: Reg,
    pub(super) q0: Reg,
    pub(super) kv_head: Reg,
    pub(super) n_blocks: Reg,
}

/// Which mbarrier of a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Bar {
    /// K and V have landed (with TMA: K has).
    Full,
    /// With TMA: V has landed.
    VFull,
    /// Every consumer is done with the stage.
    Empty,
}

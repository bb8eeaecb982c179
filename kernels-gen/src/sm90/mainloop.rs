//! The consumer warpgroups' mainloop: wait for Q, then per key block wait
//! for its stage, issue block `n + 1`'s `Q·Kᵀ` together with block `n`'s
//! `P·V`, run the softmax of `n + 1` under the `P·V`, and give block `n`'s
//! stage back to the producer.

use super::barriers::Bar;
use super::emitter::{Core, Emitter};
use crate::ptx::{BinOp, Cmp, Instr, Operand, Reg, Ty};

/// Where a consumer's mainloop reads from.
#[derive(Clone, Copy, Debug)]
pub(super) struct Operands {
    /// The first mbarrier ([`super::barriers`]).
    pub(super) sbar: Reg,
    /// The descriptor of stage 0's K tile.
    pub(super) k_desc0: Reg,
    /// The descriptor of stage 0's V tile.
    pub(super) v_desc0: Reg,
    /// The tile's key blocks.
    pub(super) n_blocks: Reg,
}

impl Emitter {
    /// A consumer's loop over the tile's key blocks, leaving `O` and the
    /// row sums in `c` for the epilogue.
    pub(super) fn mainloop(&mut self, c: &Core, ops: &Operands) {
        let Operands {
            sbar,
            k_desc0,
            v_desc0,
            n_blocks,
        } = *ops;
        let bn = self.cfg.block_n();
        let k = &mut self.k;
        let n = k.mov(Ty::U32, Operand::U(0));
        let j0 = k.mov(Ty::U32, Operand::U(0));
        let done = k.label("consumed");
        let none = k.setp(Cmp::Eq, Ty::U32, n_blocks, Operand::U(0));
        k.branch_if(none, false, &done);
        // Q's box (its phase: the tile, 0).
        let q_bar = self.q_full(sbar);
        self.mbar_wait(q_bar, n);

        // Block 0: scores and softmax.
        self.wait_stage(sbar, n, Bar::Full);
        self.k.push(Instr::WgmmaFence);
        self.s_gemm(c, k_desc0);
        self.k.push(Instr::WgmmaCommit);
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
        self.wait_stage(sbar, n1, Bar::Full);
        self.wait_stage(sbar, n, Bar::VFull);
        let cur = self.stage_of(n, 0);
        let next = self.stage_of(n, 1);
        let k = &mut self.k;
        k.bin_to(BinOp::Add, Ty::U32, j0, j0, Self::u(bn));
        let k_desc = k.bin(BinOp::Add, Ty::U64, k_desc0, next);
        let v_desc = k.bin(BinOp::Add, Ty::U64, v_desc0, cur);
        k.push(Instr::WgmmaFence);
        self.s_gemm(c, k_desc);
        self.k.push(Instr::WgmmaCommit);
        self.pv_gemm(c, v_desc);
        self.k.push(Instr::WgmmaCommit);
        self.k.push(Instr::WgmmaWait(1));
        let alpha = self.softmax(c, j0);
        let k = &mut self.k;
        k.bin_to(BinOp::Add, Ty::U32, n, n, Operand::U(1));
        let n1 = k.bin(BinOp::Add, Ty::U32, n, Operand::U(1));
        let again = k.setp(Cmp::Lt, Ty::U32, n1, n_blocks);
        let leave = k.label("last_pack");
        k.branch_if(again, true, &leave);
        // The wait for P·V starts a basic block of its own: ptxas hoists a
        // `wgmma.wait_group` to the top of its block, which would put it
        // before the softmax it is meant to overlap.
        for last in [false, true] {
            if last {
                self.k.push(Instr::Label(leave.clone()));
            }
            self.k.push(Instr::WgmmaWait(0));
            let prev = self.k.bin(BinOp::Sub, Ty::U32, n, Operand::U(1));
            let empty = self.stage_barrier(sbar, prev, Bar::Empty);
            let release = self.arrival(empty, None);
            self.k.push(release);
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
        self.wait_stage(sbar, n, Bar::VFull);
        let cur = self.stage_of(n, 0);
        let v_desc = self.k.bin(BinOp::Add, Ty::U64, v_desc0, cur);
        self.k.push(Instr::WgmmaFence);
        self.pv_gemm(c, v_desc);
        self.k.push(Instr::WgmmaCommit);
        self.k.push(Instr::WgmmaWait(0));
        self.k.push(Instr::Label(done));
    }
}

//! The output: `O / sum` rounded to the element type and stored, straight
//! from the accumulators or staged through shared memory.

use super::{Core, Emitter};
use crate::attention::store::store_scaled_pairs;
use crate::ptx::{Addr, BinOp, Cmp, Instr, Operand, Reg, StateSpace, Ty, UnOp};

impl Emitter {
    /// `1 / sum` of a row from this thread's part `l` of it (summed over
    /// the quad), or 0 where the row saw no key.
    fn inverse_sum(&mut self, l: Reg) -> Reg {
        let sum = self.quad_reduce(l, BinOp::Add);
        let k = &mut self.k;
        let empty = k.setp(Cmp::Eq, Ty::F32, sum, Operand::F32(0.0));
        let inv = k.un(UnOp::Rcp, Ty::F32, sum);
        k.selp_to(Ty::F32, inv, Operand::F32(0.0), inv, empty);
        inv
    }

    /// Writes `O / sum` of this thread's rows (rows that saw no key are 0),
    /// and returns with `ret`.
    pub(super) fn epilogue(&mut self, c: &Core, out: &Output, ret: bool) {
        let Output {
            tq,
            row0,
            seq_q,
            o_base,
            o_stride,
        } = *out;
        let n_tiles_o = self.cfg.d / 8;
        // ---- epilogue: O / sum, rows that saw no key are 0 ----
        let packed = self.cfg.packed();
        if let Some(st) = self.staging {
            self.staged_epilogue(c, out, st);
            if ret {
                self.k.push(Instr::Ret);
            }
            return;
        }
        let k = &mut self.k;
        let tq4 = k.bin(BinOp::Shl, Ty::U32, tq, Operand::U(2));
        let tq4 = k.cvt(None, Ty::U64, Ty::U32, tq4);
        for (r, &l) in c.l_run.iter().enumerate() {
            let inv = self.inverse_sum(l);
            let k = &mut self.k;
            let row = k.bin(BinOp::Add, Ty::U32, row0, Self::u(8 * r));
            let inside = k.setp(Cmp::Lt, Ty::U32, row, seq_q);
            let r64 = k.cvt(None, Ty::U64, Ty::U32, row);
            let addr = k.mad(Ty::U64, r64, o_stride, o_base);
            let addr = k.bin(BinOp::Add, Ty::U64, addr, tq4);
            let pairs =
                (0..n_tiles_o).map(|t| (c.o_acc[4 * t + 2 * r], c.o_acc[4 * t + 2 * r + 1]));
            store_scaled_pairs(k, pairs, inv, addr, inside, packed);
        }
        if ret {
            self.k.push(Instr::Ret);
        }
    }

    /// The staged epilogue: `O / sum` rounded into the warpgroup's rows of
    /// Q's tile (128-byte swizzled, as Q was), then row-contiguous 16-byte
    /// stores of rows inside the sequence.
    fn staged_epilogue(&mut self, c: &Core, out: &Output, st: Staging) {
        let Output {
            tq,
            row0,
            seq_q,
            o_base,
            o_stride,
        } = *out;
        let cfg = self.cfg;
        let (d, bm) = (cfg.d, cfg.block_m());
        let packed = cfg.packed();
        let k = &mut self.k;
        // This thread's rows in the warpgroup: lr and lr + 8 (lr % 8 = g).
        let lr = k.bin(BinOp::Sub, Ty::U32, row0, st.row_base);
        let sw = k.bin(BinOp::And, Ty::U32, lr, Operand::U(7));
        let tq4 = k.bin(BinOp::Shl, Ty::U32, tq, Operand::U(2));
        for (r, &l) in c.l_run.iter().enumerate() {
            let inv = self.inverse_sum(l);
            let k = &mut self.k;
            let row = k.bin(BinOp::Add, Ty::U32, lr, Self::u(8 * r));
            let row_at = k.mad(Ty::U32, row, Operand::U(128), st.smem);
            let row_at = k.bin(BinOp::Add, Ty::U32, row_at, tq4);
            // Chunk cc of the row sits at chunk cc ^ (row % 8).
            let chunk_at: Vec<Reg> = (0..8)
                .map(|cc| {
                    let x = k.bin(BinOp::Xor, Ty::U32, sw, Self::u(cc));
                    let x = k.bin(BinOp::Shl, Ty::U32, x, Operand::U(4));
                    k.bin(BinOp::Add, Ty::U32, row_at, x)
                })
                .collect();
            for t in 0..d / 8 {
                let x0 = k.bin(BinOp::Mul, Ty::F32, c.o_acc[4 * t + 2 * r], inv);
                let x1 = k.bin(BinOp::Mul, Ty::F32, c.o_acc[4 * t + 2 * r + 1], inv);
                let pk = k.reg(Ty::B32);
                k.push(Instr::CvtPack {
                    ty: packed,
                    dst: pk,
                    hi: x1,
                    lo: x0,
                });
                k.push(Instr::St {
                    space: StateSpace::Shared,
                    ty: Ty::B32,
                    addr: Addr::at(chunk_at[t % 8], ((t / 8) * bm * 128) as i64),
                    src: vec![pk],
                });
            }
        }
        let k = &mut self.k;
        k.push(Instr::NamedBarrier {
            arrive: false,
            id: st.bar.into(),
            threads: 128,
        });
        let chunks = d / 8;
        for j in 0..64 * chunks / 128 {
            let idx = k.bin(BinOp::Add, Ty::U32, st.ltid, Self::u(128 * j));
            let row = k.bin(BinOp::Div, Ty::U32, idx, Self::u(chunks));
            let ch = k.bin(BinOp::Rem, Ty::U32, idx, Self::u(chunks));
            let panel = k.bin(BinOp::Shr, Ty::U32, ch, Operand::U(3));
            let cc = k.bin(BinOp::And, Ty::U32, ch, Operand::U(7));
            let r8 = k.bin(BinOp::And, Ty::U32, row, Operand::U(7));
            let x = k.bin(BinOp::Xor, Ty::U32, cc, r8);
            let x = k.bin(BinOp::Shl, Ty::U32, x, Operand::U(4));
            let at = k.mad(Ty::U32, panel, Self::u(bm * 128), st.smem);
            let at = k.mad(Ty::U32, row, Operand::U(128), at);
            let at = k.bin(BinOp::Add, Ty::U32, at, x);
            let v = k.regs(Ty::B32, 4);
            k.push(Instr::Ld {
                space: StateSpace::Shared,
                ty: Ty::B32,
                dst: v.clone(),
                addr: at.into(),
            });
            let grow = k.bin(BinOp::Add, Ty::U32, st.row_base, row);
            let inside = k.setp(Cmp::Lt, Ty::U32, grow, seq_q);
            let g64 = k.cvt(None, Ty::U64, Ty::U32, grow);
            let addr = k.mad(Ty::U64, g64, o_stride, o_base);
            let ch16 = k.bin(BinOp::Shl, Ty::U32, ch, Operand::U(4));
            let ch16 = k.cvt(None, Ty::U64, Ty::U32, ch16);
            let addr = k.bin(BinOp::Add, Ty::U64, addr, ch16);
            k.guard(
                inside,
                false,
                Instr::St {
                    space: StateSpace::Global,
                    ty: Ty::B32,
                    addr: addr.into(),
                    src: v,
                },
            );
        }
    }
}

/// A consumer warpgroup's output staging ([`super::Sm90Config::staged_store`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Staging {
    /// Shared address of the warpgroup's first row in Q's first panel.
    pub(super) smem: Reg,
    /// The warpgroup's first query row.
    pub(super) row_base: Reg,
    /// The thread's index in its warpgroup.
    pub(super) ltid: Reg,
    /// The warpgroup's named barrier.
    pub(super) bar: Reg,
}

/// Where a thread's output rows go.
#[derive(Clone, Copy, Debug)]
pub(super) struct Output {
    /// `lane % 4`: the thread's column pair in each n8 slice.
    pub(super) tq: Reg,
    /// The thread's first query row (the other is 8 below).
    pub(super) row0: Reg,
    /// `Sq`: rows at or past it are not stored.
    pub(super) seq_q: Reg,
    /// The byte address of the (batch, head)'s token 0.
    pub(super) o_base: Reg,
    /// The byte stride between tokens.
    pub(super) o_stride: Reg,
}

//! The epilogue: `O / sum` rounded to the element type and stored
//! straight from the accumulators.

use super::emitter::{Core, Emitter};
use crate::attention::store::store_scaled_pairs;
use crate::ptx::{BinOp, Cmp, Operand, Reg, Ty, UnOp};

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

    /// Writes `O / sum` of this thread's rows (rows that saw no key are 0)
    /// from the accumulators, 4 bytes a store. (Staging the rows through
    /// shared memory for 16-byte stores measured slower, `docs/hopper.md`.)
    pub(super) fn epilogue(&mut self, c: &Core, out: &Output) {
        let Output {
            tq,
            row0,
            seq_q,
            o_base,
            o_stride,
        } = *out;
        let n_tiles_o = self.cfg.head_size() / 8;
        let packed = self.cfg.packed();
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
    }
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

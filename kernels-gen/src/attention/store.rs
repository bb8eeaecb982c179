//! The output: a row's inverse sum (zero for rows that saw no key), and the
//! accumulators times it, rounded to the variant's 16-bit type and stored.

use super::layout::AccFragment;
use super::softmax::{pack, quad_reduce};
use crate::ptx::{Addr, BinOp, Cmp, Instr, Kernel, Operand, Reg, StateSpace, Ty, UnOp};

/// `(lo · inv, hi · inv)` rounded to the packed 16-bit pair type `packed`,
/// in a fresh 32-bit register: one output pair, ready to store.
pub fn pack_scaled(k: &mut Kernel, lo: Reg, hi: Reg, inv: Reg, packed: Ty) -> Reg {
    let x0 = k.bin(BinOp::Mul, Ty::F32, lo, inv);
    let x1 = k.bin(BinOp::Mul, Ty::F32, hi, inv);
    let pk = k.reg(Ty::B32);
    pack(k, packed, pk, x0, x1);
    pk
}

/// Stores one output row fragment: each `(lo, hi)` pair of f32 accumulators
/// times `inv`, rounded to the 16-bit `packed` type, as one 32-bit store at
/// `addr + 16·t` for the `t`-th pair, where the row is `inside` the
/// sequence. The epilogue of the tensor-core emitters.
pub fn store_scaled_pairs(
    k: &mut Kernel,
    pairs: impl IntoIterator<Item = (Reg, Reg)>,
    inv: Reg,
    addr: Reg,
    inside: Reg,
    packed: Ty,
) {
    for (t, (lo, hi)) in pairs.into_iter().enumerate() {
        let pk = pack_scaled(k, lo, hi, inv, packed);
        k.guard(
            inside,
            false,
            Instr::St {
                space: StateSpace::Global,
                ty: Ty::B32,
                addr: Addr::at(addr, (t * 16) as i64),
                src: vec![pk],
            },
        );
    }
}

/// `(empty, 1 / sum)`: whether a row's sum is exactly 0 (it saw no key,
/// or every key was hidden), and the sum's reciprocal.
pub fn row_inverse(k: &mut Kernel, sum: Reg) -> (Reg, Reg) {
    let empty = k.setp(Cmp::Eq, Ty::F32, sum, Operand::F32(0.0));
    let inv = k.un(UnOp::Rcp, Ty::F32, sum);
    (empty, inv)
}

/// `1 / sum`, or 0 where the row saw no key: its output is written as
/// zeros.
pub fn inverse_or_zero(k: &mut Kernel, sum: Reg) -> Reg {
    let (empty, inv) = row_inverse(k, sum);
    k.selp_to(Ty::F32, inv, Operand::F32(0.0), inv, empty);
    inv
}

/// Where a CTA's output rows go, for [`store_output`].
#[derive(Clone, Copy, Debug)]
pub struct OutputRows {
    /// The thread's first query row (row slot 0 of its fragment).
    pub row0: Reg,
    /// `lane % 4`: the thread's column pair within each n8 tile.
    pub tq: Reg,
    /// `Sq`: rows at or past it are not stored.
    pub seq_q: Reg,
    /// The byte address of the output's row 0 of this (batch, head).
    pub base: Reg,
    /// The output's token stride, in bytes.
    pub stride: Reg,
}

/// The epilogue of the tensor-core kernels: each row slot's sum `l_run[r]`
/// completed across the quad, its [`inverse_or_zero`], and the row of the
/// output fragment `o` times it stored as 16-bit pairs
/// ([`store_scaled_pairs`]) where the row is inside `Sq`.
pub fn store_output(k: &mut Kernel, o: &AccFragment, l_run: &[Reg], out: &OutputRows, packed: Ty) {
    let tq4 = k.bin(BinOp::Shl, Ty::U32, out.tq, Operand::U(2));
    let tq4 = k.cvt(None, Ty::U64, Ty::U32, tq4);
    for (r, &l) in l_run.iter().enumerate() {
        let sum = quad_reduce(k, l, BinOp::Add);
        let inv = inverse_or_zero(k, sum);
        let offset = Operand::U(AccFragment::row_offset(r) as u64);
        let row = k.bin(BinOp::Add, Ty::U32, out.row0, offset);
        let inside = k.setp(Cmp::Lt, Ty::U32, row, out.seq_q);
        let r64 = k.cvt(None, Ty::U64, Ty::U32, row);
        let addr = k.mad(Ty::U64, r64, out.stride, out.base);
        let addr = k.bin(BinOp::Add, Ty::U64, addr, tq4);
        let pairs: Vec<(Reg, Reg)> = o.row(r).chunks(2).map(|p| (p[0], p[1])).collect();
        store_scaled_pairs(k, pairs, inv, addr, inside, packed);
    }
}

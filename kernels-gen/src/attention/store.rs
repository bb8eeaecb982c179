//! The output: a row's inverse sum (zero for rows that saw no key), and the
//! accumulators times it, rounded to the variant's 16-bit type and stored.

use super::softmax::pack;
use crate::ptx::{Addr, BinOp, Cmp, Instr, Kernel, Operand, Reg, StateSpace, Ty, UnOp};

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
        let x0 = k.bin(BinOp::Mul, Ty::F32, lo, inv);
        let x1 = k.bin(BinOp::Mul, Ty::F32, hi, inv);
        let pk = k.reg(Ty::B32);
        pack(k, packed, pk, x0, x1);
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

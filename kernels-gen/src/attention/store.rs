//! The output stores: accumulators times a row's inverse sum, rounded to
//! the variant's 16-bit type.

use crate::ptx::{Addr, BinOp, Instr, Kernel, Reg, StateSpace, Ty};

/// Stores one output row fragment: each `(lo, hi)` pair of f32 accumulators
/// times `inv`, rounded to the 16-bit `packed` type, as one 32-bit store at
/// `addr + 16·t` for the `t`-th pair, where the row is `inside` the
/// sequence. The epilogue of both tensor-core emitters.
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
        k.push(Instr::CvtPack {
            ty: packed,
            dst: pk,
            hi: x1,
            lo: x0,
        });
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

//! The online softmax: reductions along a row (within a thread and across
//! the quad of a fragment row), the running max update with its rescale
//! factor, the weights `ex2(s − shift)`, and `P` packed to 16 bits.

use super::layout::AccFragment;
use crate::ptx::{BinOp, Cmp, Instr, Kernel, Operand, Reg, Ty, UnOp};

/// Reduces `x` over the four lanes of a quad (the threads that share a
/// fragment row) with `op`: two `shfl.sync.bfly` steps.
pub fn quad_reduce(k: &mut Kernel, x: Reg, op: BinOp) -> Reg {
    let mut acc = x;
    for mask in [1, 2] {
        let other = k.reg(Ty::F32);
        k.push(Instr::ShflBfly {
            dst: other,
            src: acc,
            lane_mask: mask,
        });
        acc = k.bin(op, Ty::F32, acc, other);
    }
    acc
}

/// Reduces `xs` with `op` in one chain starting from a fresh register
/// holding `init`.
pub fn reduce_chain(k: &mut Kernel, init: Operand, xs: &[Reg], op: BinOp) -> Reg {
    let mut acc = k.mov(Ty::F32, init);
    for &x in xs {
        acc = k.bin(op, Ty::F32, acc, x);
    }
    acc
}

/// Reduces `xs` (at least one) with `op` through four independent chains
/// joined at the end, so that the chains' latencies overlap.
pub fn reduce_tree4(k: &mut Kernel, xs: &[Reg], op: BinOp) -> Reg {
    let mut acc: Vec<Reg> = xs.iter().take(4).copied().collect();
    for (i, &x) in xs.iter().enumerate().skip(4) {
        acc[i % 4] = k.bin(op, Ty::F32, acc[i % 4], x);
    }
    while acc.len() > 1 {
        let b = acc.pop().expect("two or more");
        let a = acc.pop().expect("two or more");
        acc.insert(0, k.bin(op, Ty::F32, a, b));
    }
    acc[0]
}

/// Reduces `xs` (at least one) with `op` as a balanced tree of adjacent
/// pairs, level by level (an odd element out passes up unchanged).
pub fn reduce_pairwise(k: &mut Kernel, xs: &[Reg], op: BinOp) -> Reg {
    let mut level = xs.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|p| {
                if p.len() == 2 {
                    k.bin(op, Ty::F32, p[0], p[1])
                } else {
                    p[0]
                }
            })
            .collect();
    }
    level[0]
}

/// The online max update of one row: `m_new = max(m_old, block_max)`
/// (written back into `m_old`) and the row's shift and rescale factor,
/// returned as `(shift, alpha)`.
///
/// The shift is `m_new`, or 0 while the row has seen only hidden keys (max
/// `-inf`): that keeps `ex2(-inf - -inf)` = NaN out and makes every hidden
/// weight exactly 0. `alpha = ex2(m_old − shift)` rescales the row's
/// running sum and output.
pub fn update_max(k: &mut Kernel, m_old: Reg, block_max: Reg) -> (Reg, Reg) {
    let neg_inf = Operand::F32(f32::NEG_INFINITY);
    let m_new = k.bin(BinOp::Max, Ty::F32, m_old, block_max);
    let none = k.setp(Cmp::Eq, Ty::F32, m_new, neg_inf);
    let shift = k.selp(Ty::F32, Operand::F32(0.0), m_new, none);
    let diff = k.bin(BinOp::Sub, Ty::F32, m_old, shift);
    let alpha = k.un(UnOp::Ex2, Ty::F32, diff);
    k.mov_to(Ty::F32, m_old, m_new);
    (shift, alpha)
}

/// `s = ex2(s − shift)`: a score becomes its unnormalised weight.
pub fn exp2_shifted(k: &mut Kernel, s: Reg, shift: Reg) {
    let x = k.bin(BinOp::Sub, Ty::F32, s, shift);
    k.un_to(UnOp::Ex2, Ty::F32, s, x);
}

/// `s = ex2(s · factor − shift)`, given `neg_shift = −shift`: the weight
/// of a score not yet scaled (one FMA).
pub fn exp2_scaled(k: &mut Kernel, s: Reg, factor: Reg, neg_shift: Reg) {
    let x = k.mad(Ty::F32, s, factor, neg_shift);
    k.un_to(UnOp::Ex2, Ty::F32, s, x);
}

/// The weights of a fragment ([`exp2_shifted`] by its row slot's `shift`)
/// and their sums per row slot, accumulated as the weights are made.
pub fn exp2_with_row_sums(k: &mut Kernel, acc: &AccFragment, shift: &[Reg]) -> Vec<Reg> {
    let mut sums: Vec<Reg> = (0..acc.rows())
        .map(|_| k.mov(Ty::F32, Operand::F32(0.0)))
        .collect();
    for (r, _, s) in acc.elems() {
        exp2_shifted(k, s, shift[r]);
        sums[r] = k.bin(BinOp::Add, Ty::F32, sums[r], s);
    }
    sums
}

/// `l = l · alpha + block_sum`: the running sum of a row moves on.
pub fn update_sum(k: &mut Kernel, l: Reg, alpha: Reg, block_sum: Reg) {
    k.mad_to(Ty::F32, l, l, alpha, block_sum);
}

/// `x *= by` for each of `xs`.
pub fn scale(k: &mut Kernel, xs: impl IntoIterator<Item = Reg>, by: Reg) {
    for x in xs {
        k.bin_to(BinOp::Mul, Ty::F32, x, x, by);
    }
}

/// Each register of a fragment times its row slot's factor: the output's
/// rescale by `alpha`.
pub fn scale_rows(k: &mut Kernel, acc: &AccFragment, by: &[Reg]) {
    for (r, _, x) in acc.elems() {
        k.bin_to(BinOp::Mul, Ty::F32, x, x, by[r]);
    }
}

/// `dst = (hi, lo)` rounded to the packed 16-bit pair type `packed`.
pub fn pack(k: &mut Kernel, packed: Ty, dst: Reg, lo: Reg, hi: Reg) {
    k.push(Instr::CvtPack {
        ty: packed,
        dst,
        hi,
        lo,
    });
}

/// The weights of two adjacent n-tiles (`lo`, `hi`: four registers each)
/// packed into the four registers of an m16n8k16 A fragment, `dst`: the
/// accumulator layout of two n8 tiles is exactly an A fragment's.
pub fn pack_a_fragment(k: &mut Kernel, packed: Ty, lo: &[Reg], hi: &[Reg], dst: &[Reg]) {
    for (&d, (h, l)) in dst.iter().zip([
        (lo[1], lo[0]),
        (lo[3], lo[2]),
        (hi[1], hi[0]),
        (hi[3], hi[2]),
    ]) {
        pack(k, packed, d, l, h);
    }
}

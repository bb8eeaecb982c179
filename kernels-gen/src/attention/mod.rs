//! The attention rules every GPU emitter shares, written once: which
//! tokens of a batch entry are its queries and keys ([`seqs`],
//! [`sequence_of`]), the mask bias and the hiding of keys that do not
//! exist for a row ([`mask`]), the
//! online-softmax row update and the reductions along a row, within a
//! thread and across the quad of a fragment row ([`softmax`]), and the
//! rows' inverse sums, scaled 16-bit output stores and log-sum-exp
//! ([`store`]).
//!
//! The tensor-core kernels hand their score and output accumulators over
//! as an [`AccFragment`] (which query rows and key columns a thread's
//! registers hold: the C-fragment layout that `mma.sync` m16n8 and `wgmma`
//! m64nN share), so one [`mask::mask_fragment`], [`softmax::scale_rows`]
//! or [`store::store_output`] serves the sm_80 and the sm_90a main loops.
//! The CUDA-core kernel, whose lanes hold whole score rows, uses the
//! element-wise pieces ([`mask::add_bias`], [`mask::hide_unless`],
//! [`softmax::update_max`], [`store::row_inverse`], ...).
//!
//! Every piece emits exactly the instructions, in the order, the kernels
//! wrote themselves before (the PTX snapshot of every variant is
//! byte-identical); where kernels differ in order or form, the piece takes
//! a parameter or comes in variants (the row reductions
//! [`softmax::reduce_chain`], [`softmax::reduce_tree4`],
//! [`softmax::reduce_pairwise`]).

pub mod layout;
pub mod mask;
pub mod seqs;
pub mod softmax;
pub mod store;

pub use layout::AccFragment;

use crate::contract::Args;
use crate::ptx::{Kernel, Reg};
use seqs::{sequence, token_offset, Sequence, Side};

/// Which side of the attention a sequence is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqSide {
    /// The query rows: `q_start`, `q_end`, `tokens_q`, `Sq`.
    Queries,
    /// The keys (and values): `k_start`, `k_end`, `tokens_k`, `Sk`.
    Keys,
}

/// `base + start · stride` (`u64` address and token stride, in the same
/// unit, and a `u32` token): where a sequence's local row 0 lives, token
/// `start` ([`seqs::token_offset`]).
pub fn at_token(k: &mut Kernel, base: Reg, start: Reg, stride: Reg) -> Reg {
    let off = token_offset(k, start, stride);
    k.bin(crate::ptx::BinOp::Add, crate::ptx::Ty::U64, base, off)
}

/// Batch entry `batch`'s sequence on `side`, from the contract's
/// arguments `a` ([`seqs::sequence`]): without sequence bounds, start 0
/// and length `Sq` or `Sk`.
pub fn sequence_of(k: &mut Kernel, a: &Args, batch: Reg, side: SeqSide) -> Sequence {
    let (i, bound) = match side {
        SeqSide::Queries => (0, a.seq_q),
        SeqSide::Keys => (1, a.seq_k),
    };
    let side = Side {
        starts: a.seq_bounds[2 * i],
        ends: a.seq_bounds[2 * i + 1],
        tokens: a.tokens[i],
        bound,
    };
    sequence(k, side, batch)
}

#[cfg(test)]
mod tests {
    use super::mask::{block_needs_mask, mask_fragment, FragmentMask, MaskKind};
    use super::softmax::{quad_reduce, reduce_pairwise, reduce_tree4, update_max};
    use super::*;
    use crate::ptx::{BinOp, Kernel, Module, Reg, Target, Ty};

    fn body(k: Kernel) -> Vec<String> {
        let text = Module::new(Target::Sm80).kernel(k).to_string();
        let start = text.find('{').expect("a body");
        text[start..]
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with(".reg") && !l.starts_with('{'))
            .filter(|l| *l != "}")
            .map(String::from)
            .collect()
    }

    #[test]
    fn the_row_update_shifts_by_zero_while_the_row_is_hidden() {
        let mut k = Kernel::new("t");
        let (m_old, block_max) = (k.reg(Ty::F32), k.reg(Ty::F32));
        let (shift, alpha) = update_max(&mut k, m_old, block_max);
        assert_eq!(
            (shift.to_string(), alpha.to_string()),
            ("%f3".into(), "%f5".into())
        );
        assert_eq!(
            body(k),
            [
                "max.f32 %f2, %f0, %f1;",
                "setp.eq.f32 %p0, %f2, 0fFF800000;",
                "selp.f32 %f3, 0f00000000, %f2, %p0;",
                "sub.f32 %f4, %f0, %f3;",
                "ex2.approx.ftz.f32 %f5, %f4;",
                "mov.f32 %f0, %f2;",
            ]
        );
    }

    #[test]
    fn reductions_take_one_instruction_per_joined_pair() {
        for n in 1..=9 {
            let mut k = Kernel::new("t");
            let xs = k.regs(Ty::F32, n);
            reduce_tree4(&mut k, &xs, BinOp::Max);
            reduce_pairwise(&mut k, &xs, BinOp::Add);
            assert_eq!(body(k).len(), 2 * (n - 1), "n={n}");
        }
        let mut k = Kernel::new("t");
        let x = k.reg(Ty::F32);
        quad_reduce(&mut k, x, BinOp::Add);
        let b = body(k);
        assert!(b[0].starts_with("shfl.sync.bfly.b32") && b[0].contains(", 1, 31,"));
        assert!(b[2].starts_with("shfl.sync.bfly.b32") && b[2].contains(", 2, 31,"));
    }

    #[test]
    fn fragment_masking_visits_every_element_of_both_rows() {
        let mut k = Kernel::new("t");
        let regs: Vec<Vec<Reg>> = vec![k.regs(Ty::F32, 8)];
        let acc = AccFragment::new(&regs);
        let u32s: Vec<Reg> = k.regs(Ty::U32, 7);
        let u64s: Vec<Reg> = k.regs(Ty::U64, 3);
        let has_mask = k.reg(Ty::Pred);
        let m = FragmentMask {
            row0: u32s[0],
            tq2: u32s[1],
            seq_q: u32s[2],
            seq_k: u32s[3],
            has_mask,
            mask: u64s[0],
            mask_head: u64s[1],
            mask_stride_q: u64s[2],
            kind: u32s[5],
            pad: u32s[6],
            causal: true,
        };
        let need = block_needs_mask(&mut k, u32s[4], 64, m.seq_k, has_mask, None, Some(m.row0));
        mask_fragment(&mut k, &acc, &m, u32s[4]);
        let b = body(k);
        let count = |p: &str| b.iter().filter(|l| l.contains(p)).count();
        assert!(need.to_string().starts_with("%p"));
        // One guarded bias load per score and element kind (two for an
        // i64: its high half where its low half is zero), and one -inf
        // select per score (and per score of each bool kind).
        assert_eq!(count("ld.global.nc"), 8 * (MaskKind::ALL.len() + 1));
        assert_eq!(count("ld.global.nc.f32"), 8);
        assert_eq!(count("ld.global.nc.u8"), 8);
        assert_eq!(count("selp.f32"), 8 + 3 * 8);
        // The block's two tests (past Sk, across the diagonal), then,
        // causal, every key compared with its row.
        assert_eq!(count("setp.gt.u32"), 2 + 8);
    }
}

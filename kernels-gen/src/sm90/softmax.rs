//! The online softmax on the score accumulators: masking where needed,
//! row maxima and sums, the output's rescale and P's packing.

use super::emitter::{Core, Emitter};
use crate::attention::mask::{block_needs_mask, mask_fragment, FragmentMask};
use crate::attention::softmax::{
    exp2_scaled, pack_a_fragment, quad_reduce, reduce_tree4, scale, scale_rows, update_max,
    update_sum,
};
use crate::attention::AccFragment;
use crate::ptx::{BinOp, Cmp, Instr, Operand, Reg, Ty, UnOp};

impl Emitter {
    /// Scores of the block starting at key `j0` to the log2 domain, masking
    /// where needed, online softmax: `S` becomes the unnormalised weights,
    /// the running max and sum move on. Returns the factor each row's `O`
    /// must be rescaled by.
    pub(super) fn softmax(&mut self, c: &Core, j0: Reg) -> [Reg; 2] {
        let cfg = self.cfg;
        let s = AccFragment::new(std::slice::from_ref(&c.s_acc));
        let k = &mut self.k;
        // Unmasked blocks keep the raw scores and fold the scale into the
        // exponent (`ex2(s · scale − max)`, one FMA); the masking path
        // scales them first and then uses a factor of 1. A negative scale
        // would turn the raw maximum into a minimum: it takes that path.
        let factor = k.mov(Ty::F32, c.scale_log2);
        let need = block_needs_mask(
            k,
            j0,
            cfg.block_n(),
            c.seq_k,
            c.has_mask,
            Some(c.negative_scale),
            cfg.causal().then_some(c.q0),
        );
        let skip_mask = k.label("unmasked");
        k.branch_if(need, true, &skip_mask);
        scale(k, c.s_acc.iter().copied(), c.scale_log2);
        k.mov_to(Ty::F32, factor, Operand::F32(1.0));
        let fm = FragmentMask {
            row0: c.row0,
            tq2: c.tq2,
            seq_q: c.seq_q,
            seq_k: c.seq_k,
            has_mask: c.has_mask,
            mask: c.m_ptr,
            mask_head: c.mask_head,
            mask_stride_q: c.msq,
            kind: c.mask_kind,
            pad: c.mask_pad,
            causal: cfg.causal(),
        };
        mask_fragment(k, &s, &fm, j0);
        k.push(Instr::Label(skip_mask));

        // Row maxima over the block, across the quad; rescale factors.
        let mut shift = Vec::new();
        let mut alpha = Vec::new();
        for (r, &m_old) in c.m_run.iter().enumerate() {
            let m = reduce_tree4(k, &s.row(r), BinOp::Max);
            let m = quad_reduce(k, m, BinOp::Max);
            let m = k.bin(BinOp::Mul, Ty::F32, m, factor);
            let (sh, a) = update_max(k, m_old, m);
            shift.push(sh);
            alpha.push(a);
        }
        let neg_shift: Vec<Reg> = shift
            .iter()
            .map(|&sh| k.un(UnOp::Neg, Ty::F32, sh))
            .collect();
        for (r, _, x) in s.elems() {
            exp2_scaled(k, x, factor, neg_shift[r]);
        }
        for (r, (&l, &a)) in c.l_run.iter().zip(&alpha).enumerate() {
            let b = reduce_tree4(k, &s.row(r), BinOp::Add);
            update_sum(k, l, a, b);
        }
        [alpha[0], alpha[1]]
    }

    /// `O *= alpha` per row, and the weights in `S` packed into `P`'s
    /// register A fragments (k-step `j` covers S slices `2j` and `2j + 1`).
    pub(super) fn rescale_and_pack(&mut self, c: &Core, alpha: [Reg; 2]) {
        let packed = self.cfg.packed();
        let k = &mut self.k;
        let kept = k.label("kept_max");
        if self.cfg.lazy_rescale() {
            let same = k.setp(Cmp::Eq, Ty::F32, alpha[0], Operand::F32(1.0));
            let same1 = k.setp(Cmp::Eq, Ty::F32, alpha[1], Operand::F32(1.0));
            k.bin_to(BinOp::And, Ty::Pred, same, same, same1);
            let all = k.reg(Ty::Pred);
            k.push(Instr::VoteAll {
                dst: all,
                src: same,
            });
            k.branch_if(all, false, &kept);
        }
        scale_rows(k, &AccFragment::new(std::slice::from_ref(&c.o_acc)), &alpha);
        if self.cfg.lazy_rescale() {
            k.push(Instr::Label(kept));
        }
        for (j, p) in c.p.iter().enumerate() {
            let (lo, hi) = (&c.s_acc[8 * j..8 * j + 4], &c.s_acc[8 * j + 4..8 * j + 8]);
            pack_a_fragment(k, packed, lo, hi, p);
        }
    }
}

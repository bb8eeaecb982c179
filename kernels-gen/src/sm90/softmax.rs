//! The online softmax on the score accumulators: masking where needed,
//! row maxima and sums, the output's rescale and P's packing.

use super::emitter::{Core, Emitter};
use crate::ptx::{BinOp, Cmp, Instr, Operand, Reg, StateSpace, Ty, UnOp};

const LOG2E: f32 = std::f32::consts::LOG2_E;

impl Emitter {
    /// Reduces `xs` (at least one) with `op` through four independent
    /// chains joined at the end, so that the chains' latencies overlap.
    pub(super) fn tree(&mut self, xs: &[Reg], op: BinOp) -> Reg {
        let k = &mut self.k;
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

    /// Reduces `x` over the four lanes of a quad with `op`.
    pub(super) fn quad_reduce(&mut self, x: Reg, op: BinOp) -> Reg {
        let mut acc = x;
        for mask in [1, 2] {
            let other = self.k.reg(Ty::F32);
            self.k.push(Instr::ShflBfly {
                dst: other,
                src: acc,
                lane_mask: mask,
            });
            acc = self.k.bin(op, Ty::F32, acc, other);
        }
        acc
    }

    /// Scores of the block starting at key `j0` to the log2 domain, masking
    /// where needed, online softmax: `S` becomes the unnormalised weights,
    /// the running max and sum move on. Returns the factor each row's `O`
    /// must be rescaled by.
    pub(super) fn softmax(&mut self, c: &Core, j0: Reg) -> [Reg; 2] {
        let cfg = self.cfg;
        let bn = cfg.block_n();
        let n_tiles_s = bn / 8;
        let neg_inf = Operand::F32(f32::NEG_INFINITY);
        let row_offset = |r: usize| Self::u(8 * r);
        let k = &mut self.k;
        // Unmasked blocks keep the raw scores and fold the scale into the
        // exponent (`ex2(s · scale − max)`, one FMA); the masking path
        // scales them first and then uses a factor of 1. A negative scale
        // would turn the raw maximum into a minimum: it takes that path.
        let factor = k.mov(Ty::F32, c.scale_log2);
        let block_end = k.bin(BinOp::Add, Ty::U32, j0, Self::u(bn));
        let ragged = k.setp(Cmp::Gt, Ty::U32, block_end, c.seq_k);
        let need = k.reg(Ty::Pred);
        k.bin_to(BinOp::Or, Ty::Pred, need, ragged, c.has_mask);
        k.bin_to(BinOp::Or, Ty::Pred, need, need, c.negative_scale);
        if cfg.causal() {
            // The block crosses the diagonal of the CTA's first row.
            let last_key = k.bin(BinOp::Add, Ty::U32, j0, Self::u(bn - 1));
            let diag = k.setp(Cmp::Gt, Ty::U32, last_key, c.q0);
            k.bin_to(BinOp::Or, Ty::Pred, need, need, diag);
        }
        let skip_mask = k.label("unmasked");
        k.branch_if(need, true, &skip_mask);
        {
            for &r in &c.s_acc {
                k.bin_to(BinOp::Mul, Ty::F32, r, r, c.scale_log2);
            }
            k.mov_to(Ty::F32, factor, Operand::F32(1.0));
            let kbase = k.bin(BinOp::Add, Ty::U32, j0, c.tq2);
            let skip_bias = k.label("no_bias");
            // Additive mask, in the log2 domain.
            k.branch_if(c.has_mask, true, &skip_bias);
            let mut row_in = Vec::new();
            let mut mask_rows = Vec::new();
            for r in 0..2 {
                let row = k.bin(BinOp::Add, Ty::U32, c.row0, row_offset(r));
                row_in.push(k.setp(Cmp::Lt, Ty::U32, row, c.seq_q));
                let r64 = k.cvt(None, Ty::U64, Ty::U32, row);
                let o = k.mad(Ty::U64, r64, c.msq, c.mask_head);
                mask_rows.push(k.mad(Ty::U64, o, Operand::U(4), c.m_ptr));
            }
            for t in 0..n_tiles_s {
                for e in 0..4 {
                    let s = c.s_acc[4 * t + e];
                    let r = e / 2;
                    let key = k.bin(BinOp::Add, Ty::U32, kbase, Self::u(8 * t + e % 2));
                    let kin = k.setp(Cmp::Lt, Ty::U32, key, c.seq_k);
                    let ok = k.reg(Ty::Pred);
                    k.bin_to(BinOp::And, Ty::Pred, ok, kin, row_in[r]);
                    let key64 = k.cvt(None, Ty::U64, Ty::U32, key);
                    let addr = k.mad(Ty::U64, key64, Operand::U(4), mask_rows[r]);
                    let bias = k.mov(Ty::F32, Operand::F32(0.0));
                    k.guard(
                        ok,
                        false,
                        Instr::Ld {
                            space: StateSpace::GlobalNc,
                            ty: Ty::F32,
                            dst: vec![bias],
                            addr: addr.into(),
                        },
                    );
                    k.mad_to(Ty::F32, s, bias, Operand::F32(LOG2E), s);
                }
            }
            k.push(Instr::Label(skip_bias));
            // Keys past Sk, and (causal) keys after the row, do not exist.
            let rows: Vec<Reg> = (0..2)
                .map(|r| k.bin(BinOp::Add, Ty::U32, c.row0, row_offset(r)))
                .collect();
            for t in 0..n_tiles_s {
                for e in 0..4 {
                    let s = c.s_acc[4 * t + e];
                    let key = k.bin(BinOp::Add, Ty::U32, kbase, Self::u(8 * t + e % 2));
                    let hide = k.setp(Cmp::Ge, Ty::U32, key, c.seq_k);
                    if cfg.causal() {
                        let after = k.setp(Cmp::Gt, Ty::U32, key, rows[e / 2]);
                        k.bin_to(BinOp::Or, Ty::Pred, hide, hide, after);
                    }
                    k.selp_to(Ty::F32, s, neg_inf.clone(), s, hide);
                }
            }
        }
        k.push(Instr::Label(skip_mask));

        // Row maxima over the block, across the quad; rescale factors.
        let mut shift = Vec::new();
        let mut alpha = Vec::new();
        for (r, &m_old) in c.m_run.iter().enumerate() {
            let row: Vec<Reg> = (0..n_tiles_s)
                .flat_map(|t| [c.s_acc[4 * t + 2 * r], c.s_acc[4 * t + 2 * r + 1]])
                .collect();
            let m = self.tree(&row, BinOp::Max);
            let m = self.quad_reduce(m, BinOp::Max);
            let k = &mut self.k;
            let m = k.bin(BinOp::Mul, Ty::F32, m, factor);
            let m_new = k.bin(BinOp::Max, Ty::F32, m_old, m);
            // A row that has seen only hidden keys keeps max -inf; shifting
            // by 0 keeps NaN out and makes every hidden weight exactly 0.
            let none = k.setp(Cmp::Eq, Ty::F32, m_new, neg_inf.clone());
            let sh = k.selp(Ty::F32, Operand::F32(0.0), m_new, none);
            let diff = k.bin(BinOp::Sub, Ty::F32, m_old, sh);
            let a = k.un(UnOp::Ex2, Ty::F32, diff);
            k.mov_to(Ty::F32, m_old, m_new);
            shift.push(sh);
            alpha.push(a);
        }
        let k = &mut self.k;
        let neg_shift: Vec<Reg> = shift
            .iter()
            .map(|&sh| k.un(UnOp::Neg, Ty::F32, sh))
            .collect();
        for (i, &s) in c.s_acc.iter().enumerate() {
            let x = k.mad(Ty::F32, s, factor, neg_shift[(i % 4) / 2]);
            k.un_to(UnOp::Ex2, Ty::F32, s, x);
        }
        for (r, (&l, &a)) in c.l_run.iter().zip(&alpha).enumerate() {
            let row: Vec<Reg> = (0..n_tiles_s)
                .flat_map(|t| [c.s_acc[4 * t + 2 * r], c.s_acc[4 * t + 2 * r + 1]])
                .collect();
            let b = self.tree(&row, BinOp::Add);
            self.k.mad_to(Ty::F32, l, l, a, b);
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
        for (i, &o) in c.o_acc.iter().enumerate() {
            k.bin_to(BinOp::Mul, Ty::F32, o, o, alpha[(i % 4) / 2]);
        }
        if self.cfg.lazy_rescale() {
            k.push(Instr::Label(kept));
        }
        for (j, p) in c.p.iter().enumerate() {
            let lo = &c.s_acc[8 * j..8 * j + 4];
            let hi = &c.s_acc[8 * j + 4..8 * j + 8];
            for (dst, (h, l)) in p.iter().zip([
                (lo[1], lo[0]),
                (lo[3], lo[2]),
                (hi[1], hi[0]),
                (hi[3], hi[2]),
            ]) {
                k.push(Instr::CvtPack {
                    ty: packed,
                    dst: *dst,
                    hi: h,
                    lo: l,
                });
            }
        }
    }
}

//! The two `wgmma` products of a key block: `S = Q·Kᵀ` from two
//! shared-memory descriptors and `O += P·V` with P from registers.

use super::emitter::{Core, Emitter};
use crate::ptx::{BinOp, Instr, Operand, Reg, Ty, WgmmaA};

impl Emitter {
    /// A descriptor for the shared address `addr` with `bits`.
    pub(super) fn desc(&mut self, addr: Reg, bits: u64) -> Reg {
        let k = &mut self.k;
        let a = k.bin(BinOp::Shr, Ty::U32, addr, Operand::U(4));
        let a = k.bin(BinOp::And, Ty::U32, a, Operand::U(0x3fff));
        let a = k.cvt(None, Ty::U64, Ty::U32, a);
        k.bin(BinOp::Or, Ty::U64, a, Operand::U(bits))
    }

    /// `desc` moved on by `bytes` (a multiple of 16).
    pub(super) fn desc_at(&mut self, desc: Reg, bytes: usize) -> Reg {
        if bytes == 0 {
            desc
        } else {
            self.k.bin(BinOp::Add, Ty::U64, desc, Self::u(bytes >> 4))
        }
    }

    /// `S = Q·K(block)ᵀ` for the K tile of descriptor `k_desc` (no fence,
    /// no commit).
    pub(super) fn s_gemm(&mut self, c: &Core, k_desc: Reg) {
        let cfg = self.cfg;
        let (bm, bn) = (cfg.block_m(), cfg.block_n());
        for kk in 0..cfg.head_size() / 16 {
            let within = (kk % 4) * 32;
            let qa = self.desc_at(c.q_desc, (kk / 4) * bm * 128 + within);
            let kb = self.desc_at(k_desc, (kk / 4) * bn * 128 + within);
            self.k.push(Instr::Wgmma {
                n: bn as u32,
                ab: cfg.element(),
                d: c.s_acc.clone(),
                a: WgmmaA::Desc {
                    desc: qa,
                    trans: false,
                },
                b: kb,
                scale_d: if kk == 0 { c.p_false } else { c.p_true },
                trans_b: false,
            });
        }
    }

    /// `O += P·V(block)` for the V tile of descriptor `v_desc` (no fence,
    /// no commit): one `m64n{d}k16` per 16 keys, V read N-major through
    /// the transpose bit. `N` is `d` itself, also where it is not a
    /// multiple of 64: a partial last panel of V is read as such (measured
    /// correct on an H100), `m64n80` rather than `m64n128` at d=80.
    pub(super) fn pv_gemm(&mut self, c: &Core, v_desc: Reg) {
        let cfg = self.cfg;
        for (j, a) in c.p.iter().enumerate() {
            let vb = self.desc_at(v_desc, j * 16 * 128);
            self.k.push(Instr::Wgmma {
                n: cfg.head_size() as u32,
                ab: cfg.element(),
                d: c.o_acc.clone(),
                a: WgmmaA::Regs(*a),
                b: vb,
                scale_d: c.p_true,
                trans_b: true,
            });
        }
    }
}

//! Shorthands on [`Kernel`] that allocate the destination register and push
//! the instruction in one call, so emitters read like the arithmetic they
//! write.

use super::instr::{BinOp, Cmp, Instr, Operand, UnOp};
use super::kernel::Kernel;
use super::reg::{Param, Reg, Ty};

impl Kernel {
    /// `dst = src` into a fresh register.
    pub fn mov(&mut self, ty: Ty, src: impl Into<Operand>) -> Reg {
        let dst = self.reg(ty);
        self.push(Instr::Mov {
            ty,
            dst,
            src: src.into(),
        });
        dst
    }

    /// `dst = src` into an existing register.
    pub fn mov_to(&mut self, ty: Ty, dst: Reg, src: impl Into<Operand>) {
        self.push(Instr::Mov {
            ty,
            dst,
            src: src.into(),
        });
    }

    /// Loads a kernel parameter.
    pub fn ld_param(&mut self, ty: Ty, param: &Param) -> Reg {
        let dst = self.reg(ty);
        self.push(Instr::LdParam {
            ty,
            dst,
            param: param.clone(),
        });
        dst
    }

    /// `a op b` into a fresh register of type `ty` (`U64` for `MulWide`
    /// of `U32` sources is handled: pass the source type).
    pub fn bin(&mut self, op: BinOp, ty: Ty, a: impl Into<Operand>, b: impl Into<Operand>) -> Reg {
        let dst_ty = match (op, ty) {
            (BinOp::MulWide, Ty::U32) => Ty::U64,
            (BinOp::MulWide, Ty::S32) => Ty::S64,
            _ => ty,
        };
        let dst = self.reg(dst_ty);
        self.push(Instr::Bin {
            op,
            ty,
            dst,
            a: a.into(),
            b: b.into(),
        });
        dst
    }

    /// `a op b` into an existing register.
    pub fn bin_to(
        &mut self,
        op: BinOp,
        ty: Ty,
        dst: Reg,
        a: impl Into<Operand>,
        b: impl Into<Operand>,
    ) {
        self.push(Instr::Bin {
            op,
            ty,
            dst,
            a: a.into(),
            b: b.into(),
        });
    }

    /// `a * b + c` (integer `mad.lo`, or `fma.rn` on floats) into a fresh
    /// register.
    pub fn mad(
        &mut self,
        ty: Ty,
        a: impl Into<Operand>,
        b: impl Into<Operand>,
        c: impl Into<Operand>,
    ) -> Reg {
        let dst = self.reg(ty);
        self.mad_to(ty, dst, a, b, c);
        dst
    }

    /// `dst = a * b + c`.
    pub fn mad_to(
        &mut self,
        ty: Ty,
        dst: Reg,
        a: impl Into<Operand>,
        b: impl Into<Operand>,
        c: impl Into<Operand>,
    ) {
        self.push(Instr::Mad {
            ty,
            wide: false,
            dst,
            a: a.into(),
            b: b.into(),
            c: c.into(),
        });
    }

    /// A one-operand operation into a fresh register.
    pub fn un(&mut self, op: UnOp, ty: Ty, a: impl Into<Operand>) -> Reg {
        let dst = self.reg(ty);
        self.push(Instr::Un {
            op,
            ty,
            dst,
            a: a.into(),
        });
        dst
    }

    /// A one-operand operation into an existing register.
    pub fn un_to(&mut self, op: UnOp, ty: Ty, dst: Reg, a: impl Into<Operand>) {
        self.push(Instr::Un {
            op,
            ty,
            dst,
            a: a.into(),
        });
    }

    /// A fresh predicate `a cmp b`.
    pub fn setp(&mut self, cmp: Cmp, ty: Ty, a: impl Into<Operand>, b: impl Into<Operand>) -> Reg {
        let dst = self.reg(Ty::Pred);
        self.push(Instr::Setp {
            cmp,
            ty,
            dst,
            a: a.into(),
            b: b.into(),
        });
        dst
    }

    /// `pred ? a : b` into a fresh register.
    pub fn selp(&mut self, ty: Ty, a: impl Into<Operand>, b: impl Into<Operand>, pred: Reg) -> Reg {
        let dst = self.reg(ty);
        self.selp_to(ty, dst, a, b, pred);
        dst
    }

    /// `dst = pred ? a : b`.
    pub fn selp_to(
        &mut self,
        ty: Ty,
        dst: Reg,
        a: impl Into<Operand>,
        b: impl Into<Operand>,
        pred: Reg,
    ) {
        self.push(Instr::Selp {
            ty,
            dst,
            a: a.into(),
            b: b.into(),
            pred,
        });
    }

    /// Converts `src` from `src_ty` to `dst_ty` into `dst`.
    pub fn cvt_to(
        &mut self,
        rnd: Option<&'static str>,
        dst_ty: Ty,
        src_ty: Ty,
        dst: Reg,
        src: impl Into<Operand>,
    ) {
        self.push(Instr::Cvt {
            rnd,
            dst_ty,
            src_ty,
            dst,
            src: src.into(),
        });
    }

    /// Converts `src` from `src_ty` to `dst_ty` into a fresh register.
    pub fn cvt(
        &mut self,
        rnd: Option<&'static str>,
        dst_ty: Ty,
        src_ty: Ty,
        src: impl Into<Operand>,
    ) -> Reg {
        let dst = self.reg(dst_ty);
        self.push(Instr::Cvt {
            rnd,
            dst_ty,
            src_ty,
            dst,
            src: src.into(),
        });
        dst
    }

    /// Pushes `instr` guarded by `@pred` (or `@!pred`).
    pub fn guard(&mut self, pred: Reg, negate: bool, instr: Instr) {
        self.push(instr.guarded(pred, negate));
    }

    /// `bra.uni target` if `pred` (negated: if not `pred`).
    pub fn branch_if(&mut self, pred: Reg, negate: bool, target: &str) {
        self.guard(
            pred,
            negate,
            Instr::Bra {
                target: target.into(),
                uni: true,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::instr::Special;
    use super::*;

    #[test]
    fn shorthands_allocate_and_emit() {
        let mut k = Kernel::new("k");
        let t = k.mov(Ty::U32, Operand::Special(Special::TidX));
        let w = k.bin(BinOp::MulWide, Ty::U32, t, Operand::U(4));
        let p = k.setp(Cmp::Lt, Ty::U32, t, Operand::U(100));
        let s = k.selp(Ty::U32, t, Operand::U(0), p);
        let _ = k.mad(Ty::U32, s, Operand::U(2), t);
        let lines: Vec<String> = k.body().iter().map(|i| i.to_string()).collect();
        assert_eq!(
            lines,
            [
                "mov.u32 %r0, %tid.x;",
                "mul.wide.u32 %rd0, %r0, 4;",
                "setp.lt.u32 %p0, %r0, 100;",
                "selp.u32 %r1, %r0, 0, %p0;",
                "mad.lo.u32 %r2, %r1, 2, %r0;",
            ]
        );
        assert_eq!(w.to_string(), "%rd0");
    }
}

//! Sequences: which tokens of a batch entry are its query rows and its
//! keys. The one rule every kernel follows for variable-length batches
//! (`cu_seqlens`) and for key-padding runs.
//!
//! A side (queries or keys) has a `start` and an `end` array of `i32`
//! indexed by the batch entry, or null pointers. Null: the entry's tokens
//! are `[0, bound)`. Otherwise they are `[start[b], end[b])`, made safe
//! whatever the arrays hold: `start` is clamped to `[0, tokens]`, `end` to
//! `[start, tokens]` (negative values read as unsigned are past `tokens`),
//! and the length to at most `bound` (the grid's and the scratch buffers'
//! size). So a kernel never addresses a token outside the tensor, nor a
//! scratch row past `bound`, even when a caller's device-side offsets are
//! wrong.
//!
//! Everything else a kernel does is in local positions `0..len`, and token
//! `start + i` is where local position `i` lives in every tensor.

use crate::ptx::{BinOp, Cmp, Instr, Kernel, Operand, Reg, StateSpace, Ty};

/// One batch entry's tokens on one side: `start` and `len` (`u32`).
#[derive(Clone, Copy, Debug)]
pub struct Sequence {
    /// The first token.
    pub start: Reg,
    /// The number of tokens (local positions `0..len`).
    pub len: Reg,
}

/// The pointers and sizes one side's rule reads.
#[derive(Clone, Copy, Debug)]
pub struct Side {
    /// `start` array (`u64` pointer, null for whole entries).
    pub starts: Reg,
    /// `end` array (`u64` pointer; read only where `starts` is not null).
    pub ends: Reg,
    /// The tensor's token count (`u32`).
    pub tokens: Reg,
    /// The most tokens a sequence has (`Sq` or `Sk`, `u32`).
    pub bound: Reg,
}

/// Batch entry `batch`'s sequence on side `side` ([`crate::contract::Args`]
/// holds the registers: `seq_bounds`, `tokens`, `seq_q`/`seq_k`). Without
/// bounds the sequence is `[0, bound)`: the `start` register is 0 and `len`
/// is `bound` itself, so kernels without variable lengths compute as
/// before.
pub fn sequence(k: &mut Kernel, side: Side, batch: Reg) -> Sequence {
    let start = k.mov(Ty::U32, Operand::U(0));
    let end = k.mov(Ty::U32, Operand::U(0));
    let given = k.setp(Cmp::Ne, Ty::U64, side.starts, Operand::U(0));
    let b64 = k.cvt(None, Ty::U64, Ty::U32, batch);
    let at_s = k.mad(Ty::U64, b64, Operand::U(4), side.starts);
    let at_e = k.mad(Ty::U64, b64, Operand::U(4), side.ends);
    for (dst, addr) in [(start, at_s), (end, at_e)] {
        k.guard(
            given,
            false,
            Instr::Ld {
                space: StateSpace::GlobalNc,
                ty: Ty::U32,
                dst: vec![dst],
                addr: addr.into(),
            },
        );
    }
    // start in [0, tokens], end in [start, tokens], len <= bound; without
    // bounds, start 0 and len = bound.
    k.bin_to(BinOp::Min, Ty::U32, start, start, side.tokens);
    k.bin_to(BinOp::Min, Ty::U32, end, end, side.tokens);
    k.bin_to(BinOp::Max, Ty::U32, end, end, start);
    k.bin_to(BinOp::Sub, Ty::U32, end, end, start);
    k.bin_to(BinOp::Min, Ty::U32, end, end, side.bound);
    k.selp_to(Ty::U32, end, end, side.bound, given);
    Sequence { start, len: end }
}

/// The element offset of token `start` of a tensor whose token stride is
/// `stride_s` (`u64`): `start · stride_s`, to add to a (batch, head) base
/// offset.
pub fn token_offset(k: &mut Kernel, start: Reg, stride_s: Reg) -> Reg {
    let s64 = k.cvt(None, Ty::U64, Ty::U32, start);
    k.bin(BinOp::Mul, Ty::U64, s64, stride_s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ptx::{Module, Target};

    #[test]
    fn the_rule_clamps_and_loads_only_given_bounds() {
        let mut k = Kernel::new("t");
        let regs: Vec<Reg> = (0..2).map(|_| k.reg(Ty::U64)).collect();
        let u: Vec<Reg> = (0..3).map(|_| k.reg(Ty::U32)).collect();
        let side = Side {
            starts: regs[0],
            ends: regs[1],
            tokens: u[0],
            bound: u[1],
        };
        let s = sequence(&mut k, side, u[2]);
        assert_ne!(s.start, s.len);
        let text = Module::new(Target::Sm80).kernel(k).to_string();
        assert_eq!(text.matches("ld.global.nc.u32").count(), 2, "{text}");
        assert_eq!(text.matches("@%p0 ld.global.nc.u32").count(), 2, "{text}");
        assert_eq!(text.matches("min.u32").count(), 3, "{text}");
        assert_eq!(text.matches("max.u32").count(), 1, "{text}");
    }
}

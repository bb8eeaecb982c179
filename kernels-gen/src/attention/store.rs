//! The output: a row's inverse sum (zero for rows that saw no key), and the
//! accumulators times it, rounded to the variant's 16-bit type and stored;
//! and, where the caller asked for it, the row's log-sum-exp
//! ([`row_lse`], [`store_lse`]).

use super::layout::AccFragment;
use super::seqs::Sequence;
use super::softmax::{pack, quad_reduce};
use crate::contract::head_offset;
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

/// Where a CTA's row log-sum-exps go (the contract's `lse`, an `f32`
/// `[B, Hq, Sq]` at any element strides), for [`store_lse`].
#[derive(Clone, Copy, Debug)]
pub struct LseRows {
    /// Whether this thread writes its rows' log-sum-exp: `lse` is not null
    /// and, where several threads hold a row's sum, this thread is the one
    /// that writes for them.
    pub write: Reg,
    /// The byte address of `lse[b, h, 0]` of this (batch, head).
    pub base: Reg,
    /// The query-row stride, in bytes.
    pub stride: Reg,
}

/// The [`LseRows`] of the (batch, head) `batch64`, `head64` (widened to 64
/// bits), from the contract's `lse` pointer and its element strides
/// (batch, head, query), for the sequence whose first query token is
/// `q_start` (`u32`; local row `i` is written at token `q_start + i`).
/// `writer`, where the threads that share a row hold its sum alike, is the
/// predicate of the one that writes it.
pub fn lse_rows(
    k: &mut Kernel,
    ptr: Reg,
    strides: [Reg; 3],
    batch64: Reg,
    head64: Reg,
    q_start: Reg,
    writer: Option<Reg>,
) -> LseRows {
    let write = k.setp(Cmp::Ne, Ty::U64, ptr, Operand::U(0));
    if let Some(w) = writer {
        k.bin_to(BinOp::And, Ty::Pred, write, write, w);
    }
    let off = head_offset(k, batch64, head64, strides[0], strides[1]);
    let s64 = k.cvt(None, Ty::U64, Ty::U32, q_start);
    let off = k.mad(Ty::U64, s64, strides[2], off);
    let base = k.mad(Ty::U64, off, Operand::U(4), ptr);
    let stride = k.bin(BinOp::Shl, Ty::U64, strides[2], Operand::U(2));
    LseRows {
        write,
        base,
        stride,
    }
}

/// A row's log-sum-exp, `ln Σ_j exp(scale · q·k_j + mask_j)` over the keys
/// it saw, from its running max `m` and running sum `sum` in the kernels'
/// log2 domain (scores times `log2(e)`, `sum` relative to `m`: the shift
/// every weight of the sum was taken against): `(m + lg2(sum)) · ln 2`.
///
/// A row that saw no key has `sum` 0, so `lg2(sum)` is `-inf` and so is
/// the result, whether `m` is finite or `-inf` (`-inf + -inf`; never
/// `-inf + inf`, so never NaN); a NaN in the row's scores reaches `sum`
/// and the result.
pub fn row_lse(k: &mut Kernel, m: Reg, sum: Reg) -> Reg {
    let lg = k.un(UnOp::Lg2, Ty::F32, sum);
    let x = k.bin(BinOp::Add, Ty::F32, m, lg);
    k.bin(BinOp::Mul, Ty::F32, x, Operand::F32(std::f32::consts::LN_2))
}

/// Stores the [`row_lse`] of query row `row` (running max `m`, completed
/// sum `sum`) at `lse.base + row · lse.stride`, where `inside` (the row is
/// inside its sequence) and `lse.write` hold: one predicated store, nothing where
/// the caller passed no `lse`.
pub fn store_lse(k: &mut Kernel, lse: &LseRows, m: Reg, sum: Reg, row: Reg, inside: Reg) {
    let value = row_lse(k, m, sum);
    let write = k.bin(BinOp::And, Ty::Pred, inside, lse.write);
    let r64 = k.cvt(None, Ty::U64, Ty::U32, row);
    let addr = k.mad(Ty::U64, r64, lse.stride, lse.base);
    k.guard(
        write,
        false,
        Instr::St {
            space: StateSpace::Global,
            ty: Ty::F32,
            addr: Addr::at(addr, 0),
            src: vec![value],
        },
    );
}

/// Where a CTA's output rows go, for [`store_output`].
#[derive(Clone, Copy, Debug)]
pub struct OutputRows {
    /// The thread's first query row (row slot 0 of its fragment), local to
    /// the sequence.
    pub row0: Reg,
    /// `lane % 4`: the thread's column pair within each n8 tile.
    pub tq: Reg,
    /// The sequence's query rows (`Sq` without sequence bounds): rows at
    /// or past it are not stored ([`OutputRows::in_sequence`]).
    pub seq_q: Reg,
    /// The byte address of the output's local row 0 (token `q_start`,
    /// [`OutputRows::in_sequence`]) of this (batch, head).
    pub base: Reg,
    /// The output's token stride, in bytes.
    pub stride: Reg,
}

/// Ends the CTA (every thread of it, a uniform exit) whose first query
/// row `q0` is at or past its sequence's end `len_q`: it has no row to
/// compute and writes nothing, neither output nor log-sum-exp. The grid
/// covers the longest sequence; the others' tail CTAs leave here.
pub fn exit_past_end(k: &mut Kernel, q0: Reg, len_q: Reg) {
    let past = k.setp(Cmp::Ge, Ty::U32, q0, len_q);
    k.guard(past, false, Instr::Ret);
}

impl OutputRows {
    /// The rows of the query sequence `seq` of this (batch, head): `base`
    /// moved on to token `seq.start` and `seq_q` its length. Epilogues
    /// read the sequence again and call this there, so that no register
    /// holds it across their main loop.
    pub fn in_sequence(self, k: &mut Kernel, seq: Sequence) -> OutputRows {
        let base = super::at_token(k, self.base, seq.start, self.stride);
        OutputRows {
            seq_q: seq.len,
            base,
            ..self
        }
    }
}

/// The predicate of the one thread of each quad that writes the quad's
/// rows' log-sum-exp (`tq == 0`; the four hold the same max and, once
/// reduced, the same sum), for [`lse_rows`].
pub fn quad_writer(k: &mut Kernel, tq: Reg) -> Reg {
    k.setp(Cmp::Eq, Ty::U32, tq, Operand::U(0))
}

/// The epilogue of the tensor-core kernels: each row slot's sum `l_run[r]`
/// completed across the quad, its [`inverse_or_zero`], and the row of the
/// output fragment `o` times it stored as 16-bit pairs
/// ([`store_scaled_pairs`]) where the row is inside its sequence; then the row's
/// log-sum-exp from its running max `m_run[r]` ([`store_lse`]) where `lse`
/// asks for it.
pub fn store_output(
    k: &mut Kernel,
    o: &AccFragment,
    m_run: &[Reg],
    l_run: &[Reg],
    out: &OutputRows,
    lse: &LseRows,
    packed: Ty,
) {
    assert_eq!(m_run.len(), l_run.len(), "a max and a sum per row slot");
    let tq4 = k.bin(BinOp::Shl, Ty::U32, out.tq, Operand::U(2));
    let tq4 = k.cvt(None, Ty::U64, Ty::U32, tq4);
    for (r, (&m, &l)) in m_run.iter().zip(l_run).enumerate() {
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
        store_lse(k, lse, m, sum, row, inside);
    }
}

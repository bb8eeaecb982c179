//! Masking: the mask read in place, of any [`MaskKind`] and with front
//! padding, as an additive bias (in the log2 domain), and the keys a row
//! does not see (past its sequence's end, and after the row where causal)
//! hidden as `-inf`, so that they weigh exactly 0. Rows and keys are local
//! to their sequence ([`super::seqs`]): `seq_q` and `seq_k` arguments are
//! a sequence's lengths (`Sq` and `Sk` without sequence bounds).

use super::layout::AccFragment;
use crate::contract::head_offset;
use crate::ptx::{Addr, BinOp, Cmp, Instr, Kernel, Operand, Reg, StateSpace, Ty};

const LOG2E: f32 = std::f32::consts::LOG2_E;

/// The end of the keys the CTA whose first query row is `q0` visits: `Sk`,
/// and for causal CTAs the key after their last row's diagonal,
/// `min(q0 + block_m, Sk)`. With `seq_q` the last row is also clamped to
/// `Sq` first (`min(q0 + block_m, Sq, Sk)`: the CTA's rows past `Sq` see
/// nothing).
pub fn key_end(
    k: &mut Kernel,
    q0: Reg,
    block_m: usize,
    seq_q: Option<Reg>,
    seq_k: Reg,
    causal: bool,
) -> Reg {
    if !causal {
        return seq_k;
    }
    let last = k.bin(BinOp::Add, Ty::U32, q0, Operand::U(block_m as u64));
    let last = match seq_q {
        Some(seq_q) => k.bin(BinOp::Min, Ty::U32, last, seq_q),
        None => last,
    };
    k.bin(BinOp::Min, Ty::U32, last, seq_k)
}

/// The end of the keys causal query row `row` sees: `min(row + 1, Sk)`.
pub fn row_key_end(k: &mut Kernel, row: Reg, seq_k: Reg) -> Reg {
    let end = k.bin(BinOp::Add, Ty::U32, row, Operand::U(1));
    k.bin(BinOp::Min, Ty::U32, end, seq_k)
}

/// The number of `block_n`-key blocks the CTA whose first query row is
/// `q0` visits: every block up to `Sk`, and causal CTAs stop at the block
/// holding their last row's diagonal ([`key_end`]).
pub fn key_blocks(
    k: &mut Kernel,
    q0: Reg,
    block_m: usize,
    block_n: usize,
    seq_k: Reg,
    causal: bool,
) -> Reg {
    let key_end = key_end(k, q0, block_m, None, seq_k, causal);
    let n_blocks = k.bin(BinOp::Add, Ty::U32, key_end, Operand::U(block_n as u64 - 1));
    k.bin(BinOp::Div, Ty::U32, n_blocks, Operand::U(block_n as u64))
}

/// Whether the mask applies to this batch entry ([`mask_applies`]), and the
/// element offset `batch · stride_b + head · stride_h` of this (batch,
/// head)'s mask rows: `(has_mask, mask_head)`.
pub fn mask_of_head(
    k: &mut Kernel,
    mask: Reg,
    batches: Reg,
    batch: Reg,
    head: Reg,
    stride_b: Reg,
    stride_h: Reg,
) -> (Reg, Reg) {
    let b64 = k.cvt(None, Ty::U64, Ty::U32, batch);
    let h64 = k.cvt(None, Ty::U64, Ty::U32, head);
    mask_of_head_wide(k, mask, batches, b64, h64, stride_b, stride_h)
}

/// [`mask_of_head`] from `batch` and `head` already widened to 64 bits.
pub fn mask_of_head_wide(
    k: &mut Kernel,
    mask: Reg,
    batches: Reg,
    batch64: Reg,
    head64: Reg,
    stride_b: Reg,
    stride_h: Reg,
) -> (Reg, Reg) {
    let has_mask = mask_applies(k, mask, batches, batch64);
    (
        has_mask,
        head_offset(k, batch64, head64, stride_b, stride_h),
    )
}

/// Whether the mask applies to batch entry `batch64`: its pointer is not
/// null, and `mask_batches` (the contract's per-entry flags, from the
/// key-runs kernel) is null or holds a non-zero value for the entry.
pub fn mask_applies(k: &mut Kernel, mask: Reg, batches: Reg, batch64: Reg) -> Reg {
    let has_mask = mask_passed(k, mask);
    let flags = k.setp(Cmp::Ne, Ty::U64, batches, Operand::U(0));
    let flag = k.mov(Ty::U32, Operand::U(1));
    let at = k.mad(Ty::U64, batch64, Operand::U(4), batches);
    k.guard(
        flags,
        false,
        Instr::Ld {
            space: StateSpace::GlobalNc,
            ty: Ty::U32,
            dst: vec![flag],
            addr: at.into(),
        },
    );
    let applies = k.setp(Cmp::Ne, Ty::U32, flag, Operand::U(0));
    k.bin_to(BinOp::And, Ty::Pred, has_mask, has_mask, applies);
    has_mask
}

/// Whether the mask pointer is not null.
fn mask_passed(k: &mut Kernel, mask: Reg) -> Reg {
    k.setp(Cmp::Ne, Ty::U64, mask, Operand::U(0))
}

/// `score += bias · log2(e)`, with `bias` the mask's `f32` at `addr` where
/// `pred` holds and 0 elsewhere.
pub fn add_bias(k: &mut Kernel, score: Reg, pred: Reg, addr: Addr) {
    let bias = k.mov(Ty::F32, Operand::F32(0.0));
    k.guard(
        pred,
        false,
        Instr::Ld {
            space: StateSpace::GlobalNc,
            ty: Ty::F32,
            dst: vec![bias],
            addr,
        },
    );
    k.mad_to(Ty::F32, score, bias, Operand::F32(LOG2E), score);
}

/// The element kind of a mask read in place: the contract's `mask_kind`
/// code ([`MaskKind::code`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskKind {
    /// An additive `f32` bias.
    F32,
    /// An additive `f16` bias.
    F16,
    /// An additive `bf16` bias.
    Bf16,
    /// `u8` (bool): non-zero attends, zero hides.
    U8,
    /// `i32`: non-zero attends.
    I32,
    /// `i64`: non-zero attends.
    I64,
}

impl MaskKind {
    /// Every kind, in code order.
    pub const ALL: [MaskKind; 6] = [
        MaskKind::F32,
        MaskKind::F16,
        MaskKind::Bf16,
        MaskKind::U8,
        MaskKind::I32,
        MaskKind::I64,
    ];

    /// The `mask_kind` code the runtime passes.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The bytes of one element.
    pub const fn bytes(self) -> u64 {
        match self {
            MaskKind::F32 | MaskKind::I32 => 4,
            MaskKind::F16 | MaskKind::Bf16 => 2,
            MaskKind::U8 => 1,
            MaskKind::I64 => 8,
        }
    }
}

/// The additive bias (natural-log domain, `f32`) of the `kind` element at
/// `addr` where `pred` holds, 0 elsewhere: the float kinds widened, the
/// others `0` where non-zero and `-inf` where zero ([`hidden_by`]).
pub fn load_bias(k: &mut Kernel, kind: MaskKind, pred: Reg, addr: Addr) -> Reg {
    let bias = k.mov(Ty::F32, Operand::F32(0.0));
    let load = |k: &mut Kernel, ty: Ty, dst: Reg| {
        k.guard(
            pred,
            false,
            Instr::Ld {
                space: StateSpace::GlobalNc,
                ty,
                dst: vec![dst],
                addr: addr.clone(),
            },
        )
    };
    match kind {
        MaskKind::F32 => load(k, Ty::F32, bias),
        MaskKind::F16 => {
            let raw = k.mov(Ty::B16, Operand::U(0));
            load(k, Ty::B16, raw);
            k.cvt_to(None, Ty::F32, Ty::F16, bias, raw);
        }
        MaskKind::Bf16 => {
            // bf16 is the top half of an f32.
            let raw = k.mov(Ty::U32, Operand::U(0));
            load(k, Ty::U16, raw);
            k.bin_to(BinOp::Shl, Ty::B32, raw, raw, Operand::U(16));
            k.mov_to(Ty::B32, bias, raw);
        }
        MaskKind::U8 | MaskKind::I32 | MaskKind::I64 => {
            let hide = hidden_by(k, kind, pred, addr);
            k.selp_to(Ty::F32, bias, Operand::F32(f32::NEG_INFINITY), bias, hide);
        }
    }
    bias
}

/// Whether the element of a bool kind (`U8`, `I32`, `I64`) at `addr`
/// hides its key: it is zero. Where `pred` does not hold nothing is read
/// and the key is not hidden. An `i64` is read as its low 32-bit half,
/// and its high half only where the low one is zero (one register per
/// element at a time, as for the 32-bit kinds: ptxas hoists the loads of
/// a fragment together).
///
/// # Panics
///
/// If `kind` is a float kind.
pub fn hidden_by(k: &mut Kernel, kind: MaskKind, pred: Reg, addr: Addr) -> Reg {
    let ty = match kind {
        MaskKind::U8 => Ty::U8,
        MaskKind::I32 | MaskKind::I64 => Ty::U32,
        _ => panic!("{kind:?} is an additive bias"),
    };
    // Lanes that do not load read as "attend".
    let load = |k: &mut Kernel, pred: Reg, ty: Ty, addr: Addr| {
        let raw = k.mov(Ty::U32, Operand::U(1));
        k.guard(
            pred,
            false,
            Instr::Ld {
                space: StateSpace::GlobalNc,
                ty,
                dst: vec![raw],
                addr,
            },
        );
        k.setp(Cmp::Eq, Ty::U32, raw, Operand::U(0))
    };
    let low_zero = load(k, pred, ty, addr.clone());
    if kind != MaskKind::I64 {
        return low_zero;
    }
    let high = Addr {
        offset: addr.offset + 4,
        ..addr
    };
    load(k, low_zero, Ty::U32, high)
}

/// Emits `body` once per [`MaskKind`], each behind a uniform branch on the
/// `mask_kind` register `kind`: the masked path of a kernel, specialised
/// for every element kind, of which one runs.
pub fn per_kind(k: &mut Kernel, kind: Reg, mut body: impl FnMut(&mut Kernel, MaskKind)) {
    let done = k.label("mask_kind_done");
    for mk in MaskKind::ALL {
        let next = k.label("mask_kind_next");
        let other = k.setp(Cmp::Ne, Ty::U32, kind, Operand::U(mk.code() as u64));
        k.branch_if(other, false, &next);
        body(k, mk);
        k.push(Instr::Bra {
            target: done.clone(),
            uni: true,
        });
        k.push(Instr::Label(next));
    }
    k.push(Instr::Label(done));
}

/// `score = -inf` where `hidden` holds.
pub fn hide_if(k: &mut Kernel, score: Reg, hidden: Reg) {
    k.selp_to(
        Ty::F32,
        score,
        Operand::F32(f32::NEG_INFINITY),
        score,
        hidden,
    );
}

/// `score = -inf` where `seen` does not hold.
pub fn hide_unless(k: &mut Kernel, score: Reg, seen: Reg) {
    k.selp_to(Ty::F32, score, score, Operand::F32(f32::NEG_INFINITY), seen);
}

/// Whether the key block `[j0, j0 + block_n)` needs element-wise masking:
/// it reaches past `Sk`, or there is a mask, or `extra` holds, or (given
/// the CTA's first query row `causal_q0`) it crosses that row's diagonal.
pub fn block_needs_mask(
    k: &mut Kernel,
    j0: Reg,
    block_n: usize,
    seq_k: Reg,
    has_mask: Reg,
    extra: Option<Reg>,
    causal_q0: Option<Reg>,
) -> Reg {
    let block_end = k.bin(BinOp::Add, Ty::U32, j0, Operand::U(block_n as u64));
    let ragged = k.setp(Cmp::Gt, Ty::U32, block_end, seq_k);
    let need = k.reg(Ty::Pred);
    k.bin_to(BinOp::Or, Ty::Pred, need, ragged, has_mask);
    if let Some(x) = extra {
        k.bin_to(BinOp::Or, Ty::Pred, need, need, x);
    }
    if let Some(q0) = causal_q0 {
        // The block crosses the diagonal of the CTA's first row.
        let last_key = k.bin(BinOp::Add, Ty::U32, j0, Operand::U(block_n as u64 - 1));
        let diag = k.setp(Cmp::Gt, Ty::U32, last_key, q0);
        k.bin_to(BinOp::Or, Ty::Pred, need, need, diag);
    }
    need
}

/// `score += bias · log2(e)`, with `bias` the [`load_bias`] of the `kind`
/// element at `addr` where `pred` holds and 0 elsewhere: [`add_bias`] for
/// a mask of any element kind.
pub fn add_kind_bias(k: &mut Kernel, kind: MaskKind, score: Reg, pred: Reg, addr: Addr) {
    let bias = load_bias(k, kind, pred, addr);
    k.mad_to(Ty::F32, score, bias, Operand::F32(LOG2E), score);
}

/// The element offset, in the mask, of query row `row`'s column for key 0
/// (`u64`): `mask_head + row · stride_q - pad`. Key `j` of the row is at
/// offset `+ j`, and is read only where [`mask_column_limit`] says so
/// (keys before the front padding `pad` are not in the mask: the offset
/// may wrap below 0, it is never read there).
pub fn mask_row_offset(k: &mut Kernel, mask_head: Reg, row: Reg, stride_q: Reg, pad: Reg) -> Reg {
    let r64 = k.cvt(None, Ty::U64, Ty::U32, row);
    let o = k.mad(Ty::U64, r64, stride_q, mask_head);
    let pad64 = k.cvt(None, Ty::U64, Ty::U32, pad);
    k.bin(BinOp::Sub, Ty::U64, o, pad64)
}

/// The mask's columns a row reads, `[0, max(Sk, pad) - pad)` (`u32`), for
/// key `j`'s column `j - pad`: a key is read where `j - pad`, as an
/// unsigned 32-bit value, is below this limit, that is `pad <= j < Sk`.
/// Keys before the front padding attend with bias 0; keys past `Sk` are
/// hidden anyway.
pub fn mask_column_limit(k: &mut Kernel, seq_k: Reg, pad: Reg) -> Reg {
    let lim = k.bin(BinOp::Max, Ty::U32, seq_k, pad);
    k.bin(BinOp::Sub, Ty::U32, lim, pad)
}

/// What masking a fragment of scores needs to know.
#[derive(Clone, Copy, Debug)]
pub struct FragmentMask {
    /// The thread's first query row (row slot 0 of [`AccFragment`]), local
    /// to the sequence.
    pub row0: Reg,
    /// `2 · (lane % 4)`: the thread's first key column.
    pub tq2: Reg,
    /// The rows the mask holds, `Sq`: its reads stop there (a mask comes
    /// without sequence bounds, so the sequence's rows are `Sq` too; the
    /// contract's parameter, no register held across a loop).
    pub seq_q: Reg,
    /// The sequence's keys (`Sk` without sequence bounds).
    pub seq_k: Reg,
    /// Whether a mask was passed (a uniform branch skips the bias).
    pub has_mask: Reg,
    /// The mask's device pointer.
    pub mask: Reg,
    /// The mask's element offset of this (batch, head).
    pub mask_head: Reg,
    /// The mask's query stride, in elements.
    pub mask_stride_q: Reg,
    /// The mask's [`MaskKind`] code (the contract's `mask_kind`).
    pub kind: Reg,
    /// The mask's front padding (the contract's `mask_pad`).
    pub pad: Reg,
    /// Top-left causal: keys after the row are hidden.
    pub causal: bool,
}

/// Masks the scores of the key block starting at `j0`: the mask's bias
/// where there is a mask ([`add_kind_bias`], one specialised body per
/// element kind behind [`per_kind`]), then `-inf` for the keys past the
/// sequence's end and, causal, after the row ([`hide_if`]).
pub fn mask_fragment(k: &mut Kernel, acc: &AccFragment, m: &FragmentMask, j0: Reg) {
    let row_offset = |r: usize| Operand::U(AccFragment::row_offset(r) as u64);
    let kbase = k.bin(BinOp::Add, Ty::U32, j0, m.tq2);
    let skip_bias = k.label("no_bias");
    // The mask's bias, in the log2 domain.
    k.branch_if(m.has_mask, true, &skip_bias);
    let col_base = k.bin(BinOp::Sub, Ty::U32, kbase, m.pad);
    let col_lim = mask_column_limit(k, m.seq_k, m.pad);
    // Per row: the columns it reads (none past `Sq`), and the element
    // offset of its key `kbase`.
    let mut row_lims = Vec::new();
    let mut row_offsets = Vec::new();
    let kbase64 = k.cvt(None, Ty::U64, Ty::U32, kbase);
    for r in 0..acc.rows() {
        let row = k.bin(BinOp::Add, Ty::U32, m.row0, row_offset(r));
        let row_in = k.setp(Cmp::Lt, Ty::U32, row, m.seq_q);
        row_lims.push(k.selp(Ty::U32, col_lim, Operand::U(0), row_in));
        let o = mask_row_offset(k, m.mask_head, row, m.mask_stride_q, m.pad);
        row_offsets.push(k.bin(BinOp::Add, Ty::U64, o, kbase64));
    }
    per_kind(k, m.kind, |k, kind| {
        let bytes = kind.bytes();
        // The address of each row's element for key `kbase`; the thread's
        // keys are at immediate offsets from it.
        let at_kbase: Vec<Reg> = row_offsets
            .iter()
            .map(|&o| k.mad(Ty::U64, o, Operand::U(bytes), m.mask))
            .collect();
        for (r, col, s) in acc.elems() {
            let column = k.bin(BinOp::Add, Ty::U32, col_base, Operand::U(col as u64));
            let read = k.setp(Cmp::Lt, Ty::U32, column, row_lims[r]);
            let addr = Addr::at(at_kbase[r], (col as u64 * bytes) as i64);
            add_kind_bias(k, kind, s, read, addr);
        }
    });
    k.push(Instr::Label(skip_bias));
    // Keys past the sequence's end, and (causal) keys after the row, do
    // not exist.
    let rows: Vec<Reg> = (0..acc.rows())
        .map(|r| k.bin(BinOp::Add, Ty::U32, m.row0, row_offset(r)))
        .collect();
    for (r, col, s) in acc.elems() {
        let key = k.bin(BinOp::Add, Ty::U32, kbase, Operand::U(col as u64));
        let hide = k.setp(Cmp::Ge, Ty::U32, key, m.seq_k);
        if m.causal {
            let after = k.setp(Cmp::Gt, Ty::U32, key, rows[r]);
            k.bin_to(BinOp::Or, Ty::Pred, hide, hide, after);
        }
        hide_if(k, s, hide);
    }
}

//! The backward pass on the CPU, written once against [`Simd`] and compiled
//! per instruction set, in FlashAttention-2's two-pass structure so that no
//! two tasks write the same element and every sum has a fixed order:
//!
//! 1. **dK, dV**: one task per (batch, key/value head, block of [`BK`]
//!    keys). It widens its keys and values (transposed, `[D][BK]`), then,
//!    for each query head of the group and each query row that can see the
//!    block, recomputes the row's probabilities `P = e^(s − lse)` from `q`,
//!    `k` and the forward's log-sum-exp, `dP = dO·Vᵀ` and
//!    `dS = P∘(dP − Δ)` (`Δ = rowsum(dO∘O)`, computed once per row
//!    beforehand), and adds `dV[j] += P[j]·dO` and `dK[j] += dS[j]·q·scale`
//!    into its own `f32` block, four query rows per pass over the block
//!    (the block outgrows L1, so each accumulator row is loaded and stored
//!    once per four rows).
//! 2. **dQ**: one task per (batch, query head, block of [`BQ`] queries). It
//!    walks the key blocks the rows can see, recomputes `P` and `dS` the
//!    same way (the same function), and adds `dQ[i] += dS[j]·K[j]` with the
//!    row of `dQ` held in registers over the block's keys; `dQ` is
//!    multiplied by the scale once at the end.
//!
//! The scores and `dP` of one row come out with keys in vector lanes (the
//! key and value blocks are stored transposed), so there is no horizontal
//! sum; the accumulations are row-wise multiply-adds. Memory is the per-task
//! blocks (`O(BQ·D + BK·D)` floats) and two `f32` numbers per query row
//! (`lse` and `Δ`), never `Sq·Sk`. Rows whose `lse` is `-inf` (they see no
//! key) contribute nothing, so their `dq` is zero. Rows whose `lse` is too
//! large for `f32` to hold `ln l` in it (a large finite mask such as `-1e9`
//! on every key) have their maximum `m` and `ln l` recomputed beforehand
//! ([`row_stats`]), and `P = e^((x − m) − ln l)`; for every other row
//! `m = lse` and `ln l = 0` (one more subtraction per probability, one more
//! `f32` per row). The mask is the forward's
//! [`ResolvedMask`](crate::ResolvedMask), applied by the same `bias_row`.

use super::kernel::{read_row, write_row, Src};
use super::simd::Simd;
use crate::layout::Layout;
use crate::mask::ResolvedMask;
use crate::DType;

/// Keys per block of both passes: a multiple of every vector width, and of
/// the `NV·W` key lanes one score step covers on every path (4 × 16 on
/// AVX-512, 8 × 8 on AVX2 and the portable path).
pub const BK: usize = 64;
/// Query rows per task of the dQ pass.
pub const BQ: usize = 64;

/// A raw, writable tensor: its base pointer and layout.
#[derive(Clone, Copy)]
pub(crate) struct DstT {
    /// The first element of the caller's buffer.
    pub ptr: *mut u8,
    /// Offsets of rows, in elements.
    pub layout: Layout,
}

/// Everything the tasks of one backward call share.
pub(crate) struct BwdCtx<'a> {
    /// The element type of every tensor but the log-sum-exp.
    pub dtype: DType,
    /// `[B, Sq, Hq, D]`.
    pub q: Src,
    /// `[B, Sk, Hkv, D]`.
    pub k: Src,
    /// `[B, Sk, Hkv, D]`.
    pub v: Src,
    /// The output gradient, `[B, Sq, Hq, D]`.
    pub dout: Src,
    /// The shift `m` of each row's probabilities `P = e^((x − m) − ln l)`,
    /// row `(b·Hq + h)·Sq + i`: the forward's log-sum-exp, except for rows
    /// [`row_stats`] recomputed (see [`needs_stats`]), where it is the
    /// row's largest masked score.
    pub lse: &'a [f32],
    /// `ln l` of each row, indexed as `lse`: `0` where `lse` is the
    /// log-sum-exp, the log of the softmax denominator after the shift
    /// where [`row_stats`] recomputed the row.
    pub lnl: &'a [f32],
    /// `Δ = rowsum(dO∘O)`, indexed as `lse`.
    pub delta: &'a [f32],
    /// `[B, Sq, Hq, D]`; each row written by one dQ task.
    pub dq: DstT,
    /// `[B, Sk, Hkv, D]`; each row written by one dK/dV task.
    pub dk: DstT,
    /// As `dk`.
    pub dv: DstT,
    /// The mask, checked against this problem, if any.
    pub mask: Option<ResolvedMask<'a>>,
    /// The softmax scale.
    pub scale: f32,
    /// Top-left causal.
    pub causal: bool,
    /// `B`.
    pub batch: usize,
    /// `Hq`.
    pub heads_q: usize,
    /// `Hkv`.
    pub heads_kv: usize,
    /// `Sq`.
    pub seq_q: usize,
    /// `Sk`.
    pub seq_k: usize,
}

// SAFETY: the pointers are views of the caller's buffers, which the entry
// point borrows (shared for the inputs, exclusive for the gradients) for the
// whole parallel loop; tasks write disjoint rows of the gradients.
unsafe impl Send for BwdCtx<'_> {}
unsafe impl Sync for BwdCtx<'_> {}

impl BwdCtx<'_> {
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.heads_q / self.heads_kv
    }
    /// Tasks of the dK/dV pass.
    pub fn kv_tasks(&self) -> usize {
        self.batch * self.heads_kv * self.seq_k.div_ceil(BK)
    }
    /// Tasks of the dQ pass.
    pub fn q_tasks(&self) -> usize {
        self.batch * self.heads_q * self.seq_q.div_ceil(BQ)
    }
}

/// The floats of workspace one task of head size `d` needs (either pass).
pub(crate) fn workspace_floats(d: usize) -> usize {
    // dQ pass: q, dO, dQ (BQ rows each), K rows, Kᵀ, Vᵀ (BK each), and
    // three rows of BK (P, dS, the bias) and a scratch row of D. dK/dV
    // pass: Kᵀ, Vᵀ, dK, dV (BK each), RB rows of q and dO, RB rows of P
    // and dS, the bias.
    let dq_pass = 3 * BQ * d + 3 * BK * d + 3 * BK + d;
    let kv_pass = 4 * BK * d + 2 * RB * d + 2 * RB * BK + BK;
    if dq_pass > kv_pass {
        dq_pass
    } else {
        kv_pass
    }
}

/// One row's probabilities and score gradients against a loaded block.
struct RowInputs {
    /// The query row times the scale, `D` floats.
    q: *const f32,
    /// The output-gradient row, `D` floats.
    dout: *const f32,
    /// The row's shift `m` (finite): its log-sum-exp, or its largest
    /// masked score (see [`BwdCtx::lse`]).
    lse: f32,
    /// The row's `ln l` (see [`BwdCtx::lnl`]).
    lnl: f32,
    /// The row's `Δ`.
    delta: f32,
    /// Keys of the block the row sees (the first `nk`), at most [`BK`].
    nk: usize,
}

/// `out[l] = Σ_d x[d]·t[d][l]` for the lanes `l < lanes` (a multiple of
/// the vector width, at most [`BK`]) of a transposed block `t` (`[D][BK]`).
///
/// # Safety
/// `x` reads `D` floats, `t` reads `D·BK`, `out` writes `lanes`.
#[inline(always)]
unsafe fn dots<S: Simd, const D: usize, const NV: usize>(
    s: S,
    x: *const f32,
    t: *const f32,
    out: *mut f32,
    lanes: usize,
) {
    let w = S::W;
    let mut l0 = 0;
    while l0 < lanes {
        if l0 + NV * w <= lanes {
            let mut acc = [s.zero(); NV];
            for d in 0..D {
                // SAFETY: element `d < D` of `x`.
                let xd = s.splat(unsafe { *x.add(d) });
                for (n, a) in acc.iter_mut().enumerate() {
                    // SAFETY: row `d`, lanes `l0 + n·W..` (below `lanes <=
                    // BK`) of `t`.
                    let tv = unsafe { s.load(t.add(d * BK + l0 + n * w)) };
                    *a = s.fma(xd, tv, *a);
                }
            }
            for (n, a) in acc.iter().enumerate() {
                // SAFETY: lanes `l0 + n·W..` of `out`, below `lanes`.
                unsafe { s.store(out.add(l0 + n * w), *a) };
            }
            l0 += NV * w;
        } else {
            let mut a = s.zero();
            for d in 0..D {
                // SAFETY: element `d < D` of `x`.
                let xd = s.splat(unsafe { *x.add(d) });
                // SAFETY: row `d`, lanes `l0..l0 + W` (below `lanes`) of `t`.
                let tv = unsafe { s.load(t.add(d * BK + l0)) };
                a = s.fma(xd, tv, a);
            }
            // SAFETY: as above.
            unsafe { s.store(out.add(l0), a) };
            l0 += w;
        }
    }
}

/// `P[j] = e^((s[j] + bias[j] − m) − ln l)` into `p` and `dS[j] = P[j]·(dP[j] − Δ)`
/// into `ds` for the keys `j < nk` of a block (lanes up to the next vector
/// hold finite values that the callers never read). `bias` holds the mask's
/// bias of those keys, if the call has a mask.
///
/// # Safety
/// `kt` and `vt` read `D·BK` floats; `p`, `ds` and `bias` hold [`BK`].
#[inline(always)]
unsafe fn row_probs<S: Simd, const D: usize, const NV: usize>(
    s: S,
    row: &RowInputs,
    kt: *const f32,
    vt: *const f32,
    bias: Option<*const f32>,
    p: *mut f32,
    ds: *mut f32,
) {
    let w = S::W;
    let lanes = row.nk.div_ceil(w) * w;
    // SAFETY: the caller's contract.
    unsafe {
        dots::<S, D, NV>(s, row.q, kt, p, lanes);
        dots::<S, D, NV>(s, row.dout, vt, ds, lanes);
        if let Some(bias) = bias {
            for j in 0..row.nk {
                *p.add(j) += *bias.add(j);
            }
        }
        let (lse, delta) = (s.splat(row.lse), s.splat(row.delta));
        let lnl = s.splat(row.lnl);
        for l in (0..lanes).step_by(w) {
            // `ln l` is 0 for ordinary rows: `y − 0 = y`, today's bits.
            let pr = s.exp(s.sub(s.sub(s.load(p.add(l)), lse), lnl));
            s.store(p.add(l), pr);
            s.store(ds.add(l), s.mul(pr, s.sub(s.load(ds.add(l)), delta)));
        }
    }
}

/// Vectors of a `dQ` row held in registers while the keys are summed.
const DQ_CHUNK: usize = 8;

/// `dq[0..D] += Σ_{j<nk} ds[j]·kr[j][0..D]`, [`DQ_CHUNK`] vectors of the
/// row at a time in registers, the keys summed in order.
///
/// # Safety
/// `dq` holds `D` floats, `ds` `nk`, `kr` `nk` rows of `D`.
#[inline(always)]
unsafe fn dq_row<S: Simd, const D: usize>(
    s: S,
    dq: *mut f32,
    ds: *const f32,
    kr: *const f32,
    nk: usize,
) {
    let w = S::W;
    let full = D / w * w;
    let mut c0 = 0;
    // SAFETY (all accesses): the caller's contract; `c0 + DQ_CHUNK·W <= D`
    // in the first loop, `c0 + W <= D` in the second.
    unsafe {
        while c0 + DQ_CHUNK * w <= full {
            let mut acc = [s.zero(); DQ_CHUNK];
            for (n, a) in acc.iter_mut().enumerate() {
                *a = s.load(dq.add(c0 + n * w));
            }
            for j in 0..nk {
                let x = s.splat(*ds.add(j));
                for (n, a) in acc.iter_mut().enumerate() {
                    *a = s.fma(x, s.load(kr.add(j * D + c0 + n * w)), *a);
                }
            }
            for (n, a) in acc.iter().enumerate() {
                s.store(dq.add(c0 + n * w), *a);
            }
            c0 += DQ_CHUNK * w;
        }
        while c0 < full {
            let mut a = s.load(dq.add(c0));
            for j in 0..nk {
                a = s.fma(s.splat(*ds.add(j)), s.load(kr.add(j * D + c0)), a);
            }
            s.store(dq.add(c0), a);
            c0 += w;
        }
        for c in full..D {
            for j in 0..nk {
                *dq.add(c) += *ds.add(j) * *kr.add(j * D + c);
            }
        }
    }
}

/// Reads `D` elements of row (b, t, h) of `src` into `dst` as `f32`,
/// times `mul`.
///
/// # Safety
/// The row is in bounds of `src`'s buffer of `dtype` elements; `dst` holds
/// `D` floats.
#[inline(always)]
unsafe fn load_row<S: Simd, const D: usize>(
    s: S,
    dtype: DType,
    src: &Src,
    (b, t, h): (usize, usize, usize),
    dst: *mut f32,
    mul: f32,
) {
    // SAFETY: the caller's contract.
    unsafe {
        read_row::<S, D>(s, dtype, src.ptr, src.layout.offset(b, t, h), dst);
        if mul != 1.0 {
            for c in 0..D {
                *dst.add(c) *= mul;
            }
        }
    }
}

/// Loads keys and values `j0..j0 + n` of (b, kvh) transposed into `kt` and
/// `vt` (`[D][BK]`, lanes `n..BK` zero), and the keys row-major into `kr`
/// (`[BK][D]`) where given; `row` is `D` floats of scratch.
///
/// # Safety
/// The rows are in bounds; the buffers hold what is said above and do not
/// overlap.
#[inline(always)]
unsafe fn load_kv<S: Simd, const D: usize>(
    s: S,
    ctx: &BwdCtx<'_>,
    (b, kvh, j0, n): (usize, usize, usize, usize),
    kt: *mut f32,
    vt: *mut f32,
    kr: Option<*mut f32>,
    row: *mut f32,
) {
    // SAFETY: the caller's contract.
    unsafe {
        std::ptr::write_bytes(kt, 0, D * BK);
        std::ptr::write_bytes(vt, 0, D * BK);
        for j in 0..n {
            load_row::<S, D>(s, ctx.dtype, &ctx.k, (b, j0 + j, kvh), row, 1.0);
            for d in 0..D {
                *kt.add(d * BK + j) = *row.add(d);
            }
            if let Some(kr) = kr {
                std::ptr::copy_nonoverlapping(row, kr.add(j * D), D);
            }
            load_row::<S, D>(s, ctx.dtype, &ctx.v, (b, j0 + j, kvh), row, 1.0);
            for d in 0..D {
                *vt.add(d * BK + j) = *row.add(d);
            }
        }
    }
}

/// The keys of the block at `j0` (of `n`) that query row `i` sees.
#[inline(always)]
fn seen(causal: bool, i: usize, j0: usize, n: usize) -> usize {
    if !causal {
        n
    } else if i < j0 {
        0
    } else {
        n.min(i + 1 - j0)
    }
}

/// Query rows the dK/dV pass gathers before it adds them into the block.
const RB: usize = 4;

/// `dV[j] += Σ_r P[r][j]·dO[r]` and `dK[j] += Σ_r dS[r][j]·q[r]` for the
/// keys `j < n` and the gathered rows `r < rows`, each accumulator row
/// loaded and stored once; the sum over `r` runs in row order.
///
/// # Safety
/// `dk`, `dv` hold `n` rows of `D`; `q`, `dout` hold `rows` rows of `D`;
/// `p`, `ds` hold `rows` rows of [`BK`], valid for `j < n`; `rows <= RB`.
#[inline(always)]
unsafe fn accumulate<S: Simd, const D: usize>(
    s: S,
    (dk, dv): (*mut f32, *mut f32),
    (q, dout): (*const f32, *const f32),
    (p, ds): (*const f32, *const f32),
    rows: usize,
    n: usize,
) {
    let w = S::W;
    let full = D / w * w;
    for j in 0..n {
        // SAFETY: the caller's contract: row `j` of the accumulators,
        // element `j` of each gathered row of `p` and `ds`.
        unsafe {
            let (kr, vr) = (dk.add(j * D), dv.add(j * D));
            let mut pj = [s.zero(); RB];
            let mut sj = [s.zero(); RB];
            for r in 0..rows {
                pj[r] = s.splat(*p.add(r * BK + j));
                sj[r] = s.splat(*ds.add(r * BK + j));
            }
            for c in (0..full).step_by(w) {
                let (mut av, mut ak) = (s.load(vr.add(c)), s.load(kr.add(c)));
                for r in 0..rows {
                    av = s.fma(pj[r], s.load(dout.add(r * D + c)), av);
                    ak = s.fma(sj[r], s.load(q.add(r * D + c)), ak);
                }
                s.store(vr.add(c), av);
                s.store(kr.add(c), ak);
            }
            for c in full..D {
                for r in 0..rows {
                    *vr.add(c) += *p.add(r * BK + j) * *dout.add(r * D + c);
                    *kr.add(c) += *ds.add(r * BK + j) * *q.add(r * D + c);
                }
            }
        }
    }
}

/// Task `task` of the dK/dV pass: keys `kb·BK..` of (b, kvh).
///
/// # Safety
/// `ws` holds [`workspace_floats`]`(D)` floats; `ctx` describes buffers
/// valid for its layouts and dtype; no other thread runs the same task.
#[inline(always)]
pub(crate) unsafe fn kv_task<S: Simd, const D: usize, const NV: usize>(
    s: S,
    ctx: &BwdCtx<'_>,
    ws: &mut [f32],
    task: usize,
) {
    let k_blocks = ctx.seq_k.div_ceil(BK);
    let kb = task % k_blocks;
    let kvh = (task / k_blocks) % ctx.heads_kv;
    let b = task / (k_blocks * ctx.heads_kv);
    let j0 = kb * BK;
    let n = BK.min(ctx.seq_k - j0);
    debug_assert!(ws.len() >= workspace_floats(D));
    let base = ws.as_mut_ptr();
    // SAFETY (offsets): the parts below lie inside `ws` and do not overlap.
    let (kt, vt, dk, dv, q, dout, p, ds, bias) = unsafe {
        let x = 4 * D * BK;
        (
            base,
            base.add(D * BK),
            base.add(2 * D * BK),
            base.add(3 * D * BK),
            base.add(x),
            base.add(x + RB * D),
            base.add(x + 2 * RB * D),
            base.add(x + 2 * RB * D + RB * BK),
            base.add(x + 2 * RB * D + 2 * RB * BK),
        )
    };
    // SAFETY: rows `j0..j0 + n` of (b, kvh) are in bounds; `q` is scratch
    // of D floats until the rows are read.
    unsafe {
        load_kv::<S, D>(s, ctx, (b, kvh, j0, n), kt, vt, None, q);
        std::ptr::write_bytes(dk, 0, 2 * D * BK);
    }
    // Rows are gathered RB at a time, so that each dK and dV row is loaded
    // and stored once per RB query rows (the blocks outgrow L1).
    let mut pending = 0;
    let group = ctx.group();
    for h in kvh * group..(kvh + 1) * group {
        // Top-left causal: rows before j0 see none of the block.
        let first = if ctx.causal { j0.min(ctx.seq_q) } else { 0 };
        for i in first..ctx.seq_q {
            let r = (b * ctx.heads_q + h) * ctx.seq_q + i;
            let lse = ctx.lse[r];
            let nk = seen(ctx.causal, i, j0, n);
            if lse == f32::NEG_INFINITY || nk == 0 {
                continue; // sees no key at all, or none of this block
            }
            // SAFETY: row (b, i, h) of q and dout; slot `pending < RB` of
            // `q`, `dout` (RB rows of D), `p`, `ds` (RB rows of BK); `bias`
            // holds BK; `nk <= n <= BK`.
            unsafe {
                let (qg, dg) = (q.add(pending * D), dout.add(pending * D));
                let (pg, sg) = (p.add(pending * BK), ds.add(pending * BK));
                load_row::<S, D>(s, ctx.dtype, &ctx.q, (b, i, h), qg, ctx.scale);
                load_row::<S, D>(s, ctx.dtype, &ctx.dout, (b, i, h), dg, 1.0);
                let bias = ctx.mask.as_ref().map(|m| {
                    m.bias_row(b, h, i, j0, std::slice::from_raw_parts_mut(bias, nk));
                    bias.cast_const()
                });
                let row = RowInputs {
                    q: qg,
                    dout: dg,
                    lse,
                    lnl: ctx.lnl[r],
                    delta: ctx.delta[r],
                    nk,
                };
                row_probs::<S, D, NV>(s, &row, kt, vt, bias, pg, sg);
                // Keys the row does not see add nothing.
                for j in nk..n {
                    *pg.add(j) = 0.0;
                    *sg.add(j) = 0.0;
                }
            }
            pending += 1;
            if pending == RB {
                // SAFETY: RB gathered rows; dK and dV hold n rows of D.
                unsafe { accumulate::<S, D>(s, (dk, dv), (q, dout), (p, ds), RB, n) };
                pending = 0;
            }
        }
    }
    if pending > 0 {
        // SAFETY: as above, `pending` rows.
        unsafe { accumulate::<S, D>(s, (dk, dv), (q, dout), (p, ds), pending, n) };
    }
    for j in 0..n {
        // SAFETY: rows (b, j0 + j, kvh) of dk and dv are this task's alone.
        unsafe {
            let off = ctx.dk.layout.offset(b, j0 + j, kvh);
            write_row::<S, D>(s, ctx.dtype, ctx.dk.ptr, off, dk.add(j * D));
            let off = ctx.dv.layout.offset(b, j0 + j, kvh);
            write_row::<S, D>(s, ctx.dtype, ctx.dv.ptr, off, dv.add(j * D));
        }
    }
}

/// Task `task` of the dQ pass: query rows `qb·BQ..` of (b, h).
///
/// # Safety
/// As [`kv_task`].
#[inline(always)]
pub(crate) unsafe fn q_task<S: Simd, const D: usize, const NV: usize>(
    s: S,
    ctx: &BwdCtx<'_>,
    ws: &mut [f32],
    task: usize,
) {
    let q_blocks = ctx.seq_q.div_ceil(BQ);
    let qb = task % q_blocks;
    let h = (task / q_blocks) % ctx.heads_q;
    let b = task / (q_blocks * ctx.heads_q);
    let kvh = h / ctx.group();
    let i0 = qb * BQ;
    let rows = BQ.min(ctx.seq_q - i0);
    debug_assert!(ws.len() >= workspace_floats(D));
    let base = ws.as_mut_ptr();
    // SAFETY (offsets): the parts below lie inside `ws` and do not overlap.
    let (q, dout, dq, kr, kt, vt, p, ds, bias, scratch) = unsafe {
        let x = 3 * BQ * D;
        (
            base,
            base.add(BQ * D),
            base.add(2 * BQ * D),
            base.add(x),
            base.add(x + BK * D),
            base.add(x + 2 * BK * D),
            base.add(x + 3 * BK * D),
            base.add(x + 3 * BK * D + BK),
            base.add(x + 3 * BK * D + 2 * BK),
            base.add(x + 3 * BK * D + 3 * BK),
        )
    };
    let row_of = |r: usize| (b * ctx.heads_q + h) * ctx.seq_q + i0 + r;
    for r in 0..rows {
        // SAFETY: rows (b, i0 + r, h) of q and dout; row r of `q`, `dout`,
        // `dq` (BQ rows of D each).
        unsafe {
            load_row::<S, D>(
                s,
                ctx.dtype,
                &ctx.q,
                (b, i0 + r, h),
                q.add(r * D),
                ctx.scale,
            );
            load_row::<S, D>(
                s,
                ctx.dtype,
                &ctx.dout,
                (b, i0 + r, h),
                dout.add(r * D),
                1.0,
            );
            std::ptr::write_bytes(dq.add(r * D), 0, D);
        }
    }
    let key_end = if ctx.causal {
        ctx.seq_k.min(i0 + rows)
    } else {
        ctx.seq_k
    };
    let mut j0 = 0;
    while j0 < key_end {
        let n = BK.min(ctx.seq_k - j0);
        // SAFETY: rows `j0..j0 + n` of (b, kvh) are in bounds; `kr`, `kt`,
        // `vt` hold BK rows, `scratch` D floats.
        unsafe { load_kv::<S, D>(s, ctx, (b, kvh, j0, n), kt, vt, Some(kr), scratch) };
        for r in 0..rows {
            let i = i0 + r;
            let lse = ctx.lse[row_of(r)];
            let nk = seen(ctx.causal, i, j0, n);
            if lse == f32::NEG_INFINITY || nk == 0 {
                continue;
            }
            // SAFETY: row r of `q`, `dout`, `dq`; `p`, `ds`, `bias` hold BK;
            // `kr` rows `< nk <= n`.
            unsafe {
                let bias = ctx.mask.as_ref().map(|m| {
                    m.bias_row(b, h, i, j0, std::slice::from_raw_parts_mut(bias, nk));
                    bias.cast_const()
                });
                let row = RowInputs {
                    q: q.add(r * D),
                    dout: dout.add(r * D),
                    lse,
                    lnl: ctx.lnl[row_of(r)],
                    delta: ctx.delta[row_of(r)],
                    nk,
                };
                row_probs::<S, D, NV>(s, &row, kt, vt, bias, p, ds);
                dq_row::<S, D>(s, dq.add(r * D), ds, kr, nk);
            }
        }
        j0 += n;
    }
    for r in 0..rows {
        // SAFETY: row (b, i0 + r, h) of dq is this task's alone; row r of
        // `dq` holds D floats.
        unsafe {
            let x = dq.add(r * D);
            for c in 0..D {
                *x.add(c) *= ctx.scale;
            }
            let off = ctx.dq.layout.offset(b, i0 + r, h);
            write_row::<S, D>(s, ctx.dtype, ctx.dq.ptr, off, x);
        }
    }
}

/// The `|lse|` from which [`row_stats`] recomputes a row: `2^12`. The
/// forward stores `lse = m + ln l` in `f32`, whose spacing at `|lse|` is
/// `|lse|·2^-23` or so; below `2^12` that is at most `2^-12`, so `P` keeps
/// a relative error of at most `2^-13 ≈ 1.2e-4` from the rounding, and only
/// rows with scores beyond ±4000 (which a mask puts there, not attention
/// logits) reach it. At `2^12` and above the rounding grows with the mask's
/// size until it swallows `ln l ≤ ln Sk` whole (spacing 64 at `-1e9`,
/// `2·10^31` at `f32::MIN`), and `P = e^(x − lse)` becomes 1 for every key
/// instead of `1/Sk`. Those rows, and only those, pay the recomputation:
/// one `q·kᵀ` row, `O(Sk·D)`, the cost of a forward row.
pub(crate) const LARGE_LSE: f32 = 4096.0;

/// Whether [`row_stats`] recomputes the row whose log-sum-exp is `lse`.
#[inline]
pub(crate) fn needs_stats(lse: f32) -> bool {
    lse.is_finite() && lse.abs() >= LARGE_LSE
}

/// Recomputes the softmax statistics of the rows of (b, h) `bh = b·Hq + h`
/// whose log-sum-exp is large (see [`needs_stats`]): for each, its
/// largest masked score `m` into `m[i]` (which holds the forward's lse on
/// entry) and `ln l`, the log of `l = Σ_j e^(x_j − m)`, into `lnl[i]`. The
/// scores are formed by the very calls [`row_probs`] makes (`dots` on the
/// scaled query row and the transposed key block, then `bias_row` added),
/// so `m` and `l` describe exactly the `x` the passes exponentiate, and
/// `Σ_j P[j] = 1` to rounding. The sum runs over key blocks in order with
/// the online rescaling `l ← l·e^(m_old − m_new) + Σ e^(x − m_new)`:
/// deterministic. Other rows are left as they are (`lnl` 0).
///
/// # Safety
/// `ws` holds [`workspace_floats`]`(D)` floats; `ctx` describes buffers
/// valid for its layouts and dtype (its `lse`, `lnl` and `delta` are not
/// read); `m` and `lnl` hold `Sq` floats.
#[inline(always)]
pub(crate) unsafe fn row_stats<S: Simd, const D: usize, const NV: usize>(
    s: S,
    ctx: &BwdCtx<'_>,
    ws: &mut [f32],
    bh: usize,
    m: &mut [f32],
    lnl: &mut [f32],
) {
    let (b, h) = (bh / ctx.heads_q, bh % ctx.heads_q);
    let kvh = h / ctx.group();
    let rows: Vec<usize> = (0..m.len()).filter(|&i| needs_stats(m[i])).collect();
    let Some(&last) = rows.last() else {
        return;
    };
    debug_assert!(ws.len() >= workspace_floats(D));
    let base = ws.as_mut_ptr();
    // SAFETY (offsets): 2·D·BK + 2·D + 2·BK floats, inside `ws`
    // (`workspace_floats(D)` is more), not overlapping.
    let (kt, vt, q, scratch, p, bias) = unsafe {
        let x = 2 * D * BK;
        (
            base,
            base.add(D * BK),
            base.add(x),
            base.add(x + D),
            base.add(x + 2 * D),
            base.add(x + 2 * D + BK),
        )
    };
    let mut mx = vec![f32::NEG_INFINITY; rows.len()];
    let mut sum = vec![0.0f32; rows.len()];
    let key_end = if ctx.causal {
        ctx.seq_k.min(last + 1)
    } else {
        ctx.seq_k
    };
    let w = S::W;
    let mut j0 = 0;
    while j0 < key_end {
        let n = BK.min(ctx.seq_k - j0);
        // SAFETY: rows `j0..j0 + n` of (b, kvh) are in bounds; `kt`, `vt`
        // hold D·BK floats, `scratch` D.
        unsafe { load_kv::<S, D>(s, ctx, (b, kvh, j0, n), kt, vt, None, scratch) };
        for (r, &i) in rows.iter().enumerate() {
            let nk = seen(ctx.causal, i, j0, n);
            if nk == 0 {
                continue;
            }
            let lanes = nk.div_ceil(w) * w;
            // SAFETY: row (b, i, h) of q; `q` holds D floats; `p` and
            // `bias` hold BK >= lanes; `kt` D·BK.
            let x = unsafe {
                load_row::<S, D>(s, ctx.dtype, &ctx.q, (b, i, h), q, ctx.scale);
                dots::<S, D, NV>(s, q, kt, p, lanes);
                if let Some(mask) = ctx.mask.as_ref() {
                    let bias = std::slice::from_raw_parts_mut(bias, nk);
                    mask.bias_row(b, h, i, j0, bias);
                    for (j, &y) in bias.iter().enumerate() {
                        *p.add(j) += y;
                    }
                }
                std::slice::from_raw_parts(p, nk)
            };
            let top = x.iter().fold(mx[r], |a, &y| if y > a { y } else { a });
            if top == f32::NEG_INFINITY {
                continue; // every key so far hidden
            }
            let rescale = if mx[r] == f32::NEG_INFINITY {
                0.0
            } else {
                (mx[r] - top).exp()
            };
            let block: f32 = x.iter().map(|&y| (y - top).exp()).sum();
            sum[r] = sum[r] * rescale + block;
            mx[r] = top;
        }
        j0 += n;
    }
    for (r, &i) in rows.iter().enumerate() {
        // A row the forward saw keys in sees the same ones here; should it
        // not, the forward's lse stays (with `ln l` 0).
        if mx[r].is_finite() && sum[r] > 0.0 {
            m[i] = mx[r];
            lnl[i] = sum[r].ln();
        }
    }
}

//! The backward pass on the CPU, written once against [`Simd`] and compiled
//! per instruction set, in FlashAttention-2's structure: the probabilities
//! are recomputed tile by tile from `q`, `k` and the forward's log-sum-exp,
//! and each of the five products runs once per tile. No two tasks write the
//! same element and every sum has a fixed order:
//!
//! 1. **dK, dV and dQ partials**: one task per (batch, key/value head,
//!    chunk of key blocks). For each block of [`BK`] keys of its chunk it
//!    packs the keys and values (transposed `[D][BK]` for the score
//!    products, the keys also row-major for `dQ`) and zeroes two `f32`
//!    accumulators `dK`, `dV`; then for each query head of the group and
//!    each tile of [`BQ`] query rows that can see the block it packs the
//!    rows of `q·scale` and `dO` and computes
//!    - `S = q·Kᵀ` and `dP = dO·Vᵀ` (keys in vector lanes),
//!    - `P = e^((S + bias − m) − ln l)` and `dS = P∘(dP − Δ)`
//!      (`Δ = rowsum(dO∘O)`, computed once per row beforehand),
//!    - `dV += Pᵀ·dO`, `dK += dSᵀ·(q·scale)`, and `dQ_c += dS·K` into the
//!      chunk's own `f32` partial of `dQ`.
//!
//!    Each product is a register-blocked micro-kernel: [`R`] rows × `NV`
//!    (or `CV`) vectors of `f32` accumulators held in registers over the
//!    whole reduction (4 × 4 `zmm` on AVX-512, 4 × 2 `ymm` on AVX2 and the
//!    portable path), each operand element loaded once per micro-tile.
//! 2. **dQ**: one task per (batch, query head, block of [`BQ`] rows) adds
//!    the chunks' partials of each row in chunk order, multiplies by the
//!    scale and writes the row in the caller's dtype.
//!
//! The number of chunks per (batch, key/value head) depends on the shape
//! only ([`key_chunks`]: enough for [`MIN_TASKS`] tasks, at most
//! [`MAX_CHUNKS`]), never on the thread count, so the bits are the same
//! whatever the pool. Memory is the per-task tiles (`O(BK·D + BQ·D)`
//! floats), two `f32` numbers per query row (`lse` and `Δ`) and the `dQ`
//! partials (`chunks · B·Hq·Sq·D` floats, [`key_chunks`] of the gradient's
//! size), never `Sq·Sk`.
//!
//! Tasks run per batch entry ([`Seq`]: a batch of `[B, S, H, D]`
//! tensors, a packed sequence, or a batch and its key-padding run), in the
//! entry's local positions; the first pass visits only the keys the entry
//! sees and writes zero `dk`, `dv` for the rest of its keys; the dQ pass
//! runs over the tensors' query tokens, whatever sequence holds them.
//!
//! Rows whose `lse` is `-inf` (they see no key) contribute nothing, so
//! their `dq` is zero. Rows whose `lse` is too large for `f32` to hold
//! `ln l` in it (a large finite mask such as `-1e9` on every key) have
//! their maximum `m` and `ln l` recomputed beforehand ([`row_stats`]), and
//! `P = e^((x − m) − ln l)`; for every other row `m = lse` and `ln l = 0`
//! (one more subtraction per probability, one more `f32` per row). The mask
//! is the forward's [`ResolvedMask`](crate::ResolvedMask), applied by the
//! same `bias_row`.

use super::kernel::{read_row, write_row, Src};
use super::seqs::Seq;
use super::simd::Simd;
use crate::layout::Layout;
use crate::mask::ResolvedMask;
use crate::DType;

/// Keys per block: a multiple of the `NV·W` key lanes one score
/// micro-tile covers on every path (4 × 16 on AVX-512, 2 × 8 on AVX2 and
/// the portable path) and of [`R`]. 64 keys × D = 128 keep a block's
/// packed keys and values (three copies) and its two accumulators in
/// 160 KiB of L2.
pub const BK: usize = 64;
/// Query rows per tile: a multiple of [`R`].
pub const BQ: usize = 64;
/// Rows of every micro-tile: 4 rows × 4 `zmm` is 16 accumulators, and
/// each step loads 4 vectors and broadcasts 4 scalars for 16 FMAs.
const R: usize = 4;
/// Tasks the first pass aims for: with fewer (batch, key/value head) pairs
/// than this, each pair's keys are split into chunks.
pub const MIN_TASKS: usize = 16;
/// At most this many chunks per (batch, key/value head): each costs one
/// `f32` copy of the `dQ` of the pair's query heads.
pub const MAX_CHUNKS: usize = 8;

/// `d` rounded up to 16: the row stride, in floats, of every row-major
/// tile and of the `dQ` partials, so that rows are whole `zmm` vectors and
/// 64-byte aligned.
pub(crate) const fn padded(d: usize) -> usize {
    d.div_ceil(16) * 16
}

/// Chunks the keys of each (batch, key/value head) are split into:
/// enough for [`MIN_TASKS`] tasks, at most [`MAX_CHUNKS`] and at most one
/// per key block; 1 when there is nothing to split. A function of the
/// shape alone, so the order of every sum is too.
pub(crate) fn key_chunks(batch: usize, heads_kv: usize, seq_k: usize) -> usize {
    let pairs = (batch * heads_kv).max(1);
    MIN_TASKS
        .div_ceil(pairs)
        .min(MAX_CHUNKS)
        .min(seq_k.div_ceil(BK))
        .max(1)
}

/// The key blocks of chunk `c` of `chunks` over `seq_k` keys: the chunks
/// cut the blocks into consecutive runs of about equal work, so that the
/// tasks are of one size. Block `kb` costs one unit, or when causal (with
/// `Sq` queries) the `Sq − kb·BK` rows that see it (the first blocks are
/// seen by every row, the last by few). Every block is in exactly one
/// chunk (some may be empty): its dK and dV rows are written even when no
/// row sees it.
fn chunk_blocks(
    c: usize,
    chunks: usize,
    seq_k: usize,
    causal_seq_q: Option<usize>,
) -> std::ops::Range<usize> {
    let k_blocks = seq_k.div_ceil(BK);
    let chunks = chunks.max(1);
    let work = |kb: usize| match causal_seq_q {
        Some(sq) => sq.saturating_sub(kb * BK),
        None => 1,
    };
    let total: usize = (0..k_blocks).map(work).sum();
    // The first block of chunk `c`: where the work before it reaches
    // `c/chunks` of the total.
    let start = |c: usize| {
        if c == 0 {
            return 0;
        }
        if c >= chunks {
            return k_blocks;
        }
        let mut before = 0;
        for kb in 0..k_blocks {
            if before * chunks >= c * total {
                return kb;
            }
            before += work(kb);
        }
        k_blocks
    };
    start(c)..start(c + 1)
}

/// A raw, writable tensor: its base pointer and layout.
#[derive(Clone, Copy)]
pub(crate) struct DstT {
    /// The first element of the caller's buffer.
    pub ptr: *mut u8,
    /// Offsets of rows, in elements.
    pub layout: Layout,
}

/// Everything the tasks of one backward call share.
///
/// Batch entries ([`Seq`]) are in their local positions (query `i` is
/// token `q0 + i` of the tensors' batch `tb`, key `j` token `k0 + j`); the
/// per-row arrays and the `dQ` partials are indexed by token: row
/// `(tb·Hq + h)·Tq + t` (`Tq` = `Sq` and `tb` = `b` for `[B, Sq, Hq, D]`
/// tensors).
pub(crate) struct BwdCtx<'a> {
    /// The element type of every tensor but the log-sum-exp.
    pub dtype: DType,
    /// `[B, Sq, Hq, D]`, or `[1, Tq, Hq, D]` packed.
    pub q: Src,
    /// `[B, Sk, Hkv, D]`, or `[1, Tk, Hkv, D]` packed.
    pub k: Src,
    /// As `k`.
    pub v: Src,
    /// The output gradient, as `q`.
    pub dout: Src,
    /// The shift `m` of each row's probabilities `P = e^((x − m) − ln l)`,
    /// row `(tb·Hq + h)·Tq + t`: the forward's log-sum-exp, except for rows
    /// [`row_stats`] recomputed (see [`needs_stats`]), where it is the
    /// row's largest masked score.
    pub lse: &'a [f32],
    /// `ln l` of each row, indexed as `lse`: `0` where `lse` is the
    /// log-sum-exp, the log of the softmax denominator after the shift
    /// where [`row_stats`] recomputed the row.
    pub lnl: &'a [f32],
    /// `Δ = rowsum(dO∘O)`, indexed as `lse`.
    pub delta: &'a [f32],
    /// As `q`; each row written by one dQ task.
    pub dq: DstT,
    /// As `k`; each row written by one dK/dV task.
    pub dk: DstT,
    /// As `dk`.
    pub dv: DstT,
    /// The `f32` partials of `dQ` (unscaled), zeroed, 64-byte aligned:
    /// [`BwdCtx::chunks`] × `[tb][Hq][Tq][padded(D)]`, chunk `c` of the
    /// rows of (entry, h) written by the first-pass task of chunk `c` of
    /// (entry, h's key/value head) alone, then read by the dQ pass. Null
    /// where no pass runs.
    pub dq_acc: *mut f32,
    /// Chunks of key blocks per (entry, key/value head): [`key_chunks`].
    pub chunks: usize,
    /// The mask to add, if any (none where key runs stand for it).
    pub mask: Option<ResolvedMask<'a>>,
    /// The softmax scale.
    pub scale: f32,
    /// Top-left causal, in each entry's local positions.
    pub causal: bool,
    /// The batch entries, in batch order.
    pub seqs: &'a [Seq],
    /// The tensors' batch size (`B`, or 1 packed).
    pub q_batches: usize,
    /// `Hq`.
    pub heads_q: usize,
    /// `Hkv`.
    pub heads_kv: usize,
    /// Query tokens per batch of the tensors (`Sq`, or `Tq` packed).
    pub tokens_q: usize,
}

// SAFETY: the pointers are views of the caller's buffers, which the entry
// point borrows (shared for the inputs, exclusive for the gradients) for the
// whole parallel loop, and of the `dQ` partials, which it owns for as long;
// tasks write disjoint rows of the gradients and of the partials.
unsafe impl Send for BwdCtx<'_> {}
unsafe impl Sync for BwdCtx<'_> {}

impl BwdCtx<'_> {
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.heads_q / self.heads_kv
    }
    /// The key blocks of chunk `c` of entry `seq`'s visible keys (block
    /// `kb` is local keys `lo + kb·BK..`): see [`chunk_blocks`].
    fn chunk_blocks(&self, c: usize, seq: &Seq) -> std::ops::Range<usize> {
        chunk_blocks(
            c,
            self.chunks,
            seq.hi - seq.lo,
            self.causal.then_some(seq.nq.saturating_sub(seq.lo)),
        )
    }
    /// Tasks of the first pass: (entry, key/value head, chunk).
    pub fn kv_tasks(&self) -> usize {
        self.seqs.len() * self.heads_kv * self.chunks
    }
    /// Tasks of the dQ pass: (tensor batch, query head, block of [`BQ`]
    /// tokens).
    pub fn q_tasks(&self) -> usize {
        self.q_batches * self.heads_q * self.tokens_q.div_ceil(BQ)
    }
    /// Rows of the per-row arrays: `tb·Hq·Tq`.
    pub fn rows(&self) -> usize {
        self.q_batches * self.heads_q * self.tokens_q
    }
    /// The row of query token `t` of (tb, h) in the per-row arrays.
    #[inline(always)]
    pub fn row(&self, tb: usize, h: usize, t: usize) -> usize {
        (tb * self.heads_q + h) * self.tokens_q + t
    }
    /// Floats of the `dQ` partials for head size `d`.
    pub fn dq_acc_floats(&self, d: usize) -> usize {
        self.chunks * self.rows() * padded(d)
    }
    /// The first float of the `dQ` partial of chunk `c`, (tb, h), token 0.
    ///
    /// # Safety
    /// `dq_acc` is the buffer described on it; `c`, `tb`, `h` in range.
    unsafe fn dq_part(&self, c: usize, tb: usize, h: usize, dp: usize) -> *mut f32 {
        let row = c * self.rows() + self.row(tb, h, 0);
        // SAFETY: the caller's contract: inside the buffer.
        unsafe { self.dq_acc.add(row * dp) }
    }
}

/// The floats of workspace one task of head size `d` needs (any pass),
/// including 16 of slack to align it to 64 bytes.
pub(crate) fn workspace_floats(d: usize) -> usize {
    // Kᵀ, Vᵀ ([D][BK]); K, dK, dV ([BK][DP]); q·scale, dO ([BQ][DP]);
    // P, dS, bias ([BQ][BK]). `row_stats` and the dQ pass need less.
    let dp = padded(d);
    16 + 2 * d * BK + 3 * BK * dp + 2 * BQ * dp + 3 * BQ * BK
}

/// A task's workspace, carved into its tiles (each 64-byte aligned).
struct Tiles {
    /// Keys, transposed: `[D][BK]`, lanes past the block's keys zero.
    kt: *mut f32,
    /// Values, transposed, as `kt`.
    vt: *mut f32,
    /// Keys, row-major: `[BK][DP]`, rows past the block's keys and
    /// columns past `D` zero.
    kr: *mut f32,
    /// The block's `dK` accumulator, `[BK][DP]`.
    dk: *mut f32,
    /// The block's `dV` accumulator, `[BK][DP]`.
    dv: *mut f32,
    /// The tile's query rows times the scale, `[BQ][DP]`.
    q: *mut f32,
    /// The tile's output-gradient rows, `[BQ][DP]`.
    dout: *mut f32,
    /// Scores, then probabilities, `[BQ][BK]`.
    p: *mut f32,
    /// `dP`, then `dS`, `[BQ][BK]`.
    ds: *mut f32,
    /// The mask's bias, `[BQ][BK]`.
    bias: *mut f32,
}

impl Tiles {
    /// Carves `ws` for head size `D`.
    ///
    /// # Safety
    /// `ws` holds [`workspace_floats`]`(D)` floats.
    #[inline(always)]
    unsafe fn carve<const D: usize>(ws: &mut [f32]) -> Tiles {
        debug_assert!(ws.len() >= workspace_floats(D));
        let dp = padded(D);
        let base = ws.as_mut_ptr();
        let skip = base.align_offset(64).min(16);
        let sizes = [
            D * BK,
            D * BK,
            BK * dp,
            BK * dp,
            BK * dp,
            BQ * dp,
            BQ * dp,
            BQ * BK,
            BQ * BK,
            BQ * BK,
        ];
        let mut at = [std::ptr::null_mut(); 10];
        let mut off = skip;
        for (p, n) in at.iter_mut().zip(sizes) {
            // SAFETY: the sizes sum to `workspace_floats(D) - 16` and
            // `skip <= 16`: every part lies inside `ws`; each size is a
            // multiple of 16 floats, so every part stays aligned.
            *p = unsafe { base.add(off) };
            off += n;
        }
        let [kt, vt, kr, dk, dv, q, dout, p, ds, bias] = at;
        Tiles {
            kt,
            vt,
            kr,
            dk,
            dv,
            q,
            dout,
            p,
            ds,
            bias,
        }
    }
}

/// `out[r][l0 + lane] = Σ_{d<D} a[r][d]·t[d][l0 + lane]` for the rows
/// `r < RR` of `a` (row stride `stride`) and the `NV·W` lanes from `l0` of a
/// transposed block `t` (`[D][BK]`): the scores or `dP` of `RR` rows, with
/// `RR·NV` accumulators in registers. Each lane's sum runs over `d` in
/// order, one multiply-add at a time, whatever `RR` and `NV` are (so
/// [`row_stats`] forms the very scores the passes do).
///
/// # Safety
/// `a` reads `RR` rows of `D`; `t` reads `D·BK`; `l0 + NV·W <= BK`; `out`
/// writes `RR` rows of [`BK`].
#[inline(always)]
unsafe fn score_tile<S: Simd, const D: usize, const RR: usize, const NV: usize>(
    s: S,
    (a, stride): (*const f32, usize),
    t: *const f32,
    l0: usize,
    out: *mut f32,
) {
    let w = S::W;
    let mut acc = [[s.zero(); NV]; RR];
    // SAFETY (all accesses): the caller's contract.
    unsafe {
        for d in 0..D {
            let mut tv = [s.zero(); NV];
            for (n, x) in tv.iter_mut().enumerate() {
                *x = s.load(t.add(d * BK + l0 + n * w));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let x = s.splat(*a.add(r * stride + d));
                for (n, y) in row.iter_mut().enumerate() {
                    *y = s.fma(x, tv[n], *y);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (n, y) in row.iter().enumerate() {
                s.store(out.add(r * BK + l0 + n * w), *y);
            }
        }
    }
}

/// A rank update of `RR` accumulator rows over `CV` vectors of columns
/// from `col`: `c[r][col..] += Σ_{k<kn} a(r, k)·b[k][col..]`, where
/// `a(r, k) = a[r·a_row + k·a_k]`, the sum over `k` in order. `c` and `b`
/// have row stride `padded(D)`.
///
/// # Safety
/// `c` reads and writes `RR` rows, `b` reads `kn` rows, from `col` to
/// `col + CV·W <= padded(D)`; `a` reads the `RR × kn` elements named.
#[inline(always)]
unsafe fn update_block<S: Simd, const D: usize, const RR: usize, const CV: usize>(
    s: S,
    c: *mut f32,
    (a, a_row, a_k): (*const f32, usize, usize),
    b: *const f32,
    kn: usize,
    col: usize,
) {
    let (w, dp) = (S::W, padded(D));
    let mut acc = [[s.zero(); CV]; RR];
    // SAFETY (all accesses): the caller's contract.
    unsafe {
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, y) in row.iter_mut().enumerate() {
                *y = s.load(c.add(r * dp + col + v * w));
            }
        }
        for k in 0..kn {
            let mut bv = [s.zero(); CV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = s.load(b.add(k * dp + col + v * w));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let x = s.splat(*a.add(r * a_row + k * a_k));
                for (v, y) in row.iter_mut().enumerate() {
                    *y = s.fma(x, bv[v], *y);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, y) in row.iter().enumerate() {
                s.store(c.add(r * dp + col + v * w), *y);
            }
        }
    }
}

/// [`update_block`] over every column of `padded(D)`: `CV` vectors at a
/// time, then one.
///
/// # Safety
/// As [`update_block`] for the columns `0..padded(D)`.
#[inline(always)]
unsafe fn update_rows<S: Simd, const D: usize, const RR: usize, const CV: usize>(
    s: S,
    c: *mut f32,
    a: (*const f32, usize, usize),
    b: *const f32,
    kn: usize,
) {
    let (w, dp) = (S::W, padded(D));
    let mut col = 0;
    // SAFETY: the caller's contract; `col + CV·W <= DP`, then `col + W <=
    // DP` (DP is a multiple of 16, so of W).
    unsafe {
        while col + CV * w <= dp {
            update_block::<S, D, RR, CV>(s, c, a, b, kn, col);
            col += CV * w;
        }
        while col < dp {
            update_block::<S, D, RR, 1>(s, c, a, b, kn, col);
            col += w;
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

/// Loads keys `j0..j0 + n` of (b, kvh) row-major into `kr` (`[BK][DP]`,
/// rows `n..` and columns `D..` zero) and transposed into `kt`
/// (`[D][BK]`, lanes `n..` zero), and the values transposed into `vt`
/// where given, through `row` (`DP` floats of scratch).
///
/// # Safety
/// The rows are in bounds; the buffers hold what is said above and do not
/// overlap.
#[inline(always)]
unsafe fn load_kv<S: Simd, const D: usize>(
    s: S,
    ctx: &BwdCtx<'_>,
    (b, kvh, j0, n): (usize, usize, usize, usize),
    (kr, kt): (*mut f32, *mut f32),
    vt: Option<*mut f32>,
    row: *mut f32,
) {
    let dp = padded(D);
    // SAFETY: the caller's contract.
    unsafe {
        std::ptr::write_bytes(kr, 0, BK * dp);
        std::ptr::write_bytes(kt, 0, D * BK);
        for j in 0..n {
            let kj = kr.add(j * dp);
            load_row::<S, D>(s, ctx.dtype, &ctx.k, (b, j0 + j, kvh), kj, 1.0);
            for d in 0..D {
                *kt.add(d * BK + j) = *kj.add(d);
            }
        }
        if let Some(vt) = vt {
            std::ptr::write_bytes(vt, 0, D * BK);
            for j in 0..n {
                load_row::<S, D>(s, ctx.dtype, &ctx.v, (b, j0 + j, kvh), row, 1.0);
                for d in 0..D {
                    *vt.add(d * BK + j) = *row.add(d);
                }
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

/// One query row of a tile: its statistics and the keys it sees.
#[derive(Clone, Copy, Default)]
struct RowStat {
    /// The row's shift `m` (see [`BwdCtx::lse`]).
    m: f32,
    /// The row's `ln l` (see [`BwdCtx::lnl`]).
    lnl: f32,
    /// The row's `Δ`.
    delta: f32,
    /// Keys of the block the row sees (the first `nk`); 0 where it sees
    /// none, or no key at all (`lse = -inf`), or is past the tile.
    nk: usize,
}

/// Turns row `r`'s scores (in `p`, without the mask's bias) and `dP` (in
/// `ds`) into `P = e^((s + bias − m) − ln l)` and `dS = P∘(dP − Δ)`, and
/// zeroes both past the keys the row sees.
///
/// # Safety
/// `p`, `ds` hold [`BK`] floats, `bias` (if any) the row's `nk` biases.
#[inline(always)]
unsafe fn probs_row<S: Simd>(
    s: S,
    st: RowStat,
    p: *mut f32,
    ds: *mut f32,
    bias: Option<*const f32>,
) {
    let w = S::W;
    let lanes = st.nk.div_ceil(w) * w;
    // SAFETY: the caller's contract; `lanes <= BK`.
    unsafe {
        if let Some(bias) = bias {
            for j in 0..st.nk {
                *p.add(j) += *bias.add(j);
            }
        }
        let (m, lnl, delta) = (s.splat(st.m), s.splat(st.lnl), s.splat(st.delta));
        for l in (0..lanes).step_by(w) {
            // `ln l` is 0 for ordinary rows: `y − 0 = y`.
            let pr = s.exp(s.sub(s.sub(s.load(p.add(l)), m), lnl));
            s.store(p.add(l), pr);
            s.store(ds.add(l), s.mul(pr, s.sub(s.load(ds.add(l)), delta)));
        }
        for j in st.nk..BK {
            *p.add(j) = 0.0;
            *ds.add(j) = 0.0;
        }
    }
}

/// One tile: local query rows `i0..i0 + m` of (entry `seq`, h) against
/// the block of local keys `j0..j0 + n` loaded in `t`; adds into `t.dk`,
/// `t.dv` and the rows `i0..` of `dq` (the chunk's partial of the entry's
/// rows of head h, row stride `padded(D)`).
///
/// # Safety
/// `t` carved from a workspace holding the block of (entry, h's
/// key/value head); `m <= BQ`, `n <= BK`, in bounds; `dq` this task's
/// alone.
#[inline(always)]
unsafe fn tile<S: Simd, const D: usize, const NV: usize, const CV: usize>(
    s: S,
    ctx: &BwdCtx<'_>,
    t: &Tiles,
    (seq, h, i0, m): (&Seq, usize, usize, usize),
    (j0, n): (usize, usize),
    dq: *mut f32,
) {
    let (w, dp) = (S::W, padded(D));
    let mut st = [RowStat::default(); BQ];
    let mut any = false;
    let b = seq.tb;
    let qi0 = seq.q0 + i0;
    let row0 = ctx.row(b, h, qi0);
    for (r, x) in st.iter_mut().enumerate().take(m) {
        let lse = ctx.lse[row0 + r];
        if lse == f32::NEG_INFINITY {
            continue; // sees no key at all
        }
        *x = RowStat {
            m: lse,
            lnl: ctx.lnl[row0 + r],
            delta: ctx.delta[row0 + r],
            nk: seen(ctx.causal, i0 + r, j0, n),
        };
        any |= x.nk > 0;
    }
    if !any {
        return;
    }
    // SAFETY (all accesses below): the tiles' sizes (see `Tiles`); rows
    // `r < m <= BQ` of (b, h) in bounds; `m.div_ceil(R)·R <= BQ` and
    // `n.div_ceil(R)·R <= BK` as R divides both.
    unsafe {
        for (r, x) in st.iter().enumerate().take(m) {
            let (qr, dr) = (t.q.add(r * dp), t.dout.add(r * dp));
            if x.nk == 0 {
                // Zero rows add nothing to dK and dV.
                std::ptr::write_bytes(qr, 0, D);
                std::ptr::write_bytes(dr, 0, D);
            } else {
                load_row::<S, D>(s, ctx.dtype, &ctx.q, (b, qi0 + r, h), qr, ctx.scale);
                load_row::<S, D>(s, ctx.dtype, &ctx.dout, (b, qi0 + r, h), dr, 1.0);
            }
        }
        // S = q·Kᵀ into p and dP = dO·Vᵀ into ds, keys up to the last
        // micro-tile that holds one of the block's.
        let key_lanes = n.div_ceil(NV * w) * NV * w;
        for r0 in (0..m.div_ceil(R) * R).step_by(R) {
            for l0 in (0..key_lanes).step_by(NV * w) {
                let (pr, dr) = (t.p.add(r0 * BK), t.ds.add(r0 * BK));
                score_tile::<S, D, R, NV>(s, (t.q.add(r0 * dp), dp), t.kt, l0, pr);
                score_tile::<S, D, R, NV>(s, (t.dout.add(r0 * dp), dp), t.vt, l0, dr);
            }
        }
        for (r, x) in st.iter().enumerate().take(m) {
            let (pr, dr) = (t.p.add(r * BK), t.ds.add(r * BK));
            let bias = match ctx.mask.as_ref() {
                Some(mask) if x.nk > 0 => {
                    let bias = t.bias.add(r * BK);
                    let out = std::slice::from_raw_parts_mut(bias, x.nk);
                    // Whole entries only: local positions are tokens.
                    mask.bias_row(b, h, i0 + r, j0, out);
                    Some(bias.cast_const())
                }
                _ => None,
            };
            probs_row::<S>(s, *x, pr, dr, bias);
        }
        // dV += Pᵀ·dO and dK += dSᵀ·(q·scale): R key rows at a time, the
        // sum over the tile's rows in order.
        for n0 in (0..n.div_ceil(R) * R).step_by(R) {
            let (p, ds) = (t.p.add(n0).cast_const(), t.ds.add(n0).cast_const());
            update_rows::<S, D, R, CV>(s, t.dv.add(n0 * dp), (p, 1, BK), t.dout, m);
            update_rows::<S, D, R, CV>(s, t.dk.add(n0 * dp), (ds, 1, BK), t.q, m);
        }
        // dQ += dS·K: R query rows at a time where all R see keys, else
        // row by row (a row that sees none is left alone).
        let mut r0 = 0;
        while r0 < m {
            let ds = t.ds.add(r0 * BK).cast_const();
            if r0 + R <= m && st[r0..r0 + R].iter().all(|x| x.nk > 0) {
                update_rows::<S, D, R, CV>(s, dq.add(r0 * dp), (ds, BK, 1), t.kr, n);
                r0 += R;
            } else {
                if st[r0].nk > 0 {
                    update_rows::<S, D, 1, CV>(s, dq.add(r0 * dp), (ds, BK, 1), t.kr, n);
                }
                r0 += 1;
            }
        }
    }
}

/// Task `task` of the first pass: chunk `c` of the key blocks of
/// (entry, kvh); writes their rows of `dk` and `dv` (chunk 0 also the zero
/// rows of the entry's keys outside its run) and adds into chunk `c`'s
/// partial of `dQ` for the group's query heads.
///
/// # Safety
/// `ws` holds [`workspace_floats`]`(D)` floats; `ctx` describes buffers
/// valid for its layouts and dtype, `dq_acc` included; no other thread
/// runs the same task.
#[inline(always)]
pub(crate) unsafe fn kv_task<S: Simd, const D: usize, const NV: usize, const CV: usize>(
    s: S,
    ctx: &BwdCtx<'_>,
    ws: &mut [f32],
    task: usize,
) {
    let chunks = ctx.chunks.max(1);
    let c = task % chunks;
    let kvh = (task / chunks) % ctx.heads_kv;
    let seq = ctx.seqs[task / (chunks * ctx.heads_kv)];
    let b = seq.tb;
    let dp = padded(D);
    // SAFETY: the caller's contract.
    let t = unsafe { Tiles::carve::<D>(ws) };
    let group = ctx.group();
    if c == 0 && seq.hi - seq.lo < seq.nk {
        // Keys outside the run: no row sees them, their gradients are 0.
        // SAFETY: `t.dk` holds DP floats; the rows (b, k0 + j, kvh) for
        // `j < nk` outside `lo..hi` are in bounds and this task's alone.
        unsafe {
            std::ptr::write_bytes(t.dk, 0, dp);
            for j in (0..seq.lo).chain(seq.hi..seq.nk) {
                for dst in [&ctx.dk, &ctx.dv] {
                    let off = dst.layout.offset(b, seq.k0 + j, kvh);
                    write_row::<S, D>(s, ctx.dtype, dst.ptr, off, t.dk);
                }
            }
        }
    }
    for kb in ctx.chunk_blocks(c, &seq) {
        let j0 = seq.lo + kb * BK;
        let n = BK.min(seq.hi - j0);
        let kj0 = seq.k0 + j0;
        // SAFETY: tokens `kj0..kj0 + n` of (b, kvh) are in bounds; `t.q`
        // is scratch of DP floats until the tile's rows are read.
        unsafe {
            load_kv::<S, D>(s, ctx, (b, kvh, kj0, n), (t.kr, t.kt), Some(t.vt), t.q);
            std::ptr::write_bytes(t.dk, 0, BK * dp);
            std::ptr::write_bytes(t.dv, 0, BK * dp);
        }
        for h in kvh * group..(kvh + 1) * group {
            // SAFETY: chunk `c` of the entry's rows of head h is this
            // task's alone.
            let dq = unsafe { ctx.dq_part(c, b, h, dp).add(seq.q0 * dp) };
            // Top-left causal: rows before j0 see none of the block.
            let mut i0 = if ctx.causal { j0 } else { 0 };
            while i0 < seq.nq {
                let m = BQ.min(seq.nq - i0);
                // SAFETY: the block is loaded; rows `i0..i0 + m` of the
                // entry in bounds, of this chunk's partial.
                unsafe {
                    tile::<S, D, NV, CV>(s, ctx, &t, (&seq, h, i0, m), (j0, n), dq.add(i0 * dp))
                };
                i0 += m;
            }
        }
        for j in 0..n {
            // SAFETY: rows (b, kj0 + j, kvh) of dk and dv are this task's
            // alone; rows `j < n` of the accumulators hold D floats.
            unsafe {
                let off = ctx.dk.layout.offset(b, kj0 + j, kvh);
                write_row::<S, D>(s, ctx.dtype, ctx.dk.ptr, off, t.dk.add(j * dp));
                let off = ctx.dv.layout.offset(b, kj0 + j, kvh);
                write_row::<S, D>(s, ctx.dtype, ctx.dv.ptr, off, t.dv.add(j * dp));
            }
        }
    }
}

/// Task `task` of the dQ pass: query tokens `qb·BQ..` of (tb, h), each
/// the sum of its chunks' partials in chunk order, times the scale.
///
/// # Safety
/// As [`kv_task`], after every first-pass task has run.
#[inline(always)]
pub(crate) unsafe fn q_task<S: Simd, const D: usize>(
    s: S,
    ctx: &BwdCtx<'_>,
    ws: &mut [f32],
    task: usize,
) {
    let q_blocks = ctx.tokens_q.div_ceil(BQ);
    let qb = task % q_blocks;
    let h = (task / q_blocks) % ctx.heads_q;
    let b = task / (q_blocks * ctx.heads_q);
    let i0 = qb * BQ;
    let rows = BQ.min(ctx.tokens_q - i0);
    let (w, dp) = (S::W, padded(D));
    let row = ws.as_mut_ptr();
    let scale = s.splat(ctx.scale);
    for i in i0..i0 + rows {
        // SAFETY: row i of every chunk's partial of (b, h) holds DP floats;
        // `row` DP floats of workspace; row (b, i, h) of dq is this
        // task's alone.
        unsafe {
            let first = ctx.dq_part(0, b, h, dp).add(i * dp);
            for col in (0..dp).step_by(w) {
                let mut acc = s.load(first.add(col));
                for c in 1..ctx.chunks {
                    acc = s.add(acc, s.load(ctx.dq_part(c, b, h, dp).add(i * dp + col)));
                }
                s.store(row.add(col), s.mul(acc, scale));
            }
            let off = ctx.dq.layout.offset(b, i, h);
            write_row::<S, D>(s, ctx.dtype, ctx.dq.ptr, off, row);
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

/// Recomputes the softmax statistics of the rows of (entry `seq`, h)
/// whose log-sum-exp is large (see [`needs_stats`]): for each, its
/// largest masked score `m` into `m[i]` (which holds the forward's lse on
/// entry) and `ln l`, the log of `l = Σ_j e^(x_j − m)`, into `lnl[i]`. The
/// scores are formed as the passes form them ([`score_tile`] on the
/// scaled query row and the transposed key block, then `bias_row` added),
/// so `m` and `l` describe exactly the `x` the passes exponentiate, and
/// `Σ_j P[j] = 1` to rounding. The sum runs over key blocks in order with
/// the online rescaling `l ← l·e^(m_old − m_new) + Σ e^(x − m_new)`:
/// deterministic. Other rows are left as they are (`lnl` 0).
///
/// # Safety
/// `ws` holds [`workspace_floats`]`(D)` floats; `ctx` describes buffers
/// valid for its layouts and dtype (its `lse`, `lnl` and `delta` are not
/// read); `m` and `lnl` hold the entry's `nq` rows.
#[inline(always)]
pub(crate) unsafe fn row_stats<S: Simd, const D: usize, const NV: usize>(
    s: S,
    ctx: &BwdCtx<'_>,
    ws: &mut [f32],
    (seq, h): (&Seq, usize),
    m: &mut [f32],
    lnl: &mut [f32],
) {
    let b = seq.tb;
    let kvh = h / ctx.group();
    let rows: Vec<usize> = (0..m.len()).filter(|&i| needs_stats(m[i])).collect();
    let Some(&last) = rows.last() else {
        return;
    };
    // SAFETY: the caller's contract.
    let t = unsafe { Tiles::carve::<D>(ws) };
    let mut mx = vec![f32::NEG_INFINITY; rows.len()];
    let mut sum = vec![0.0f32; rows.len()];
    let key_end = seq.key_end(ctx.causal, last + 1);
    let w = S::W;
    let mut j0 = seq.lo;
    while j0 < key_end {
        let n = BK.min(seq.hi - j0);
        // SAFETY: tokens `k0 + j0..+n` of (b, kvh) are in bounds; the
        // tiles hold what `load_kv` asks.
        let kj0 = seq.k0 + j0;
        unsafe { load_kv::<S, D>(s, ctx, (b, kvh, kj0, n), (t.kr, t.kt), None, t.dout) };
        for (r, &i) in rows.iter().enumerate() {
            let nk = seen(ctx.causal, i, j0, n);
            if nk == 0 {
                continue;
            }
            let key_lanes = nk.div_ceil(NV * w) * NV * w;
            // SAFETY: row (b, q0 + i, h) of q; `t.q` holds D floats; `t.p`
            // and `t.bias` hold BK >= key_lanes; `t.kt` D·BK.
            let (p, bias) = (t.p, t.bias);
            let x = unsafe {
                let qi = (b, seq.q0 + i, h);
                load_row::<S, D>(s, ctx.dtype, &ctx.q, qi, t.q, ctx.scale);
                for l0 in (0..key_lanes).step_by(NV * w) {
                    score_tile::<S, D, 1, NV>(s, (t.q, 0), t.kt, l0, p);
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_depend_on_the_shape_alone() {
        // 1 pair, 11 key blocks: 8 chunks (of 2 blocks, the last short or
        // empty); 8 pairs: 2; 16 pairs or more: 1; never more chunks than
        // key blocks, and at least one when there is nothing to split.
        assert_eq!(key_chunks(1, 1, 10 * BK + 5), MAX_CHUNKS);
        assert_eq!(key_chunks(1, 8, 2048), 2);
        assert_eq!(key_chunks(4, 4, 3 * BK), 1);
        assert_eq!(key_chunks(1, 1, BK + 1), 2);
        assert_eq!(key_chunks(0, 0, 0), 1);
        assert_eq!(key_chunks(1, 1, 0), 1);
    }

    #[test]
    fn chunks_cut_the_key_blocks_into_runs_of_equal_work() {
        let runs = |chunks, sk, causal| -> Vec<std::ops::Range<usize>> {
            (0..chunks)
                .map(|c| chunk_blocks(c, chunks, sk, causal))
                .collect()
        };
        // Every block in exactly one chunk, in order.
        for (chunks, sk, causal) in [
            (8, 10 * BK + 5, None),
            (8, 10 * BK + 5, Some(70)),
            (2, 2048, Some(2048)),
            (3, 0, None),
            (4, 5 * BK, Some(0)),
        ] {
            let r = runs(chunks, sk, causal);
            assert_eq!(r[0].start, 0);
            assert_eq!(r[chunks - 1].end, sk.div_ceil(BK));
            assert!(r.windows(2).all(|w| w[0].end == w[1].start), "{r:?}");
        }
        assert_eq!(runs(8, 10 * BK + 5, None)[..3], [0..2, 2..3, 3..5]);
        // Causal 2048 × 2048 in two: the first chunk takes the 10 blocks
        // seen by the most rows (52% of the work), the second 22.
        assert_eq!(runs(2, 2048, Some(2048)), [0..10, 10..32]);
    }

    #[test]
    fn padded_rows_are_whole_zmm_vectors() {
        assert_eq!(padded(8), 16);
        assert_eq!(padded(40), 48);
        assert_eq!(padded(128), 128);
        assert_eq!(padded(136), 144);
    }
}

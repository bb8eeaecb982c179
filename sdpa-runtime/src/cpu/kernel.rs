//! One task of the CPU kernel, written once against [`Simd`] and compiled
//! per instruction set: a block of query rows of one (batch, head) against
//! every key it may see, with an online softmax.
//!
//! Layout in the per-thread workspace (all `f32`):
//!
//! - `qt`: the task's queries, scaled and transposed, one `[D][PANEL]` panel
//!   after another: query rows sit in vector lanes, so the scores come out
//!   with queries in lanes and the softmax's row maximum and row sum are
//!   plain lane-wise operations. Panel-major keeps a panel in 16 KiB of
//!   consecutive lines (a `[D][BQ]` layout, with its 1 KiB row stride, maps a
//!   panel onto 8 of L1's 64 sets and re-reads it from L2 on every tile);
//! - `kw`, `vw`: the current key and value block widened to `f32`,
//!   `[BK][D]` and `[BK][DP]` (`DP`: `D` rounded up to the vector width,
//!   zero-padded), converted once per task and reused by all its rows;
//! - `st`: the scores, then the probabilities, of one panel of [`PANEL`]
//!   queries against the block, `[BK][PANEL]`; it stays in L1;
//! - `o`: the running output, `[BQ][DP]`, rescaled lazily by the softmax
//!   correction as each block's `P·V` adds to it.
//!
//! `S = K·Qᵀ` is a register-blocked outer product: each step broadcasts one
//! key element and multiplies it into `NQ` vectors of queries, `MK` keys at
//! once (12 × 2 `zmm` accumulators on AVX-512). `O += P·V` broadcasts one
//! probability and multiplies it into `C` vectors of a value row, for `R`
//! query rows at once (4 × up to 6 `zmm` on AVX-512).

use super::simd::Simd;
use crate::layout::Layout;
use crate::mask::ResolvedMask;
use crate::DType;

/// Query rows per panel: the lanes of one score tile.
pub const PANEL: usize = 32;
/// The L1 data cache per core the tiles are sized for (Zen 4, and most
/// AVX-512 and AVX2 cores since Skylake: 32 KiB or more).
pub const L1D_BYTES: usize = 32 << 10;
/// The L2 cache per core the tiles are sized for (Zen 4: 1 MiB; Skylake-SP
/// and later server cores: 1 to 2 MiB).
pub const L2_BYTES: usize = 1 << 20;
/// How many key rows ahead the block loader prefetches: enough to cover
/// DRAM latency (about 100 ns) at a few ns per row.
const PREFETCH_ROWS: usize = 16;
/// The key-block length is a multiple of this: the key tiles of every
/// instruction set (12, 6 and 4 keys) divide it.
const KEY_QUANTUM: usize = 12;

/// Query rows per task for head size `d`: the transposed queries and the
/// running output of a task (`2·BQ·D` floats) take at most half of L2 (the
/// key/value blocks and the score panel take under a fifth). Each task
/// converts its head's keys and values once, so bigger tasks convert less:
/// 512 rows rather than 256 at `D = 128` measured 3–5% faster on Zen 4.
/// 512 rows at `D = 128`, 256 at `D = 256`; a multiple of [`PANEL`].
pub const fn block_q(d: usize) -> usize {
    let fit = L2_BYTES / 2 / (2 * 4 * d);
    let rows = fit / PANEL * PANEL;
    if rows < PANEL {
        PANEL
    } else if rows > 512 {
        512
    } else {
        rows
    }
}

/// The most query rows a task may take: [`block_q`] plus one panel, so that
/// a sequence slightly longer than a block (CLIP's 257 tokens) stays one
/// task rather than a full task and a one-row task that converts every key
/// and value again for a single query.
pub const fn max_task_rows(d: usize) -> usize {
    block_q(d) + PANEL
}

/// Query rows per task for `seq_q` queries of head size `d`, when
/// `heads` (batch × query heads) share `threads` threads: as few tasks as
/// [`max_task_rows`] allows (each task converts the keys and values once),
/// but at least four per thread while a task keeps two panels or more, so
/// that work stealing can even out the load. A multiple of [`PANEL`].
pub fn task_rows(d: usize, seq_q: usize, heads: usize, threads: usize) -> usize {
    let seq_q = seq_q.max(1);
    let mut blocks = seq_q.div_ceil(max_task_rows(d));
    let wanted = (4 * threads).div_ceil(heads.max(1));
    let most = (seq_q / (2 * PANEL)).max(1);
    blocks = blocks.max(wanted.min(most));
    seq_q.div_ceil(blocks).div_ceil(PANEL) * PANEL
}

/// Keys per block for head size `d`: one panel's scores (`BK × PANEL`
/// floats) take at most half of L1, and the widened key and value blocks
/// (`2·BK·D` floats) at most an eighth of L2. 120 keys at `D = 128`, 60 at
/// `D = 256`; a multiple of every key tile.
pub const fn block_k(d: usize) -> usize {
    let by_l1 = L1D_BYTES / 2 / (PANEL * 4);
    let by_l2 = L2_BYTES / 8 / (2 * 4 * d);
    let keys = if by_l1 < by_l2 { by_l1 } else { by_l2 };
    let keys = keys / KEY_QUANTUM * KEY_QUANTUM;
    if keys < KEY_QUANTUM {
        KEY_QUANTUM
    } else {
        keys
    }
}

/// A raw, read-only tensor: its base pointer and layout.
#[derive(Clone, Copy)]
pub(crate) struct Src {
    /// The first element of the caller's buffer.
    pub ptr: *const u8,
    /// Offsets of rows, in elements.
    pub layout: Layout,
}

/// Everything a task reads, shared by all tasks of a call.
pub(crate) struct Ctx<'a> {
    pub dtype: DType,
    pub q: Src,
    pub k: Src,
    pub v: Src,
    /// The output buffer; every `(b, i, h)` row is written by one task only.
    pub out: *mut u8,
    pub out_layout: Layout,
    pub mask: Option<ResolvedMask<'a>>,
    pub scale: f32,
    pub causal: bool,
    pub heads_q: usize,
    /// Query heads per key/value head.
    pub group: usize,
    pub seq_q: usize,
    pub seq_k: usize,
    /// Query rows per task.
    pub bq: usize,
    /// Query blocks per (batch, head).
    pub q_blocks: usize,
}

// SAFETY: the pointers are read-only views of the caller's input buffers and
// the output buffer, which `attention` borrows (shared / exclusive) for the
// whole parallel loop; tasks write disjoint output rows.
unsafe impl Send for Ctx<'_> {}
unsafe impl Sync for Ctx<'_> {}

/// A 64-byte aligned line of workspace.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub [f32; 16]);

/// Offsets (in floats) of the workspace arrays of one instantiation.
struct Parts {
    qt: usize,
    o: usize,
    kw: usize,
    vw: usize,
    st: usize,
    m: usize,
    l: usize,
    alpha: usize,
    row: usize,
    total: usize,
}

/// Rounds `n` up to a multiple of 16 floats (one cache line).
const fn line_up(n: usize) -> usize {
    n.div_ceil(16) * 16
}

impl Parts {
    const fn new(d: usize, dp: usize, bq: usize, bk: usize, r: usize) -> Parts {
        let qt = 0;
        let o = qt + line_up(d * bq);
        let kw = o + line_up((bq + r) * dp);
        let vw = kw + line_up(bk * d);
        let st = vw + line_up(bk * dp);
        let m = st + line_up(bk * PANEL);
        let l = m + line_up(bq + PANEL);
        let alpha = l + line_up(bq + PANEL);
        let row = alpha + line_up(bq + PANEL);
        let total = row + line_up(bk + dp);
        Parts {
            qt,
            o,
            kw,
            vw,
            st,
            m,
            l,
            alpha,
            row,
            total,
        }
    }
}

/// The workspace lines one task of head size `d` needs on an instruction set
/// of `w` lanes with `r`-row output tiles.
pub(crate) fn workspace_lines(d: usize, w: usize, r: usize) -> usize {
    let dp = d.div_ceil(w) * w;
    Parts::new(d, dp, max_task_rows(d), block_k(d), r).total / 16
}

/// Reads `D` elements at `off` of `src` into `dst` as `f32`.
///
/// # Safety
/// `off..off + D` is in bounds of `src`'s buffer of `dtype` elements; `dst`
/// holds `D` floats; `D` is a multiple of 8.
#[inline(always)]
unsafe fn read_row<S: Simd, const D: usize>(
    s: S,
    dtype: DType,
    src: *const u8,
    off: usize,
    dst: *mut f32,
) {
    // SAFETY: the caller's contract.
    unsafe {
        match dtype {
            DType::F32 => std::ptr::copy_nonoverlapping(src.cast::<f32>().add(off), dst, D),
            DType::BF16 => {
                let p = src.cast::<u16>().add(off);
                for c in (0..D).step_by(8) {
                    s.bf16x8_to_f32(p.add(c), dst.add(c));
                }
            }
            DType::F16 => {
                let p = src.cast::<u16>().add(off);
                for c in (0..D).step_by(8) {
                    s.f16x8_to_f32(p.add(c), dst.add(c));
                }
            }
        }
    }
}

/// Writes `D` floats of `src` to `off` of the output buffer.
///
/// # Safety
/// As [`read_row`], for writing; no other thread writes `off..off + D`.
#[inline(always)]
unsafe fn write_row<S: Simd, const D: usize>(
    s: S,
    dtype: DType,
    dst: *mut u8,
    off: usize,
    src: *const f32,
) {
    // SAFETY: the caller's contract.
    unsafe {
        match dtype {
            DType::F32 => std::ptr::copy_nonoverlapping(src, dst.cast::<f32>().add(off), D),
            DType::BF16 => {
                let p = dst.cast::<u16>().add(off);
                for c in (0..D).step_by(8) {
                    s.f32x8_to_bf16(src.add(c), p.add(c));
                }
            }
            DType::F16 => {
                let p = dst.cast::<u16>().add(off);
                for c in (0..D).step_by(8) {
                    s.f32x8_to_f16(src.add(c), p.add(c));
                }
            }
        }
    }
}

/// Where query row `r` (lane `r % PANEL` of panel `r / PANEL`) starts in
/// the panel-major `qt`; its element `d` is `PANEL·d` further.
#[inline(always)]
fn qt_at(qt: *mut f32, d: usize, r: usize) -> *mut f32 {
    qt.wrapping_add((r / PANEL) * d * PANEL + r % PANEL)
}

/// `S[k][lanes] = K[k] · Qᵀ[lanes]` for `MK` keys and `NQ·W` query lanes.
///
/// # Safety
/// `qt` reads `D` rows of `NQ·W` floats at stride `qs`; `kw` reads `MK`
/// rows of `D` floats; `st` writes `MK` rows of `NQ·W` floats at stride
/// `ss`.
#[inline(always)]
unsafe fn qk_tile<S: Simd, const D: usize, const MK: usize, const NQ: usize>(
    s: S,
    qt: *const f32,
    qs: usize,
    kw: *const f32,
    st: *mut f32,
    ss: usize,
) {
    let mut acc = [[s.zero(); NQ]; MK];
    for d in 0..D {
        let mut q = [s.zero(); NQ];
        for (n, qn) in q.iter_mut().enumerate() {
            // SAFETY: row `d`, lanes `n·W..(n+1)·W` of the panel.
            *qn = unsafe { s.load(qt.add(d * qs + n * S::W)) };
        }
        for (k, row) in acc.iter_mut().enumerate() {
            // SAFETY: key `k`, element `d`.
            let kb = s.splat(unsafe { *kw.add(k * D + d) });
            for (a, &qn) in row.iter_mut().zip(&q) {
                *a = s.fma(qn, kb, *a);
            }
        }
    }
    for (k, row) in acc.iter().enumerate() {
        for (n, &a) in row.iter().enumerate() {
            // SAFETY: score row `k`, lanes of vector `n`.
            unsafe { s.store(st.add(k * ss + n * S::W), a) };
        }
    }
}

/// Stores score accumulators `acc[k][n]` times `scale` to row `k`, lanes of
/// vector `n`, of `st`.
///
/// # Safety
/// `st` writes `MK` rows of `NQ·W` floats at stride `ss`.
#[inline(always)]
pub(crate) unsafe fn qk_tile_scale<S: Simd, const MK: usize, const NQ: usize>(
    s: S,
    acc: &[[S::V; NQ]; MK],
    st: *mut f32,
    ss: usize,
    scale: f32,
) {
    let scale = s.splat(scale);
    for (k, row) in acc.iter().enumerate() {
        for (n, &a) in row.iter().enumerate() {
            // SAFETY: score row `k`, lanes of vector `n`.
            unsafe { s.store(st.add(k * ss + n * S::W), s.mul(a, scale)) };
        }
    }
}

/// `O[r] = alpha[r]·O[r] + Σ_j P[j][r]·V[j]` for `R` rows and `C` vectors of
/// the head dimension.
///
/// # Safety
/// `o` reads and writes `R` rows of `C·W` floats at stride `os`; `p` reads
/// `nk` rows of `R` floats at stride `ps`; `alpha` reads `R` floats; `v`
/// reads `nk` rows of `C·W` floats at stride `vs`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_tile<S: Simd, const R: usize, const C: usize>(
    s: S,
    o: *mut f32,
    os: usize,
    p: *const f32,
    ps: usize,
    alpha: *const f32,
    v: *const f32,
    vs: usize,
    nk: usize,
) {
    let mut acc = [[s.zero(); C]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        // SAFETY: row `r` of the tile.
        let a = s.splat(unsafe { *alpha.add(r) });
        for (c, x) in row.iter_mut().enumerate() {
            // SAFETY: row `r`, vector `c`.
            *x = s.mul(unsafe { s.load(o.add(r * os + c * S::W)) }, a);
        }
    }
    for j in 0..nk {
        let mut vv = [s.zero(); C];
        for (c, x) in vv.iter_mut().enumerate() {
            // SAFETY: value row `j`, vector `c`.
            *x = unsafe { s.load(v.add(j * vs + c * S::W)) };
        }
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: probability of key `j`, row `r`.
            let pb = s.splat(unsafe { *p.add(j * ps + r) });
            for (x, &vc) in row.iter_mut().zip(&vv) {
                *x = s.fma(pb, vc, *x);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (c, &x) in row.iter().enumerate() {
            // SAFETY: as the loads above.
            unsafe { s.store(o.add(r * os + c * S::W), x) };
        }
    }
}

/// [`pv_tile`] with a run-time chunk width `c` (1, 2 or `CMAX`, which is at
/// most 3: `R·CMAX` accumulators fill the register budget).
///
/// # Safety
/// As [`pv_tile`] with `C = c`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_chunk<S: Simd, const R: usize, const CMAX: usize>(
    s: S,
    c: usize,
    o: *mut f32,
    os: usize,
    p: *const f32,
    ps: usize,
    alpha: *const f32,
    v: *const f32,
    vs: usize,
    nk: usize,
) {
    debug_assert!(c <= CMAX && CMAX <= 3);
    // SAFETY: the caller's contract, with `C = c`.
    unsafe {
        match c {
            1 => pv_tile::<S, R, 1>(s, o, os, p, ps, alpha, v, vs, nk),
            2 => pv_tile::<S, R, 2>(s, o, os, p, ps, alpha, v, vs, nk),
            _ => pv_tile::<S, R, CMAX>(s, o, os, p, ps, alpha, v, vs, nk),
        }
    }
}

/// How a task stores its operands and runs the two matrix products: in
/// `f32` ([`F32Products`], any dtype, widened once per block) or, for
/// `bf16` on CPUs with AVX-512 BF16, as `bf16` pairs for `vdpbf16ps`
/// (`bf16dot.rs`). Scores, softmax and the running output are `f32` in both.
pub(crate) trait Products<S: Simd> {
    /// Packs query rows `i..i + rows` (`rows <= PANEL`) of head (b, h) into
    /// the panel at `qt`, padding lanes with zeros. The rows are first
    /// copied into `scratch` one after another, so that their loads overlap
    /// (the transposition between two row loads would serialise the cache
    /// misses of rows that lie a token stride apart).
    ///
    /// # Safety
    /// The rows are inside q's buffer; `qt` holds a panel; `scratch` holds
    /// `PANEL·D` floats.
    #[allow(clippy::too_many_arguments)]
    unsafe fn pack_q<const D: usize>(
        s: S,
        ctx: &Ctx<'_>,
        b: usize,
        h: usize,
        i: usize,
        rows: usize,
        qt: *mut f32,
        scratch: *mut f32,
    );

    /// Loads keys and values `j0..j0 + n` of kv head `kvh` into `kw` and
    /// `vw`, zeroing key rows up to the next multiple of `MK`, prefetching
    /// rows below `key_end` ahead.
    ///
    /// # Safety
    /// The rows are inside k's and v's buffers; `kw` and `vw` hold
    /// `n.div_ceil(MK) * MK` rows of `D` and `dp` floats.
    #[allow(clippy::too_many_arguments)]
    unsafe fn load_block<const D: usize, const MK: usize>(
        s: S,
        ctx: &Ctx<'_>,
        b: usize,
        kvh: usize,
        j0: usize,
        n: usize,
        key_end: usize,
        kw: *mut f32,
        vw: *mut f32,
        dp: usize,
    );

    /// `st[k][l] = scale · K[k] · Q[l]` for keys `k < nk_tiles` (a multiple
    /// of `MK`) and lanes `l < lanes` of the panel at `qt`.
    ///
    /// # Safety
    /// `qt` is a whole panel; `kw` holds `nk_tiles` rows; `st` holds
    /// `nk_tiles` rows of [`PANEL`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn scores<const D: usize, const MK: usize, const NQ: usize>(
        s: S,
        ctx: &Ctx<'_>,
        qt: *const f32,
        kw: *const f32,
        st: *mut f32,
        nk_tiles: usize,
        lanes: usize,
    );

    /// `o[r] = alpha[r]·o[r] + Σ_{j<nk} st[j][r]·V[j]` for rows `r < rows`
    /// (computed in tiles of `R`, so up to `rows` rounded up to `R`, at most
    /// `lanes`). May overwrite `st`.
    ///
    /// # Safety
    /// `o` holds `rows` rounded up to `R` rows of `dp`; `alpha` as many
    /// floats; `st` holds `nk` rows of [`PANEL`] valid in lanes `< lanes`;
    /// `vw` holds `nk` value rows.
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv<const R: usize, const CMAX: usize>(
        s: S,
        o: *mut f32,
        dp: usize,
        st: *mut f32,
        alpha: *const f32,
        vw: *const f32,
        nk: usize,
        rows: usize,
        lanes: usize,
    );
}

/// Both products in `f32` FMA, with keys and values widened to `f32`.
pub(crate) struct F32Products;

impl<S: Simd> Products<S> for F32Products {
    #[inline(always)]
    unsafe fn pack_q<const D: usize>(
        s: S,
        ctx: &Ctx<'_>,
        b: usize,
        h: usize,
        i: usize,
        rows: usize,
        qt: *mut f32,
        scratch: *mut f32,
    ) {
        for r in 0..rows {
            let off = ctx.q.layout.offset(b, i + r, h);
            // SAFETY: the caller's contract: row (b, i + r, h) of q, row `r`
            // of `scratch`.
            unsafe { read_row::<S, D>(s, ctx.dtype, ctx.q.ptr, off, scratch.add(r * D)) };
        }
        for d in 0..D {
            for r in 0..PANEL {
                let x = if r < rows {
                    // SAFETY: row `r < rows` of `scratch`.
                    unsafe { *scratch.add(r * D + d) * ctx.scale }
                } else {
                    0.0
                };
                // SAFETY: element `d` of lane `r` of the panel.
                unsafe { *qt.add(d * PANEL + r) = x };
            }
        }
    }

    #[inline(always)]
    unsafe fn load_block<const D: usize, const MK: usize>(
        s: S,
        ctx: &Ctx<'_>,
        b: usize,
        kvh: usize,
        j0: usize,
        n: usize,
        key_end: usize,
        kw: *mut f32,
        vw: *mut f32,
        dp: usize,
    ) {
        for j in 0..n.div_ceil(MK) * MK {
            prefetch_ahead::<S, D>(s, ctx, b, kvh, j0 + j, key_end);
            if j < n {
                let koff = ctx.k.layout.offset(b, j0 + j, kvh);
                let voff = ctx.v.layout.offset(b, j0 + j, kvh);
                // SAFETY: the caller's contract.
                unsafe {
                    read_row::<S, D>(s, ctx.dtype, ctx.k.ptr, koff, kw.add(j * D));
                    read_row::<S, D>(s, ctx.dtype, ctx.v.ptr, voff, vw.add(j * dp));
                    for c in D..dp {
                        *vw.add(j * dp + c) = 0.0;
                    }
                }
            } else {
                for c in 0..D {
                    // SAFETY: the caller's contract (padding rows).
                    unsafe { *kw.add(j * D + c) = 0.0 };
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn scores<const D: usize, const MK: usize, const NQ: usize>(
        s: S,
        _ctx: &Ctx<'_>,
        qt: *const f32,
        kw: *const f32,
        st: *mut f32,
        nk_tiles: usize,
        lanes: usize,
    ) {
        let w = S::W;
        let mut l0 = 0;
        while l0 < lanes {
            let full = l0 + NQ * w <= lanes;
            for k0 in (0..nk_tiles).step_by(MK) {
                // SAFETY: the caller's contract: lanes `l0..` of the panel,
                // key rows `k0..k0 + MK`, score rows `k0..k0 + MK`.
                unsafe {
                    let q = qt.add(l0);
                    let kr = kw.add(k0 * D);
                    let sp = st.add(k0 * PANEL + l0);
                    if full {
                        qk_tile::<S, D, MK, NQ>(s, q, PANEL, kr, sp, PANEL);
                    } else {
                        qk_tile::<S, D, MK, 1>(s, q, PANEL, kr, sp, PANEL);
                    }
                }
            }
            l0 += if full { NQ * w } else { w };
        }
    }

    #[inline(always)]
    unsafe fn pv<const R: usize, const CMAX: usize>(
        s: S,
        o: *mut f32,
        dp: usize,
        st: *mut f32,
        alpha: *const f32,
        vw: *const f32,
        nk: usize,
        rows: usize,
        _lanes: usize,
    ) {
        let w = S::W;
        let dv = dp / w;
        let chunks = dv.div_ceil(CMAX);
        for r0 in (0..rows).step_by(R) {
            let mut c0 = 0;
            for ch in 0..chunks {
                let c = dv / chunks + usize::from(ch < dv % chunks);
                // SAFETY: the caller's contract: rows `r0..r0 + R`, vectors
                // `c0..c0 + c` of `o`; lanes `r0..r0 + R` of `st` rows < nk.
                unsafe {
                    pv_chunk::<S, R, CMAX>(
                        s,
                        c,
                        o.add(r0 * dp + c0 * w),
                        dp,
                        st.add(r0),
                        PANEL,
                        alpha.add(r0),
                        vw.add(c0 * w),
                        dp,
                        nk,
                    );
                }
                c0 += c;
            }
        }
    }
}

/// Prefetches key and value row `j + PREFETCH_ROWS` of head (b, kvh) if it
/// is below `key_end`. Rows of one head lie a token stride apart (often a
/// page or more), which the hardware prefetcher does not follow;
/// decode-like calls are bound by these loads.
#[inline(always)]
pub(crate) fn prefetch_ahead<S: Simd, const D: usize>(
    s: S,
    ctx: &Ctx<'_>,
    b: usize,
    kvh: usize,
    j: usize,
    key_end: usize,
) {
    let ahead = j + PREFETCH_ROWS;
    if ahead < key_end {
        prefetch_row::<S, D>(s, ctx, &ctx.k, b, ahead, kvh);
        prefetch_row::<S, D>(s, ctx, &ctx.v, b, ahead, kvh);
    }
}

/// Prefetches row (b, t, h) of `src` (a hint: never reads).
#[inline(always)]
fn prefetch_row<S: Simd, const D: usize>(
    s: S,
    ctx: &Ctx<'_>,
    src: &Src,
    b: usize,
    t: usize,
    h: usize,
) {
    let esize = match ctx.dtype {
        DType::F32 => 4,
        DType::F16 | DType::BF16 => 2,
    };
    let p = src.ptr.wrapping_add(src.layout.offset(b, t, h) * esize);
    for line in (0..D * esize).step_by(64) {
        s.prefetch(p.wrapping_add(line));
    }
}

/// Runs task `task` of `ctx`: rows `qb·BQ..` of one (batch, head).
///
/// `P` stores the operands and runs the two products; `MK`×`NQ` is the score tile (keys × query vectors), `R`×`CMAX` the
/// largest output tile (rows × vectors of the head dimension).
///
/// # Safety
/// `ws` holds at least [`workspace_lines`]`(D, S::W, R)` lines; `ctx`
/// describes buffers that are valid for its layouts and dtype; no other
/// thread runs the same task.
#[inline(always)]
pub(crate) unsafe fn run_task<
    S: Simd,
    P: Products<S>,
    const D: usize,
    const MK: usize,
    const NQ: usize,
    const R: usize,
    const CMAX: usize,
>(
    s: S,
    ctx: &Ctx<'_>,
    ws: &mut [Line],
    task: usize,
) {
    let w = S::W;
    let dp = D.div_ceil(w) * w;
    let bq = ctx.bq;
    let bk = block_k(D);
    let parts = Parts::new(D, dp, max_task_rows(D), bk, R);
    debug_assert!(ws.len() * 16 >= parts.total && bq <= max_task_rows(D));
    let base = ws.as_mut_ptr().cast::<f32>();
    // SAFETY (all offsets below): the parts lie inside `ws` (checked by the
    // caller against `workspace_lines`) and do not overlap.
    let (qt, o, kw, vw, st, mrow, lrow, alpha, tmp) = unsafe {
        (
            base.add(parts.qt),
            base.add(parts.o),
            base.add(parts.kw),
            base.add(parts.vw),
            base.add(parts.st),
            base.add(parts.m),
            base.add(parts.l),
            base.add(parts.alpha),
            base.add(parts.row),
        )
    };

    // Heavy (late, for causal) query blocks first, so that the last tasks
    // to run are short ones.
    let qb = ctx.q_blocks - 1 - task % ctx.q_blocks;
    let h = (task / ctx.q_blocks) % ctx.heads_q;
    let b = task / (ctx.q_blocks * ctx.heads_q);
    let kvh = h / ctx.group;
    let i0 = qb * bq;
    let rows = bq.min(ctx.seq_q - i0);
    let lanes = rows.div_ceil(PANEL) * PANEL;

    // The first key and value rows, while the queries are packed.
    let key_end = if ctx.causal {
        ctx.seq_k.min(i0 + rows)
    } else {
        ctx.seq_k
    };
    for j in 0..PREFETCH_ROWS.min(key_end) {
        prefetch_row::<S, D>(s, ctx, &ctx.k, b, j, kvh);
        prefetch_row::<S, D>(s, ctx, &ctx.v, b, j, kvh);
    }
    // Queries, packed panel-major; padding lanes are zero. `kw` (at least
    // PANEL rows of D) is free until the first key block.
    debug_assert!(bk >= PANEL);
    for p0 in (0..lanes).step_by(PANEL) {
        let prows = PANEL.min(rows.saturating_sub(p0));
        // The next panel's rows, while this one is packed.
        for r in p0 + PANEL..(p0 + 2 * PANEL).min(rows) {
            prefetch_row::<S, D>(s, ctx, &ctx.q, b, i0 + r, h);
        }
        // SAFETY: rows `i0 + p0..+prows` of head (b, h) lie inside q's
        // buffer; `qt` holds `max_task_rows(D) / PANEL` panels; `kw` holds
        // `bk >= PANEL` rows of D floats.
        unsafe { P::pack_q::<D>(s, ctx, b, h, i0 + p0, prows, qt_at(qt, D, p0), kw) };
    }
    for r in 0..lanes {
        // SAFETY: `o` has `bq + R` rows of `dp`; `m`, `l`, `alpha` have
        // `bq + PANEL` entries.
        unsafe {
            for c in (0..dp).step_by(w) {
                s.store(o.add(r * dp + c), s.zero());
            }
            *mrow.add(r) = f32::NEG_INFINITY;
            *lrow.add(r) = 0.0;
            *alpha.add(r) = 1.0;
        }
    }

    // Top-left causal: row i sees keys j <= i, so keys past the last row
    // (`key_end`, above) are never loaded.
    let mut j0 = 0;
    while j0 < key_end {
        let n = bk.min(key_end - j0);
        // Convert the key and value blocks once for all the task's rows.
        // SAFETY: rows `j0..j0 + n` (< key_end <= Sk) of head (b, kvh) lie
        // inside k's and v's buffers; `kw` and `vw` hold `bk >= n` rows,
        // `bk` a multiple of MK.
        unsafe { P::load_block::<D, MK>(s, ctx, b, kvh, j0, n, key_end, kw, vw, dp) };

        for p0 in (0..rows).step_by(PANEL) {
            let prows = PANEL.min(rows - p0);
            // The keys of this block the panel's last row sees.
            let nk = if ctx.causal {
                let last = i0 + p0 + prows - 1;
                if last < j0 {
                    continue;
                }
                n.min(last + 1 - j0)
            } else {
                n
            };
            let nk_tiles = nk.div_ceil(MK) * MK;
            let plan_lanes = prows.div_ceil(w) * w;

            // Scores: MK keys × NQ vectors of queries per tile.
            // SAFETY: lanes `< plan_lanes <= PANEL` of panel `p0 / PANEL` of
            // `qt`; key rows `< nk_tiles <= bk` of `kw` (padding rows zero);
            // `st` holds `bk` rows of PANEL.
            unsafe {
                P::scores::<D, MK, NQ>(s, ctx, qt_at(qt, D, p0), kw, st, nk_tiles, plan_lanes)
            };

            // The mask's bias, one query row at a time.
            if let Some(mask) = &ctx.mask {
                for r in 0..prows {
                    // SAFETY: `tmp` holds bk + dp >= nk floats.
                    let bias = unsafe { std::slice::from_raw_parts_mut(tmp, nk) };
                    mask.bias_row(b, h, i0 + p0 + r, j0, bias);
                    for (j, &x) in bias.iter().enumerate() {
                        // SAFETY: score row j < nk, lane r < PANEL.
                        unsafe { *st.add(j * PANEL + r) += x };
                    }
                }
            }

            // Online softmax, lane-wise over groups of W query rows.
            for g in (0..plan_lanes).step_by(w) {
                let row0 = i0 + p0 + g;
                // SAFETY: lanes `g..g + W` of `st` rows `< nk`, entries
                // `p0 + g..` of `m`, `l`, `alpha` (`bq + PANEL` long).
                unsafe {
                    softmax_group(
                        s,
                        st.add(g),
                        nk,
                        mrow.add(p0 + g),
                        lrow.add(p0 + g),
                        alpha.add(p0 + g),
                        ctx.causal && j0 + nk > row0 + 1,
                        j0,
                        row0,
                    );
                }
            }

            // O += P·V, R rows × up to CMAX vectors of D per tile.
            // SAFETY: rows `p0..p0 + prows` (rounded up to R <= W) of `o`
            // (`bq + R` rows of dp) and of `alpha`; `st` rows `< nk`, lanes
            // `< plan_lanes`; `vw` rows `< nk`.
            unsafe {
                P::pv::<R, CMAX>(
                    s,
                    o.add(p0 * dp),
                    dp,
                    st,
                    alpha.add(p0),
                    vw,
                    nk,
                    prows,
                    plan_lanes,
                )
            };
        }
        j0 += n;
    }

    // Normalise and write; a row that saw no key is zeros, as in torch.
    for r in 0..rows {
        // SAFETY: `l` has bq entries; `o` row r has dp floats; `tmp` has D;
        // the output row (b, i0 + r, h) is in bounds and this task's alone.
        unsafe {
            let l = *lrow.add(r);
            let inv = if l == 0.0 { 0.0 } else { 1.0 / l };
            let scale = s.splat(inv);
            for c in (0..dp).step_by(w) {
                let x = s.mul(s.load(o.add(r * dp + c)), scale);
                let x = if l == 0.0 { s.zero() } else { x };
                s.store(o.add(r * dp + c), x);
            }
            let off = ctx.out_layout.offset(b, i0 + r, h);
            write_row::<S, D>(s, ctx.dtype, ctx.out, off, o.add(r * dp));
        }
    }
}

/// The online-softmax step of `W` query lanes against `nk` keys: masks the
/// causal diagonal, updates the running maximum `m` and sum `l`, writes the
/// correction `alpha = e^(m_old − m_new)` and turns the scores into
/// probabilities in place.
///
/// # Safety
/// `st` reads and writes `nk` rows of `W` floats at stride [`PANEL`]; `m`,
/// `l` and `alpha` hold `W` floats.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn softmax_group<S: Simd>(
    s: S,
    st: *mut f32,
    nk: usize,
    m: *mut f32,
    l: *mut f32,
    alpha: *mut f32,
    diagonal: bool,
    j0: usize,
    row0: usize,
) {
    let neg_inf = s.splat(f32::NEG_INFINITY);
    let mut mx = neg_inf;
    if diagonal {
        let rows = s.iota(row0 as f32);
        for j in 0..nk {
            // SAFETY: score row j < nk.
            unsafe {
                let p = st.add(j * PANEL);
                let mut x = s.load(p);
                if j0 + j > row0 {
                    x = s.neg_inf_where_gt(x, s.splat((j0 + j) as f32), rows);
                    s.store(p, x);
                }
                mx = s.max(mx, x);
            }
        }
    } else {
        for j in 0..nk {
            // SAFETY: as above.
            mx = s.max(mx, unsafe { s.load(st.add(j * PANEL)) });
        }
    }
    // SAFETY: W floats each.
    let (m_old, l_old) = unsafe { (s.load(m), s.load(l)) };
    let m_new = s.max(m_old, mx);
    // A lane that has seen only hidden keys keeps m = -inf; shifting by 0
    // instead keeps exp(-inf - -inf) = NaN out and gives hidden keys a
    // weight of exactly 0.
    let shift = s.zero_where_lt(m_new, m_new, s.splat(f32::MIN));
    let a = s.exp(s.sub(m_old, shift));
    let mut sum = s.zero();
    for j in 0..nk {
        // SAFETY: score row j < nk.
        unsafe {
            let p = st.add(j * PANEL);
            let e = s.exp(s.sub(s.load(p), shift));
            s.store(p, e);
            sum = s.add(sum, e);
        }
    }
    // SAFETY: W floats each.
    unsafe {
        s.store(m, m_new);
        s.store(l, s.fma(l_old, a, sum));
        s.store(alpha, a);
    }
}

//! One task of the CPU kernel, written once against [`Simd`] and compiled
//! per instruction set: a block of query rows of one (sequence, head) against
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

use super::seqs::Tasks;
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

/// A raw `f32` output with a `[B, Hq, Sq, 1]` layout: the row log-sum-exp.
#[derive(Clone, Copy)]
pub(crate) struct Dst {
    /// The first element of the caller's buffer.
    pub ptr: *mut f32,
    /// Element `(b, h, i)` is at `layout.offset(b, h, i)`.
    pub layout: Layout,
}

/// Everything a task reads, shared by all tasks of a call.
pub(crate) struct Ctx<'a> {
    /// The element type of q, k, v and the output.
    pub dtype: DType,
    /// The queries, `[B, Sq, Hq, D]` (`[1, Tq, Hq, D]` packed) as their
    /// layout says.
    pub q: Src,
    /// The keys, `[B, Sk, Hkv, D]` (`[1, Tk, Hkv, D]` packed).
    pub k: Src,
    /// The values, as the keys.
    pub v: Src,
    /// The output buffer; every `(b, i, h)` row is written by one task only.
    pub out: *mut u8,
    /// Offsets of the output's rows, in elements.
    pub out_layout: Layout,
    /// Where the row log-sum-exp goes, if it was asked for; every
    /// `(b, h, i)` is written by the task that writes output row
    /// `(b, i, h)`.
    pub lse: Option<Dst>,
    /// The mask to add, if any (none where the keys' runs stand for it).
    pub mask: Option<ResolvedMask<'a>>,
    /// The softmax scale.
    pub scale: f32,
    /// Top-left causal masking (in each entry's local positions).
    pub causal: bool,
    /// Query heads per key/value head.
    pub group: usize,
    /// Query rows per task.
    pub bq: usize,
    /// The tasks: (batch entry, query head, block of `bq` rows).
    pub tasks: &'a Tasks,
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
    bias: usize,
    total: usize,
}

/// Rounds `n` up to a multiple of 16 floats (one cache line).
const fn line_up(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// Keys per row of the mask's bias buffer and score rows of the score
/// panel, for `bk` keys a block: whole lines, so the transposed adds of
/// `W`×`W` blocks never run past either.
const fn bias_stride(bk: usize) -> usize {
    line_up(bk)
}

impl Parts {
    const fn new(d: usize, dp: usize, bq: usize, bk: usize, r: usize) -> Parts {
        let qt = 0;
        let o = qt + line_up(d * bq);
        let kw = o + line_up((bq + r) * dp);
        let vw = kw + line_up(bk * d);
        let st = vw + line_up(bk * dp);
        // Score rows up to a whole line of keys, for the mask's transposed
        // adds (`bias` below).
        let m = st + line_up(bias_stride(bk) * PANEL);
        let l = m + line_up(bq + PANEL);
        let alpha = l + line_up(bq + PANEL);
        // A panel's mask bias, row-major: PANEL rows of `bias_stride(bk)`
        // keys.
        let bias = alpha + line_up(bq + PANEL);
        let total = bias + PANEL * bias_stride(bk);
        Parts {
            qt,
            o,
            kw,
            vw,
            st,
            m,
            l,
            alpha,
            bias,
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
pub(crate) unsafe fn read_row<S: Simd, const D: usize>(
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
pub(crate) unsafe fn write_row<S: Simd, const D: usize>(
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

/// How an input row of `D` elements is stored in the workspace: widened to
/// `f32` (any dtype), or copied as `bf16` bits (`u16`, `bf16` inputs only).
/// Query, key and value rows all load through it.
pub(crate) trait RowFormat: Copy {
    /// Reads the `D` elements at `off` of `src`, a buffer of `dtype`
    /// elements, into `dst`.
    ///
    /// # Safety
    /// `off..off + D` is in bounds of `src`'s buffer; `dst` holds `D`
    /// elements of `Self`; `D` is a multiple of 8; for `u16`, `dtype` is
    /// `bf16`.
    unsafe fn read<S: Simd, const D: usize>(
        s: S,
        dtype: DType,
        src: *const u8,
        off: usize,
        dst: *mut Self,
    );
}

impl RowFormat for f32 {
    #[inline(always)]
    unsafe fn read<S: Simd, const D: usize>(
        s: S,
        dtype: DType,
        src: *const u8,
        off: usize,
        dst: *mut f32,
    ) {
        // SAFETY: the caller's contract, which is `read_row`'s.
        unsafe { read_row::<S, D>(s, dtype, src, off, dst) }
    }
}

impl RowFormat for u16 {
    #[inline(always)]
    unsafe fn read<S: Simd, const D: usize>(
        _s: S,
        dtype: DType,
        src: *const u8,
        off: usize,
        dst: *mut u16,
    ) {
        debug_assert!(dtype == DType::BF16);
        // SAFETY: the caller's contract: `src` holds `bf16` elements,
        // `off..off + D` of them in bounds; `dst` holds `D`.
        unsafe { std::ptr::copy_nonoverlapping(src.cast::<u16>().add(off), dst, D) }
    }
}

/// The operand format of the two products: how a stored operand's vectors
/// load, broadcast and multiply into `f32` accumulators. [`F32Products`]
/// has `f32` operands on any [`Simd`]; `bf16dot::Bf16Dot` has 32-bit pairs
/// of `bf16` on AVX-512 BF16. The tile loops ([`qk_tile`], [`pv_tile`]) and
/// the panel loops around them are written once against it.
pub(crate) trait Dot<S: Simd> {
    /// One stored operand element: an `f32`, or a pair of `bf16`.
    type E: Copy;
    /// A vector of [`Simd::W`] operand elements.
    type V: Copy;
    /// Input elements per operand element (1 or 2): a row of `D` inputs is
    /// `D / PER` operand elements.
    const PER: usize;
    /// Whether score tiles are multiplied by the softmax scale as they are
    /// stored (the `f32` path scales the queries when it packs them).
    const SCALE_SCORES: bool;

    /// A vector of zeros.
    fn zero(s: S) -> Self::V;

    /// Loads the `W` elements at `p`.
    ///
    /// # Safety
    /// `p..p + W` is readable.
    unsafe fn load(s: S, p: *const Self::E) -> Self::V;

    /// Broadcasts the element at `p` (which need not be aligned).
    ///
    /// # Safety
    /// `p` is readable.
    unsafe fn splat(s: S, p: *const Self::E) -> Self::V;

    /// `acc + a·b` lane by lane (over the pair of each lane for `bf16`).
    ///
    /// # Safety
    /// The CPU has the format's instructions (AVX-512 BF16 for `bf16`
    /// pairs; `S`'s token proves the rest).
    unsafe fn mac(s: S, acc: S::V, a: Self::V, b: Self::V) -> S::V;
}

/// Query rows `i..i + rows` of head (b, h), to be packed into one panel.
///
/// Invariants (the callers' safety contract): `rows <= PANEL` and the rows
/// lie inside q's buffer; `qt` holds one panel (`D·PANEL` floats, padding
/// lanes included); `scratch` holds `PANEL·D` floats and overlaps neither
/// `qt` nor the inputs.
pub(crate) struct QRows {
    /// Batch index.
    pub b: usize,
    /// Query head.
    pub h: usize,
    /// The first query row (token).
    pub i: usize,
    /// How many rows, at most [`PANEL`].
    pub rows: usize,
    /// The panel the rows are packed into.
    pub qt: *mut f32,
    /// Where the rows are read before they are transposed.
    pub scratch: *mut f32,
}

/// One block of keys and values, tokens `j0..j0 + n` of kv head `kvh`, to
/// be loaded into the workspace.
///
/// Invariants (the callers' safety contract): `j0 + n <= key_end <= Tk`,
/// so the rows lie inside k's and v's buffers; `kw` and `vw` hold the
/// whole key block of the workspace, `block_k(D) >= n` rows (rounded up to
/// the key tile `MK`) of `D` and `dp` floats, do not overlap, and `dp` is
/// `D` rounded up to the vector width. The bf16 value layout keeps its two
/// spare rows in the part of `vw` past the block's pair rows.
pub(crate) struct KvBlock {
    /// Batch index.
    pub b: usize,
    /// Key/value head.
    pub kvh: usize,
    /// The first key token of the block.
    pub j0: usize,
    /// Keys in the block.
    pub n: usize,
    /// One past the last key token the task reads: rows up to it are
    /// prefetched.
    pub key_end: usize,
    /// The key rows, as [`Products::Row`] elements.
    pub kw: *mut f32,
    /// The value rows, as the products store them.
    pub vw: *mut f32,
    /// Row stride of `vw`, in floats.
    pub dp: usize,
}

/// The scores of one panel: `st[k][l] = K[k] · Q[l]` (times the scale where
/// [`Dot::SCALE_SCORES`]) for keys `k < keys` and lanes `l < lanes`.
///
/// Invariants (the callers' safety contract): `qt` is a whole packed panel;
/// `kw` holds `keys` loaded rows (padding rows zero), `keys` a multiple of
/// the key tile; `st` holds `keys` rows of [`PANEL`] floats; `lanes` is a
/// multiple of the vector width, at most [`PANEL`].
pub(crate) struct ScorePanel {
    /// The packed query panel.
    pub qt: *const f32,
    /// The loaded key block.
    pub kw: *const f32,
    /// The scores, `[keys][PANEL]`.
    pub st: *mut f32,
    /// Key rows to score.
    pub keys: usize,
    /// Query lanes to score.
    pub lanes: usize,
}

/// `o[r] = alpha[r]·o[r] + Σ_{j<nk} st[j][r]·V[j]` for the rows `r < rows`
/// of one panel.
///
/// Invariants (the callers' safety contract): `o` holds `rows` rounded up
/// to `R` rows of `dp` floats, `alpha` as many floats; `st` holds `nk` rows
/// of [`PANEL`] probabilities, valid in lanes `< lanes` (`rows <= lanes`,
/// a multiple of the vector width), and may be overwritten; `vw` holds the
/// `nk` value rows as the products store them.
pub(crate) struct PvPanel {
    /// The panel's first output row.
    pub o: *mut f32,
    /// Row stride of `o` and `vw`, in floats.
    pub dp: usize,
    /// The probabilities, `[nk][PANEL]`.
    pub st: *mut f32,
    /// The softmax corrections of the panel's rows.
    pub alpha: *const f32,
    /// The loaded value block.
    pub vw: *const f32,
    /// Keys to add.
    pub nk: usize,
    /// Output rows.
    pub rows: usize,
    /// Valid lanes of `st`.
    pub lanes: usize,
}

/// One output tile of `O += P·V` in operand elements `E`: `R` rows and `C`
/// vectors of the head dimension, against `n` operand rows (keys, or key
/// pairs).
///
/// Invariants (the callers' safety contract): `o` reads and writes `R` rows
/// of `C·W` floats at stride `stride`; `p` reads `n` rows of `R` elements
/// at stride [`PANEL`]; `alpha` reads `R` floats; `v` reads `n` rows of
/// `C·W` elements at stride `stride`.
struct PvTile<E> {
    /// The tile's first output row.
    o: *mut f32,
    /// The probabilities of the tile's rows.
    p: *const E,
    /// The softmax corrections of the tile's rows.
    alpha: *const f32,
    /// The tile's first value vector.
    v: *const E,
    /// Row stride of `o` (floats) and `v` (elements).
    stride: usize,
    /// Operand rows.
    n: usize,
}

/// `S[k][lanes] = K[k] · Q[lanes]` for `MK` keys and `NQ·W` query lanes,
/// times `scale` where [`Dot::SCALE_SCORES`].
///
/// # Safety
/// `q` reads `D / PER` rows of `NQ·W` elements at stride [`PANEL`]; `k`
/// reads `MK` rows of `D / PER` elements; `st` writes `MK` rows of `NQ·W`
/// floats at stride [`PANEL`]; the CPU has `M`'s instructions.
#[inline(always)]
unsafe fn qk_tile<S: Simd, M: Dot<S>, const D: usize, const MK: usize, const NQ: usize>(
    s: S,
    q: *const M::E,
    k: *const M::E,
    st: *mut f32,
    scale: f32,
) {
    let steps = D / M::PER;
    let mut acc = [[s.zero(); NQ]; MK];
    for d in 0..steps {
        let mut qv = [M::zero(s); NQ];
        for (n, qn) in qv.iter_mut().enumerate() {
            // SAFETY: row `d`, lanes `n·W..(n+1)·W` of the panel.
            *qn = unsafe { M::load(s, q.add(d * PANEL + n * S::W)) };
        }
        for (kk, row) in acc.iter_mut().enumerate() {
            // SAFETY: key `kk`, element `d`.
            let kb = unsafe { M::splat(s, k.add(kk * steps + d)) };
            for (a, &qn) in row.iter_mut().zip(&qv) {
                // SAFETY: the caller's contract (the CPU has `M`'s
                // instructions).
                *a = unsafe { M::mac(s, *a, qn, kb) };
            }
        }
    }
    let scale = s.splat(scale);
    for (kk, row) in acc.iter().enumerate() {
        for (n, &a) in row.iter().enumerate() {
            let x = if M::SCALE_SCORES { s.mul(a, scale) } else { a };
            // SAFETY: score row `kk`, lanes of vector `n`.
            unsafe { s.store(st.add(kk * PANEL + n * S::W), x) };
        }
    }
}

/// The scores of one panel (see [`ScorePanel`]), `MK` keys × `NQ` vectors
/// of queries per tile.
///
/// # Safety
/// [`ScorePanel`]'s invariants hold; the CPU has `M`'s instructions.
#[inline(always)]
unsafe fn scores<S: Simd, M: Dot<S>, const D: usize, const MK: usize, const NQ: usize>(
    s: S,
    panel: &ScorePanel,
    scale: f32,
) {
    let (q, k) = (panel.qt.cast::<M::E>(), panel.kw.cast::<M::E>());
    let w = S::W;
    let mut l0 = 0;
    while l0 < panel.lanes {
        let full = l0 + NQ * w <= panel.lanes;
        for k0 in (0..panel.keys).step_by(MK) {
            // SAFETY: the caller's contract: lanes `l0..` of the panel, key
            // rows `k0..k0 + MK`, score rows `k0..k0 + MK`.
            unsafe {
                let q = q.add(l0);
                let kr = k.add(k0 * (D / M::PER));
                let sp = panel.st.add(k0 * PANEL + l0);
                if full {
                    qk_tile::<S, M, D, MK, NQ>(s, q, kr, sp, scale);
                } else {
                    qk_tile::<S, M, D, MK, 1>(s, q, kr, sp, scale);
                }
            }
        }
        l0 += if full { NQ * w } else { w };
    }
}

/// `O[r] = alpha[r]·O[r] + Σ_j P[j][r]·V[j]` for one tile (see [`PvTile`]).
///
/// # Safety
/// [`PvTile`]'s invariants hold with these `R` and `C`; the CPU has `M`'s
/// instructions.
#[inline(always)]
unsafe fn pv_tile<S: Simd, M: Dot<S>, const R: usize, const C: usize>(s: S, t: &PvTile<M::E>) {
    let mut acc = [[s.zero(); C]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        // SAFETY: row `r` of the tile.
        let a = s.splat(unsafe { *t.alpha.add(r) });
        for (c, x) in row.iter_mut().enumerate() {
            // SAFETY: row `r`, vector `c`.
            *x = s.mul(unsafe { s.load(t.o.add(r * t.stride + c * S::W)) }, a);
        }
    }
    for j in 0..t.n {
        let mut vv = [M::zero(s); C];
        for (c, x) in vv.iter_mut().enumerate() {
            // SAFETY: value row `j`, vector `c`.
            *x = unsafe { M::load(s, t.v.add(j * t.stride + c * S::W)) };
        }
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: probability row `j`, lane `r`.
            let pb = unsafe { M::splat(s, t.p.add(j * PANEL + r)) };
            for (x, &vc) in row.iter_mut().zip(&vv) {
                // SAFETY: the caller's contract (the CPU has `M`'s
                // instructions).
                *x = unsafe { M::mac(s, *x, pb, vc) };
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (c, &x) in row.iter().enumerate() {
            // SAFETY: as the loads above.
            unsafe { s.store(t.o.add(r * t.stride + c * S::W), x) };
        }
    }
}

/// `O += P·V` of one panel (see [`PvPanel`]): the products turn the
/// probabilities into operand rows ([`Products::probabilities`]), then the
/// output is computed in tiles of `R` rows × `c` vectors, `c` being 1, 2 or
/// `CMAX` (at most 3: `R·CMAX` accumulators fill the register budget).
///
/// # Safety
/// [`PvPanel`]'s invariants hold; the CPU has `P`'s instructions.
#[inline(always)]
unsafe fn pv<S: Simd, P: Products<S>, const R: usize, const CMAX: usize>(s: S, panel: &PvPanel) {
    debug_assert!(CMAX <= 3);
    // SAFETY: the caller's contract: `st` holds `nk` rows, valid in lanes
    // `< lanes`.
    let n = unsafe { P::probabilities(s, panel.st, panel.nk, panel.lanes) };
    let (p, v) = (
        panel.st.cast::<P::E>().cast_const(),
        panel.vw.cast::<P::E>(),
    );
    let (w, dp) = (S::W, panel.dp);
    let dv = dp / w;
    let chunks = dv.div_ceil(CMAX);
    for r0 in (0..panel.rows).step_by(R) {
        let mut c0 = 0;
        for ch in 0..chunks {
            let c = dv / chunks + usize::from(ch < dv % chunks);
            // SAFETY: the caller's contract: rows `r0..r0 + R`, vectors
            // `c0..c0 + c` of `o`; lanes `r0..r0 + R` of the `n` operand
            // rows of `p`; vectors `c0..c0 + c` of the `n` rows of `v`.
            unsafe {
                let t = PvTile {
                    o: panel.o.add(r0 * dp + c0 * w),
                    p: p.add(r0),
                    alpha: panel.alpha.add(r0),
                    v: v.add(c0 * w),
                    stride: dp,
                    n,
                };
                match c {
                    1 => pv_tile::<S, P, R, 1>(s, &t),
                    2 => pv_tile::<S, P, R, 2>(s, &t),
                    _ => pv_tile::<S, P, R, CMAX>(s, &t),
                }
            }
            c0 += c;
        }
    }
}

/// How a task stores its operands and runs the two matrix products: in
/// `f32` ([`F32Products`], any dtype, widened once per block) or, for
/// `bf16` on CPUs with AVX-512 BF16, as `bf16` pairs for `vdpbf16ps`
/// (`bf16dot.rs`). Scores, softmax and the running output are `f32` in both.
///
/// The loops are shared ([`load_block`], [`scores`], [`pv`]); an
/// implementation says only how its operands are laid out.
pub(crate) trait Products<S: Simd>: Dot<S> {
    /// How key rows (and query rows, before packing) are stored.
    type Row: RowFormat;

    /// Transposes the query rows that [`read_q_rows`] left in `q.scratch`
    /// into the panel at `q.qt`, padding lanes with zeros.
    ///
    /// # Safety
    /// [`QRows`]'s invariants hold, and the first `q.rows` rows of
    /// `q.scratch` hold the queries as `Self::Row` elements.
    unsafe fn transpose_q<const D: usize>(s: S, ctx: &Ctx<'_>, q: &QRows);

    /// Loads value row `j < blk.n` of the block into `blk.vw`.
    ///
    /// # Safety
    /// [`KvBlock`]'s invariants hold and `j < blk.n`; called for `j` in
    /// increasing order.
    unsafe fn value_row<const D: usize>(s: S, ctx: &Ctx<'_>, blk: &KvBlock, j: usize);

    /// Turns the `nk` rows of probabilities in `st` (valid in lanes
    /// `< lanes`) into the operand rows of `P·V`, in place; returns how
    /// many operand rows there are.
    ///
    /// # Safety
    /// `st` holds `nk` rows of [`PANEL`] floats; `lanes` is a multiple of
    /// the vector width, at most [`PANEL`]; the CPU has `Self`'s
    /// instructions.
    unsafe fn probabilities(s: S, st: *mut f32, nk: usize, lanes: usize) -> usize;
}

/// Reads query rows `q.i..q.i + q.rows` of head (q.b, q.h) into
/// `q.scratch`, one row after another, as `P::Row` elements: their loads
/// overlap (the transposition between two row loads would serialise the
/// cache misses of rows that lie a token stride apart).
///
/// # Safety
/// [`QRows`]'s invariants hold.
#[inline(always)]
unsafe fn read_q_rows<S: Simd, P: Products<S>, const D: usize>(s: S, ctx: &Ctx<'_>, q: &QRows) {
    let dst = q.scratch.cast::<P::Row>();
    for r in 0..q.rows {
        let off = ctx.q.layout.offset(q.b, q.i + r, q.h);
        // SAFETY: the caller's contract: row (b, i + r, h) of q; row `r` of
        // `scratch` (`PANEL·D` floats hold `PANEL` rows of `D` elements of
        // at most 4 bytes).
        unsafe { P::Row::read::<S, D>(s, ctx.dtype, ctx.q.ptr, off, dst.add(r * D)) };
    }
}

/// Loads keys and values `blk.j0..blk.j0 + blk.n` (see [`KvBlock`]), key
/// rows as `P::Row` elements and value rows as `P` stores them, zeroing
/// key rows up to the next multiple of `MK` and prefetching the rows
/// [`PREFETCH_ROWS`] ahead.
///
/// # Safety
/// [`KvBlock`]'s invariants hold for this `MK`.
#[inline(always)]
unsafe fn load_block<S: Simd, P: Products<S>, const D: usize, const MK: usize>(
    s: S,
    ctx: &Ctx<'_>,
    blk: &KvBlock,
) {
    let kw = blk.kw.cast::<P::Row>();
    for j in 0..blk.n.div_ceil(MK) * MK {
        prefetch_ahead::<S, D>(s, ctx, blk, blk.j0 + j);
        // SAFETY: key row `j` of `kw` (the caller's contract), read from
        // row (b, j0 + j, kvh) of k when `j < n`, zeroed otherwise.
        unsafe {
            let dst = kw.add(j * D);
            if j < blk.n {
                let off = ctx.k.layout.offset(blk.b, blk.j0 + j, blk.kvh);
                P::Row::read::<S, D>(s, ctx.dtype, ctx.k.ptr, off, dst);
                P::value_row::<D>(s, ctx, blk, j);
            } else {
                std::ptr::write_bytes(dst, 0, D);
            }
        }
    }
}

/// Both products in `f32` FMA, with keys and values widened to `f32`.
pub(crate) struct F32Products;

impl<S: Simd> Dot<S> for F32Products {
    type E = f32;
    type V = S::V;
    const PER: usize = 1;
    const SCALE_SCORES: bool = false;

    #[inline(always)]
    fn zero(s: S) -> S::V {
        s.zero()
    }

    #[inline(always)]
    unsafe fn load(s: S, p: *const f32) -> S::V {
        // SAFETY: the caller's contract.
        unsafe { s.load(p) }
    }

    #[inline(always)]
    unsafe fn splat(s: S, p: *const f32) -> S::V {
        // SAFETY: the caller's contract.
        s.splat(unsafe { *p })
    }

    #[inline(always)]
    unsafe fn mac(s: S, acc: S::V, a: S::V, b: S::V) -> S::V {
        s.fma(a, b, acc)
    }
}

impl<S: Simd> Products<S> for F32Products {
    type Row = f32;

    #[inline(always)]
    unsafe fn transpose_q<const D: usize>(_s: S, ctx: &Ctx<'_>, q: &QRows) {
        for d in 0..D {
            for r in 0..PANEL {
                let x = if r < q.rows {
                    // SAFETY: row `r < rows` of `scratch`.
                    unsafe { *q.scratch.add(r * D + d) * ctx.scale }
                } else {
                    0.0
                };
                // SAFETY: element `d` of lane `r` of the panel.
                unsafe { *q.qt.add(d * PANEL + r) = x };
            }
        }
    }

    #[inline(always)]
    unsafe fn value_row<const D: usize>(s: S, ctx: &Ctx<'_>, blk: &KvBlock, j: usize) {
        let off = ctx.v.layout.offset(blk.b, blk.j0 + j, blk.kvh);
        // SAFETY: the caller's contract: row (b, j0 + j, kvh) of v; row `j`
        // of `vw`, `dp` floats.
        unsafe {
            let dst = blk.vw.add(j * blk.dp);
            read_row::<S, D>(s, ctx.dtype, ctx.v.ptr, off, dst);
            for c in D..blk.dp {
                *dst.add(c) = 0.0;
            }
        }
    }

    #[inline(always)]
    unsafe fn probabilities(_s: S, _st: *mut f32, nk: usize, _lanes: usize) -> usize {
        nk
    }
}

/// Prefetches key and value row `j + PREFETCH_ROWS` of the block's head if
/// it is below `blk.key_end`. Rows of one head lie a token stride apart
/// (often a page or more), which the hardware prefetcher does not follow;
/// decode-like calls are bound by these loads.
#[inline(always)]
fn prefetch_ahead<S: Simd, const D: usize>(s: S, ctx: &Ctx<'_>, blk: &KvBlock, j: usize) {
    let ahead = j + PREFETCH_ROWS;
    if ahead < blk.key_end {
        prefetch_row::<S, D>(s, ctx, &ctx.k, blk.b, ahead, blk.kvh);
        prefetch_row::<S, D>(s, ctx, &ctx.v, blk.b, ahead, blk.kvh);
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
    let esize = ctx.dtype.size_bytes();
    let p = src.ptr.wrapping_add(src.layout.offset(b, t, h) * esize);
    for line in (0..D * esize).step_by(64) {
        s.prefetch(p.wrapping_add(line));
    }
}

/// Prefetches the mask elements that query rows `rows` of batch entry `b`,
/// head `h` read for keys `j0..j0 + n`: a dense mask's tile of a panel is
/// `PANEL` rows a key stride apart, which the hardware prefetcher does not
/// follow, and a mask too large for the caches would stall every panel on
/// them.
#[inline(always)]
fn prefetch_mask<S: Simd>(
    s: S,
    mask: &ResolvedMask<'_>,
    (b, h): (usize, usize),
    rows: std::ops::Range<usize>,
    j0: usize,
    n: usize,
) {
    for i in rows {
        let (p, len) = mask.row_span(b, h, i, j0, n);
        if len == 0 {
            continue;
        }
        // Every line the span touches, from the one holding its first byte.
        let first = (p as usize) & 63;
        for line in (0..first + len).step_by(64) {
            s.prefetch(p.wrapping_sub(first).wrapping_add(line));
        }
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
    let (qt, o, kw, vw, st, mrow, lrow, alpha, bias) = unsafe {
        (
            base.add(parts.qt),
            base.add(parts.o),
            base.add(parts.kw),
            base.add(parts.vw),
            base.add(parts.st),
            base.add(parts.m),
            base.add(parts.l),
            base.add(parts.alpha),
            base.add(parts.bias),
        )
    };

    // The entry, head and rows (heavy blocks first: see `Tasks`). Rows,
    // keys and the causal rule are in the entry's local positions: query
    // `i` is token `q0 + i` of batch `b`, key `j` token `k0 + j`; the
    // entry sees keys `lo..hi`.
    let (seq, h, i0) = ctx.tasks.get(task);
    let b = seq.tb;
    let kvh = h / ctx.group;
    let rows = bq.min(seq.nq - i0);
    let lanes = rows.div_ceil(PANEL) * PANEL;
    let qi0 = seq.q0 + i0;

    // The first key and value rows, and the first panel's mask tile, while
    // the queries are packed.
    let key_end = seq.key_end(ctx.causal, i0 + rows);
    for j in seq.lo..(seq.lo + PREFETCH_ROWS).min(key_end) {
        prefetch_row::<S, D>(s, ctx, &ctx.k, b, seq.k0 + j, kvh);
        prefetch_row::<S, D>(s, ctx, &ctx.v, b, seq.k0 + j, kvh);
    }
    if let Some(mask) = &ctx.mask {
        let n = bk.min(key_end.saturating_sub(seq.lo));
        prefetch_mask(s, mask, (b, h), i0..i0 + PANEL.min(rows), seq.lo, n);
    }
    // Queries, packed panel-major; padding lanes are zero. `kw` (at least
    // PANEL rows of D) is free until the first key block.
    debug_assert!(bk >= PANEL);
    for p0 in (0..lanes).step_by(PANEL) {
        let prows = PANEL.min(rows.saturating_sub(p0));
        // The next panel's rows, while this one is packed.
        for r in p0 + PANEL..(p0 + 2 * PANEL).min(rows) {
            prefetch_row::<S, D>(s, ctx, &ctx.q, b, qi0 + r, h);
        }
        // SAFETY: rows `i0 + p0..+prows` of head (b, h) lie inside q's
        // buffer; `qt` holds `max_task_rows(D) / PANEL` panels; `kw` holds
        // `bk >= PANEL` rows of D floats.
        unsafe {
            let q = QRows {
                b,
                h,
                i: qi0 + p0,
                rows: prows,
                qt: qt_at(qt, D, p0),
                scratch: kw,
            };
            read_q_rows::<S, P, D>(s, ctx, &q);
            P::transpose_q::<D>(s, ctx, &q);
        }
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
    // (`key_end`, above) are never loaded, nor keys outside `lo..hi`.
    let mut j0 = seq.lo;
    while j0 < key_end {
        let n = bk.min(key_end - j0);
        // Convert the key and value blocks once for all the task's rows.
        // SAFETY: tokens `k0 + j0..k0 + j0 + n` (< k0 + key_end <= Tk) of
        // head (b, kvh) lie inside k's and v's buffers; `kw` and `vw` hold
        // `bk >= n` rows, `bk` a multiple of MK.
        let blk = KvBlock {
            b,
            kvh,
            j0: seq.k0 + j0,
            n,
            key_end: seq.k0 + key_end,
            kw,
            vw,
            dp,
        };
        // SAFETY: as above.
        unsafe { load_block::<S, P, D, MK>(s, ctx, &blk) };

        for p0 in (0..rows).step_by(PANEL) {
            let prows = PANEL.min(rows - p0);
            // The mask tile of the next panel (of this block, else the
            // first of the next block), read while this one computes.
            if let Some(mask) = &ctx.mask {
                let (np0, nj0) = if p0 + PANEL < rows {
                    (p0 + PANEL, j0)
                } else {
                    (0, j0 + n)
                };
                let nn = bk.min(key_end.saturating_sub(nj0));
                let next = i0 + np0..i0 + (np0 + PANEL).min(rows);
                prefetch_mask(s, mask, (b, h), next, nj0, nn);
            }
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
                let panel = ScorePanel {
                    qt: qt_at(qt, D, p0),
                    kw,
                    st,
                    keys: nk_tiles,
                    lanes: plan_lanes,
                };
                scores::<S, P, D, MK, NQ>(s, &panel, ctx.scale)
            };

            // The mask's bias (whole entries only: local positions are
            // tokens): the panel's rows read into `bias` row-major, zeros
            // past the panel's rows and the block's keys, then added to
            // the scores transposed, a W×W block at a time.
            if let Some(mask) = &ctx.mask {
                let stride = bias_stride(bk);
                let nkw = nk.div_ceil(w) * w;
                for r in 0..plan_lanes {
                    // SAFETY: row `r < PANEL` of `bias`, `nkw <= stride`
                    // floats.
                    let row = unsafe { std::slice::from_raw_parts_mut(bias.add(r * stride), nkw) };
                    let read = if r < prows { nk } else { 0 };
                    mask.bias_row(b, h, i0 + p0 + r, j0, &mut row[..read]);
                    row[read..].fill(0.0);
                }
                for r in (0..plan_lanes).step_by(w) {
                    for j in (0..nkw).step_by(w) {
                        // SAFETY: rows `r..r + W <= plan_lanes` of `bias`,
                        // keys `j..j + W <= nkw`; score rows `j..j + W`
                        // (`st` holds `bias_stride(bk) >= nkw` rows), lanes
                        // `r..r + W <= PANEL`.
                        unsafe {
                            s.add_transposed(
                                bias.add(r * stride + j),
                                stride,
                                st.add(j * PANEL + r),
                                PANEL,
                            )
                        };
                    }
                }
            }

            // Online softmax, lane-wise over groups of W query rows.
            for g in (0..plan_lanes).step_by(w) {
                let row0 = i0 + p0 + g;
                // SAFETY: lanes `g..g + W` of `st` rows `< nk`, entries
                // `p0 + g..` of `m`, `l`, `alpha` (`bq + PANEL` long).
                unsafe {
                    let group = LaneGroup {
                        st: st.add(g),
                        nk,
                        m: mrow.add(p0 + g),
                        l: lrow.add(p0 + g),
                        alpha: alpha.add(p0 + g),
                        diagonal: ctx.causal && j0 + nk > row0 + 1,
                        j0,
                        row0,
                    };
                    softmax_group(s, &group);
                }
            }

            // O += P·V, R rows × up to CMAX vectors of D per tile.
            // SAFETY: rows `p0..p0 + prows` (rounded up to R <= W) of `o`
            // (`bq + R` rows of dp) and of `alpha`; `st` rows `< nk`, lanes
            // `< plan_lanes`; `vw` rows `< nk`.
            unsafe {
                let panel = PvPanel {
                    o: o.add(p0 * dp),
                    dp,
                    st,
                    alpha: alpha.add(p0),
                    vw,
                    nk,
                    rows: prows,
                    lanes: plan_lanes,
                };
                pv::<S, P, R, CMAX>(s, &panel)
            };
        }
        j0 += n;
    }

    // Normalise and write; a row that saw no key is zeros, as in torch.
    for r in 0..rows {
        // SAFETY: `l` has bq entries; `o` row r has dp floats;
        // the output row (b, qi0 + r, h) is in bounds and this task's
        // alone, and so is lse element (b, h, qi0 + r) (checked
        // `[B, Hq, Sq, 1]` or `[1, Hq, Tq, 1]`).
        unsafe {
            let l = *lrow.add(r);
            let inv = if l == 0.0 { 0.0 } else { 1.0 / l };
            let scale = s.splat(inv);
            for c in (0..dp).step_by(w) {
                let x = s.mul(s.load(o.add(r * dp + c)), scale);
                let x = if l == 0.0 { s.zero() } else { x };
                s.store(o.add(r * dp + c), x);
            }
            let off = ctx.out_layout.offset(b, qi0 + r, h);
            write_row::<S, D>(s, ctx.dtype, ctx.out, off, o.add(r * dp));
            if let Some(lse) = ctx.lse {
                // The scores were scaled and masked; `m` is their maximum.
                let x = if l == 0.0 {
                    f32::NEG_INFINITY
                } else {
                    *mrow.add(r) + l.ln()
                };
                *lse.ptr.add(lse.layout.offset(b, h, qi0 + r)) = x;
            }
        }
    }
}

/// `W` query lanes of a panel in one online-softmax step, against the `nk`
/// keys `j0..` of a block.
///
/// Invariants (the callers' safety contract): `st` reads and writes `nk`
/// rows of `W` floats at stride [`PANEL`]; `m`, `l` and `alpha` hold `W`
/// floats each.
#[derive(Clone, Copy)]
struct LaneGroup {
    /// The group's scores, lane 0 of key row 0.
    st: *mut f32,
    /// Keys in the step.
    nk: usize,
    /// The running maxima of the group's rows.
    m: *mut f32,
    /// The running sums of the group's rows.
    l: *mut f32,
    /// Where the step's corrections `e^(m_old − m_new)` go.
    alpha: *mut f32,
    /// Whether the causal diagonal crosses the step (some key is past
    /// some row).
    diagonal: bool,
    /// The step's first key.
    j0: usize,
    /// The group's first query row.
    row0: usize,
}

/// The online-softmax step of one [`LaneGroup`]: masks the causal
/// diagonal, updates the running maximum `m` and sum `l`, writes the
/// correction `alpha = e^(m_old − m_new)` and turns the scores into
/// probabilities in place.
///
/// # Safety
/// [`LaneGroup`]'s invariants hold.
#[inline(always)]
unsafe fn softmax_group<S: Simd>(s: S, group: &LaneGroup) {
    let LaneGroup {
        st,
        nk,
        m,
        l,
        alpha,
        diagonal,
        j0,
        row0,
    } = *group;
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

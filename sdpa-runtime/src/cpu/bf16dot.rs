//! `bf16` inputs on CPUs with AVX-512 BF16: both products as `vdpbf16ps`
//! dot products of `bf16` pairs accumulated in `f32`, twice the multiply
//! rate of `f32` FMA, with no widening of keys and values.
//!
//! `f16` inputs do not come here: rounding them to `bf16` keeps 8 of their
//! 11 significant bits, which moves logits of magnitude 1e4 (a large softmax
//! scale) by tens and broke the `f16` tolerance on a third of the seeds of
//! the conformance suite's large-logit case. They take the `f32` path
//! (F16C widening, `f32` FMA) instead.
//!
//! - Queries: panel-major pairs, `[D/2][PANEL]` 32-bit words holding
//!   `(q[2p], q[2p+1])` of one row each, read straight from the input and
//!   not scaled (the scale multiplies the `f32` scores instead, so the
//!   inputs stay exact).
//! - Keys: `bf16` rows `[BK][D]`, copied; a tile broadcasts one 32-bit pair
//!   `(k[2p], k[2p+1])` against 16 query lanes.
//! - Values: rows interleaved in pairs, `[BK/2][DP]` words holding
//!   `(v[2j][d], v[2j+1][d])`, so that a dot product runs over two keys.
//! - Probabilities: the `f32` softmax output, rounded to `bf16` pairs
//!   `(p[2j][i], p[2j+1][i])` in place (as FlashAttention does on GPUs);
//!   the running sum stays in `f32`.

use std::arch::x86_64::*;

use super::kernel::{Ctx, Dot, KvBlock, Products, QRows, PANEL};
use super::simd::{Avx512, Simd};

/// The `bf16`-pair products. Only used inside `#[target_feature]` entry
/// points that enable `avx512bf16`, behind an [`Avx512`] token whose
/// `has_bf16` is true.
pub(crate) struct Bf16Dot;

/// The 16-bit shuffle that turns `[a0..a15, b0..b15]` into
/// `[a0, b0, a1, b1, …]`.
const INTERLEAVE: [i16; 32] = {
    let mut idx = [0i16; 32];
    let mut e = 0;
    while e < 32 {
        idx[e] = ((e % 2) * 16 + e / 2) as i16;
        e += 1;
    }
    idx
};

/// `a` reinterpreted as 32 `bf16`.
#[inline(always)]
fn bh(a: __m512i) -> __m512bh {
    // SAFETY: both are 64-byte plain vectors; every bit pattern is valid.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(a) }
}

/// Operands are 32-bit words holding a pair of `bf16`; a step is one
/// `vdpbf16ps`, `acc + a.lo·b.lo + a.hi·b.hi` in each lane.
impl Dot<Avx512> for Bf16Dot {
    type E = u32;
    type V = __m512i;
    const PER: usize = 2;
    const SCALE_SCORES: bool = true;

    #[inline(always)]
    fn zero(_s: Avx512) -> __m512i {
        // SAFETY: AVX-512 F (the token).
        unsafe { _mm512_setzero_si512() }
    }

    #[inline(always)]
    unsafe fn load(_s: Avx512, p: *const u32) -> __m512i {
        // SAFETY: the caller's contract: 16 words at `p`; AVX-512 F.
        unsafe { _mm512_loadu_si512(p.cast()) }
    }

    #[inline(always)]
    unsafe fn splat(_s: Avx512, p: *const u32) -> __m512i {
        // SAFETY: the caller's contract: one word at `p`, maybe unaligned.
        unsafe { _mm512_set1_epi32(p.read_unaligned() as i32) }
    }

    #[inline(always)]
    unsafe fn mac(_s: Avx512, acc: __m512, a: __m512i, b: __m512i) -> __m512 {
        // SAFETY: the caller's contract (AVX-512 BF16).
        unsafe { _mm512_dpbf16_ps(acc, bh(a), bh(b)) }
    }
}

impl Products<Avx512> for Bf16Dot {
    type Row = u16;

    #[inline(always)]
    unsafe fn transpose_q<const D: usize>(_s: Avx512, _ctx: &Ctx<'_>, q: &QRows) {
        let (q2, tmp) = (q.qt.cast::<u32>(), q.scratch.cast::<u16>());
        for p in 0..D / 2 {
            for r in 0..PANEL {
                let pair = if r < q.rows {
                    // SAFETY: elements `2p, 2p + 1` of row `r` of `scratch`,
                    // read as one little-endian word.
                    unsafe { tmp.add(r * D + 2 * p).cast::<u32>().read_unaligned() }
                } else {
                    0
                };
                // SAFETY: pair row `p` of the panel, lane `r`.
                unsafe { *q2.add(p * PANEL + r) = pair };
            }
        }
    }

    /// Value rows are interleaved in pairs, `[n/2][dp]` words holding
    /// `(v[2j][d], v[2j+1][d])`: an even row waits in a spare row until its
    /// partner comes (or the block ends), then both are interleaved.
    #[inline(always)]
    unsafe fn value_row<const D: usize>(_s: Avx512, ctx: &Ctx<'_>, blk: &KvBlock, j: usize) {
        let v2 = blk.vw.cast::<u32>();
        // Two copied value rows, in the last part of `vw`'s pair rows that
        // this block does not use (`bk` rows of `dp` words hold the `n/2`
        // pair rows and, past them, at least two rows of D).
        let spare = v2.wrapping_add(blk.n.div_ceil(2) * blk.dp).cast::<u16>();
        let (ra, rb) = (spare, spare.wrapping_add(D));
        let off = ctx.v.layout.offset(blk.b, blk.j0 + j, blk.kvh);
        let second = j % 2 == 1;
        // SAFETY: row (b, j0 + j, kvh) of v (the caller's contract); the
        // spare rows as above.
        unsafe {
            std::ptr::copy_nonoverlapping(
                ctx.v.ptr.cast::<u16>().add(off),
                spare.add((j % 2) * D),
                D,
            )
        };
        if !second && j + 1 < blk.n {
            return;
        }
        // SAFETY: pair row `j / 2` of `vw`, `dp` words (the caller's
        // contract: `vw` holds `n` rows of `dp` floats, and
        // `n.div_ceil(2) <= n`); the spare rows hold rows `j - 1` and `j`
        // (`second`) or row `j` alone; AVX-512 VL (the token).
        unsafe {
            let dst = v2.add(j / 2 * blk.dp);
            for d in (0..D).step_by(8) {
                let va = _mm_loadu_si128(ra.add(d).cast());
                let vb = if second {
                    _mm_loadu_si128(rb.add(d).cast())
                } else {
                    _mm_setzero_si128()
                };
                _mm_storeu_si128(dst.add(d).cast(), _mm_unpacklo_epi16(va, vb));
                _mm_storeu_si128(dst.add(d + 4).cast(), _mm_unpackhi_epi16(va, vb));
            }
            for d in D..blk.dp {
                *dst.add(d) = 0;
            }
        }
    }

    /// Rounds the probabilities to `bf16` pairs `(p[2j][i], p[2j+1][i])`,
    /// in place: pair row `jp` replaces score row `jp`, whose values (rows
    /// `jp/2`…) were read before (`jp <= 2jp`).
    #[inline(always)]
    unsafe fn probabilities(s: Avx512, st: *mut f32, nk: usize, lanes: usize) -> usize {
        let np = nk.div_ceil(2);
        let p2 = st.cast::<u32>();
        // SAFETY: AVX-512 BW (the token); `INTERLEAVE` is 64 bytes.
        let idx = unsafe { _mm512_loadu_si512(INTERLEAVE.as_ptr().cast()) };
        for jp in 0..np {
            for g in (0..lanes).step_by(16) {
                // SAFETY: score rows `2jp`, `2jp + 1` (when `< nk`), lanes
                // `g..g + 16 <= lanes`; AVX-512 BF16 and BW.
                unsafe {
                    let a = s.load(st.add(2 * jp * PANEL + g));
                    let b = if 2 * jp + 1 < nk {
                        s.load(st.add((2 * jp + 1) * PANEL + g))
                    } else {
                        s.zero()
                    };
                    let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
                    let pairs = _mm512_permutexvar_epi16(idx, packed);
                    _mm512_storeu_si512(p2.add(jp * PANEL + g).cast(), pairs);
                }
            }
        }
        np
    }
}

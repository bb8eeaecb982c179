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

use super::kernel::{prefetch_ahead, qk_tile_scale, Ctx, Products, PANEL};
use super::simd::{Avx512, Simd};

/// Copies the `D` `bf16` elements at `off` of `src` to `dst`.
///
/// # Safety
/// `off..off + D` is inside the `bf16` buffer `src`; `dst` holds `D`.
#[inline(always)]
unsafe fn row_bf16<const D: usize>(src: *const u8, off: usize, dst: *mut u16) {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src.cast::<u16>().add(off), dst, D) }
}

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

/// `acc + a·b` over `bf16` pairs.
///
/// # Safety
/// The CPU has AVX-512 BF16 (the caller's token says so).
#[inline(always)]
unsafe fn dot(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
    // SAFETY: the caller's contract.
    unsafe { _mm512_dpbf16_ps(acc, bh(a), bh(b)) }
}

/// `S[k][lanes] = scale · K[k]·Q[lanes]` for `MK` keys and `NQ·16` lanes.
///
/// # Safety
/// `q2` reads `D/2` rows of `NQ·16` words at stride [`PANEL`]; `k16` reads
/// `MK` rows of `D` `bf16`; `st` writes `MK` rows of `NQ·16` floats at
/// stride [`PANEL`]; the CPU has AVX-512 BF16.
#[inline(always)]
unsafe fn qk_tile<const D: usize, const MK: usize, const NQ: usize>(
    s: Avx512,
    q2: *const u32,
    k16: *const u16,
    st: *mut f32,
    scale: f32,
) {
    let mut acc = [[s.zero(); NQ]; MK];
    for p in 0..D / 2 {
        let mut q = [unsafe { _mm512_setzero_si512() }; NQ];
        for (n, qn) in q.iter_mut().enumerate() {
            // SAFETY: pair row `p`, lanes of vector `n`.
            *qn = unsafe { _mm512_loadu_si512(q2.add(p * PANEL + n * 16).cast()) };
        }
        for (k, row) in acc.iter_mut().enumerate() {
            // SAFETY: key `k`, elements `2p, 2p + 1`.
            let kb =
                unsafe { _mm512_set1_epi32(k16.add(k * D + 2 * p).cast::<i32>().read_unaligned()) };
            for (a, &qn) in row.iter_mut().zip(&q) {
                // SAFETY: the caller's contract (AVX-512 BF16).
                *a = unsafe { dot(*a, qn, kb) };
            }
        }
    }
    // SAFETY: score rows `k`, lanes of vector `n`.
    unsafe { qk_tile_scale::<Avx512, MK, NQ>(s, &acc, st, PANEL, scale) };
}

/// `O[r] = alpha[r]·O[r] + Σ_jp P2[jp][r]·V2[jp]` for `R` rows and `C`
/// vectors, `np` key pairs.
///
/// # Safety
/// `o` reads and writes `R` rows of `C·16` floats at stride `os`; `p2` reads
/// `np` rows of `R` words at stride [`PANEL`]; `alpha` reads `R` floats;
/// `v2` reads `np` rows of `C·16` words at stride `vs`; AVX-512 BF16.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_tile<const R: usize, const C: usize>(
    s: Avx512,
    o: *mut f32,
    os: usize,
    p2: *const u32,
    alpha: *const f32,
    v2: *const u32,
    vs: usize,
    np: usize,
) {
    let mut acc = [[s.zero(); C]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        // SAFETY: row `r` of the tile.
        let a = s.splat(unsafe { *alpha.add(r) });
        for (c, x) in row.iter_mut().enumerate() {
            // SAFETY: row `r`, vector `c`.
            *x = s.mul(unsafe { s.load(o.add(r * os + c * 16)) }, a);
        }
    }
    for jp in 0..np {
        let mut vv = [unsafe { _mm512_setzero_si512() }; C];
        for (c, x) in vv.iter_mut().enumerate() {
            // SAFETY: value pair row `jp`, vector `c`.
            *x = unsafe { _mm512_loadu_si512(v2.add(jp * vs + c * 16).cast()) };
        }
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: probability pair `jp` of row `r`.
            let pb = unsafe { _mm512_set1_epi32(*p2.add(jp * PANEL + r) as i32) };
            for (x, &vc) in row.iter_mut().zip(&vv) {
                // SAFETY: AVX-512 BF16.
                *x = unsafe { dot(*x, vc, pb) };
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (c, &x) in row.iter().enumerate() {
            // SAFETY: as the loads above.
            unsafe { s.store(o.add(r * os + c * 16), x) };
        }
    }
}

impl Products<Avx512> for Bf16Dot {
    #[inline(always)]
    unsafe fn pack_q<const D: usize>(
        _s: Avx512,
        ctx: &Ctx<'_>,
        b: usize,
        h: usize,
        i: usize,
        rows: usize,
        qt: *mut f32,
        scratch: *mut f32,
    ) {
        let (q2, tmp) = (qt.cast::<u32>(), scratch.cast::<u16>());
        for r in 0..rows {
            let off = ctx.q.layout.offset(b, i + r, h);
            // SAFETY: the caller's contract: row (b, i + r, h) of q; row `r`
            // of `scratch` (PANEL·D floats hold PANEL rows of 2D bf16).
            unsafe { row_bf16::<D>(ctx.q.ptr, off, tmp.add(r * D)) };
        }
        for p in 0..D / 2 {
            for r in 0..PANEL {
                let pair = if r < rows {
                    // SAFETY: elements `2p, 2p + 1` of converted row `r`,
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

    #[inline(always)]
    unsafe fn load_block<const D: usize, const MK: usize>(
        s: Avx512,
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
        let (k16, v2) = (kw.cast::<u16>(), vw.cast::<u32>());
        // Two converted value rows, in the last part of `vw`'s pair rows
        // that this block does not use (`bk` rows of `dp` words hold the
        // `n/2` pair rows and, past them, at least two rows of D).
        let spare = v2.wrapping_add(n.div_ceil(2) * dp).cast::<u16>();
        let (ra, rb) = (spare, spare.wrapping_add(D));
        for j in 0..n.div_ceil(MK) * MK {
            prefetch_ahead::<Avx512, D>(s, ctx, b, kvh, j0 + j, key_end);
            // SAFETY: key row `j` of `kw` (the caller's contract), read
            // from row (b, j0 + j, kvh) of k when `j < n`.
            unsafe {
                let dst = k16.add(j * D);
                if j < n {
                    let off = ctx.k.layout.offset(b, j0 + j, kvh);
                    row_bf16::<D>(ctx.k.ptr, off, dst);
                } else {
                    std::ptr::write_bytes(dst, 0, D);
                }
            }
        }
        for jp in 0..n.div_ceil(2) {
            let j = 2 * jp;
            // SAFETY: value rows `j` and `j + 1` (when `< n`) of v; pair row
            // `jp` of `vw`, `dp` words (the caller's contract: `vw` holds
            // `n` rows of `dp` floats, and `n.div_ceil(2) <= n`).
            unsafe {
                let second = j + 1 < n;
                row_bf16::<D>(ctx.v.ptr, ctx.v.layout.offset(b, j0 + j, kvh), ra);
                if second {
                    let off = ctx.v.layout.offset(b, j0 + j + 1, kvh);
                    row_bf16::<D>(ctx.v.ptr, off, rb);
                }
                let dst = v2.add(jp * dp);
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
                for d in D..dp {
                    *dst.add(d) = 0;
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn scores<const D: usize, const MK: usize, const NQ: usize>(
        s: Avx512,
        ctx: &Ctx<'_>,
        qt: *const f32,
        kw: *const f32,
        st: *mut f32,
        nk_tiles: usize,
        lanes: usize,
    ) {
        let (q2, k16) = (qt.cast::<u32>(), kw.cast::<u16>());
        let mut l0 = 0;
        while l0 < lanes {
            let full = l0 + NQ * 16 <= lanes;
            for k0 in (0..nk_tiles).step_by(MK) {
                // SAFETY: the caller's contract: lanes `l0..` of the panel,
                // key rows `k0..k0 + MK`, score rows `k0..k0 + MK`; the
                // entry point enabled AVX-512 BF16.
                unsafe {
                    let q = q2.add(l0);
                    let kr = k16.add(k0 * D);
                    let sp = st.add(k0 * PANEL + l0);
                    if full {
                        qk_tile::<D, MK, NQ>(s, q, kr, sp, ctx.scale);
                    } else {
                        qk_tile::<D, MK, 1>(s, q, kr, sp, ctx.scale);
                    }
                }
            }
            l0 += if full { NQ * 16 } else { 16 };
        }
    }

    #[inline(always)]
    unsafe fn pv<const R: usize, const CMAX: usize>(
        s: Avx512,
        o: *mut f32,
        dp: usize,
        st: *mut f32,
        alpha: *const f32,
        vw: *const f32,
        nk: usize,
        rows: usize,
        lanes: usize,
    ) {
        // Round the probabilities to bf16 pairs, in place: pair row `jp`
        // replaces score row `jp`, whose values (rows `jp/2`…) were read
        // before (`jp <= 2jp`).
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
        let v2 = vw.cast::<u32>();
        let dv = dp / 16;
        let chunks = dv.div_ceil(CMAX);
        for r0 in (0..rows).step_by(R) {
            let mut c0 = 0;
            for ch in 0..chunks {
                let c = dv / chunks + usize::from(ch < dv % chunks);
                // SAFETY: the caller's contract: rows `r0..r0 + R`, vectors
                // `c0..c0 + c` of `o`; pair rows `< np` of `p2` and `v2`.
                unsafe {
                    let (o, a, p, v) = (
                        o.add(r0 * dp + c0 * 16),
                        alpha.add(r0),
                        p2.add(r0),
                        v2.add(c0 * 16),
                    );
                    match c {
                        1 => pv_tile::<R, 1>(s, o, dp, p, a, v, dp, np),
                        2 => pv_tile::<R, 2>(s, o, dp, p, a, v, dp, np),
                        _ => pv_tile::<R, CMAX>(s, o, dp, p, a, v, dp, np),
                    }
                }
                c0 += c;
            }
        }
    }
}

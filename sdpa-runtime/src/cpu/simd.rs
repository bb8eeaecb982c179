//! The few vector operations the kernel needs, for each instruction set.
//!
//! Why hand-written `std::arch` intrinsics behind a small trait, rather than
//! `pulp`, the `gemm` crate's micro-kernels or code left to the
//! auto-vectoriser:
//!
//! - the kernel needs about twenty operations (loads, stores, FMA, max, a
//!   blend, an exponential built from integer bit tricks, and element
//!   conversions), all of which map one-to-one onto intrinsics, so a trait of
//!   our own costs less than a dependency and keeps every instruction visible;
//! - register blocking must be exact (24 of the 32 `zmm` registers as
//!   accumulators), which auto-vectorised code does not promise, and the
//!   `gemm` crate's micro-kernels compute a plain matrix product with no room
//!   for the online softmax between the two products or the AVX-512 BF16 dot
//!   products;
//! - one generic kernel body, written once against [`Simd`], is compiled
//!   three times: inside `#[target_feature]` entry points for AVX-512 and
//!   AVX2+FMA, and for the baseline target as the portable path. The
//!   portable vector is a plain array whose loops the compiler vectorises for
//!   whatever the baseline has (SSE2 on x86-64, NEON on aarch64).
//!
//! Soundness: a value of [`Avx512`] or [`Avx2`] can only be made by
//! [`Avx512::detect`] / [`Avx2::detect`], which check the CPU at run time, so
//! holding one proves that its intrinsics may run.

/// A vector of `f32` lanes and the operations the kernel uses on it.
///
/// Every method is `#[inline(always)]` so that it melts into the
/// `#[target_feature]` function that calls it.
pub(crate) trait Simd: Copy + Send + Sync + 'static {
    /// The vector.
    type V: Copy;
    /// Lanes per vector.
    const W: usize;

    /// All lanes zero.
    fn zero(self) -> Self::V;
    /// All lanes `x`.
    fn splat(self, x: f32) -> Self::V;
    /// Loads `W` lanes.
    ///
    /// # Safety
    /// `p..p + W` must be readable.
    unsafe fn load(self, p: *const f32) -> Self::V;
    /// Stores `W` lanes.
    ///
    /// # Safety
    /// `p..p + W` must be writable.
    unsafe fn store(self, p: *mut f32, v: Self::V);
    /// `a + b`.
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a - b`.
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a * b`.
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`, fused where the instruction set has FMA.
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Per lane `if a > b { a } else { b }`: when either is NaN, `b` (as
    /// x86's `maxps`).
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// Per lane `if a < b { a } else { b }`: when either is NaN, `b`.
    fn min(self, a: Self::V, b: Self::V) -> Self::V;
    /// Per lane `if a < b { 0 } else { x }` (ordered: NaN keeps `x`).
    fn zero_where_lt(self, x: Self::V, a: Self::V, b: Self::V) -> Self::V;
    /// Per lane `if a > b { -inf } else { x }` (ordered: NaN keeps `x`).
    fn neg_inf_where_gt(self, x: Self::V, a: Self::V, b: Self::V) -> Self::V;
    /// `2^n` per lane, where each lane of `t` is `n + 1.5·2^23` computed in
    /// `f32` (so that its low mantissa bits hold `n`), `-126 <= n <= 127`.
    fn pow2_biased(self, t: Self::V) -> Self::V;
    /// Lanes `0, 1, …, W-1` plus `base`.
    fn iota(self, base: f32) -> Self::V;
    /// Asks for the cache line holding `p` to be brought into L2. A hint:
    /// any address is fine (nothing is read). No-op where unsupported.
    #[inline(always)]
    fn prefetch(self, p: *const u8) {
        let _ = p;
    }

    /// Adds a `W`×`W` block of floats transposed:
    /// `dst[c·dst_stride + r] += src[r·src_stride + c]` for `r, c < W`
    /// (strides in floats). The portable form; the x86 sets transpose in
    /// registers.
    ///
    /// # Safety
    /// `W` rows of `W` floats from `src` (a row every `src_stride`) are
    /// readable, and from `dst` (every `dst_stride`) readable and writable;
    /// the two do not overlap.
    #[inline(always)]
    unsafe fn add_transposed(
        self,
        src: *const f32,
        src_stride: usize,
        dst: *mut f32,
        dst_stride: usize,
    ) {
        for c in 0..Self::W {
            for r in 0..Self::W {
                // SAFETY: the caller's contract.
                unsafe { *dst.add(c * dst_stride + r) += *src.add(r * src_stride + c) };
            }
        }
    }

    /// Widens 8 `bf16` (as raw bits) to `f32`.
    ///
    /// # Safety
    /// `src..src + 8` readable, `dst..dst + 8` writable.
    unsafe fn bf16x8_to_f32(self, src: *const u16, dst: *mut f32);
    /// Widens 8 `f16` (as raw bits) to `f32`.
    ///
    /// # Safety
    /// As [`Simd::bf16x8_to_f32`].
    unsafe fn f16x8_to_f32(self, src: *const u16, dst: *mut f32);
    /// Narrows 8 `f32` to `bf16` bits, rounding to nearest even (NaN stays
    /// NaN).
    ///
    /// # Safety
    /// `src..src + 8` readable, `dst..dst + 8` writable.
    unsafe fn f32x8_to_bf16(self, src: *const f32, dst: *mut u16);
    /// Narrows 8 `f32` to `f16` bits, rounding to nearest even.
    ///
    /// # Safety
    /// As [`Simd::f32x8_to_bf16`].
    unsafe fn f32x8_to_f16(self, src: *const f32, dst: *mut u16);

    /// `e^x` per lane, within 2 ulp for `x <= 0`; exactly `0` for
    /// `x < -87` (so `e^-inf = 0`), NaN for NaN. Not used for `x > 88`.
    ///
    /// Cephes' `expf`: `x = n·ln2 + r` with `|r| <= ln2/2`, a degree-6
    /// polynomial for `e^r`, and `2^n` built in the exponent bits.
    #[inline(always)]
    fn exp(self, x: Self::V) -> Self::V {
        let s = self;
        // Clamp with the constant first: `max`/`min` return their second
        // operand for NaN, so NaN flows through.
        let xc = s.min(s.splat(88.0), s.max(s.splat(-87.0), x));
        let t = s.fma(xc, s.splat(std::f32::consts::LOG2_E), s.splat(MAGIC));
        let n = s.sub(t, s.splat(MAGIC));
        let r = s.fma(n, s.splat(-0.693_359_4), xc);
        let r = s.fma(n, s.splat(2.121_944_4e-4), r);
        let mut p = s.splat(1.987_569_1e-4);
        p = s.fma(p, r, s.splat(1.398_199_9e-3));
        p = s.fma(p, r, s.splat(8.333_452e-3));
        p = s.fma(p, r, s.splat(4.166_579_6e-2));
        p = s.fma(p, r, s.splat(1.666_666_5e-1));
        p = s.fma(p, r, s.splat(0.5));
        let r2 = s.mul(r, r);
        let e = s.add(s.fma(p, r2, r), s.splat(1.0));
        let y = s.mul(e, s.pow2_biased(t));
        s.zero_where_lt(y, x, s.splat(-87.0))
    }
}

/// `1.5·2^23`: adding it to a float below `2^22` in magnitude rounds that
/// float to an integer held in the low mantissa bits.
const MAGIC: f32 = 12_582_912.0;

/// The portable path: 8 lanes as a plain array, loops the compiler
/// vectorises for the baseline target.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Portable;

/// Eight `f32` lanes.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(32))]
pub(crate) struct F32x8([f32; 8]);

#[inline(always)]
#[allow(clippy::needless_range_loop)] // indexed lanes: the shape the vectoriser likes
fn map2(a: F32x8, b: F32x8, f: impl Fn(f32, f32) -> f32) -> F32x8 {
    let mut o = [0.0; 8];
    for i in 0..8 {
        o[i] = f(a.0[i], b.0[i]);
    }
    F32x8(o)
}

/// `half`'s `bf16` rounding on raw bits: nearest even, NaN kept quiet.
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else {
        (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}

#[allow(clippy::needless_range_loop)] // indexed lanes: the shape the vectoriser likes
impl Simd for Portable {
    type V = F32x8;
    const W: usize = 8;

    #[inline(always)]
    fn zero(self) -> F32x8 {
        F32x8([0.0; 8])
    }
    #[inline(always)]
    fn splat(self, x: f32) -> F32x8 {
        F32x8([x; 8])
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> F32x8 {
        // SAFETY: the caller guarantees 8 readable lanes.
        F32x8(unsafe { p.cast::<[f32; 8]>().read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: F32x8) {
        // SAFETY: the caller guarantees 8 writable lanes.
        unsafe { p.cast::<[f32; 8]>().write_unaligned(v.0) }
    }
    #[inline(always)]
    fn add(self, a: F32x8, b: F32x8) -> F32x8 {
        map2(a, b, |x, y| x + y)
    }
    #[inline(always)]
    fn sub(self, a: F32x8, b: F32x8) -> F32x8 {
        map2(a, b, |x, y| x - y)
    }
    #[inline(always)]
    fn mul(self, a: F32x8, b: F32x8) -> F32x8 {
        map2(a, b, |x, y| x * y)
    }
    #[inline(always)]
    fn fma(self, a: F32x8, b: F32x8, c: F32x8) -> F32x8 {
        // Unfused: `f32::mul_add` is a library call without hardware FMA.
        let mut o = [0.0; 8];
        for i in 0..8 {
            o[i] = a.0[i] * b.0[i] + c.0[i];
        }
        F32x8(o)
    }
    #[inline(always)]
    fn max(self, a: F32x8, b: F32x8) -> F32x8 {
        map2(a, b, |x, y| if x > y { x } else { y })
    }
    #[inline(always)]
    fn min(self, a: F32x8, b: F32x8) -> F32x8 {
        map2(a, b, |x, y| if x < y { x } else { y })
    }
    #[inline(always)]
    fn zero_where_lt(self, x: F32x8, a: F32x8, b: F32x8) -> F32x8 {
        let mut o = x.0;
        for i in 0..8 {
            if a.0[i] < b.0[i] {
                o[i] = 0.0;
            }
        }
        F32x8(o)
    }
    #[inline(always)]
    fn neg_inf_where_gt(self, x: F32x8, a: F32x8, b: F32x8) -> F32x8 {
        let mut o = x.0;
        for i in 0..8 {
            if a.0[i] > b.0[i] {
                o[i] = f32::NEG_INFINITY;
            }
        }
        F32x8(o)
    }
    #[inline(always)]
    fn pow2_biased(self, t: F32x8) -> F32x8 {
        let mut o = [0.0; 8];
        for i in 0..8 {
            o[i] = f32::from_bits((t.0[i].to_bits() << 23).wrapping_add(0x3f80_0000));
        }
        F32x8(o)
    }
    #[inline(always)]
    fn iota(self, base: f32) -> F32x8 {
        let mut o = [0.0; 8];
        for (i, x) in o.iter_mut().enumerate() {
            *x = base + i as f32;
        }
        F32x8(o)
    }
    #[inline(always)]
    unsafe fn bf16x8_to_f32(self, src: *const u16, dst: *mut f32) {
        for i in 0..8 {
            // SAFETY: the caller guarantees 8 elements each side.
            unsafe { *dst.add(i) = f32::from_bits((*src.add(i) as u32) << 16) };
        }
    }
    #[inline(always)]
    unsafe fn f16x8_to_f32(self, src: *const u16, dst: *mut f32) {
        for i in 0..8 {
            // SAFETY: the caller guarantees 8 elements each side.
            unsafe { *dst.add(i) = half::f16::from_bits(*src.add(i)).to_f32() };
        }
    }
    #[inline(always)]
    unsafe fn f32x8_to_bf16(self, src: *const f32, dst: *mut u16) {
        for i in 0..8 {
            // SAFETY: the caller guarantees 8 elements each side.
            unsafe { *dst.add(i) = bf16_bits(*src.add(i)) };
        }
    }
    #[inline(always)]
    unsafe fn f32x8_to_f16(self, src: *const f32, dst: *mut u16) {
        for i in 0..8 {
            // SAFETY: the caller guarantees 8 elements each side.
            unsafe { *dst.add(i) = half::f16::from_f32(*src.add(i)).to_bits() };
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Simd;

    /// AVX2 + FMA + F16C, 8 lanes. Made only by [`Avx2::detect`].
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2 {
        _proof: (),
    }

    impl Avx2 {
        /// The token if this CPU has AVX2, FMA and F16C.
        pub(crate) fn detect() -> Option<Avx2> {
            (is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c"))
            .then_some(Avx2 { _proof: () })
        }
    }

    /// AVX-512 F/BW/VL/DQ + FMA + F16C, 16 lanes. Made only by
    /// [`Avx512::detect`].
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx512 {
        bf16: bool,
    }

    impl Avx512 {
        /// The token if this CPU has the AVX-512 subsets the kernel uses.
        pub(crate) fn detect() -> Option<Avx512> {
            (is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512dq")
                && Avx2::detect().is_some())
            .then(|| Avx512 {
                bf16: is_x86_feature_detected!("avx512bf16"),
            })
        }
        /// Whether the CPU also has the AVX-512 BF16 dot products.
        pub(crate) fn has_bf16(self) -> bool {
            self.bf16
        }
    }

    /// 8 lanes of `bf16` bits (in `__m128i`) widened to `f32`.
    #[inline(always)]
    fn bf16_widen(h: __m128i) -> __m256 {
        // SAFETY: `Avx2`/`Avx512` values exist only when AVX2 is present, and
        // these helpers are called only through them.
        unsafe { _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) }
    }

    /// 8 `f32` narrowed to `bf16` bits with `half`'s rounding.
    #[inline(always)]
    fn bf16_narrow(x: __m256) -> __m128i {
        // SAFETY: as `bf16_widen`.
        unsafe {
            let b = _mm256_castps_si256(x);
            let lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
            let rounded = _mm256_srli_epi32(
                _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb),
                16,
            );
            let quiet = _mm256_or_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x40));
            let nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
            let r = _mm256_blendv_epi8(rounded, quiet, nan);
            // Pack the low halves of the 32-bit lanes (values < 2^16, so the
            // unsigned saturation never bites).
            let packed = _mm256_packus_epi32(r, r);
            _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0b1000))
        }
    }

    macro_rules! convert_methods {
        () => {
            #[inline(always)]
            unsafe fn bf16x8_to_f32(self, src: *const u16, dst: *mut f32) {
                // SAFETY: the caller guarantees 8 elements each side; the
                // token proves AVX2.
                unsafe { _mm256_storeu_ps(dst, bf16_widen(_mm_loadu_si128(src.cast()))) }
            }
            #[inline(always)]
            unsafe fn f16x8_to_f32(self, src: *const u16, dst: *mut f32) {
                // SAFETY: as above; the token proves F16C.
                unsafe { _mm256_storeu_ps(dst, _mm256_cvtph_ps(_mm_loadu_si128(src.cast()))) }
            }
            #[inline(always)]
            unsafe fn f32x8_to_bf16(self, src: *const f32, dst: *mut u16) {
                // SAFETY: as above.
                unsafe { _mm_storeu_si128(dst.cast(), bf16_narrow(_mm256_loadu_ps(src))) }
            }
            #[inline(always)]
            unsafe fn f32x8_to_f16(self, src: *const f32, dst: *mut u16) {
                // SAFETY: as above; the token proves F16C.
                unsafe {
                    _mm_storeu_si128(
                        dst.cast(),
                        _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src)),
                    )
                }
            }
        };
    }

    // SAFETY (every `unsafe` block in this impl): an `Avx2` exists only if
    // `Avx2::detect` found AVX2, FMA and F16C; pointer arguments are the
    // caller's promise as documented on the trait.
    impl Simd for Avx2 {
        type V = __m256;
        const W: usize = 8;

        #[inline(always)]
        fn zero(self) -> __m256 {
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        fn splat(self, x: f32) -> __m256 {
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(self, p: *const f32) -> __m256 {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, v: __m256) {
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn max(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_min_ps(a, b) }
        }
        #[inline(always)]
        fn zero_where_lt(self, x: __m256, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_andnot_ps(_mm256_cmp_ps(a, b, _CMP_LT_OQ), x) }
        }
        #[inline(always)]
        fn neg_inf_where_gt(self, x: __m256, a: __m256, b: __m256) -> __m256 {
            unsafe {
                _mm256_blendv_ps(
                    x,
                    _mm256_set1_ps(f32::NEG_INFINITY),
                    _mm256_cmp_ps(a, b, _CMP_GT_OQ),
                )
            }
        }
        #[inline(always)]
        fn pow2_biased(self, t: __m256) -> __m256 {
            unsafe {
                _mm256_castsi256_ps(_mm256_add_epi32(
                    _mm256_slli_epi32(_mm256_castps_si256(t), 23),
                    _mm256_set1_epi32(0x3f80_0000),
                ))
            }
        }
        #[inline(always)]
        fn iota(self, base: f32) -> __m256 {
            unsafe {
                _mm256_add_ps(
                    _mm256_set1_ps(base),
                    _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0),
                )
            }
        }
        #[inline(always)]
        unsafe fn add_transposed(
            self,
            src: *const f32,
            src_stride: usize,
            dst: *mut f32,
            dst_stride: usize,
        ) {
            // An 8×8 transpose: pairs of rows interleaved, then pairs of
            // pairs, then the 128-bit halves.
            unsafe {
                let r: [__m256; 8] =
                    std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * src_stride)));
                let t: [__m256; 8] = std::array::from_fn(|i| {
                    let (a, b) = (r[i & !1], r[i | 1]);
                    if i % 2 == 0 {
                        _mm256_unpacklo_ps(a, b)
                    } else {
                        _mm256_unpackhi_ps(a, b)
                    }
                });
                // Element e (of each half) of rows 4k..4k+3: s[4k + e].
                let q: [__m256; 8] = std::array::from_fn(|i| {
                    let (k, e) = (i / 4, i % 4);
                    let (a, b) = (t[4 * k + e / 2], t[4 * k + 2 + e / 2]);
                    if e % 2 == 0 {
                        _mm256_shuffle_ps::<0x44>(a, b)
                    } else {
                        _mm256_shuffle_ps::<0xEE>(a, b)
                    }
                });
                for c in 0..8 {
                    let (e, hi) = (c % 4, c / 4);
                    let col = if hi == 0 {
                        _mm256_permute2f128_ps::<0x20>(q[e], q[4 + e])
                    } else {
                        _mm256_permute2f128_ps::<0x31>(q[e], q[4 + e])
                    };
                    let d = dst.add(c * dst_stride);
                    _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), col));
                }
            }
        }
        convert_methods!();
        #[inline(always)]
        fn prefetch(self, p: *const u8) {
            // SAFETY: a prefetch is a hint that never faults, whatever `p`.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
        }
    }

    // SAFETY (every `unsafe` block in this impl): an `Avx512` exists only if
    // `Avx512::detect` found AVX-512 F/BW/VL/DQ, AVX2, FMA and F16C; pointer
    // arguments are the caller's promise as documented on the trait.
    impl Simd for Avx512 {
        type V = __m512;
        const W: usize = 16;

        #[inline(always)]
        fn zero(self) -> __m512 {
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        fn splat(self, x: f32) -> __m512 {
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(self, p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, v: __m512) {
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn max(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_min_ps(a, b) }
        }
        #[inline(always)]
        fn zero_where_lt(self, x: __m512, a: __m512, b: __m512) -> __m512 {
            unsafe {
                let lt = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, b);
                _mm512_mask_blend_ps(lt, x, _mm512_setzero_ps())
            }
        }
        #[inline(always)]
        fn neg_inf_where_gt(self, x: __m512, a: __m512, b: __m512) -> __m512 {
            unsafe {
                let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, b);
                _mm512_mask_blend_ps(gt, x, _mm512_set1_ps(f32::NEG_INFINITY))
            }
        }
        #[inline(always)]
        fn pow2_biased(self, t: __m512) -> __m512 {
            unsafe {
                _mm512_castsi512_ps(_mm512_add_epi32(
                    _mm512_slli_epi32::<23>(_mm512_castps_si512(t)),
                    _mm512_set1_epi32(0x3f80_0000),
                ))
            }
        }
        #[inline(always)]
        fn iota(self, base: f32) -> __m512 {
            unsafe {
                _mm512_add_ps(
                    _mm512_set1_ps(base),
                    _mm512_setr_ps(
                        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0,
                        14.0, 15.0,
                    ),
                )
            }
        }
        #[inline(always)]
        unsafe fn add_transposed(
            self,
            src: *const f32,
            src_stride: usize,
            dst: *mut f32,
            dst_stride: usize,
        ) {
            // A 16×16 transpose: within each 128-bit lane, pairs of rows
            // interleaved, then pairs of pairs (`s[4k + e]` holds element
            // `e` of every lane for rows 4k..4k+3); then the lanes
            // gathered in two 128-bit shuffles.
            unsafe {
                let r: [__m512; 16] =
                    std::array::from_fn(|i| _mm512_loadu_ps(src.add(i * src_stride)));
                let t: [__m512; 16] = std::array::from_fn(|i| {
                    let (a, b) = (r[i & !1], r[i | 1]);
                    if i % 2 == 0 {
                        _mm512_unpacklo_ps(a, b)
                    } else {
                        _mm512_unpackhi_ps(a, b)
                    }
                });
                let q: [__m512; 16] = std::array::from_fn(|i| {
                    let (k, e) = (i / 4, i % 4);
                    let (a, b) = (t[4 * k + e / 2], t[4 * k + 2 + e / 2]);
                    if e % 2 == 0 {
                        _mm512_shuffle_ps::<0x44>(a, b)
                    } else {
                        _mm512_shuffle_ps::<0xEE>(a, b)
                    }
                });
                for e in 0..4 {
                    // Lanes 0, 2 (x) and 1, 3 (y) of rows 0..8 and 8..16.
                    let x0 = _mm512_shuffle_f32x4::<0x88>(q[e], q[4 + e]);
                    let y0 = _mm512_shuffle_f32x4::<0xDD>(q[e], q[4 + e]);
                    let x1 = _mm512_shuffle_f32x4::<0x88>(q[8 + e], q[12 + e]);
                    let y1 = _mm512_shuffle_f32x4::<0xDD>(q[8 + e], q[12 + e]);
                    let cols = [
                        _mm512_shuffle_f32x4::<0x88>(x0, x1),
                        _mm512_shuffle_f32x4::<0x88>(y0, y1),
                        _mm512_shuffle_f32x4::<0xDD>(x0, x1),
                        _mm512_shuffle_f32x4::<0xDD>(y0, y1),
                    ];
                    for (lane, col) in cols.into_iter().enumerate() {
                        let d = dst.add((4 * lane + e) * dst_stride);
                        _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), col));
                    }
                }
            }
        }
        convert_methods!();
        #[inline(always)]
        fn prefetch(self, p: *const u8) {
            // SAFETY: a prefetch is a hint that never faults, whatever `p`.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp` of `S` on `xs`, lane by lane.
    fn exp_of<S: Simd>(s: S, xs: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        let mut buf = vec![0.0f32; S::W];
        for chunk in xs.chunks(S::W) {
            buf.fill(0.0);
            buf[..chunk.len()].copy_from_slice(chunk);
            // SAFETY: `buf` holds `W` lanes.
            unsafe {
                let v = s.exp(s.load(buf.as_ptr()));
                s.store(buf.as_mut_ptr(), v);
            }
            out.extend_from_slice(&buf[..chunk.len()]);
        }
        out
    }

    fn check_exp<S: Simd>(s: S) {
        let xs: Vec<f32> = (0..20_000).map(|i| -90.0 + i as f32 * 0.0045).collect();
        for (&x, &y) in xs.iter().zip(&exp_of(s, &xs)) {
            let want = (x as f64).exp();
            if x < -87.0 {
                assert_eq!(y, 0.0, "exp({x})");
            } else {
                let rel = ((y as f64 - want) / want).abs();
                assert!(rel < 3e-7, "exp({x}) = {y}, want {want} (rel {rel:e})");
            }
        }
        let special = exp_of(s, &[f32::NEG_INFINITY, f32::NAN, 0.0, -0.0, -1e-30]);
        assert_eq!(special[0], 0.0);
        assert!(special[1].is_nan());
        assert_eq!(&special[2..], &[1.0, 1.0, 1.0]);
    }

    fn check_conversions<S: Simd>(s: S) {
        let xs = [
            1.0f32,
            -2.5,
            1.0 + 1.0 / 256.0,
            std::f32::consts::PI,
            f32::NAN,
            f32::INFINITY,
            -0.0,
            65504.0,
        ];
        let mut bits = [0u16; 8];
        let mut back = [0.0f32; 8];
        // SAFETY: 8 elements each side.
        unsafe { s.f32x8_to_bf16(xs.as_ptr(), bits.as_mut_ptr()) };
        for (&x, &b) in xs.iter().zip(&bits) {
            let want = half::bf16::from_f32(x);
            assert!(want.to_bits() == b || (want.is_nan() && half::bf16::from_bits(b).is_nan()));
        }
        // SAFETY: as above.
        unsafe { s.bf16x8_to_f32(bits.as_ptr(), back.as_mut_ptr()) };
        for (&b, &y) in bits.iter().zip(&back) {
            assert_eq!(half::bf16::from_bits(b).to_f32().to_bits(), y.to_bits());
        }
        // SAFETY: as above.
        unsafe { s.f32x8_to_f16(xs.as_ptr(), bits.as_mut_ptr()) };
        for (&x, &b) in xs.iter().zip(&bits) {
            let want = half::f16::from_f32(x);
            assert!(want.to_bits() == b || (want.is_nan() && half::f16::from_bits(b).is_nan()));
        }
        // SAFETY: as above.
        unsafe { s.f16x8_to_f32(bits.as_ptr(), back.as_mut_ptr()) };
        for (&b, &y) in bits.iter().zip(&back) {
            let want = half::f16::from_bits(b).to_f32();
            assert!(want.to_bits() == y.to_bits() || (want.is_nan() && y.is_nan()));
        }
    }

    /// `add_transposed` against the plain double loop, with strides wider
    /// than a block.
    fn check_add_transposed<S: Simd>(s: S) {
        let w = S::W;
        let (ss, ds) = (w + 5, w + 3);
        let src: Vec<f32> = (0..w * ss).map(|i| (i as f32 * 0.37).sin()).collect();
        let dst: Vec<f32> = (0..w * ds).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut want = dst.clone();
        for c in 0..w {
            for r in 0..w {
                want[c * ds + r] += src[r * ss + c];
            }
        }
        let mut got = dst;
        // SAFETY: `w` rows of each at their strides.
        unsafe { s.add_transposed(src.as_ptr(), ss, got.as_mut_ptr(), ds) };
        assert_eq!(got, want);
    }

    #[test]
    fn portable_exp_and_conversions() {
        check_exp(Portable);
        check_conversions(Portable);
        check_add_transposed(Portable);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_exp_and_conversions() {
        if let Some(s) = Avx2::detect() {
            check_exp(s);
            check_conversions(s);
            check_add_transposed(s);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_exp_and_conversions() {
        if let Some(s) = Avx512::detect() {
            check_exp(s);
            check_conversions(s);
            check_add_transposed(s);
        }
    }
}

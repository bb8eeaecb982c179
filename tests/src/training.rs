//! The training calls (the forward with the log-sum-exp, the backward pass)
//! run on random problems and checked against the float64 reference, on
//! every CPU path, with every output buffer poisoned (NaN) first.

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::SeedableRng;

use sdpa_runtime::cpu::with_isa;
use sdpa_runtime::{
    AttentionBackend, AttentionImpl, AttentionMetadata, BackendKind, BackwardInputs, DType,
    Element, Gradients, SdpaError, SdpaImpl, TensorView, TensorViewMut,
};

use crate::cases::{cpu_paths, gen_tensor, Case, CaseInputs, GenTensor, MaskKind, Placement};
use crate::reference::{self, RefInputs};

/// The inputs of a training case: q, k, v and the mask as the forward
/// cases draw them, and the output gradient `dout` with q's layout.
pub struct TrainingInputs<T> {
    /// q, k, v and the mask.
    pub x: CaseInputs<T>,
    /// `[B, Sq, Hq, D]`, with the case's placement.
    pub dout: GenTensor<T>,
}

impl<T: Element> TrainingInputs<T> {
    /// Draws the inputs of `case` from `seed`.
    pub fn draw(case: &Case, seed: u64) -> TrainingInputs<T> {
        let x = CaseInputs::<T>::draw(case, seed);
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_d0d0);
        let (b, sq, _, hq, _, d) = case.dims();
        let dout = gen_tensor::<T>([b, sq, hq, d], case.placement, 1.0, &mut rng);
        TrainingInputs { x, dout }
    }

    /// The float64 reference: `(out, lse, dq, dk, dv)`, with `out` and
    /// `dout` as the element type holds them.
    pub fn reference(&self, case: &Case) -> Reference {
        let (b, sq, sk, hq, hkv, d) = case.dims();
        let mask = &self.x.mask;
        let bias_fn = |bi: usize, hi: usize, i: usize, j: usize| {
            mask.as_ref().unwrap().bias_at(sk, bi, hi, i, j)
        };
        let r = RefInputs {
            q: &self.x.q.values,
            k: &self.x.k.values,
            v: &self.x.v.values,
            batch: b,
            seq_q: sq,
            seq_k: sk,
            heads_q: hq,
            heads_kv: hkv,
            d,
            scale: case.scale.map_or(1.0 / (d as f64).sqrt(), |s| s as f64),
            causal: case.causal,
            // The kernels hold the masked scores in f32 (see the field).
            f32_scores: true,
            bias: if mask.is_some() { Some(&bias_fn) } else { None },
        };
        let out = reference::attention(&r);
        let lse = reference::lse(&r);
        let (dq, dk, dv) = reference::backward(&r, &self.dout.values);
        let (mq, mk, mv) = reference::backward_magnitude(&r, &self.dout.values);
        Reference {
            out,
            lse,
            dq,
            dk,
            dv,
            magnitude: [mq, mk, mv],
        }
    }
}

/// What the float64 reference computes for a training case.
pub struct Reference {
    /// `[B, Sq, Hq, D]`.
    pub out: Vec<f64>,
    /// `[B, Hq, Sq]`.
    pub lse: Vec<f64>,
    /// `[B, Sq, Hq, D]`.
    pub dq: Vec<f64>,
    /// `[B, Sk, Hkv, D]`.
    pub dk: Vec<f64>,
    /// `[B, Sk, Hkv, D]`.
    pub dv: Vec<f64>,
    /// [`reference::backward_magnitude`]'s `dq`, `dk`, `dv`: the size of
    /// the terms each gradient element sums, which bounds `f32`
    /// accumulation error.
    pub magnitude: [Vec<f64>; 3],
}

/// Reads the view `[shape]` with `strides` out of `buf` as float64, and
/// checks that everything outside it is still NaN (the buffer was
/// poisoned before the call).
pub fn read_view<T: Element>(
    buf: &[T],
    shape: [usize; 4],
    strides: [usize; 4],
    what: &str,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(shape.iter().product());
    let mut written = vec![false; buf.len()];
    for b in 0..shape[0] {
        for s in 0..shape[1] {
            for h in 0..shape[2] {
                let base = b * strides[0] + s * strides[1] + h * strides[2];
                for e in 0..shape[3] {
                    out.push(buf[base + e].to_f32() as f64);
                    written[base + e] = true;
                }
            }
        }
    }
    for (n, x) in buf.iter().enumerate() {
        assert!(
            written[n] || x.to_f32().is_nan(),
            "{what}: the kernel wrote outside the view at offset {n}"
        );
    }
    out
}

/// Checks `lse` against the reference: `-inf` exactly where the reference
/// has it, else within `tol · (1 + |ref|)`.
pub fn assert_lse_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len());
    for (n, (g, w)) in got.iter().zip(want).enumerate() {
        if *w == f64::NEG_INFINITY {
            assert!(*g == f64::NEG_INFINITY, "{what}: lse[{n}] = {g}, want -inf");
        } else {
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "{what}: lse[{n}] = {g}, want {w}"
            );
        }
    }
}

/// Checks `lse` against the reference with an absolute tolerance: `-inf`
/// exactly where the reference has it, else within the `f32` spacing at
/// `|ref|` (what an `f32` can hold of it: 64 at `-1e9`) plus `1e-4`. With a
/// large finite mask, [`assert_lse_close`]'s relative tolerance alone would
/// let an error of thousands through.
pub fn assert_lse_close_abs(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len());
    for (n, (g, w)) in got.iter().zip(want).enumerate() {
        if *w == f64::NEG_INFINITY {
            assert!(*g == f64::NEG_INFINITY, "{what}: lse[{n}] = {g}, want -inf");
            continue;
        }
        let x = (w.abs() as f32).min(f32::MAX);
        let spacing = (f32::from_bits(x.to_bits() + 1) - x) as f64;
        assert!(
            (g - w).abs() <= spacing + 1e-4,
            "{what}: lse[{n}] = {g}, want {w} (absolute tolerance {spacing:.1e} + 1e-4)"
        );
    }
}

/// The tolerance on the log-sum-exp: `f32` arithmetic on inputs the
/// reference sees rounded as the kernel does, for every dtype.
pub const LSE_TOL: f64 = 2e-5;

/// Runs `forward_with_lse_into` on `case` (CPU backend, every CPU path)
/// with poisoned buffers, and checks the output and the log-sum-exp
/// against the reference; also checks that `forward_with_lse` returns the
/// same bits. Panics with the case, path and seed on a mismatch.
pub fn check_lse(backend: &dyn AttentionBackend, case: &Case, seed: u64) {
    for isa in cpu_paths(BackendKind::Cpu) {
        let isa = isa.expect("the CPU backend runs a forced path");
        let what = format!("{case:?} on {isa} (seed {seed})");
        let run = || match case.dtype {
            DType::F32 => lse_typed::<f32>(backend, case, seed, &what),
            DType::F16 => lse_typed::<f16>(backend, case, seed, &what),
            DType::BF16 => lse_typed::<bf16>(backend, case, seed, &what),
        };
        with_isa(isa, run)
            .and_then(|r| r)
            .unwrap_or_else(|e| panic!("{what} failed: {e}"));
    }
}

fn lse_typed<T: Element>(
    backend: &dyn AttentionBackend,
    case: &Case,
    seed: u64,
    what: &str,
) -> Result<(), SdpaError> {
    let (b, sq, sk, hq, hkv, d) = case.dims();
    let t = TrainingInputs::<T>::draw(case, seed);
    let x = &t.x;
    let layer = backend.build_impl(case.params().backend(BackendKind::Cpu))?;
    let qv = TensorView::with_strides(&x.q.buf, [b, sq, hq, d], x.q.strides)?;
    let kv = TensorView::with_strides(&x.k.buf, [b, sk, hkv, d], x.k.strides)?;
    let vv = TensorView::with_strides(&x.v.buf, [b, sk, hkv, d], x.v.strides)?;
    let meta = x.metadata()?;
    let out_shape = [b, sq, hq, d];
    let (out_strides, out_len) = case.out_placement.strides(out_shape);
    let mut out_buf = vec![T::from_f32(f32::NAN); out_len];
    // The lse with a gap after each head's rows: strides are honoured.
    let lse_shape = [b, hq, sq, 1];
    let lse_strides = [hq * (sq + 3), sq + 3, 1, 1];
    let mut lse_buf = vec![f32::NAN; b * hq * (sq + 3)];
    {
        let mut ov = TensorViewMut::with_strides(&mut out_buf, out_shape, out_strides)?;
        let mut lv = TensorViewMut::with_strides(&mut lse_buf, lse_shape, lse_strides)?;
        layer.forward_with_lse_into(&qv, &kv, &vv, &meta, &mut ov, &mut lv)?;
    }
    let want = t.reference(case);
    let out = read_view(&out_buf, out_shape, out_strides, what);
    let err = reference::rel_l2(&out, &want.out);
    assert!(
        err <= case.tolerance(),
        "{what}: output relative error {err:.3e} > {:.0e}",
        case.tolerance()
    );
    let lse = read_view(&lse_buf, lse_shape, lse_strides, what);
    assert_lse_close(&lse, &want.lse, LSE_TOL, what);
    if matches!(case.mask, MaskKind::LargeAdditive { .. }) {
        assert_lse_close_abs(&lse, &want.lse, what);
    }
    // The fresh form gives the same bits.
    let (out2, lse2) = layer.forward_with_lse(&qv, &kv, &vv, &meta)?;
    assert_eq!(lse2.shape(), lse_shape);
    let lse2 = lse2.to_f32_vec()?;
    for (n, (a, c)) in lse2.iter().zip(&lse).enumerate() {
        assert!(
            a.to_bits() == (*c as f32).to_bits(),
            "{what}: forward_with_lse's lse[{n}] = {a} but forward_with_lse_into wrote {c}"
        );
    }
    let out2 = out2.to_f32_vec()?;
    for (a, c) in out2.iter().zip(&out) {
        assert!(a.to_bits() == (*c as f32).to_bits() || (a.is_nan() && c.is_nan()));
    }
    Ok(())
}

/// How a backward call is made: the layer, q, k, v, the metadata, the
/// backward's inputs and the gradient buffers.
pub type BackwardCall<'c> = &'c dyn Fn(
    &SdpaImpl,
    [&TensorView<'_>; 3],
    &AttentionMetadata<'_>,
    &BackwardInputs<'_>,
    &mut Gradients<'_>,
) -> Result<(), SdpaError>;

/// The backward through the layer: `backward_into`.
pub fn through_layer(
    layer: &SdpaImpl,
    [q, k, v]: [&TensorView<'_>; 3],
    meta: &AttentionMetadata<'_>,
    x: &BackwardInputs<'_>,
    g: &mut Gradients<'_>,
) -> Result<(), SdpaError> {
    layer.backward_into(q, k, v, meta, x, g)
}

/// The tolerance on a gradient's error, per (batch, head) slice (see
/// [`judge_backward`]): `‖err‖ ≤ arith·‖magnitude‖ + dtype·‖own‖`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradTolerance {
    /// Times the norm of the terms the gradient sums
    /// ([`reference::backward_magnitude`]): `f32` accumulation error, and
    /// `Δ = rowsum(dO∘O)` read from an `out` rounded to the element type,
    /// which cancel in the gradient but not in its terms.
    pub arith: f64,
    /// Times the norm of the reference gradient itself: the rounding of
    /// the inputs' and the gradient's element type.
    pub dtype: f64,
}

/// The gradient tolerance of `dtype`. The magnitude of the terms is 30 to
/// 140 times the gradient's own norm for `dq` and `dk` (they cancel), so
/// `arith` stays small enough that a gradient that is zero, doubled or
/// halved fails for every dtype (`the_judge_rejects_wrong_gradients` in
/// `tests/tests/backward.rs`): halving fails while
/// `(0.5 − dtype)·‖own‖ > arith·‖magnitude‖`, i.e. down to
/// `‖own‖/‖magnitude‖` of 2e-6 (f32), 2e-4 (f16), 2.1e-3 (bf16).
/// Measured (all of `tests/tests/backward.rs`, seed 7): errors at most
/// 1.4e-6 (f32), 3.3e-4 (f16), 2.9e-3 (bf16) of the gradient's own norm
/// and 6.4e-7, 8.6e-5, 6.9e-4 of the terms', with `‖own‖/‖magnitude‖` at
/// least 7e-3.
pub fn grad_tolerance(dtype: DType) -> GradTolerance {
    match dtype {
        DType::F32 => GradTolerance {
            arith: 1e-6,
            dtype: 1e-5,
        },
        DType::F16 => GradTolerance {
            arith: 1e-4,
            dtype: 5e-3,
        },
        DType::BF16 => GradTolerance {
            arith: 1e-3,
            dtype: 2e-2,
        },
    }
}

/// The gradients a backward run wrote, float64, row-major.
#[derive(Debug, PartialEq)]
pub struct Grads {
    /// `[B, Sq, Hq, D]`.
    pub dq: Vec<f64>,
    /// `[B, Sk, Hkv, D]`.
    pub dk: Vec<f64>,
    /// `[B, Sk, Hkv, D]`.
    pub dv: Vec<f64>,
}

/// Runs `case` through the forward with the log-sum-exp and then `call`,
/// on every CPU path, with NaN-poisoned gradient buffers laid out as the
/// case's output placement says, and checks the gradients against the
/// float64 reference. Panics with the case, path and seed on a mismatch.
/// Returns the gradients of the last path.
pub fn check_backward(
    backend: &dyn AttentionBackend,
    case: &Case,
    seed: u64,
    call: BackwardCall<'_>,
) -> Grads {
    let mut last = None;
    for isa in cpu_paths(BackendKind::Cpu) {
        let isa = isa.expect("the CPU backend runs a forced path");
        let what = format!("{case:?} on {isa} (seed {seed})");
        let tol = grad_tolerance(case.dtype);
        let run = || match case.dtype {
            DType::F32 => backward_typed::<f32>(backend, case, seed, call, tol),
            DType::F16 => backward_typed::<f16>(backend, case, seed, call, tol),
            DType::BF16 => backward_typed::<bf16>(backend, case, seed, call, tol),
        };
        let grads = with_isa(isa, run)
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        last = Some(grads);
    }
    last.expect("at least the portable path runs")
}

/// One backward run of `case` on the active path, judged against the
/// reference with tolerance `tol`: `Err` says what failed (the call, or
/// which gradient by how much).
pub fn backward_typed<T: Element>(
    backend: &dyn AttentionBackend,
    case: &Case,
    seed: u64,
    call: BackwardCall<'_>,
    tol: GradTolerance,
) -> Result<Grads, String> {
    let grads = run_backward::<T>(backend, case, seed, call)
        .map_err(|e| format!("the call failed: {e}"))?;
    judge_backward::<T>(case, seed, &grads, tol)?;
    Ok(grads)
}

/// Runs the forward with the log-sum-exp and then `call` on `case`'s
/// inputs, with `out`, `lse` and NaN-poisoned gradient buffers laid out as
/// the case's output placement says; returns the gradients (checking that nothing outside
/// the views was written).
pub fn run_backward<T: Element>(
    backend: &dyn AttentionBackend,
    case: &Case,
    seed: u64,
    call: BackwardCall<'_>,
) -> Result<Grads, SdpaError> {
    run_backward_on::<T>(backend, BackendKind::Cpu, case, seed, call)
}

/// [`run_backward`] with the backward's layer asking for backend `kind`
/// (`Cuda`: host tensors staged through device 0); `out` and `lse` come
/// from the CPU forward either way.
pub fn run_backward_on<T: Element>(
    backend: &dyn AttentionBackend,
    kind: BackendKind,
    case: &Case,
    seed: u64,
    call: BackwardCall<'_>,
) -> Result<Grads, SdpaError> {
    let what = format!("{case:?} (seed {seed})");
    let what = what.as_str();
    let (b, sq, sk, hq, hkv, d) = case.dims();
    let t = TrainingInputs::<T>::draw(case, seed);
    let x = &t.x;
    let forward = backend.build_impl(case.params().backend(BackendKind::Cpu))?;
    let layer = backend.build_impl(case.params().backend(kind))?;
    let qv = TensorView::with_strides(&x.q.buf, [b, sq, hq, d], x.q.strides)?;
    let kv = TensorView::with_strides(&x.k.buf, [b, sk, hkv, d], x.k.strides)?;
    let vv = TensorView::with_strides(&x.v.buf, [b, sk, hkv, d], x.v.strides)?;
    let dov = TensorView::with_strides(&t.dout.buf, [b, sq, hq, d], t.dout.strides)?;
    let meta = x.metadata()?;
    let (out, lse) = forward.forward_with_lse(&qv, &kv, &vv, &meta)?;
    // `out` and `lse` as the backward reads them: in the case's output
    // placement, and the lse with a gap after each head's rows unless the
    // placement is contiguous (NaN between the elements either way).
    let out_shape = [b, sq, hq, d];
    let (out_strides, out_len) = case.out_placement.strides(out_shape);
    let mut out_buf = vec![T::from_f32(f32::NAN); out_len];
    let out_vals = out.to_f32_vec()?;
    let mut n = 0;
    for bi in 0..b {
        for i in 0..sq {
            for h in 0..hq {
                let base = bi * out_strides[0] + i * out_strides[1] + h * out_strides[2];
                for e in 0..d {
                    // Exact: the value came from a `T`.
                    out_buf[base + e] = T::from_f32(out_vals[n]);
                    n += 1;
                }
            }
        }
    }
    let lse_shape = [b, hq, sq, 1];
    let gap = if case.out_placement == Placement::Contiguous {
        0
    } else {
        3
    };
    let lse_strides = [hq * (sq + gap), sq + gap, 1, 1];
    let mut lse_buf = vec![f32::NAN; b * hq * (sq + gap)];
    for (n, x) in lse.to_f32_vec()?.into_iter().enumerate() {
        lse_buf[(n / sq) * (sq + gap) + n % sq] = x;
    }
    let inputs = BackwardInputs {
        out: TensorView::with_strides(&out_buf, out_shape, out_strides)?,
        dout: dov,
        lse: TensorView::with_strides(&lse_buf, lse_shape, lse_strides)?,
    };
    let (qs, ks) = ([b, sq, hq, d], [b, sk, hkv, d]);
    let (q_strides, q_len) = case.out_placement.strides(qs);
    let (k_strides, k_len) = case.out_placement.strides(ks);
    let mut dq = vec![T::from_f32(f32::NAN); q_len];
    let mut dk = vec![T::from_f32(f32::NAN); k_len];
    let mut dv = vec![T::from_f32(f32::NAN); k_len];
    {
        let mut g = Gradients {
            dq: TensorViewMut::with_strides(&mut dq, qs, q_strides)?,
            dk: TensorViewMut::with_strides(&mut dk, ks, k_strides)?,
            dv: TensorViewMut::with_strides(&mut dv, ks, k_strides)?,
        };
        call(&layer, [&qv, &kv, &vv], &meta, &inputs, &mut g)?;
    }
    let got = Grads {
        dq: read_view(&dq, qs, q_strides, what),
        dk: read_view(&dk, ks, k_strides, what),
        dv: read_view(&dv, ks, k_strides, what),
    };
    Ok(got)
}

/// Judges gradients of `case` against the float64 reference (see
/// [`judge_grads`]). Returns the largest share of its allowance an error
/// used (at most 1).
pub fn judge_backward<T: Element>(
    case: &Case,
    seed: u64,
    got: &Grads,
    tol: GradTolerance,
) -> Result<f64, String> {
    let want = TrainingInputs::<T>::draw(case, seed).reference(case);
    judge_grads(case, &want, got, tol)
}

/// The L2 norms of `x`'s (batch, head) slices of a `[B, S, H, D]` tensor,
/// `B·H` of them, batch-major.
fn slice_norms(x: &[f64], [b_n, s_n, h_n, d]: [usize; 4]) -> Vec<f64> {
    let mut out = vec![0.0f64; b_n * h_n];
    for b in 0..b_n {
        for s in 0..s_n {
            for h in 0..h_n {
                let row = &x[((b * s_n + s) * h_n + h) * d..][..d];
                out[b * h_n + h] += row.iter().map(|v| v * v).sum::<f64>();
            }
        }
    }
    out.iter().map(|v| v.sqrt()).collect()
}

/// The relative error, per unit of score, that `f32` scores carry into the
/// probabilities: `exp(s - lse)` of a score `s` rounded in `f32` is off by
/// about `|s|·ε` relatively, which no tolerance of the sums covers when
/// the scores are in the hundreds (a property case: head size 256, scale
/// -2.26, scores near 300, `dv` 1.7e-5 of its own size off, in f32, on
/// every implementation alike).
const SCORE_ROUNDING: f64 = 4.0 * f32::EPSILON as f64;

/// Judges gradients `got` of `case` against the reference `want`: for each
/// (batch, query head) slice of `dq` and each (batch, key/value head) slice
/// of `dk` and `dv`, so that one wrong head is not diluted by the others,
/// `‖err‖ ≤ tol.arith·‖magnitude‖ + (tol.dtype + SCORE_ROUNDING·L)·‖own‖`
/// (`own`: the reference gradient's slice, `magnitude`: the terms it sums,
/// `L`: the largest finite `|lse|`, which bounds the scores that carry
/// weight); a slice whose allowance is 0 must be exact. `dq` must be exactly zero in rows that see
/// no key. Returns the largest share of its allowance an error used.
pub fn judge_grads(
    case: &Case,
    want: &Reference,
    got: &Grads,
    tol: GradTolerance,
) -> Result<f64, String> {
    let mut worst = 0.0f64;
    let (b, sq, sk, hq, hkv, d) = case.dims();
    let lse_max = want
        .lse
        .iter()
        .filter(|x| x.is_finite())
        .fold(0.0f64, |m, x| m.max(x.abs()));
    let own_tol = tol.dtype + SCORE_ROUNDING * lse_max;
    for (n, (name, g, w, shape)) in [
        ("dq", &got.dq, &want.dq, [b, sq, hq, d]),
        ("dk", &got.dk, &want.dk, [b, sk, hkv, d]),
        ("dv", &got.dv, &want.dv, [b, sk, hkv, d]),
    ]
    .into_iter()
    .enumerate()
    {
        if g.len() != w.len() {
            return Err(format!("{name} has {} elements, want {}", g.len(), w.len()));
        }
        let err: Vec<f64> = g.iter().zip(w).map(|(a, c)| a - c).collect();
        let err = slice_norms(&err, shape);
        let own = slice_norms(w, shape);
        let mag = slice_norms(&want.magnitude[n], shape);
        for (x, ((e, o), m)) in err.iter().zip(&own).zip(&mag).enumerate() {
            let allowed = tol.arith * m + own_tol * o;
            let used = if allowed > 0.0 {
                e / allowed
            } else if *e == 0.0 {
                0.0
            } else {
                f64::INFINITY
            };
            if used.is_nan() || used > 1.0 {
                let (bi, h) = (x / shape[2], x % shape[2]);
                return Err(format!(
                    "{name} of (batch {bi}, head {h}): error {e:.3e} > {allowed:.3e} \
                     ({:.1e}·terms {m:.3e} + {:.1e}·own {o:.3e}; {:.2e} of its own size)",
                    tol.arith,
                    own_tol,
                    if *o > 0.0 { e / o } else { *e },
                ));
            }
            worst = worst.max(used);
        }
    }
    for bi in 0..b {
        for h in 0..hq {
            for i in 0..sq {
                if want.lse[(bi * hq + h) * sq + i] == f64::NEG_INFINITY {
                    let row = &got.dq[((bi * sq + i) * hq + h) * d..][..d];
                    if row.iter().any(|x| *x != 0.0) {
                        return Err(format!(
                            "dq of row ({bi}, {i}, {h}), which sees no key, is not zero"
                        ));
                    }
                }
            }
        }
    }
    Ok(worst)
}

//! An independent float64 reference: the textbook formula, one query row at
//! a time, with no tiling and no online softmax.

/// A mask as the reference sees it: the additive bias of `(b, h, i, j)`.
pub type Bias<'a> = &'a dyn Fn(usize, usize, usize, usize) -> f64;

/// Dense `[B, S, H, D]` inputs in float64.
pub struct RefInputs<'a> {
    /// `[B, Sq, Hq, D]`.
    pub q: &'a [f64],
    /// `[B, Sk, Hkv, D]`.
    pub k: &'a [f64],
    /// `[B, Sk, Hkv, D]`.
    pub v: &'a [f64],
    /// `[B, Sq, Hq, Sk, Hkv, D]` sizes.
    pub batch: usize,
    /// Queries.
    pub seq_q: usize,
    /// Keys.
    pub seq_k: usize,
    /// Query heads.
    pub heads_q: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Head size.
    pub d: usize,
    /// Scale of the scores.
    pub scale: f64,
    /// Top-left causal.
    pub causal: bool,
    /// Round each masked score `scale·q·k + bias` to `f32`, as a kernel
    /// that holds its scores in `f32` (and PyTorch's `f32` math) does: with
    /// a large finite mask (`-1e9`, `f32::MIN`) on every key of a row,
    /// the `f32` sums are all equal and the row is uniform, where float64
    /// would keep the scores. Off for finite differences.
    pub f32_scores: bool,
    /// Additive bias per `(b, h, i, j)`, if any.
    pub bias: Option<Bias<'a>>,
}

/// `softmax(scale · q kᵀ + bias) v` per row; rows that see no key are 0.
pub fn attention(x: &RefInputs<'_>) -> Vec<f64> {
    let (b_n, sq, sk, hq, hkv, d) = (x.batch, x.seq_q, x.seq_k, x.heads_q, x.heads_kv, x.d);
    let mut out = vec![0.0; b_n * sq * hq * d];
    let mut w = vec![0.0f64; sk];
    for b in 0..b_n {
        for h in 0..hq {
            let g = h / (hq / hkv);
            for i in 0..sq {
                row_scores(x, b, h, i, &mut w);
                let m = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let o = &mut out[((b * sq + i) * hq + h) * d..][..d];
                if m == f64::NEG_INFINITY {
                    continue; // sees no key: zeros
                }
                let mut total = 0.0;
                for wj in w.iter_mut() {
                    *wj = (*wj - m).exp();
                    total += *wj;
                }
                for (j, wj) in w.iter().enumerate() {
                    let vj = &x.v[((b * sk + j) * hkv + g) * d..][..d];
                    for (od, vd) in o.iter_mut().zip(vj) {
                        *od += wj / total * vd;
                    }
                }
            }
        }
    }
    out
}

/// The scaled, masked scores of row `(b, h, i)` into `w` (`-inf` where the
/// key is hidden), the rule [`attention`] applies.
fn row_scores(x: &RefInputs<'_>, b: usize, h: usize, i: usize, w: &mut [f64]) {
    let (sq, sk, hq, hkv, d) = (x.seq_q, x.seq_k, x.heads_q, x.heads_kv, x.d);
    let g = h / (hq / hkv);
    let qi = &x.q[((b * sq + i) * hq + h) * d..][..d];
    for (j, wj) in w.iter_mut().enumerate() {
        let kj = &x.k[((b * sk + j) * hkv + g) * d..][..d];
        let mut s: f64 = qi.iter().zip(kj).map(|(a, c)| a * c).sum::<f64>() * x.scale;
        if let Some(bias) = x.bias {
            s += bias(b, h, i, j);
        }
        if x.f32_scores {
            s = s as f32 as f64;
        }
        if x.causal && j > i {
            s = f64::NEG_INFINITY;
        }
        *wj = s;
    }
}

/// The row log-sum-exp `[B, Hq, Sq]`: the natural log of the softmax
/// denominator over the scaled, masked scores; `-inf` for a row that sees
/// no key.
pub fn lse(x: &RefInputs<'_>) -> Vec<f64> {
    let (b_n, sq, sk, hq) = (x.batch, x.seq_q, x.seq_k, x.heads_q);
    let mut out = vec![f64::NEG_INFINITY; b_n * hq * sq];
    let mut w = vec![0.0f64; sk];
    for b in 0..b_n {
        for h in 0..hq {
            for i in 0..sq {
                row_scores(x, b, h, i, &mut w);
                let m = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let total: f64 = w.iter().map(|s| (s - m).exp()).sum();
                out[(b * hq + h) * sq + i] = m + total.ln();
            }
        }
    }
    out
}

/// The gradients of `Σ dout ∘ attention(q, k, v)` with respect to `q`, `k`
/// and `v`, in their `[B, S, H, D]` layouts, written from the definitions:
/// `P = softmax(scale · q kᵀ + bias)` per row, `dV = Pᵀ dO`,
/// `dP = dO Vᵀ`, `dS = P ∘ (dP − rowsum(P ∘ dP))`, `dQ = scale · dS K`,
/// `dK = scale · dSᵀ Q`; key/value heads sum over their query heads; rows
/// that see no key contribute nothing. The mask is a constant.
pub fn backward(x: &RefInputs<'_>, dout: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    backward_terms(x, dout, false)
}

/// The size of the terms the gradients sum, for judging them: [`backward`]
/// with every factor replaced by its absolute value (`|dP| + |Δ|` for
/// `dP − Δ`, `|q|`, `|k|`, `|dO|`). Where the gradient cancels (one key:
/// `dP = Δ`, so `dq = 0` exactly), an `f32` kernel's error is a few unit
/// roundoffs of these terms, not of the gradient.
pub fn backward_magnitude(x: &RefInputs<'_>, dout: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    backward_terms(x, dout, true)
}

fn backward_terms(
    x: &RefInputs<'_>,
    dout: &[f64],
    magnitude: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let f = |v: f64| if magnitude { v.abs() } else { v };
    let (b_n, sq, sk, hq, hkv, d) = (x.batch, x.seq_q, x.seq_k, x.heads_q, x.heads_kv, x.d);
    let mut dq = vec![0.0; b_n * sq * hq * d];
    let mut dk = vec![0.0; b_n * sk * hkv * d];
    let mut dv = vec![0.0; b_n * sk * hkv * d];
    let mut w = vec![0.0f64; sk];
    let mut dp = vec![0.0f64; sk];
    for b in 0..b_n {
        for h in 0..hq {
            let g = h / (hq / hkv);
            for i in 0..sq {
                row_scores(x, b, h, i, &mut w);
                let m = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue; // sees no key: no gradient
                }
                let total: f64 = w.iter().map(|s| (s - m).exp()).sum();
                for wj in w.iter_mut() {
                    *wj = (*wj - m).exp() / total; // P
                }
                let row = ((b * sq + i) * hq + h) * d;
                let doi = &dout[row..][..d];
                for j in 0..sk {
                    let kv = ((b * sk + j) * hkv + g) * d;
                    dp[j] = doi.iter().zip(&x.v[kv..][..d]).map(|(a, c)| f(a * c)).sum();
                    for e in 0..d {
                        dv[kv + e] += w[j] * f(doi[e]);
                    }
                }
                let di: f64 = w.iter().zip(&dp).map(|(p, g)| p * g).sum();
                for j in 0..sk {
                    let ds = if magnitude {
                        w[j] * (dp[j] + di)
                    } else {
                        w[j] * (dp[j] - di)
                    };
                    let kv = ((b * sk + j) * hkv + g) * d;
                    for e in 0..d {
                        dq[row + e] += f(x.scale * ds * x.k[kv + e]);
                        dk[kv + e] += f(x.scale * ds * x.q[row + e]);
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

/// `‖a − b‖ / ‖b‖` (or `‖a − b‖` when `b` is 0).
pub fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

#[cfg(test)]
mod tests {
    //! The backward reference against central finite differences of the
    //! forward reference.

    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    struct Problem {
        dims: [usize; 6],
        causal: bool,
        bias: Option<Vec<f64>>,
    }

    /// `Σ dout ∘ attention(q, k, v)`.
    fn loss(p: &Problem, q: &[f64], k: &[f64], v: &[f64], dout: &[f64]) -> f64 {
        let x = inputs(p, q, k, v, &|_, _, _, _| 0.0);
        let bias_fn = |b: usize, h: usize, i: usize, j: usize| bias_at(p, b, h, i, j);
        let x = RefInputs {
            bias: p.bias.as_ref().map(|_| &bias_fn as Bias<'_>),
            ..x
        };
        attention(&x).iter().zip(dout).map(|(o, g)| o * g).sum()
    }

    fn bias_at(p: &Problem, b: usize, h: usize, i: usize, j: usize) -> f64 {
        let [_, sq, sk, hq, _, _] = p.dims;
        p.bias
            .as_ref()
            .map_or(0.0, |v| v[((b * hq + h) * sq + i) * sk + j])
    }

    fn inputs<'a>(
        p: &Problem,
        q: &'a [f64],
        k: &'a [f64],
        v: &'a [f64],
        bias: Bias<'a>,
    ) -> RefInputs<'a> {
        let [batch, seq_q, seq_k, heads_q, heads_kv, d] = p.dims;
        RefInputs {
            q,
            k,
            v,
            batch,
            seq_q,
            seq_k,
            heads_q,
            heads_kv,
            d,
            scale: 0.7,
            causal: p.causal,
            f32_scores: false,
            bias: Some(bias),
        }
    }

    fn check(p: &Problem, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let [b, sq, sk, hq, hkv, d] = p.dims;
        let mut draw =
            |n: usize| -> Vec<f64> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let q = draw(b * sq * hq * d);
        let k = draw(b * sk * hkv * d);
        let v = draw(b * sk * hkv * d);
        let dout = draw(b * sq * hq * d);
        let bias_fn = |bi: usize, h: usize, i: usize, j: usize| bias_at(p, bi, h, i, j);
        let x = inputs(p, &q, &k, &v, &bias_fn);
        let (dq, dk, dv) = backward(&x, &dout);
        // The log-sum-exp gives the forward back: out = Σ exp(s − lse) v.
        let l = lse(&x);
        let out = attention(&x);
        let mut w = vec![0.0; sk];
        for bi in 0..b {
            for h in 0..hq {
                for i in 0..sq {
                    row_scores(&x, bi, h, i, &mut w);
                    let li = l[(bi * hq + h) * sq + i];
                    let hidden = w.iter().all(|s| *s == f64::NEG_INFINITY);
                    assert_eq!(hidden, li == f64::NEG_INFINITY);
                    for e in 0..d {
                        let mut o = 0.0;
                        if !hidden {
                            for (j, s) in w.iter().enumerate() {
                                o += (s - li).exp()
                                    * v[((bi * sk + j) * hkv + h / (hq / hkv)) * d + e];
                            }
                        }
                        let got = out[((bi * sq + i) * hq + h) * d + e];
                        assert!((o - got).abs() < 1e-12, "lse: {o} vs {got}");
                    }
                }
            }
        }
        let eps = 1e-6;
        let fd = |which: usize, n: usize| -> f64 {
            let nudge = |delta: f64| {
                let (mut q2, mut k2, mut v2) = (q.clone(), k.clone(), v.clone());
                match which {
                    0 => q2[n] += delta,
                    1 => k2[n] += delta,
                    _ => v2[n] += delta,
                }
                loss(p, &q2, &k2, &v2, &dout)
            };
            let (up, down) = (nudge(eps), nudge(-eps));
            (up - down) / (2.0 * eps)
        };
        for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
            assert!(grad.iter().any(|g| *g != 0.0), "{which}: all zero");
            for (n, g) in grad.iter().enumerate() {
                let want = fd(which, n);
                assert!(
                    (g - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "tensor {which} element {n}: {g} vs finite difference {want}"
                );
            }
        }
    }

    /// A bias `[B, Hq, Sq, Sk]` with `-inf` where `keep` says no, and small
    /// values elsewhere when `additive`.
    fn bias(
        p: &[usize; 6],
        seed: u64,
        additive: bool,
        keep: impl Fn(usize, usize, usize) -> bool,
    ) -> Vec<f64> {
        let [b, sq, sk, hq, _, _] = *p;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = Vec::new();
        for _ in 0..b {
            for h in 0..hq {
                for i in 0..sq {
                    for j in 0..sk {
                        let a = if additive {
                            rng.random_range(-1.0..1.0)
                        } else {
                            0.0
                        };
                        out.push(if keep(h, i, j) { a } else { f64::NEG_INFINITY });
                    }
                }
            }
        }
        out
    }

    #[test]
    fn plain_and_grouped_gradients_match_finite_differences() {
        check(
            &Problem {
                dims: [2, 3, 4, 2, 2, 3],
                causal: false,
                bias: None,
            },
            1,
        );
        // GQA (4 query heads on 2 kv heads) and MQA.
        check(
            &Problem {
                dims: [1, 3, 5, 4, 2, 2],
                causal: false,
                bias: None,
            },
            2,
        );
        check(
            &Problem {
                dims: [1, 2, 3, 3, 1, 4],
                causal: false,
                bias: None,
            },
            3,
        );
    }

    #[test]
    fn causal_gradients_match_with_more_or_fewer_keys() {
        check(
            &Problem {
                dims: [1, 5, 3, 2, 1, 3],
                causal: true,
                bias: None,
            },
            4,
        );
        check(
            &Problem {
                dims: [1, 3, 5, 2, 2, 3],
                causal: true,
                bias: None,
            },
            5,
        );
    }

    #[test]
    fn masked_gradients_match_with_an_empty_row() {
        let dims = [1, 4, 4, 2, 1, 3];
        // Bool/int masks: -inf where hidden; row 2 of head 1 sees nothing.
        let hidden = bias(&dims, 6, false, |h, i, j| {
            !(h == 1 && i == 2) && (i + j) % 3 != 1
        });
        check(
            &Problem {
                dims,
                causal: false,
                bias: Some(hidden),
            },
            7,
        );
        // Additive, with -inf, under causal.
        let additive = bias(&dims, 8, true, |_, i, j| (i * 7 + j) % 4 != 2);
        check(
            &Problem {
                dims,
                causal: true,
                bias: Some(additive),
            },
            9,
        );
    }
}

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
                let qi = &x.q[((b * sq + i) * hq + h) * d..][..d];
                for (j, wj) in w.iter_mut().enumerate() {
                    let kj = &x.k[((b * sk + j) * hkv + g) * d..][..d];
                    let mut s: f64 = qi.iter().zip(kj).map(|(a, c)| a * c).sum::<f64>() * x.scale;
                    if let Some(bias) = x.bias {
                        s += bias(b, h, i, j);
                    }
                    if x.causal && j > i {
                        s = f64::NEG_INFINITY;
                    }
                    *wj = s;
                }
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

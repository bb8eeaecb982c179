//! The work of one task: a block of query rows against all the keys it may
//! see, with an online softmax.

use super::OutputRows;
use crate::element::Element;
use crate::problem::Problem;
use crate::tensor::Layout;

/// Query rows per task.
pub const BLOCK_Q: usize = 32;
/// Keys per inner block.
pub const BLOCK_K: usize = 64;

/// The typed inputs of one call, shared by all tasks.
pub(crate) struct Inputs<'p, 'a, T> {
    pub p: &'p Problem<'a>,
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub q_layout: Layout,
    pub k_layout: Layout,
    pub v_layout: Layout,
}

/// Per-thread scratch, reused across tasks.
pub(crate) struct Workspace<const D: usize> {
    /// The scaled query block, `[BLOCK_Q][D]`.
    q: Vec<[f32; D]>,
    /// The key block transposed, `[D][BLOCK_K]`.
    kt: Vec<[f32; BLOCK_K]>,
    /// The value block, `[BLOCK_K][D]`.
    v: Vec<[f32; D]>,
    /// Running output per query row, `[BLOCK_Q][D]`.
    acc: Vec<[f32; D]>,
    /// Running maximum of the scores per query row.
    max: [f32; BLOCK_Q],
    /// Running sum of the exponentials per query row.
    sum: [f32; BLOCK_Q],
}

impl<const D: usize> Workspace<D> {
    pub(crate) fn new() -> Self {
        Workspace {
            q: vec![[0.0; D]; BLOCK_Q],
            kt: vec![[0.0; BLOCK_K]; D],
            v: vec![[0.0; D]; BLOCK_K],
            acc: vec![[0.0; D]; BLOCK_Q],
            max: [f32::NEG_INFINITY; BLOCK_Q],
            sum: [0.0; BLOCK_Q],
        }
    }
}

/// Computes output rows `i0..i0 + BLOCK_Q` (clipped to `Sq`) of batch `b`,
/// query head `h`, and writes them to `out`.
pub(crate) fn query_block<const D: usize, const CAUSAL: bool, T: Element>(
    x: &Inputs<'_, '_, T>,
    ws: &mut Workspace<D>,
    b: usize,
    h: usize,
    i0: usize,
    out: &OutputRows<T>,
) {
    let p = x.p;
    let rows = BLOCK_Q.min(p.seq_q - i0);
    let kvh = h / p.group_size();

    for r in 0..rows {
        let base = x.q_layout.offset(b, i0 + r, h);
        let src = &x.q[base..base + D];
        for (dst, &s) in ws.q[r].iter_mut().zip(src) {
            *dst = s.to_f32() * p.scale;
        }
        ws.acc[r] = [0.0; D];
    }
    ws.max = [f32::NEG_INFINITY; BLOCK_Q];
    ws.sum = [0.0; BLOCK_Q];

    // Top-left causal: row i sees keys j <= i, so the block sees keys below
    // its last row + 1; key blocks past that are never loaded.
    let key_end = if CAUSAL {
        p.seq_k.min(i0 + rows)
    } else {
        p.seq_k
    };
    let mut bias = [0.0f32; BLOCK_K];
    let mut j0 = 0;
    while j0 < key_end {
        let n = BLOCK_K.min(key_end - j0);
        load_keys::<D, T>(x, ws, b, kvh, j0, n);

        for r in 0..rows {
            let i = i0 + r;
            // Scores of row r against the block: an axpy per head dimension,
            // which vectorises over the keys.
            let mut scores = [0.0f32; BLOCK_K];
            for (d, &qd) in ws.q[r].iter().enumerate() {
                for (s, &kd) in scores.iter_mut().zip(&ws.kt[d]) {
                    *s += qd * kd;
                }
            }
            if let Some(mask) = &p.mask {
                mask.bias_row(b, h, i, j0, &mut bias[..n]);
                for (s, &m) in scores[..n].iter_mut().zip(&bias[..n]) {
                    *s += m;
                }
            }
            let visible = if CAUSAL {
                n.min((i + 1).saturating_sub(j0))
            } else {
                n
            };
            scores[visible..].fill(f32::NEG_INFINITY);
            if visible == 0 {
                continue;
            }

            let block_max = scores.iter().fold(f32::NEG_INFINITY, |a, &s| a.max(s));
            let new_max = ws.max[r].max(block_max);
            // A row that has seen only hidden keys keeps max = -inf; shifting
            // by 0 instead keeps exp(-inf - -inf) = NaN out, and makes every
            // hidden key's weight exactly 0.
            let shift = if new_max == f32::NEG_INFINITY {
                0.0
            } else {
                new_max
            };
            let rescale = (ws.max[r] - shift).exp();
            ws.max[r] = new_max;

            let mut block_sum = 0.0f32;
            for s in scores[..visible].iter_mut() {
                *s = (*s - shift).exp();
                block_sum += *s;
            }
            ws.sum[r] = ws.sum[r] * rescale + block_sum;
            let acc = &mut ws.acc[r];
            if rescale != 1.0 {
                for a in acc.iter_mut() {
                    *a *= rescale;
                }
            }
            for (c, &w) in scores[..visible].iter().enumerate() {
                for (a, &vd) in acc.iter_mut().zip(&ws.v[c]) {
                    *a += w * vd;
                }
            }
        }
        j0 += n;
    }

    for r in 0..rows {
        let sum = ws.sum[r];
        // A row that sees no key returns zeros, as torch does.
        let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
        let acc = &mut ws.acc[r];
        for a in acc.iter_mut() {
            *a = if inv == 0.0 { 0.0 } else { *a * inv };
        }
        out.write_row::<D>(b, i0 + r, h, acc);
    }
}

/// Loads keys `j0..j0 + n` of kv head `kvh` transposed into `ws.kt` and the
/// matching values into `ws.v`, zero-filling the rest of the block.
fn load_keys<const D: usize, T: Element>(
    x: &Inputs<'_, '_, T>,
    ws: &mut Workspace<D>,
    b: usize,
    kvh: usize,
    j0: usize,
    n: usize,
) {
    for c in 0..BLOCK_K {
        if c < n {
            let kb = x.k_layout.offset(b, j0 + c, kvh);
            for (d, &kd) in x.k[kb..kb + D].iter().enumerate() {
                ws.kt[d][c] = kd.to_f32();
            }
            let vb = x.v_layout.offset(b, j0 + c, kvh);
            for (dst, &vd) in ws.v[c].iter_mut().zip(&x.v[vb..vb + D]) {
                *dst = vd.to_f32();
            }
        } else {
            for row in ws.kt.iter_mut() {
                row[c] = 0.0;
            }
            ws.v[c] = [0.0; D];
        }
    }
}

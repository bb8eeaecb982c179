//! Candle's own attention, for comparisons and tests.

use candle_core::Tensor;

/// Candle's own attention, composed of candle ops (matmul, softmax, matmul)
/// on `[B, S, H, D]` tensors, for comparisons: it materialises the
/// `[B, Hq, Sq, Sk]` scores and is differentiable like any candle
/// expression.
///
/// `k` and `v` heads are repeated for grouped-query attention; `causal` hides
/// key `j` from query `i` when `j > i` (top-left, as [`forward`](crate::forward)); `mask` is
/// `[B, Sk]`, `[B, Sq, Sk]` or `[B, H, Sq, Sk]` of the full key length (no
/// front padding), integer (non-zero = attend) or floating (added to the
/// scores). Rows that see no key give NaN here (sdpa gives zeros).
pub fn naive_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    causal: bool,
) -> candle_core::Result<Tensor> {
    let (b, sq, hq, _) = q.dims4()?;
    let (_, sk, hkv, _) = k.dims4()?;
    let group = hq / hkv.max(1);
    let repeat = |t: &Tensor| -> candle_core::Result<Tensor> {
        // [B, S, Hkv, D] -> [B, Hq, S, D], each key/value head `group` times.
        let t = t.transpose(1, 2)?;
        if group == 1 {
            return t.contiguous();
        }
        let (b, h, s, d) = t.dims4()?;
        t.unsqueeze(2)?
            .broadcast_as((b, h, group, s, d))?
            .contiguous()?
            .reshape((b, h * group, s, d))
    };
    let q = q.transpose(1, 2)?.contiguous()?;
    let (k, v) = (repeat(k)?, repeat(v)?);
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    let dtype = scores.dtype();
    let device = scores.device().clone();
    let neg_inf =
        |shape: &[usize]| Tensor::full(f32::NEG_INFINITY, shape, &device)?.to_dtype(dtype);
    if causal {
        let hide: Vec<u8> = (0..sq)
            .flat_map(|i| (0..sk).map(move |j| u8::from(j > i)))
            .collect();
        let hide = Tensor::from_vec(hide, (sq, sk), &device)?.broadcast_as(scores.shape())?;
        scores = hide.where_cond(&neg_inf(scores.dims())?, &scores)?;
    }
    if let Some(mask) = mask {
        let mask = match mask.rank() {
            2 => mask.reshape((b, 1, 1, sk))?,
            3 => mask.reshape((b, 1, sq, sk))?,
            _ => mask.clone(),
        }
        .broadcast_as(scores.shape())?;
        scores = if mask.dtype().is_int() {
            mask.ne(0u32)?
                .where_cond(&scores, &neg_inf(scores.dims())?)?
        } else {
            (scores + mask.to_dtype(dtype)?)?
        };
    }
    let max = scores.max_keepdim(candle_core::D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)?;
    p.matmul(&v)?.transpose(1, 2)?.contiguous()
}

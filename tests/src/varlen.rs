//! Variable-length batches and masks for the varlen suites: packed inputs
//! with their `cu_seqlens`, the float64 reference run per sequence and
//! laid out packed, and masks of every element kind and shape.

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sdpa_runtime::{DType, Element, OwnedMaskData};

use crate::cases::{gen_tensor, Case, GenMask, GenTensor, Placement};
use crate::reference::{self, RefInputs};
use crate::training::Reference;

/// A packed batch: the sequences' lengths on each side, the heads and the
/// head size.
#[derive(Clone, Debug)]
pub struct PackedCase {
    /// Query tokens per sequence.
    pub lens_q: Vec<usize>,
    /// Key tokens per sequence (as many sequences as `lens_q`).
    pub lens_k: Vec<usize>,
    /// `Hq`.
    pub heads_q: usize,
    /// `Hkv`.
    pub heads_kv: usize,
    /// `D`.
    pub d: usize,
    /// Top-left causal within each sequence.
    pub causal: bool,
    /// Element type.
    pub dtype: DType,
}

/// Cumulative offsets of `lens`, starting at 0.
pub fn cu_seqlens(lens: &[usize]) -> Vec<i32> {
    let mut cu = vec![0i32];
    for &l in lens {
        cu.push(cu.last().unwrap() + l as i32);
    }
    cu
}

impl PackedCase {
    /// `cu_seqlens_q`.
    pub fn cu_q(&self) -> Vec<i32> {
        cu_seqlens(&self.lens_q)
    }
    /// `cu_seqlens_k`.
    pub fn cu_k(&self) -> Vec<i32> {
        cu_seqlens(&self.lens_k)
    }
    /// `Tq`.
    pub fn tokens_q(&self) -> usize {
        self.lens_q.iter().sum()
    }
    /// `Tk`.
    pub fn tokens_k(&self) -> usize {
        self.lens_k.iter().sum()
    }
    /// The longest query sequence.
    pub fn max_q(&self) -> usize {
        self.lens_q.iter().copied().max().unwrap_or(0)
    }
    /// The longest key sequence.
    pub fn max_k(&self) -> usize {
        self.lens_k.iter().copied().max().unwrap_or(0)
    }
    /// `[1, Tq, Hq, D]`.
    pub fn q_shape(&self) -> [usize; 4] {
        [1, self.tokens_q(), self.heads_q, self.d]
    }
    /// `[1, Tk, Hkv, D]`.
    pub fn k_shape(&self) -> [usize; 4] {
        [1, self.tokens_k(), self.heads_kv, self.d]
    }
    /// `[1, Hq, Tq, 1]`.
    pub fn lse_shape(&self) -> [usize; 4] {
        [1, self.heads_q, self.tokens_q(), 1]
    }
    /// The packed tensors as one case of batch 1 (`Tq` queries, `Tk` keys):
    /// the shapes the gradient judge reads, and the layer parameters.
    pub fn case(&self) -> Case {
        Case::new(1, self.tokens_q(), self.tokens_k(), self.heads_q, self.d)
            .kv_heads(self.heads_kv)
            .causal(self.causal)
            .dtype(self.dtype)
    }
}

/// The inputs of a packed case, contiguous: q, k, v and the output
/// gradient.
pub struct PackedInputs<T> {
    /// `[1, Tq, Hq, D]`.
    pub q: GenTensor<T>,
    /// `[1, Tk, Hkv, D]`.
    pub k: GenTensor<T>,
    /// `[1, Tk, Hkv, D]`.
    pub v: GenTensor<T>,
    /// `[1, Tq, Hq, D]`.
    pub dout: GenTensor<T>,
}

impl<T: Element> PackedInputs<T> {
    /// Draws the inputs of `pc` from `seed`.
    pub fn draw(pc: &PackedCase, seed: u64) -> PackedInputs<T> {
        let mut rng = StdRng::seed_from_u64(seed);
        let c = Placement::Contiguous;
        PackedInputs {
            q: gen_tensor(pc.q_shape(), c, 1.5, &mut rng),
            k: gen_tensor(pc.k_shape(), c, 1.5, &mut rng),
            v: gen_tensor(pc.k_shape(), c, 1.5, &mut rng),
            dout: gen_tensor(pc.q_shape(), c, 1.0, &mut rng),
        }
    }

    /// The float64 reference, sequence by sequence (each a batch of one
    /// with its own causal rule), laid out packed: `out`, `dq` `[1, Tq, Hq,
    /// D]`, `dk`, `dv` `[1, Tk, Hkv, D]`, `lse` `[1, Hq, Tq]`.
    pub fn reference(&self, pc: &PackedCase) -> Reference {
        let (hq, hkv, d) = (pc.heads_q, pc.heads_kv, pc.d);
        let (tq, tk) = (pc.tokens_q(), pc.tokens_k());
        let (cu_q, cu_k) = (pc.cu_q(), pc.cu_k());
        let mut r = Reference {
            out: vec![0.0; tq * hq * d],
            lse: vec![f64::NEG_INFINITY; hq * tq],
            dq: vec![0.0; tq * hq * d],
            dk: vec![0.0; tk * hkv * d],
            dv: vec![0.0; tk * hkv * d],
            magnitude: [
                vec![0.0; tq * hq * d],
                vec![0.0; tk * hkv * d],
                vec![0.0; tk * hkv * d],
            ],
        };
        for b in 0..pc.lens_q.len() {
            let (qa, qb) = (cu_q[b] as usize, cu_q[b + 1] as usize);
            let (ka, kb) = (cu_k[b] as usize, cu_k[b + 1] as usize);
            let (lq, lk) = (qb - qa, kb - ka);
            if lq == 0 {
                continue;
            }
            let (qr, kr) = (qa * hq * d..qb * hq * d, ka * hkv * d..kb * hkv * d);
            let x = RefInputs {
                q: &self.q.values[qr.clone()],
                k: &self.k.values[kr.clone()],
                v: &self.v.values[kr.clone()],
                batch: 1,
                seq_q: lq,
                seq_k: lk,
                heads_q: hq,
                heads_kv: hkv,
                d,
                scale: 1.0 / (d as f64).sqrt(),
                causal: pc.causal,
                f32_scores: true,
                bias: None,
            };
            r.out[qr.clone()].copy_from_slice(&reference::attention(&x));
            let lse = reference::lse(&x);
            for h in 0..hq {
                for i in 0..lq {
                    r.lse[h * tq + qa + i] = lse[h * lq + i];
                }
            }
            let dout = &self.dout.values[qr.clone()];
            let (dq, dk, dv) = reference::backward(&x, dout);
            let (mq, mk, mv) = reference::backward_magnitude(&x, dout);
            r.dq[qr.clone()].copy_from_slice(&dq);
            r.dk[kr.clone()].copy_from_slice(&dk);
            r.dv[kr.clone()].copy_from_slice(&dv);
            r.magnitude[0][qr.clone()].copy_from_slice(&mq);
            r.magnitude[1][kr.clone()].copy_from_slice(&mk);
            r.magnitude[2][kr].copy_from_slice(&mv);
        }
        r
    }
}

/// The element kind of a generated mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskElem {
    /// `bool`.
    Bool,
    /// `u8`.
    U8,
    /// `i32`.
    I32,
    /// `i64`.
    I64,
    /// `f32` bias.
    F32,
    /// `f16` bias.
    F16,
    /// `bf16` bias.
    Bf16,
}

impl MaskElem {
    /// Every kind.
    pub const ALL: [MaskElem; 7] = [
        MaskElem::Bool,
        MaskElem::U8,
        MaskElem::I32,
        MaskElem::I64,
        MaskElem::F32,
        MaskElem::F16,
        MaskElem::Bf16,
    ];
}

/// A mask of `shape` and kind `elem`: attend/hide elements (key 0 attends
/// in 7 of 8 rows, the others with probability 3/4, some rows hide all),
/// or float biases in `[-2, 2]` with about a fifth `-inf`.
pub fn random_mask(elem: MaskElem, shape: &[usize], rng: &mut StdRng) -> GenMask {
    let len = *shape.last().unwrap();
    let n: usize = shape.iter().product();
    let rows = n.checked_div(len).unwrap_or(0);
    let mut keep = Vec::with_capacity(n);
    for _ in 0..rows {
        let row_hidden = rng.random_bool(0.125);
        keep.extend((0..len).map(|j| !row_hidden && (j == 0 || rng.random_bool(0.75))));
    }
    let bias: Vec<f32> = keep
        .iter()
        .map(|&k| {
            if k || !rng.random_bool(0.8) {
                rng.random_range(-2.0..2.0)
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let ints = |k: &bool, rng: &mut StdRng| if *k { rng.random_range(1..=3i64) } else { 0 };
    let data = match elem {
        MaskElem::Bool => OwnedMaskData::Bool(keep),
        MaskElem::U8 => OwnedMaskData::U8(keep.iter().map(|k| ints(k, rng) as u8).collect()),
        MaskElem::I32 => OwnedMaskData::I32(keep.iter().map(|k| ints(k, rng) as i32).collect()),
        MaskElem::I64 => OwnedMaskData::I64(keep.iter().map(|k| ints(k, rng)).collect()),
        MaskElem::F32 => OwnedMaskData::F32(bias),
        MaskElem::F16 => OwnedMaskData::F16(bias.iter().map(|&x| f16::from_f32(x)).collect()),
        MaskElem::Bf16 => OwnedMaskData::BF16(bias.iter().map(|&x| bf16::from_f32(x)).collect()),
    };
    GenMask {
        data,
        shape: shape.to_vec(),
    }
}

/// A `[B, Sk]` key-padding mask of kind `elem` whose batch entry `b` sees
/// keys `runs[b]` only: `true`/non-zero or `0.0` there, `false`/`0` or
/// `-inf` elsewhere.
pub fn key_padding_mask(elem: MaskElem, seq_k: usize, runs: &[(usize, usize)]) -> GenMask {
    let seen: Vec<bool> = runs
        .iter()
        .flat_map(|&(lo, hi)| (0..seq_k).map(move |j| (lo..hi).contains(&j)))
        .collect();
    let bias = |s: &bool| if *s { 0.0f32 } else { f32::NEG_INFINITY };
    let data = match elem {
        MaskElem::Bool => OwnedMaskData::Bool(seen),
        MaskElem::U8 => OwnedMaskData::U8(seen.iter().map(|&s| s as u8).collect()),
        MaskElem::I32 => OwnedMaskData::I32(seen.iter().map(|&s| s as i32 * 7).collect()),
        MaskElem::I64 => OwnedMaskData::I64(seen.iter().map(|&s| s as i64).collect()),
        MaskElem::F32 => OwnedMaskData::F32(seen.iter().map(bias).collect()),
        MaskElem::F16 => OwnedMaskData::F16(seen.iter().map(|s| f16::from_f32(bias(s))).collect()),
        MaskElem::Bf16 => {
            OwnedMaskData::BF16(seen.iter().map(|s| bf16::from_f32(bias(s))).collect())
        }
    };
    GenMask {
        data,
        shape: vec![runs.len(), seq_k],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packed_reference_is_the_batched_one_for_equal_lengths() {
        // Two sequences of equal lengths: packing is a batch of two.
        let pc = PackedCase {
            lens_q: vec![3, 3],
            lens_k: vec![4, 4],
            heads_q: 2,
            heads_kv: 1,
            d: 8,
            causal: true,
            dtype: DType::F32,
        };
        let x = PackedInputs::<f32>::draw(&pc, 5);
        let r = x.reference(&pc);
        let batched = RefInputs {
            q: &x.q.values,
            k: &x.k.values,
            v: &x.v.values,
            batch: 2,
            seq_q: 3,
            seq_k: 4,
            heads_q: 2,
            heads_kv: 1,
            d: 8,
            scale: 1.0 / 8f64.sqrt(),
            causal: true,
            f32_scores: true,
            bias: None,
        };
        assert_eq!(r.out, reference::attention(&batched));
        let (dq, dk, dv) = reference::backward(&batched, &x.dout.values);
        assert_eq!((r.dq, r.dk, r.dv), (dq, dk, dv));
        // lse: batched [2, Hq, 3] vs packed [1, Hq, 6].
        let l = reference::lse(&batched);
        for b in 0..2 {
            for h in 0..2 {
                for i in 0..3 {
                    assert_eq!(r.lse[h * 6 + b * 3 + i], l[(b * 2 + h) * 3 + i]);
                }
            }
        }
    }

    #[test]
    fn empty_sequences_have_no_output_and_minus_infinite_lse() {
        let pc = PackedCase {
            lens_q: vec![2, 0, 3],
            lens_k: vec![2, 4, 0],
            heads_q: 1,
            heads_kv: 1,
            d: 8,
            causal: false,
            dtype: DType::F32,
        };
        assert_eq!(pc.cu_q(), [0, 2, 2, 5]);
        let r = PackedInputs::<f32>::draw(&pc, 1).reference(&pc);
        assert!(r.lse[..2].iter().all(|l| l.is_finite()));
        assert!(r.lse[2..].iter().all(|l| *l == f64::NEG_INFINITY));
        assert!(r.out[2 * 8..].iter().all(|o| *o == 0.0));
        // Keys 2..6 belong to a sequence without queries: no gradient.
        assert!(r.dk[2 * 8..].iter().all(|g| *g == 0.0));
        assert!(r.dk[..2 * 8].iter().any(|g| *g != 0.0));
    }

    #[test]
    fn key_padding_masks_see_their_runs() {
        let m = key_padding_mask(MaskElem::F16, 4, &[(1, 3), (0, 0)]);
        let bias: Vec<f64> = (0..4).map(|j| m.bias_at(4, 0, 0, 0, j)).collect();
        assert_eq!(bias, [f64::NEG_INFINITY, 0.0, 0.0, f64::NEG_INFINITY]);
        assert!((0..4).all(|j| m.bias_at(4, 1, 0, 0, j) == f64::NEG_INFINITY));
    }
}

//! The batch entries of a problem as the CPU kernels read them: where each
//! entry's queries and keys lie in the tensors and which of its keys it
//! sees ([`Seq`]), and the forward's task table over (entry, head, block
//! of queries) ([`Tasks`]).
//!
//! An entry is batch `b` of `[B, S, H, D]` tensors ([`SeqBounds::Whole`]),
//! tokens `cu[b]..cu[b + 1]` of batch 0 of packed `[1, T, H, D]` tensors
//! ([`SeqBounds::Packed`]), or batch `b` seeing only the keys of its
//! key-padding run ([`SeqBounds::Runs`]). The kernels work in the entry's
//! local positions (query `i` is token `q0 + i`, key `j` token `k0 + j`),
//! where every rule holds: causal is `j <= i`, top-left.

use crate::error::{Result, SdpaError};
use crate::problem::Problem;
use crate::varlen::SeqBounds;

/// One batch entry: its tokens in the tensors and the keys it sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Seq {
    /// The tensors' batch index (`b`, or 0 for a packed batch).
    pub tb: usize,
    /// The token of local query 0.
    pub q0: usize,
    /// Query rows.
    pub nq: usize,
    /// The token of local key 0.
    pub k0: usize,
    /// Keys the entry owns (its rows of `dk` and `dv`).
    pub nk: usize,
    /// The first key it sees (local).
    pub lo: usize,
    /// One past the last key it sees (local; `lo <= hi <= nk`).
    pub hi: usize,
}

impl Seq {
    /// One past the last key that local query rows `..end` see: `hi`, or
    /// at most `end` when causal (top-left, `j <= i`).
    #[inline(always)]
    pub fn key_end(&self, causal: bool, end: usize) -> usize {
        if causal {
            self.hi.min(end)
        } else {
            self.hi
        }
    }
}

/// The batch entries of `p`, in batch order. Offsets in device memory
/// cannot be read here: an error.
pub(crate) fn entries(p: &Problem<'_>) -> Result<Vec<Seq>> {
    let packed = p.is_packed();
    (0..p.batch)
        .map(|b| {
            let device = || {
                SdpaError::Unsupported(
                    "cu_seqlens in device memory do not run on the CPU backend; pass host \
                     offsets, or CUDA tensors and the cuda or auto backend"
                        .into(),
                )
            };
            let q = p.q_seqs.range(b, p.tokens_q, p.seq_q).ok_or_else(device)?;
            let k = p.k_seqs.range(b, p.tokens_k, p.seq_k).ok_or_else(device)?;
            let tb = if packed { 0 } else { b };
            Ok(match p.k_seqs {
                // Keys stay absolute: the run is the part of 0..Sk seen.
                SeqBounds::Runs(_) => Seq {
                    tb,
                    q0: q.start,
                    nq: q.len(),
                    k0: 0,
                    nk: p.seq_k,
                    lo: k.start,
                    hi: k.end,
                },
                _ => Seq {
                    tb,
                    q0: q.start,
                    nq: q.len(),
                    k0: k.start,
                    nk: k.len(),
                    lo: 0,
                    hi: k.len(),
                },
            })
        })
        .collect()
}

/// The forward's tasks: for each entry, one per (query head, block of
/// `bq` query rows), entries with the most work first (then in batch
/// order) and within an entry its late (for causal, heavy) blocks first.
/// Which task computes a row changes nothing in its bits.
pub(crate) struct Tasks {
    /// Entries, in task order.
    order: Vec<Seq>,
    /// `starts[e]`: the first task of `order[e]`; one more at the end.
    starts: Vec<usize>,
    /// Query rows per task.
    bq: usize,
}

impl Tasks {
    /// The tasks of `seqs` with `heads` query heads and `bq` rows a task.
    pub fn new(seqs: &[Seq], heads: usize, bq: usize) -> Tasks {
        // Rows times the keys they may see (an order only: causal halves
        // about every entry's work alike).
        let work = |s: &Seq| s.nq * (s.hi - s.lo).max(1);
        let mut order = seqs.to_vec();
        // Stable: equal entries (every Whole batch) keep batch order.
        order.sort_by_key(|s| std::cmp::Reverse(work(s)));
        let mut starts = Vec::with_capacity(order.len() + 1);
        let mut n = 0;
        for s in &order {
            starts.push(n);
            n += heads * s.nq.div_ceil(bq.max(1));
        }
        starts.push(n);
        Tasks { order, starts, bq }
    }

    /// How many tasks there are.
    pub fn len(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    /// Task `t < len()`: its entry, query head and first local query row.
    #[inline]
    pub fn get(&self, t: usize) -> (Seq, usize, usize) {
        let e = self.starts.partition_point(|&s| s <= t) - 1;
        let seq = self.order[e];
        let blocks = seq.nq.div_ceil(self.bq);
        let local = t - self.starts[e];
        let h = local / blocks;
        let qb = blocks - 1 - local % blocks;
        (seq, h, qb * self.bq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_cover_every_row_once() {
        let seqs = [
            Seq {
                nq: 70,
                nk: 5,
                hi: 5,
                ..Seq::default()
            },
            Seq {
                q0: 70,
                ..Seq::default()
            },
            Seq {
                q0: 70,
                nq: 200,
                nk: 9,
                hi: 9,
                ..Seq::default()
            },
        ];
        {
            let t = Tasks::new(&seqs, 3, 64);
            assert_eq!(t.len(), 3 * (2 + 4));
            let mut seen = vec![0; 3 * 270];
            for i in 0..t.len() {
                let (s, h, i0) = t.get(i);
                for r in i0..(i0 + 64).min(s.nq) {
                    seen[h * 270 + s.q0 + r] += 1;
                }
            }
            assert!(seen.iter().all(|&n| n == 1));
            // The longest entry first.
            assert_eq!(t.get(0).0.nq, 200);
        }
    }
}

/// A rough timing of packed and key-padded calls against unmasked ones
/// (GFLOP/s per useful FLOP), in release:
/// `cargo test --release -p sdpa-runtime --lib cpu::seqs::timing -- --ignored --nocapture`.
#[cfg(test)]
mod timing {
    use std::time::Instant;

    use crate::{cpu, AttnMask, Problem, TensorView, TensorViewMut, VarLen};

    const D: usize = 128;
    const H: usize = 8;

    fn fill(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as f32 / u32::MAX as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// The best of 5 runs of `f`, in GFLOP/s for `flops`.
    fn gflops(flops: f64, mut f: impl FnMut()) -> f64 {
        f();
        let best = (0..5)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        flops / best / 1e9
    }

    fn view(x: &[f32], shape: [usize; 4]) -> TensorView<'_> {
        TensorView::from_slice(x, shape).unwrap()
    }

    fn time<const CAUSAL: bool>(p: &Problem<'_>, useful: f64) -> f64 {
        let shape = p.out_shape();
        let mut o = vec![0.0f32; shape.iter().product()];
        let mut ov = TensorViewMut::from_slice(&mut o, shape).unwrap();
        gflops(useful, || {
            cpu::attention::<D, CAUSAL, f32>(p, &mut ov).unwrap();
        })
    }

    /// The backward of `p` after its forward, in GFLOP/s for `useful`
    /// forward FLOPs times 2.5.
    fn time_backward<const CAUSAL: bool>(p: &Problem<'_>, useful: f64) -> f64 {
        let shape = p.out_shape();
        let n: usize = shape.iter().product();
        let kn: usize = p.k.layout().shape().iter().product();
        let lse_shape = p.lse_shape();
        let (mut o, mut lse) = (vec![0.0f32; n], vec![0.0f32; lse_shape.iter().product()]);
        {
            let mut ov = TensorViewMut::from_slice(&mut o, shape).unwrap();
            let mut lv = TensorViewMut::from_slice(&mut lse, lse_shape).unwrap();
            cpu::attention_lse::<D, CAUSAL, f32>(p, &mut ov, Some(&mut lv)).unwrap();
        }
        let dout = fill(n, 4);
        let x = crate::BackwardInputs {
            out: view(&o, shape),
            dout: view(&dout, shape),
            lse: view(&lse, lse_shape),
        };
        let (mut dq, mut dk, mut dv) = (vec![0.0f32; n], vec![0.0f32; kn], vec![0.0f32; kn]);
        let ks = p.k.layout().shape();
        let mut g = crate::Gradients {
            dq: TensorViewMut::from_slice(&mut dq, shape).unwrap(),
            dk: TensorViewMut::from_slice(&mut dk, ks).unwrap(),
            dv: TensorViewMut::from_slice(&mut dv, ks).unwrap(),
        };
        gflops(2.5 * useful, || {
            cpu::backward::<D, CAUSAL, f32>(p, &x, &mut g).unwrap();
        })
    }

    #[test]
    #[ignore = "a timing: run in release with --ignored --nocapture"]
    fn varlen_and_runs_keep_the_unmasked_speed() {
        let (b, s) = (4, 1024);
        let q = fill(b * s * H * D, 1);
        let k = fill(b * s * H * D, 2);
        let v = fill(b * s * H * D, 3);
        let scale = 1.0 / (D as f32).sqrt();
        let shape = [b, s, H, D];
        let pair = |n: f64, m: f64, causal: bool| {
            4.0 * H as f64 * D as f64 * if causal { n * (n + 1.0) / 2.0 } else { n * m }
        };
        // Whole, unmasked.
        let whole = Problem::new(
            view(&q, shape),
            view(&k, shape),
            view(&v, shape),
            None,
            scale,
        )
        .unwrap();
        // Packed: the same tokens as 4 ragged sequences.
        let lens = [1536usize, 512, 1280, 768];
        let cu: Vec<i32> = std::iter::once(0)
            .chain(lens.iter().scan(0, |t, l| {
                *t += l;
                Some(*t as i32)
            }))
            .collect();
        let vl = VarLen::new(&cu, &cu);
        let packed_shape = [1, b * s, H, D];
        let packed = Problem::with_varlen(
            view(&q, packed_shape),
            view(&k, packed_shape),
            view(&v, packed_shape),
            None,
            Some(&vl),
            scale,
        )
        .unwrap();
        // Key padding: runs of 1024, 512 (prefix), 768 (middle), 640.
        let runs = [0..1024usize, 0..512, 128..896, 384..1024];
        let keep: Vec<bool> = runs
            .iter()
            .flat_map(|r| (0..s).map(move |j| r.contains(&j)))
            .collect();
        let mask = AttnMask::new(&keep[..], &[b, s]).unwrap();
        let padded = Problem::new(
            view(&q, shape),
            view(&k, shape),
            view(&v, shape),
            Some(&mask),
            scale,
        )
        .unwrap();
        assert!(matches!(padded.k_seqs, crate::SeqBounds::Runs(_)));
        let sf = s as f64;
        let whole_flops = b as f64 * pair(sf, sf, false);
        let packed_flops: f64 = lens.iter().map(|&n| pair(n as f64, n as f64, false)).sum();
        let padded_flops: f64 = runs.iter().map(|r| pair(sf, r.len() as f64, false)).sum();
        let packed_causal: f64 = lens.iter().map(|&n| pair(n as f64, 0.0, true)).sum();
        let rows = [
            ("whole", time::<false>(&whole, whole_flops)),
            ("packed", time::<false>(&packed, packed_flops)),
            ("key padding runs", time::<false>(&padded, padded_flops)),
            (
                "whole causal",
                time::<true>(&whole, b as f64 * pair(sf, 0.0, true)),
            ),
            ("packed causal", time::<true>(&packed, packed_causal)),
            (
                "backward whole",
                time_backward::<false>(&whole, whole_flops),
            ),
            (
                "backward packed",
                time_backward::<false>(&packed, packed_flops),
            ),
            (
                "backward runs",
                time_backward::<false>(&padded, padded_flops),
            ),
        ];
        for (what, g) in rows {
            println!("{what:>18}: {g:7.1} GFLOP/s per useful FLOP");
        }
    }
}

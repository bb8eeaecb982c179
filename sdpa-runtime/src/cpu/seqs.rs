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

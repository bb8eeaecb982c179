//! Sequence-parallel cases: a global problem drawn at random, each rank's
//! slice of it, and the float64 reference of attention over the whole
//! (trimmed, replicated-extended) sequence that every rank's output is
//! judged against.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sdpa_runtime::distributed::{
    Communicator, DistributedAttention, DistributedOutput, Replicated, SequenceParallel,
};
use sdpa_runtime::{
    AttentionImpl, AttentionMetadata, AttentionParams, AttnMask, BackendKind, DType, Element,
    SdpaError, SdpaImpl, TensorView,
};

use crate::cases::Placement;
use crate::reference::{self, RefInputs};

/// One sequence-parallel problem.
#[derive(Clone, Copy, Debug)]
pub struct SpCase {
    /// Ranks.
    pub world: usize,
    /// Batch.
    pub batch: usize,
    /// Query tokens per rank.
    pub seq_local: usize,
    /// Key/value tokens per rank.
    pub seq_kv_local: usize,
    /// Query heads (all of them).
    pub heads: usize,
    /// Key/value heads (all of them).
    pub kv_heads: usize,
    /// Head size.
    pub d: usize,
    /// Top-left causal.
    pub causal: bool,
    /// Element type.
    pub dtype: DType,
    /// The global length before padding, if the sequence was padded.
    pub original_seq_len: Option<usize>,
    /// Replicated query tokens (0: none passed).
    pub replicated: usize,
    /// Replicated key/value tokens.
    pub replicated_kv: usize,
    /// How each rank's inputs lie in memory.
    pub placement: Placement,
    /// Whether to pass a random key-padding mask `[B, Sk]` over the keys
    /// each rank attends to (trimmed sequence, then replicated tokens).
    pub key_padding: bool,
}

impl SpCase {
    /// `world` ranks, `seq_local` tokens each, `heads` heads of size `d`,
    /// f32, no padding or replicated tokens.
    pub fn new(world: usize, batch: usize, seq_local: usize, heads: usize, d: usize) -> SpCase {
        SpCase {
            world,
            batch,
            seq_local,
            seq_kv_local: seq_local,
            heads,
            kv_heads: heads,
            d,
            causal: false,
            dtype: DType::F32,
            original_seq_len: None,
            replicated: 0,
            replicated_kv: 0,
            placement: Placement::Contiguous,
            key_padding: false,
        }
    }

    /// The layer's global parameters, on `backend`.
    pub fn params(&self, backend: BackendKind) -> AttentionParams {
        AttentionParams::new(self.heads, self.d)
            .num_kv_heads(self.kv_heads)
            .causal(self.causal)
            .backend(backend)
    }

    /// The tolerance on `‖out − ref‖ / ‖ref‖`, as the conformance suite's.
    pub fn tolerance(&self) -> f64 {
        match self.dtype {
            DType::F32 => 1e-5,
            DType::F16 | DType::BF16 => 2e-2,
        }
    }

    /// The shapes of one rank's q, k, v and replicated q, k, v.
    pub fn rank_shapes(&self) -> [[usize; 4]; 6] {
        let (b, d, h, hkv) = (self.batch, self.d, self.heads, self.kv_heads);
        let (s, skv, r, rkv) = (
            self.seq_local,
            self.seq_kv_local,
            self.replicated,
            self.replicated_kv,
        );
        [
            [b, s, h, d],
            [b, skv, hkv, d],
            [b, skv, hkv, d],
            [b, r, h, d],
            [b, rkv, hkv, d],
            [b, rkv, hkv, d],
        ]
    }

    fn seq_q(&self) -> usize {
        self.world * self.seq_local
    }

    fn seq_kv(&self) -> usize {
        self.world * self.seq_kv_local
    }

    /// The keys each rank attends to: the trimmed sequence and the
    /// replicated keys.
    pub fn keys_seen(&self) -> usize {
        self.effective().1 + self.replicated_kv
    }

    /// Query and key/value lengths after trimming.
    fn effective(&self) -> (usize, usize) {
        match self.original_seq_len {
            None => (self.seq_q(), self.seq_kv()),
            Some(n) if self.seq_kv_local == self.seq_local => (n, n),
            Some(n) => (n, self.seq_kv()),
        }
    }
}

/// A drawn problem: global values (rounded to the element type) in f64.
pub struct SpInputs {
    /// `[B, P·S, H, D]`.
    pub q: Vec<f64>,
    /// `[B, P·S_kv, H_kv, D]`.
    pub k: Vec<f64>,
    /// As `k`.
    pub v: Vec<f64>,
    /// `[B, R, H, D]`.
    pub rq: Vec<f64>,
    /// `[B, R_kv, H_kv, D]`.
    pub rk: Vec<f64>,
    /// As `rk`.
    pub rv: Vec<f64>,
    /// The key-padding mask `[B, keys seen]` (true: attend), when the case
    /// has one.
    pub keep: Vec<bool>,
}

fn draw<T: Element>(n: usize, rng: &mut StdRng) -> Vec<f64> {
    (0..n)
        .map(|_| T::from_f32(rng.random_range(-1.0f32..1.0)).to_f32() as f64)
        .collect()
}

impl SpInputs {
    /// Fresh random inputs for `case` from `seed`.
    pub fn draw<T: Element>(case: &SpCase, seed: u64) -> SpInputs {
        let mut rng = StdRng::seed_from_u64(seed);
        let (b, h, hkv, d) = (case.batch, case.heads, case.kv_heads, case.d);
        SpInputs {
            q: draw::<T>(b * case.seq_q() * h * d, &mut rng),
            k: draw::<T>(b * case.seq_kv() * hkv * d, &mut rng),
            v: draw::<T>(b * case.seq_kv() * hkv * d, &mut rng),
            rq: draw::<T>(b * case.replicated * h * d, &mut rng),
            rk: draw::<T>(b * case.replicated_kv * hkv * d, &mut rng),
            rv: draw::<T>(b * case.replicated_kv * hkv * d, &mut rng),
            keep: if case.key_padding {
                (0..b * case.keys_seen())
                    .map(|_| rng.random_bool(0.8))
                    .collect()
            } else {
                Vec::new()
            },
        }
    }

    /// Rank `rank`'s slice of a global `[B, P·s, heads, D]` tensor, laid out
    /// with `placement` (NaN in the gaps): the buffer and its strides.
    pub fn local<T: Element>(
        case: &SpCase,
        global: &[f64],
        rank: usize,
        s: usize,
        heads: usize,
    ) -> (Vec<T>, [usize; 4]) {
        let (b, d) = (case.batch, case.d);
        let (strides, len) = case.placement.strides([b, s, heads, d]);
        let mut buf = vec![T::from_f32(f32::NAN); len];
        let seq = case.world * s;
        for bi in 0..b {
            for si in 0..s {
                for hi in 0..heads {
                    for di in 0..d {
                        let x = global[((bi * seq + rank * s + si) * heads + hi) * d + di];
                        buf[bi * strides[0] + si * strides[1] + hi * strides[2] + di] =
                            T::from_f32(x as f32);
                    }
                }
            }
        }
        (buf, strides)
    }

    /// A replicated tensor (the same on every rank), with `placement`.
    pub fn replicated<T: Element>(
        case: &SpCase,
        values: &[f64],
        r: usize,
        heads: usize,
    ) -> (Vec<T>, [usize; 4]) {
        let one_rank = SpCase { world: 1, ..*case };
        Self::local::<T>(&one_rank, values, 0, r, heads)
    }

    /// Rank `rank`'s six buffers (q, k, v, replicated q, k, v) with their
    /// strides, laid out with the case's placement.
    pub fn rank_buffers<T: Element>(
        &self,
        case: &SpCase,
        rank: usize,
    ) -> Vec<(Vec<T>, [usize; 4])> {
        let (s, skv, h, hkv) = (case.seq_local, case.seq_kv_local, case.heads, case.kv_heads);
        let (r, rkv) = (case.replicated, case.replicated_kv);
        vec![
            Self::local::<T>(case, &self.q, rank, s, h),
            Self::local::<T>(case, &self.k, rank, skv, hkv),
            Self::local::<T>(case, &self.v, rank, skv, hkv),
            Self::replicated::<T>(case, &self.rq, r, h),
            Self::replicated::<T>(case, &self.rk, rkv, hkv),
            Self::replicated::<T>(case, &self.rv, rkv, hkv),
        ]
    }

    /// The expected outputs: the global `[B, P·S, H, D]` (zeros on padding
    /// rows) and the replicated `[B, R, H, D]`, from attention over the
    /// trimmed sequence followed by the replicated tokens.
    pub fn expected(&self, case: &SpCase) -> (Vec<f64>, Vec<f64>) {
        let (b, h, hkv, d) = (case.batch, case.heads, case.kv_heads, case.d);
        let (eq, ekv) = case.effective();
        let (r, rkv) = (case.replicated, case.replicated_kv);
        let join = |main: &[f64], seq: usize, keep: usize, rep: &[f64], rn: usize, heads| {
            let row = heads * d;
            let mut out = Vec::with_capacity(b * (keep + rn) * row);
            for bi in 0..b {
                out.extend_from_slice(&main[bi * seq * row..][..keep * row]);
                out.extend_from_slice(&rep[bi * rn * row..][..rn * row]);
            }
            out
        };
        let q = join(&self.q, case.seq_q(), eq, &self.rq, r, h);
        let k = join(&self.k, case.seq_kv(), ekv, &self.rk, rkv, hkv);
        let v = join(&self.v, case.seq_kv(), ekv, &self.rv, rkv, hkv);
        let keys = case.keys_seen();
        let bias = |bi: usize, _h: usize, _i: usize, j: usize| {
            if self.keep[bi * keys + j] {
                0.0
            } else {
                f64::NEG_INFINITY
            }
        };
        let full = reference::attention(&RefInputs {
            q: &q,
            k: &k,
            v: &v,
            batch: b,
            seq_q: eq + r,
            seq_k: ekv + rkv,
            heads_q: h,
            heads_kv: hkv,
            d,
            scale: 1.0 / (d as f64).sqrt(),
            causal: case.causal,
            f32_scores: false,
            bias: if case.key_padding { Some(&bias) } else { None },
        });
        let row = h * d;
        let mut main = vec![0.0; b * case.seq_q() * row];
        let mut rep = Vec::with_capacity(b * r * row);
        for bi in 0..b {
            let src = &full[bi * (eq + r) * row..];
            main[bi * case.seq_q() * row..][..eq * row].copy_from_slice(&src[..eq * row]);
            rep.extend_from_slice(&src[eq * row..][..r * row]);
        }
        (main, rep)
    }
}

/// Concatenates the ranks' `[B, S, H, D]` outputs along the sequence into
/// the global `[B, P·S, H, D]`.
pub fn concat_ranks(case: &SpCase, per_rank: &[Vec<f32>]) -> Vec<f64> {
    let (b, s, row) = (case.batch, case.seq_local, case.heads * case.d);
    let mut out = Vec::with_capacity(b * case.world * s * row);
    for bi in 0..b {
        for rank_out in per_rank {
            out.extend(
                rank_out[bi * s * row..][..s * row]
                    .iter()
                    .map(|&x| x as f64),
            );
        }
    }
    out
}

/// One rank's output and replicated output, on the host as f32.
pub type RankOutput = (Vec<f32>, Option<Vec<f32>>);

/// Runs one rank's forward over its views (q, k, v, replicated q, k, v;
/// the replicated ones passed only when the case has replicated tokens),
/// checks the output shapes and brings the outputs to the host.
pub fn forward_rank<C: Communicator>(
    layer: &DistributedAttention<C>,
    case: &SpCase,
    x: &SpInputs,
    views: &[TensorView<'_>],
) -> Result<RankOutput, SdpaError> {
    let [q, k, v, rq, rk, rv] = views else {
        panic!("forward_rank takes six views, got {}", views.len());
    };
    let replicated = (case.replicated + case.replicated_kv > 0).then_some(Replicated {
        q: *rq,
        k: *rk,
        v: *rv,
    });
    let sp = SequenceParallel {
        original_seq_len: case.original_seq_len,
        replicated,
    };
    let mut meta = AttentionMetadata::default();
    if case.key_padding {
        meta = meta.with_mask(AttnMask::new(&x.keep, &[case.batch, case.keys_seen()])?);
    }
    let DistributedOutput { output, replicated } = layer.forward(q, k, v, &sp, &meta)?;
    let shapes = case.rank_shapes();
    assert_eq!(output.shape(), shapes[0]);
    let rep = match replicated {
        Some(t) => {
            assert_eq!(t.shape(), shapes[3]);
            Some(t.to_f32_vec()?)
        }
        None => None,
    };
    Ok((output.to_f32_vec()?, rep))
}

/// Runs `rank` for each communicator on a thread of its own (every rank of
/// a group must be in its call at once) and returns the results in rank
/// order.
pub fn on_ranks<C: Send, R: Send>(
    comms: Vec<C>,
    rank: impl Fn(C) -> Result<R, SdpaError> + Sync,
) -> Result<Vec<R>, SdpaError> {
    let rank = &rank;
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| scope.spawn(move || rank(comm)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank panicked"))
            .collect()
    })
}

/// One process over the whole sequence of a case without padding or
/// replicated tokens: `layer` (built with the case's parameters) on host
/// tensors rounded to `T`, as the global `[B, P·S, H, D]` in f64.
pub fn whole_sequence<T: Element>(layer: &SdpaImpl, case: &SpCase, x: &SpInputs) -> Vec<f64> {
    let round = |v: &[f64]| v.iter().map(|&e| T::from_f32(e as f32)).collect::<Vec<T>>();
    let (q, k, v) = (round(&x.q), round(&x.k), round(&x.v));
    let (b, h, hkv, d) = (case.batch, case.heads, case.kv_heads, case.d);
    let q = TensorView::from_slice(&q, [b, case.seq_q(), h, d]).unwrap();
    let k = TensorView::from_slice(&k, [b, case.seq_kv(), hkv, d]).unwrap();
    let v = TensorView::from_slice(&v, [b, case.seq_kv(), hkv, d]).unwrap();
    let out = layer
        .forward(&q, &k, &v, &AttentionMetadata::default())
        .unwrap();
    out.to_f32_vec()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

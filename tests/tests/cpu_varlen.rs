//! The CPU kernels on per-sequence bounds: packed variable-length batches
//! (`cu_seqlens`) and key-padding masks run as runs of keys, forward, row
//! log-sum-exp and backward, against the float64 reference applied to each
//! sequence on its own, on every CPU path, with NaN-poisoned outputs.

use std::ops::Range;

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use sdpa_runtime::cpu::{with_isa, Isa};
use sdpa_runtime::prelude::*;
use sdpa_runtime::{
    BackwardInputs, Element, Gradients, MaskData, Problem, SeqBounds, TensorViewMut, VarLen,
};
use sdpa_tests::cases::run_seed;
use sdpa_tests::consumer::TrainingAttention;
use sdpa_tests::reference::{self, RefInputs};
use sdpa_tests::training::{assert_lse_close, grad_tolerance, LSE_TOL};

/// A key mask's elements, as the test stores them.
#[derive(Clone, Debug)]
enum MaskBuf {
    Bool(Vec<bool>),
    I32(Vec<i32>),
    U8(Vec<u8>),
    F32(Vec<f32>),
}

impl MaskBuf {
    fn data(&self) -> MaskData<'_> {
        match self {
            MaskBuf::Bool(v) => v.into(),
            MaskBuf::I32(v) => v.into(),
            MaskBuf::U8(v) => v.into(),
            MaskBuf::F32(v) => v.into(),
        }
    }
}

/// A key-padding mask `[Bm, L]` and the dense bias `[B][Sk]` it stands for
/// (front padding and broadcasting filled in).
#[derive(Clone, Debug)]
struct KeyMask {
    buf: MaskBuf,
    shape: Vec<usize>,
    bias: Vec<f64>,
}

/// Which kind of element a key mask is stored as.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Bool,
    I32,
    U8,
    Float,
}

impl KeyMask {
    /// The mask where batch `b` sees exactly the keys `keep(b, j)`, stored
    /// as `kind` with `len` columns (`len < sk`: front padded; the keys
    /// before `sk - len` must be kept) and `bm` batch rows (1: broadcast).
    fn new(
        kind: Kind,
        b_n: usize,
        bm: usize,
        sk: usize,
        len: usize,
        keep: &dyn Fn(usize, usize) -> bool,
    ) -> KeyMask {
        let pad = sk - len;
        let mut bias = vec![0.0; b_n * sk];
        for b in 0..b_n {
            for j in 0..sk {
                let bb = if bm == 1 { 0 } else { b };
                assert!(j >= pad || keep(bb, j), "front padding always attends");
                if !keep(bb, j) {
                    bias[b * sk + j] = f64::NEG_INFINITY;
                }
            }
        }
        let cells: Vec<bool> = (0..bm)
            .flat_map(|b| (pad..sk).map(move |j| (b, j)))
            .map(|(b, j)| keep(b, j))
            .collect();
        let buf = match kind {
            Kind::Bool => MaskBuf::Bool(cells),
            Kind::I32 => MaskBuf::I32(cells.iter().map(|&x| if x { 7 } else { 0 }).collect()),
            Kind::U8 => MaskBuf::U8(cells.iter().map(|&x| u8::from(x)).collect()),
            Kind::Float => MaskBuf::F32(
                cells
                    .iter()
                    .map(|&x| if x { 0.0 } else { f32::NEG_INFINITY })
                    .collect(),
            ),
        };
        KeyMask {
            buf,
            shape: vec![bm, len],
            bias,
        }
    }
}

/// One problem: its shapes, rule, element type and sequences.
#[derive(Clone, Debug)]
struct Spec {
    /// `[B, Sq]` of q (`[1, Tq]` packed).
    q: [usize; 2],
    /// `[B, Sk]` of k and v.
    k: [usize; 2],
    heads_q: usize,
    heads_kv: usize,
    d: usize,
    causal: bool,
    dtype: DType,
    /// `cu_seqlens_q`, `cu_seqlens_k`.
    varlen: Option<(Vec<i32>, Vec<i32>)>,
    mask: Option<KeyMask>,
}

/// One sequence of a problem: the tensors' batch, its query and key
/// tokens.
struct Entry {
    tb: usize,
    q: Range<usize>,
    k: Range<usize>,
}

impl Spec {
    /// A packed batch of sequences of `(queries, keys)` tokens.
    fn packed(lens: &[(usize, usize)], heads_q: usize, heads_kv: usize, d: usize) -> Spec {
        let cu = |f: &dyn Fn(&(usize, usize)) -> usize| {
            std::iter::once(0)
                .chain(lens.iter().scan(0, |t, l| {
                    *t += f(l);
                    Some(*t as i32)
                }))
                .collect::<Vec<i32>>()
        };
        let (cq, ck) = (cu(&|l| l.0), cu(&|l| l.1));
        Spec {
            q: [1, *cq.last().unwrap() as usize],
            k: [1, *ck.last().unwrap() as usize],
            heads_q,
            heads_kv,
            d,
            causal: false,
            dtype: DType::F32,
            varlen: Some((cq, ck)),
            mask: None,
        }
    }

    /// `[B, Sq]` queries and `[B, Sk]` keys under a key mask.
    fn masked(
        b: usize,
        sq: usize,
        sk: usize,
        heads_q: usize,
        heads_kv: usize,
        d: usize,
        mask: KeyMask,
    ) -> Spec {
        Spec {
            q: [b, sq],
            k: [b, sk],
            heads_q,
            heads_kv,
            d,
            causal: false,
            dtype: DType::F32,
            varlen: None,
            mask: Some(mask),
        }
    }

    fn causal(mut self, causal: bool) -> Spec {
        self.causal = causal;
        self
    }

    fn dtype(mut self, dtype: DType) -> Spec {
        self.dtype = dtype;
        self
    }

    fn entries(&self) -> Vec<Entry> {
        match &self.varlen {
            Some((cq, ck)) => (0..cq.len() - 1)
                .map(|b| Entry {
                    tb: 0,
                    q: cq[b] as usize..cq[b + 1] as usize,
                    k: ck[b] as usize..ck[b + 1] as usize,
                })
                .collect(),
            None => (0..self.q[0])
                .map(|b| Entry {
                    tb: b,
                    q: 0..self.q[1],
                    k: 0..self.k[1],
                })
                .collect(),
        }
    }

    fn q_shape(&self) -> [usize; 4] {
        [self.q[0], self.q[1], self.heads_q, self.d]
    }

    fn k_shape(&self) -> [usize; 4] {
        [self.k[0], self.k[1], self.heads_kv, self.d]
    }

    fn params(&self) -> AttentionParams {
        AttentionParams::new(self.heads_q, self.d)
            .num_kv_heads(self.heads_kv)
            .causal(self.causal)
            .backend(BackendKind::Cpu)
    }
}

/// Random elements of type `T` (and their values as float64).
fn draw<T: Element>(n: usize, rng: &mut StdRng) -> (Vec<T>, Vec<f64>) {
    let buf: Vec<T> = (0..n)
        .map(|_| T::from_f32(rng.random_range(-1.5f32..1.5)))
        .collect();
    let vals = buf.iter().map(|x| x.to_f32() as f64).collect();
    (buf, vals)
}

fn as_f64<T: Element>(buf: &[T], what: &str) -> Vec<f64> {
    buf.iter()
        .enumerate()
        .map(|(n, x)| {
            let x = x.to_f32();
            assert!(!x.is_nan(), "{what}: element {n} was not written (NaN)");
            x as f64
        })
        .collect()
}

/// What one run wrote: out, lse, dq, dk, dv (float64, row-major).
type Run = [Vec<f64>; 5];

/// Runs the forward with the log-sum-exp and the backward of `spec` on
/// the active path into NaN-poisoned buffers.
fn run<T: Element>(spec: &Spec, seed: u64) -> Result<(Run, [Vec<f64>; 4]), SdpaError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (qs, ks) = (spec.q_shape(), spec.k_shape());
    let nq: usize = qs.iter().product();
    let nk: usize = ks.iter().product();
    let (q, qf) = draw::<T>(nq, &mut rng);
    let (k, kf) = draw::<T>(nk, &mut rng);
    let (v, vf) = draw::<T>(nk, &mut rng);
    let (dout, doutf) = draw::<T>(nq, &mut rng);
    let layer = TrainingAttention.build_impl(spec.params())?;
    let mut meta = AttentionMetadata::new(0);
    if let Some((cq, ck)) = &spec.varlen {
        meta = meta.with_varlen(VarLen::new(cq, ck));
    }
    if let Some(m) = &spec.mask {
        meta = meta.with_mask(AttnMask::new(m.buf.data(), &m.shape)?);
    }
    let (qv, kv, vv) = (
        TensorView::from_slice(&q, qs)?,
        TensorView::from_slice(&k, ks)?,
        TensorView::from_slice(&v, ks)?,
    );
    let lse_shape = [qs[0], spec.heads_q, qs[1], 1];
    let mut out = vec![T::from_f32(f32::NAN); nq];
    let mut lse = vec![f32::NAN; lse_shape.iter().product()];
    {
        let mut ov = TensorViewMut::from_slice(&mut out, qs)?;
        let mut lv = TensorViewMut::from_slice(&mut lse, lse_shape)?;
        layer.forward_with_lse_into(&qv, &kv, &vv, &meta, &mut ov, &mut lv)?;
    }
    let mut dq = vec![T::from_f32(f32::NAN); nq];
    let mut dk = vec![T::from_f32(f32::NAN); nk];
    let mut dv = vec![T::from_f32(f32::NAN); nk];
    {
        let x = BackwardInputs {
            out: TensorView::from_slice(&out, qs)?,
            dout: TensorView::from_slice(&dout, qs)?,
            lse: TensorView::from_slice(&lse, lse_shape)?,
        };
        let mut g = Gradients {
            dq: TensorViewMut::from_slice(&mut dq, qs)?,
            dk: TensorViewMut::from_slice(&mut dk, ks)?,
            dv: TensorViewMut::from_slice(&mut dv, ks)?,
        };
        layer.backward_into(&qv, &kv, &vv, &meta, &x, &mut g)?;
    }
    let lse: Vec<f64> = lse
        .iter()
        .enumerate()
        .map(|(n, &x)| {
            assert!(!x.is_nan(), "lse element {n} was not written (NaN)");
            x as f64
        })
        .collect();
    Ok((
        [
            as_f64(&out, "out"),
            lse,
            as_f64(&dq, "dq"),
            as_f64(&dk, "dk"),
            as_f64(&dv, "dv"),
        ],
        [qf, kf, vf, doutf],
    ))
}

/// Rows `rows` of batch `tb` of a row-major `[B, S, H, D]` tensor.
fn rows(x: &[f64], [_, s, h, d]: [usize; 4], tb: usize, rows: &Range<usize>) -> Vec<f64> {
    x[(tb * s + rows.start) * h * d..(tb * s + rows.end) * h * d].to_vec()
}

/// The L2 norm of head `h` of `[n, H, D]` rows.
fn head_norm(x: &[f64], heads: usize, d: usize, h: usize) -> f64 {
    x.chunks(d)
        .skip(h)
        .step_by(heads)
        .flatten()
        .map(|v| v * v)
        .sum::<f64>()
        .sqrt()
}

/// Runs `spec` on every CPU path and judges each sequence against the
/// float64 reference of that sequence alone.
fn check(spec: &Spec, seed: u64) {
    for isa in Isa::supported() {
        let what = format!("{spec:?} on {isa} (seed {seed})");
        let got = with_isa(isa, || match spec.dtype {
            DType::F32 => run::<f32>(spec, seed),
            DType::F16 => run::<f16>(spec, seed),
            DType::BF16 => run::<bf16>(spec, seed),
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        judge(spec, &got, &what);
    }
}

fn judge(spec: &Spec, (got, [qf, kf, vf, doutf]): &(Run, [Vec<f64>; 4]), what: &str) {
    let [out, lse, dq, dk, dv] = got;
    let (qs, ks) = (spec.q_shape(), spec.k_shape());
    let (hq, hkv, d) = (spec.heads_q, spec.heads_kv, spec.d);
    let out_tol = match spec.dtype {
        DType::F32 => 1e-5,
        _ => 2e-2,
    };
    let tol = grad_tolerance(spec.dtype);
    for (e, entry) in spec.entries().iter().enumerate() {
        let (nq, nk) = (entry.q.len(), entry.k.len());
        let (q, dout) = (
            rows(qf, qs, entry.tb, &entry.q),
            rows(doutf, qs, entry.tb, &entry.q),
        );
        let (k, v) = (
            rows(kf, ks, entry.tb, &entry.k),
            rows(vf, ks, entry.tb, &entry.k),
        );
        let bias_fn = |_: usize, _: usize, _: usize, j: usize| {
            let m = spec.mask.as_ref().unwrap();
            m.bias[entry.tb * spec.k[1] + entry.k.start + j]
        };
        let r = RefInputs {
            q: &q,
            k: &k,
            v: &v,
            batch: 1,
            seq_q: nq,
            seq_k: nk,
            heads_q: hq,
            heads_kv: hkv,
            d,
            scale: 1.0 / (d as f64).sqrt(),
            causal: spec.causal,
            f32_scores: true,
            bias: spec.mask.as_ref().map(|_| &bias_fn as reference::Bias<'_>),
        };
        let what = format!("{what}, sequence {e} ({nq} queries, {nk} keys)");
        let want = reference::attention(&r);
        let err = reference::rel_l2(&rows(out, qs, entry.tb, &entry.q), &want);
        assert!(
            err <= out_tol,
            "{what}: output error {err:.3e} > {out_tol:.0e}"
        );
        let want_lse = reference::lse(&r);
        let got_lse: Vec<f64> = (0..hq)
            .flat_map(|h| entry.q.clone().map(move |t| (h, t)))
            .map(|(h, t)| lse[(entry.tb * hq + h) * qs[1] + t])
            .collect();
        assert_lse_close(&got_lse, &want_lse, LSE_TOL, &what);
        let lse_max = want_lse
            .iter()
            .filter(|x| x.is_finite())
            .fold(0.0f64, |m, x| m.max(x.abs()));
        let own_tol = tol.dtype + 4.0 * f32::EPSILON as f64 * lse_max;
        let (wq, wk, wv) = reference::backward(&r, &dout);
        let (mq, mk, mv) = reference::backward_magnitude(&r, &dout);
        for (name, g, w, m, heads, range, shape) in [
            ("dq", dq, wq, mq, hq, &entry.q, qs),
            ("dk", dk, wk, mk, hkv, &entry.k, ks),
            ("dv", dv, wv, mv, hkv, &entry.k, ks),
        ] {
            let g = rows(g, shape, entry.tb, range);
            let err: Vec<f64> = g.iter().zip(&w).map(|(a, b)| a - b).collect();
            for h in 0..heads {
                let (e, o, mg) = (
                    head_norm(&err, heads, d, h),
                    head_norm(&w, heads, d, h),
                    head_norm(&m, heads, d, h),
                );
                let allowed = tol.arith * mg + own_tol * o;
                assert!(
                    e <= allowed,
                    "{what}: {name} of head {h}: error {e:.3e} > {allowed:.3e} (own {o:.3e})"
                );
            }
        }
        // Keys the mask hides from the whole batch: zero dk and dv, exactly.
        if let Some(m) = &spec.mask {
            for j in entry.k.clone() {
                if m.bias[entry.tb * spec.k[1] + j] == f64::NEG_INFINITY {
                    let at = (entry.tb * ks[1] + j) * hkv * d;
                    for (name, g) in [("dk", dk), ("dv", dv)] {
                        let row = &g[at..][..hkv * d];
                        assert!(
                            row.iter().all(|&x| x == 0.0),
                            "{what}: {name} of hidden key {j}"
                        );
                    }
                }
            }
        }
        // Rows that see no key: zero dq, exactly.
        for h in 0..hq {
            for i in 0..nq {
                if want_lse[h * nq + i] == f64::NEG_INFINITY {
                    let row = &dq[((entry.tb * qs[1] + entry.q.start + i) * hq + h) * d..][..d];
                    assert!(
                        row.iter().all(|&x| x == 0.0),
                        "{what}: dq of row {i}, head {h}"
                    );
                }
            }
        }
    }
}

/// Ragged lengths that cross panels (32 rows), key blocks and tasks, with
/// empty sequences first, in the middle and last, sequences of queries
/// without keys and of keys without queries, and `Sq ≠ Sk` per sequence.
const RAGGED: [(usize, usize); 9] = [
    (0, 0),
    (37, 50),
    (130, 70),
    (1, 1),
    (0, 9),
    (12, 0),
    (65, 200),
    (33, 31),
    (0, 0),
];

#[test]
fn packed_batches_match_each_sequence_alone() {
    let seed = run_seed();
    for causal in [false, true] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let spec = Spec::packed(&RAGGED, 4, 2, 64).causal(causal).dtype(dtype);
            check(&spec, seed);
        }
    }
}

#[test]
fn packed_batches_with_groups_and_odd_head_sizes() {
    let seed = run_seed();
    // MQA, a head size that is not a multiple of 16; one long sequence
    // that makes several tasks and key blocks.
    let lens = [(33, 31), (300, 290), (0, 5), (7, 0)];
    for causal in [false, true] {
        check(&Spec::packed(&lens, 3, 1, 40).causal(causal), seed);
    }
    check(
        &Spec::packed(&[(20, 45), (50, 17)], 2, 2, 136)
            .causal(true)
            .dtype(DType::BF16),
        seed,
    );
    // One sequence: the same as a [1, S, H, D] call.
    check(&Spec::packed(&[(70, 90)], 2, 1, 8).causal(true), seed);
}

/// A run mask: batch `b` sees keys `runs[b]`.
fn run_mask(kind: Kind, sk: usize, runs: &[Range<usize>]) -> KeyMask {
    KeyMask::new(kind, runs.len(), runs.len(), sk, sk, &|b, j| {
        runs[b].contains(&j)
    })
}

#[test]
fn key_padding_masks_run_as_runs_of_keys() {
    let seed = run_seed();
    let sk = 77;
    let masks = [
        // Prefix runs (padding at the end), one batch seeing nothing.
        run_mask(Kind::Bool, sk, &[0..77, 0..50, 0..0]),
        // Middle runs, integers.
        run_mask(Kind::I32, sk, &[10..60, 30..31, 0..77]),
        run_mask(Kind::U8, sk, &[64..77, 1..2, 5..70]),
        // Floats 0 / -inf: a suffix, a middle run, none.
        run_mask(Kind::Float, sk, &[5..77, 20..40, 0..0]),
        // Front padded: 60 columns for 77 keys, the first 17 always seen.
        KeyMask::new(Kind::Bool, 3, 3, sk, 60, &|b, j| j < 30 + 10 * b),
        // Broadcast over the batch.
        KeyMask::new(Kind::Float, 3, 1, sk, sk, &|_, j| (3..41).contains(&j)),
    ];
    for mask in masks {
        for (sq, causal) in [(45, false), (45, true), (90, true)] {
            for dtype in [DType::F32, DType::BF16] {
                let spec = Spec::masked(3, sq, sk, 4, 2, 64, mask.clone())
                    .causal(causal)
                    .dtype(dtype);
                assert_runs(&spec, true);
                check(&spec, seed);
            }
        }
    }
    let spec = Spec::masked(
        2,
        33,
        130,
        2,
        2,
        40,
        run_mask(Kind::Bool, 130, &[7..129, 60..130]),
    )
    .causal(true)
    .dtype(DType::F16);
    assert_runs(&spec, true);
    check(&spec, seed);
}

#[test]
fn key_masks_that_are_not_one_run_still_apply() {
    let seed = run_seed();
    let sk = 77;
    // Batch 0 sees two runs: the mask is read as a mask.
    let mask = KeyMask::new(Kind::Bool, 2, 2, sk, sk, &|b, j| {
        if b == 0 {
            j < 20 || (40..60).contains(&j)
        } else {
            j < 50
        }
    });
    for causal in [false, true] {
        let spec = Spec::masked(2, 45, sk, 4, 2, 64, mask.clone()).causal(causal);
        assert_runs(&spec, false);
        check(&spec, seed);
    }
}

/// Checks whether `spec`'s problem runs on key runs.
fn assert_runs(spec: &Spec, runs: bool) {
    let q = vec![0.0f32; spec.q_shape().iter().product()];
    let k = vec![0.0f32; spec.k_shape().iter().product()];
    let qv = TensorView::from_slice(&q, spec.q_shape()).unwrap();
    let kv = TensorView::from_slice(&k, spec.k_shape()).unwrap();
    let m = spec.mask.as_ref().unwrap();
    let mask = AttnMask::new(m.buf.data(), &m.shape).unwrap();
    let p = Problem::new(qv, kv, kv, Some(&mask), 1.0).unwrap();
    assert_eq!(matches!(p.k_seqs, SeqBounds::Runs(_)), runs, "{spec:?}");
}

#[test]
fn packed_and_masked_runs_are_deterministic() {
    let seed = run_seed();
    let specs = [
        Spec::packed(&RAGGED, 4, 2, 64).causal(true),
        Spec::masked(
            3,
            45,
            77,
            4,
            2,
            64,
            run_mask(Kind::Bool, 77, &[3..70, 0..77, 10..11]),
        )
        .causal(true),
    ];
    for spec in specs {
        for isa in Isa::supported() {
            let once = || with_isa(isa, || run::<f32>(&spec, seed).unwrap().0).unwrap();
            let bits = |r: Run| -> Vec<u64> { r.iter().flatten().map(|x| x.to_bits()).collect() };
            let first = bits(once());
            assert!(first == bits(once()), "{spec:?} on {isa}: two runs differ");
            let one = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap()
                .install(|| bits(once()));
            assert!(first == one, "{spec:?} on {isa}: one thread differs");
        }
    }
}

#[test]
fn a_packed_batch_refuses_a_mask() {
    let spec = Spec::packed(&[(4, 4)], 1, 1, 8);
    let layer = TrainingAttention.build_impl(spec.params()).unwrap();
    let q = vec![0.0f32; 4 * 8];
    let qv = TensorView::from_slice(&q, [1, 4, 1, 8]).unwrap();
    let keep = [true; 4];
    let (cq, ck) = spec.varlen.as_ref().unwrap();
    let meta = AttentionMetadata::new(0)
        .with_varlen(VarLen::new(cq, ck))
        .with_mask(AttnMask::new(&keep[..], &[1, 4]).unwrap());
    let e = layer.forward(&qv, &qv, &qv, &meta).unwrap_err().to_string();
    assert!(e.contains("cannot take an attn_mask"), "{e}");
}

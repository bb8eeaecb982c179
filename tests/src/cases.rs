//! Random attention problems, run through a backend and checked against the
//! float64 reference.
//!
//! Every run draws a fresh seed (printed with any failure; set
//! `SDPA_TEST_SEED` to replay one), fills padding between strided elements
//! with NaN so that a kernel reading outside the view is caught, and poisons
//! the output buffer with NaN before the call.

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Once;

use sdpa_runtime::{
    probe_cuda, AttentionBackend, AttentionImpl, AttentionMetadata, AttentionParams, AttnMask,
    BackendKind, CudaProbe, DType, Element, OwnedMaskData, SdpaError, TensorView, TensorViewMut,
};

use sdpa_runtime::cpu::{with_isa, Isa};

use crate::reference::{self, RefInputs};

/// How a tensor's elements are laid out in its buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Row-major `[B, S, H, D]`.
    Contiguous,
    /// `[B, H, S, D]` memory seen as `[B, S, H, D]` (FastVideo's transposed
    /// views).
    HeadMajor,
    /// Row-major with gaps: each head row is followed by 8 unused elements,
    /// each token by one unused row and each batch by 8 elements. Rows stay
    /// 16-byte aligned, as the CUDA kernels require of device tensors.
    Gapped,
    /// Gaps of odd sizes: rows start at any element. The CPU takes these;
    /// the CUDA backend packs such host tensors before staging them.
    Unaligned,
}

impl Placement {
    /// Strides for `shape` and the buffer length they need.
    pub fn strides(self, [b, s, h, d]: [usize; 4]) -> ([usize; 4], usize) {
        let strides = match self {
            Placement::Contiguous => [s * h * d, h * d, d, 1],
            Placement::HeadMajor => [h * s * d, d, s * d, 1],
            Placement::Gapped => {
                let row = d + 8;
                let tok = (h + 1) * row;
                [s * tok + 8, tok, row, 1]
            }
            Placement::Unaligned => {
                let row = d + 1;
                let tok = h * row + 3;
                [s * tok + 5, tok, row, 1]
            }
        };
        let len = if b * s * h * d == 0 {
            0
        } else {
            (b - 1) * strides[0] + (s - 1) * strides[1] + (h - 1) * strides[2] + d
        };
        (strides, len)
    }
}

/// The integer types an integer mask may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntType {
    /// `u8`.
    U8,
    /// `i32`.
    I32,
    /// `i64`.
    I64,
}

/// Which mask a case carries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MaskKind {
    /// No mask.
    None,
    /// Boolean key padding `[B or 1, Sk - short]`.
    KeyPadding {
        /// How many leading keys are left out of the mask (front padding).
        short: usize,
        /// Batch dimension 1 (broadcast).
        broadcast_batch: bool,
    },
    /// Boolean `[B, Sq, Sk]`.
    Bool3,
    /// Integer `[B, Sq, Sk]`, non-zero = attend.
    Int3(IntType),
    /// Additive float `[B, H or 1, Sq, Sk - short]` in the element type.
    Additive4 {
        /// Head dimension 1 (broadcast).
        broadcast_heads: bool,
        /// How many leading keys are left out of the mask.
        short: usize,
        /// Put `-inf` in about a quarter of the entries.
        with_neg_inf: bool,
    },
    /// Boolean `[B, H, Sq, Sk]` that hides every key from some query rows.
    HideRows,
    /// A large finite additive mask in the element type (the Hugging Face
    /// convention): `0` where a key is seen, `value` where it is hidden.
    LargeAdditive {
        /// What hides a key.
        value: LargeValue,
        /// `[B, Sk]` key padding rather than `[B, H, Sq, Sk]`.
        key_padding: bool,
        /// Hide every key from some rows (`[B, H, Sq, Sk]`: about a third
        /// of the rows; `[B, Sk]`: every row of batch 0); otherwise key 0
        /// is seen everywhere and about a third of the others hidden.
        whole_rows: bool,
    },
}

/// The finite value a [`MaskKind::LargeAdditive`] mask hides keys with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LargeValue {
    /// The element type's most negative finite value (`torch.finfo(dtype)
    /// .min`: `f32::MIN`, `-65504` for `f16`, `bf16::MIN`).
    DtypeMin,
    /// `-1e9` as the element type holds it (`-inf` in `f16`).
    MinusBillion,
}

/// One attention problem.
#[derive(Clone, Debug)]
pub struct Case {
    /// `B`.
    pub batch: usize,
    /// `Sq`.
    pub seq_q: usize,
    /// `Sk`.
    pub seq_k: usize,
    /// `Hq`.
    pub heads_q: usize,
    /// `Hkv`.
    pub heads_kv: usize,
    /// `D`.
    pub head_size: usize,
    /// Top-left causal.
    pub causal: bool,
    /// Explicit softmax scale.
    pub scale: Option<f32>,
    /// Element type.
    pub dtype: DType,
    /// Mask.
    pub mask: MaskKind,
    /// Layout of q, k and v.
    pub placement: Placement,
    /// Layout of the output buffer.
    pub out_placement: Placement,
    /// Inputs drawn uniformly from `[-amplitude, amplitude]`.
    pub amplitude: f64,
    /// A tolerance other than the dtype's, for cases whose inputs make the
    /// exact answer ill-conditioned.
    pub tolerance: Option<f64>,
}

impl Case {
    /// A plain case: contiguous, no mask, default scale.
    pub fn new(batch: usize, seq_q: usize, seq_k: usize, heads: usize, d: usize) -> Case {
        Case {
            batch,
            seq_q,
            seq_k,
            heads_q: heads,
            heads_kv: heads,
            head_size: d,
            causal: false,
            scale: None,
            dtype: DType::F32,
            mask: MaskKind::None,
            placement: Placement::Contiguous,
            out_placement: Placement::Contiguous,
            amplitude: 1.5,
            tolerance: None,
        }
    }
    /// Sets the element type.
    pub fn dtype(mut self, dtype: DType) -> Case {
        self.dtype = dtype;
        self
    }
    /// Sets causal.
    pub fn causal(mut self, causal: bool) -> Case {
        self.causal = causal;
        self
    }
    /// Sets the key/value heads.
    pub fn kv_heads(mut self, n: usize) -> Case {
        self.heads_kv = n;
        self
    }
    /// Sets the mask.
    pub fn mask(mut self, mask: MaskKind) -> Case {
        self.mask = mask;
        self
    }
    /// Sets the layouts of the inputs and the output.
    pub fn placement(mut self, inputs: Placement, out: Placement) -> Case {
        self.placement = inputs;
        self.out_placement = out;
        self
    }
    /// Sets the scale.
    pub fn scale(mut self, scale: f32) -> Case {
        self.scale = Some(scale);
        self
    }
    /// Sets the input amplitude.
    pub fn amplitude(mut self, a: f64) -> Case {
        self.amplitude = a;
        self
    }

    /// `(B, Sq, Sk, Hq, Hkv, D)`.
    pub fn dims(&self) -> (usize, usize, usize, usize, usize, usize) {
        (
            self.batch,
            self.seq_q,
            self.seq_k,
            self.heads_q,
            self.heads_kv,
            self.head_size,
        )
    }

    /// The layer parameters of the case (no backend chosen).
    pub fn params(&self) -> AttentionParams {
        let mut params = AttentionParams::new(self.heads_q, self.head_size)
            .num_kv_heads(self.heads_kv)
            .causal(self.causal);
        if let Some(s) = self.scale {
            params = params.softmax_scale(s);
        }
        params
    }

    /// Replaces the dtype's tolerance.
    pub fn with_tolerance(mut self, tolerance: f64) -> Case {
        self.tolerance = Some(tolerance);
        self
    }

    /// The tolerance on `‖out − ref‖ / ‖ref‖`: the case's own, else the
    /// dtype's.
    pub fn tolerance(&self) -> f64 {
        if let Some(t) = self.tolerance {
            return t;
        }
        match self.dtype {
            DType::F32 => 1e-5,
            DType::F16 | DType::BF16 => 2e-2,
        }
    }
}

/// The seed of this test run: `SDPA_TEST_SEED` if set, else fresh entropy.
pub fn run_seed() -> u64 {
    match std::env::var("SDPA_TEST_SEED") {
        Ok(s) => s.parse().expect("SDPA_TEST_SEED must be an integer"),
        Err(_) => rand::rng().random(),
    }
}

/// The backends the conformance suite runs on this machine: the CPU, and
/// CUDA when a driver and a device are present (host tensors are copied to
/// device 0 and back, so every case exercises the GPU kernels). Without
/// one, prints one line to stderr per test binary saying why CUDA is
/// skipped.
pub fn backends() -> Vec<BackendKind> {
    match probe_cuda() {
        CudaProbe::Present { .. } => vec![BackendKind::Cpu, BackendKind::Cuda],
        CudaProbe::Absent(reason) => {
            static SAID: Once = Once::new();
            SAID.call_once(|| say(&format!("skipping CUDA conformance: {reason}")));
            vec![BackendKind::Cpu]
        }
    }
}

/// Writes one line to the process's stderr, past the test harness's
/// capture (which takes only `print!` and `eprint!`), so that it shows in a
/// passing run.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The additive bias of element `idx` of a mask, computed independently
/// of the runtime.
fn reference_bias(mask: &OwnedMaskData, idx: usize) -> f64 {
    let attend = |yes: bool| if yes { 0.0 } else { f64::NEG_INFINITY };
    match mask {
        OwnedMaskData::Bool(v) => attend(v[idx]),
        OwnedMaskData::U8(v) => attend(v[idx] != 0),
        OwnedMaskData::I32(v) => attend(v[idx] != 0),
        OwnedMaskData::I64(v) => attend(v[idx] != 0),
        OwnedMaskData::F32(v) => v[idx] as f64,
        OwnedMaskData::F16(v) => v[idx].to_f64(),
        OwnedMaskData::BF16(v) => v[idx].to_f64(),
    }
}

/// A generated mask with its shape.
pub struct GenMask {
    /// The elements.
    pub data: OwnedMaskData,
    /// The shape, rank 2 to 4.
    pub shape: Vec<usize>,
}

impl GenMask {
    /// The bias the reference applies at `(b, h, i, j)`: broadcast over
    /// size-1 dimensions, front-padded with "attend".
    pub fn bias_at(&self, seq_k: usize, b: usize, h: usize, i: usize, j: usize) -> f64 {
        let s = &self.shape;
        let len = *s.last().unwrap();
        let pad = seq_k - len;
        if j < pad {
            return 0.0;
        }
        let pick = |dim: usize, idx: usize| if dim == 1 { 0 } else { idx };
        let idx = match s.len() {
            2 => pick(s[0], b) * len + (j - pad),
            3 => (pick(s[0], b) * s[1] + pick(s[1], i)) * len + (j - pad),
            _ => ((pick(s[0], b) * s[1] + pick(s[1], h)) * s[2] + pick(s[2], i)) * len + (j - pad),
        };
        reference_bias(&self.data, idx)
    }
}

/// Draws the mask `case` asks for, if any.
pub fn gen_mask(case: &Case, rng: &mut StdRng) -> Option<GenMask> {
    let (b, h, sq, sk) = (case.batch, case.heads_q, case.seq_q, case.seq_k);
    // Keep key 0 visible in most rows so that the majority of rows are not
    // empty; `HideRows` tests empty rows on purpose.
    let keep = |rng: &mut StdRng, j: usize| j == 0 || rng.random_bool(0.7);
    match case.mask {
        MaskKind::None => None,
        MaskKind::KeyPadding {
            short,
            broadcast_batch,
        } => {
            let bm = if broadcast_batch { 1 } else { b };
            let len = sk - short;
            let mut v = Vec::with_capacity(bm * len);
            for _ in 0..bm {
                let valid = rng.random_range(1..=len.max(1));
                v.extend((0..len).map(|j| j < valid));
            }
            Some(GenMask {
                data: OwnedMaskData::Bool(v),
                shape: vec![bm, len],
            })
        }
        MaskKind::Bool3 => {
            let v = (0..b * sq * sk).map(|n| keep(rng, n % sk)).collect();
            Some(GenMask {
                data: OwnedMaskData::Bool(v),
                shape: vec![b, sq, sk],
            })
        }
        MaskKind::Int3(t) => {
            let raw: Vec<i64> = (0..b * sq * sk)
                .map(|n| {
                    if keep(rng, n % sk) {
                        rng.random_range(1..=3)
                    } else {
                        0
                    }
                })
                .collect();
            let data = match t {
                IntType::U8 => OwnedMaskData::U8(raw.iter().map(|&x| x as u8).collect()),
                IntType::I32 => OwnedMaskData::I32(raw.iter().map(|&x| x as i32).collect()),
                IntType::I64 => OwnedMaskData::I64(raw),
            };
            Some(GenMask {
                data,
                shape: vec![b, sq, sk],
            })
        }
        MaskKind::Additive4 {
            broadcast_heads,
            short,
            with_neg_inf,
        } => {
            let hm = if broadcast_heads { 1 } else { h };
            let len = sk - short;
            let raw: Vec<f32> = (0..b * hm * sq * len)
                .map(|n| {
                    if with_neg_inf && n % len != 0 && rng.random_bool(0.25) {
                        f32::NEG_INFINITY
                    } else {
                        rng.random_range(-2.0..2.0)
                    }
                })
                .collect();
            let data = match case.dtype {
                DType::F32 => OwnedMaskData::F32(raw),
                DType::F16 => OwnedMaskData::F16(raw.iter().map(|&x| f16::from_f32(x)).collect()),
                DType::BF16 => {
                    OwnedMaskData::BF16(raw.iter().map(|&x| bf16::from_f32(x)).collect())
                }
            };
            Some(GenMask {
                data,
                shape: vec![b, hm, sq, len],
            })
        }
        MaskKind::LargeAdditive {
            value,
            key_padding,
            whole_rows,
        } => {
            let big = match (value, case.dtype) {
                (LargeValue::DtypeMin, DType::F32) => f32::MIN,
                (LargeValue::DtypeMin, DType::F16) => f16::MIN.to_f32(),
                (LargeValue::DtypeMin, DType::BF16) => bf16::MIN.to_f32(),
                (LargeValue::MinusBillion, _) => -1e9,
            };
            let (rows, shape) = if key_padding {
                (b, vec![b, sk])
            } else {
                (b * h * sq, vec![b, h, sq, sk])
            };
            let mut raw = Vec::with_capacity(rows * sk);
            for row in 0..rows {
                let hidden = whole_rows
                    && if key_padding {
                        row == 0
                    } else {
                        rng.random_bool(0.3)
                    };
                raw.extend((0..sk).map(|j| {
                    if hidden || (j != 0 && rng.random_bool(0.3)) {
                        big
                    } else {
                        0.0
                    }
                }));
            }
            let data = match case.dtype {
                DType::F32 => OwnedMaskData::F32(raw),
                DType::F16 => OwnedMaskData::F16(raw.iter().map(|&x| f16::from_f32(x)).collect()),
                DType::BF16 => {
                    OwnedMaskData::BF16(raw.iter().map(|&x| bf16::from_f32(x)).collect())
                }
            };
            Some(GenMask { data, shape })
        }
        MaskKind::HideRows => {
            let mut v = Vec::with_capacity(b * h * sq * sk);
            for _ in 0..b * h * sq {
                let hidden = rng.random_bool(0.3);
                v.extend((0..sk).map(|j| !hidden && keep(rng, j)));
            }
            Some(GenMask {
                data: OwnedMaskData::Bool(v),
                shape: vec![b, h, sq, sk],
            })
        }
    }
}

/// A tensor's logical values and its buffer, NaN between elements.
pub struct GenTensor<T> {
    /// The logical values, row-major `[B, S, H, D]`, as the element type
    /// holds them, widened to f64.
    pub values: Vec<f64>,
    /// The buffer the view reads.
    pub buf: Vec<T>,
    /// The view's strides.
    pub strides: [usize; 4],
}

/// Draws a tensor with `placement`, rounding values to `T`.
pub fn gen_tensor<T: Element>(
    shape: [usize; 4],
    placement: Placement,
    amplitude: f64,
    rng: &mut StdRng,
) -> GenTensor<T> {
    let (strides, len) = placement.strides(shape);
    let mut buf = vec![T::from_f32(f32::NAN); len];
    let mut values = Vec::with_capacity(shape.iter().product());
    let [b, s, h, d] = shape;
    for bi in 0..b {
        for si in 0..s {
            for hi in 0..h {
                for di in 0..d {
                    let x = T::from_f32(rng.random_range(-amplitude..amplitude) as f32);
                    buf[bi * strides[0] + si * strides[1] + hi * strides[2] + di] = x;
                    values.push(x.to_f32() as f64);
                }
            }
        }
    }
    GenTensor {
        values,
        buf,
        strides,
    }
}

/// What a checked run measured.
#[derive(Debug)]
pub struct Outcome {
    /// `‖out − ref‖ / ‖ref‖`.
    pub rel_err: f64,
    /// The output, row-major `[B, Sq, Hq, D]`.
    pub out: Vec<f64>,
    /// The reference output.
    pub reference: Vec<f64>,
}

/// The CPU code paths a case runs on for `kind`: on the CPU backend, every
/// path this CPU supports (AVX-512, AVX2, portable), each forced with
/// `sdpa_runtime::cpu::with_isa`; on other backends, the backend's own
/// choice (`None`).
pub fn cpu_paths(kind: BackendKind) -> Vec<Option<Isa>> {
    if kind == BackendKind::Cpu {
        Isa::supported().into_iter().map(Some).collect()
    } else {
        vec![None]
    }
}

/// Runs `case` on `backend` through `forward_into` with a poisoned output
/// buffer, and checks against the reference; on the CPU backend, once per
/// CPU code path ([`cpu_paths`]). Panics (this is a test helper) with the
/// case, path and seed when the error exceeds the tolerance. Returns the
/// outcome of the last path.
pub fn check(backend: &dyn AttentionBackend, kind: BackendKind, case: &Case, seed: u64) -> Outcome {
    let mut last = None;
    for isa in cpu_paths(kind) {
        let run = || match case.dtype {
            DType::F32 => run_typed::<f32>(backend, kind, case, seed),
            DType::F16 => run_typed::<f16>(backend, kind, case, seed),
            DType::BF16 => run_typed::<bf16>(backend, kind, case, seed),
        };
        let (outcome, path) = match isa {
            Some(isa) => (
                with_isa(isa, run).and_then(|r| r),
                format!("{kind} ({isa})"),
            ),
            None => (run(), kind.to_string()),
        };
        let outcome =
            outcome.unwrap_or_else(|e| panic!("{case:?} on {path} (seed {seed}) failed: {e}"));
        assert!(
            outcome.rel_err <= case.tolerance(),
            "{case:?} on {path} (seed {seed}): relative error {:.3e} > {:.0e}",
            outcome.rel_err,
            case.tolerance()
        );
        last = Some(outcome);
    }
    last.expect("every backend runs at least one path")
}

/// The inputs of a case: q, k and v with the case's placement (NaN
/// between elements) and the mask, drawn from `seed`.
pub struct CaseInputs<T> {
    /// Queries.
    pub q: GenTensor<T>,
    /// Keys.
    pub k: GenTensor<T>,
    /// Values.
    pub v: GenTensor<T>,
    /// The mask, if the case has one.
    pub mask: Option<GenMask>,
}

impl<T: Element> CaseInputs<T> {
    /// Draws the inputs of `case`.
    pub fn draw(case: &Case, seed: u64) -> CaseInputs<T> {
        let mut rng = StdRng::seed_from_u64(seed);
        let (b, sq, sk, hq, hkv, d) = case.dims();
        let (p, a) = (case.placement, case.amplitude);
        let q = gen_tensor::<T>([b, sq, hq, d], p, a, &mut rng);
        let k = gen_tensor::<T>([b, sk, hkv, d], p, a, &mut rng);
        let v = gen_tensor::<T>([b, sk, hkv, d], p, a, &mut rng);
        let mask = gen_mask(case, &mut rng);
        CaseInputs { q, k, v, mask }
    }

    /// The metadata carrying the mask.
    pub fn metadata(&self) -> Result<AttentionMetadata<'_>, SdpaError> {
        let mut meta = AttentionMetadata::new(0);
        if let Some(m) = &self.mask {
            meta = meta.with_mask(AttnMask::new(m.data.as_data(), &m.shape)?);
        }
        Ok(meta)
    }

    /// Judges an output buffer laid out with `out_strides` (poisoned with
    /// NaN before the call): every element outside the view must still be
    /// NaN, and the view is compared with the float64 reference.
    pub fn judge(&self, case: &Case, seed: u64, out_buf: &[T], out_strides: [usize; 4]) -> Outcome {
        let (b, sq, sk, hq, hkv, d) = case.dims();
        let mut out = Vec::with_capacity(b * sq * hq * d);
        let mut written = vec![false; out_buf.len()];
        for bi in 0..b {
            for si in 0..sq {
                for hi in 0..hq {
                    let base = bi * out_strides[0] + si * out_strides[1] + hi * out_strides[2];
                    for di in 0..d {
                        out.push(out_buf[base + di].to_f32() as f64);
                        written[base + di] = true;
                    }
                }
            }
        }
        for (n, x) in out_buf.iter().enumerate() {
            assert!(
                written[n] || x.to_f32().is_nan(),
                "{case:?} (seed {seed}): the kernel wrote outside the output view at offset {n}"
            );
        }
        let mask = &self.mask;
        let bias_fn = |bi: usize, hi: usize, i: usize, j: usize| {
            mask.as_ref().unwrap().bias_at(sk, bi, hi, i, j)
        };
        let reference = reference::attention(&RefInputs {
            q: &self.q.values,
            k: &self.k.values,
            v: &self.v.values,
            batch: b,
            seq_q: sq,
            seq_k: sk,
            heads_q: hq,
            heads_kv: hkv,
            d,
            scale: case.scale.map_or(1.0 / (d as f64).sqrt(), |s| s as f64),
            causal: case.causal,
            f32_scores: false,
            bias: if mask.is_some() { Some(&bias_fn) } else { None },
        });
        Outcome {
            rel_err: reference::rel_l2(&out, &reference),
            out,
            reference,
        }
    }
}

/// Runs `case` on host tensors through `forward_into` and returns the
/// outcome without judging its error.
pub fn run_typed<T: Element>(
    backend: &dyn AttentionBackend,
    kind: BackendKind,
    case: &Case,
    seed: u64,
) -> Result<Outcome, SdpaError> {
    let (b, sq, sk, hq, hkv, d) = case.dims();
    let x = CaseInputs::<T>::draw(case, seed);
    let layer = backend.build_impl(case.params().backend(kind))?;
    let qv = TensorView::with_strides(&x.q.buf, [b, sq, hq, d], x.q.strides)?;
    let kv = TensorView::with_strides(&x.k.buf, [b, sk, hkv, d], x.k.strides)?;
    let vv = TensorView::with_strides(&x.v.buf, [b, sk, hkv, d], x.v.strides)?;
    let meta = x.metadata()?;
    let out_shape = [b, sq, hq, d];
    let (out_strides, out_len) = case.out_placement.strides(out_shape);
    let mut out_buf = vec![T::from_f32(f32::NAN); out_len];
    {
        let mut ov = TensorViewMut::with_strides(&mut out_buf, out_shape, out_strides)?;
        layer.forward_into(&qv, &kv, &vv, &meta, &mut ov)?;
    }
    Ok(x.judge(case, seed, &out_buf, out_strides))
}

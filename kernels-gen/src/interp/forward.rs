//! The forward kernels' harness: a [`Case`] (shapes, mask, sequence
//! bounds), random inputs and NaN-poisoned outputs in a [`Memory`], the
//! kernel run over its whole grid, and the results checked against a
//! float64 reference.

use super::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, Grid, Memory, Program};
use crate::attention::mask::MaskKind;
use crate::contract::PARAMS;
use crate::ptx::Kernel;
use crate::DType;
use std::collections::HashMap;

/// How a kernel is launched: threads per CTA, query rows per CTA, dynamic
/// shared memory.
#[derive(Clone, Copy, Debug)]
pub struct Launch {
    pub threads: usize,
    pub block_m: usize,
    pub smem_bytes: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MaskShape {
    None,
    /// `[B, H, Sq, Sk]` with random values, some -inf, and query row 1
    /// of every (b, h) fully masked.
    Dense,
    /// `[B, 1, Sq, Sk]` broadcast over heads (stride 0), no -inf.
    PerBatch,
    /// `[B, 1, 1, Sk]` broadcast over heads and query rows (a key-padding
    /// mask), some -inf.
    Keys,
}

#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub d: usize,
    pub causal: bool,
    pub dtype: DType,
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub sq: usize,
    pub sk: usize,
    pub mask: MaskShape,
    /// The mask's element kind (bool kinds: zero hides).
    pub mask_kind: MaskKind,
    /// The mask's front padding: keys before it attend, the mask holds
    /// `Sk - pad` columns.
    pub mask_pad: usize,
    /// Which tokens each batch entry's queries and keys are.
    pub seqs: Seqs,
    /// Puts a NaN into q at (batch 0, row 2, head 0).
    pub nan_q: bool,
    /// Asks for the row log-sum-exp, into a strided buffer with gaps
    /// (otherwise `lse` is null, and any store to it would be out of
    /// bounds).
    pub lse: bool,
    /// The contract's `mask_batches`: per batch entry, whether the mask
    /// applies (non-zero) or is ignored (0); `None` passes a null pointer
    /// (the mask applies to every entry). Key runs come with it, the
    /// flagged entries' runs being their whole keys.
    pub mask_batches: Option<[i32; 4]>,
    /// softmax_scale.
    pub scale: f32,
}

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Rounds `x` to the element type; returns the stored bits and value.
pub fn quantise(dtype: DType, x: f32) -> (u32, f32) {
    match dtype {
        DType::F32 => (x.to_bits(), x),
        DType::F16 => {
            let h = f32_to_f16(x);
            (h as u32, f16_to_f32(h))
        }
        DType::BF16 => {
            let h = f32_to_bf16(x);
            (h as u32, bf16_to_f32(h))
        }
    }
}

pub fn put(mem: &mut Memory, dtype: DType, base: u64, index: usize, bits: u32) {
    let es = dtype.size_bytes();
    let o = mem.check(base + (index * es) as u64, es as u64);
    for k in 0..es {
        mem.bytes[o + k] = (bits >> (8 * k)) as u8;
    }
}

pub fn get(mem: &Memory, dtype: DType, base: u64, index: usize) -> f64 {
    let es = dtype.size_bytes();
    let o = mem.check(base + (index * es) as u64, es as u64);
    let mut v = 0u32;
    for k in 0..es {
        v |= (mem.bytes[o + k] as u32) << (8 * k);
    }
    match dtype {
        DType::F32 => f32::from_bits(v) as f64,
        DType::F16 => f16_to_f32(v as u16) as f64,
        DType::BF16 => bf16_to_f32(v as u16) as f64,
    }
}

/// Which tokens each batch entry's queries and keys are.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Seqs {
    /// No bounds: batch entry `b` is tokens `[0, Sq)` and `[0, Sk)` of
    /// batch `b`.
    Whole,
    /// Packed variable lengths (batch strides 0, one packed batch): the
    /// queries' and keys' lengths per batch entry, passed as `cu_seqlens`
    /// (`start = cu`, `end = cu + 1`); the tensors hold 3 more tokens past
    /// the last sequence, in no sequence.
    Packed { q: [usize; 4], k: [usize; 4] },
    /// Key runs over the padded layout: batch entry `b`'s keys are tokens
    /// `[k[b].0, k[b].1)` of batch `b` (`k_start`, `k_end`), its queries
    /// the whole `[0, Sq)`.
    KeyRuns { k: [(usize, usize); 2] },
}

/// One batch entry: its queries' and keys' `(first token, length)`, and
/// the batch of the tensors that hold them.
pub type Entry = ((usize, usize), (usize, usize), usize);

/// A sequence layout's batch entries: per entry the queries' and keys'
/// `(first token, length)` and the batch of the tensors holding them;
/// then the tokens per tensor batch (`tokens_q`, `tokens_k`), the tensor
/// batches, and the grid's bounds `(Sq, Sk)`.
pub struct Layout {
    pub entries: Vec<Entry>,
    pub tokens: (usize, usize),
    pub batches: usize,
    pub bounds: (usize, usize),
}

pub fn layout(c: &Case) -> Layout {
    match c.seqs {
        Seqs::Whole => Layout {
            entries: (0..c.b).map(|b| ((0, c.sq), (0, c.sk), b)).collect(),
            tokens: (c.sq, c.sk),
            batches: c.b,
            bounds: (c.sq, c.sk),
        },
        Seqs::Packed { q, k } => {
            let (mut qs, mut ks) = (0, 0);
            let mut entries = Vec::new();
            for b in 0..c.b {
                entries.push(((qs, q[b]), (ks, k[b]), 0));
                qs += q[b];
                ks += k[b];
            }
            let max = |x: &[usize]| x[..c.b].iter().copied().max().unwrap();
            Layout {
                entries,
                tokens: (qs + 3, ks + 3),
                batches: 1,
                bounds: (max(&q), max(&k)),
            }
        }
        Seqs::KeyRuns { k } => Layout {
            entries: (0..c.b)
                .map(|b| ((0, c.sq), (k[b].0, k[b].1 - k[b].0), b))
                .collect(),
            tokens: (c.sq, c.sk),
            batches: c.b,
            bounds: (c.sq, c.sk),
        },
    }
}

/// A mask element of `kind` for the bias `x` (bool kinds: `-inf` hides,
/// anything else attends): its bits and the bias it stands for.
pub fn mask_elem(kind: MaskKind, x: f32) -> (u64, f64) {
    let hide = x == f32::NEG_INFINITY;
    match kind {
        MaskKind::F32 => (x.to_bits() as u64, x as f64),
        MaskKind::F16 => {
            let h = f32_to_f16(x);
            (h as u64, f16_to_f32(h) as f64)
        }
        MaskKind::Bf16 => {
            let h = f32_to_bf16(x);
            (h as u64, bf16_to_f32(h) as f64)
        }
        MaskKind::U8 | MaskKind::I32 | MaskKind::I64 => {
            // Non-zero attends: various non-zero values, i64's above 32 bits.
            let attend = match kind {
                MaskKind::U8 => 0x80,
                MaskKind::I32 => 0x8000_0000,
                _ => 1u64 << 40,
            };
            if hide {
                (0, f64::NEG_INFINITY)
            } else {
                (attend, 0.0)
            }
        }
    }
}

/// A case's inputs in device memory: `q`, `k`, `v` (keys outside every
/// sequence NaN), the mask, the sequence bounds, and an `lse` buffer of NaN
/// bytes with gaps (when the case asks for it); their host values (`f64`),
/// element strides and pointers.
pub struct Inputs {
    pub mem: Memory,
    pub rng: Rng,
    pub lay: Layout,
    pub q_ptr: u64,
    pub k_ptr: u64,
    pub v_ptr: u64,
    pub m_ptr: u64,
    pub lse_ptr: u64,
    pub bounds: [u64; 4],
    /// `q` and `out` (batch, token, head) strides.
    pub q_st: [usize; 3],
    /// `k` and `v` strides.
    pub kv_st: [usize; 3],
    pub m_st: [usize; 3],
    pub lse_st: [usize; 3],
    pub lse_len: usize,
    pub qv: Vec<f64>,
    pub kv: Vec<f64>,
    pub vv: Vec<f64>,
    pub mvals: Vec<f64>,
}

/// Allocates and fills the inputs of `c`.
pub fn inputs(c: &Case) -> Inputs {
    let mut rng = Rng(0x5eed ^ (c.d as u64 * 31 + c.sq as u64 * 7 + c.sk as u64));
    let lay = layout(c);
    let (d, b, hq, hkv) = (c.d, c.b, c.hq, c.hkv);
    let (tq, tk) = lay.tokens;
    let (sq, sk) = lay.bounds;
    let nb = lay.batches;
    let packed = matches!(c.seqs, Seqs::Packed { .. });

    // Layouts (strides in elements): q and out [B, Tq, H, D]; k and v
    // [B, H, Tk, D] (a transposed view); the mask [B, H, Sq, Sk - pad].
    // Packed tensors pass batch strides 0.
    let bstride = |x: usize| if packed { 0 } else { x };
    let q_st = [bstride(tq * hq * d), hq * d, d];
    let kv_st = [bstride(hkv * tk * d), d, tk * d];
    let mut mem = Memory::new();
    let es = c.dtype.size_bytes();
    let q_ptr = mem.alloc(nb * tq * hq * d * es, 0);
    let k_ptr = mem.alloc(nb * tk * hkv * d * es, 0);
    let v_ptr = mem.alloc(nb * tk * hkv * d * es, 0);
    let mut qv = vec![0f64; nb * tq * hq * d];
    let mut kv = vec![0f64; nb * tk * hkv * d];
    let mut vv = vec![0f64; nb * tk * hkv * d];
    // Keys and values outside every sequence are NaN: never read.
    let mut key_used = vec![false; nb * tk];
    for &(_, (ks, kl), tb) in &lay.entries {
        for t in ks..ks + kl {
            key_used[tb * tk + t] = true;
        }
    }
    for (i, x) in qv.iter_mut().enumerate() {
        let (bits, val) = quantise(c.dtype, rng.next() * 2.0);
        put(&mut mem, c.dtype, q_ptr, i, bits);
        *x = val as f64;
    }
    for (ptr, vals, amp) in [(k_ptr, &mut kv, 2.0), (v_ptr, &mut vv, 1.0)] {
        for (i, x) in vals.iter_mut().enumerate() {
            // [B, H, Tk, D]: element i is token (i / d) % tk of batch
            // i / (hkv · tk · d).
            let token = (i / (hkv * tk * d)) * tk + (i / d) % tk;
            let v = if key_used[token] {
                rng.next() * amp
            } else {
                f32::NAN
            };
            let (bits, val) = quantise(c.dtype, v);
            put(&mut mem, c.dtype, ptr, i, bits);
            *x = val as f64;
        }
    }
    if c.nan_q {
        let i = 2 * q_st[1] + 3;
        let (bits, _) = quantise(c.dtype, f32::NAN);
        put(&mut mem, c.dtype, q_ptr, i, bits);
        qv[i] = f64::NAN;
    }
    let width = sk - c.mask_pad;
    let (m_ptr, m_st, mvals) = match c.mask {
        MaskShape::None => (0, [0, 0, 0], Vec::new()),
        shape => {
            assert!(
                c.seqs == Seqs::Whole || c.mask_batches.is_some(),
                "masks come without sequence bounds, or with mask_batches"
            );
            let (n, st) = match shape {
                MaskShape::Dense => (b * hq * sq * width, [hq * sq * width, sq * width, width]),
                MaskShape::PerBatch => (b * sq * width, [sq * width, 0, width]),
                _ => (b * width, [width, 0, 0]),
            };
            let eb = c.mask_kind.bytes() as usize;
            let ptr = mem.alloc(n * eb, 0);
            let mut vals = vec![0f64; n];
            for (i, x) in vals.iter_mut().enumerate() {
                let row = (i / width) % sq;
                let mut m = rng.next() * 2.0;
                let hidden = match shape {
                    MaskShape::Dense => row == 1 || rng.next() > 0.7,
                    MaskShape::Keys => rng.next() > 0.6,
                    _ => false,
                };
                if hidden {
                    m = f32::NEG_INFINITY;
                }
                let (bits, bias) = mask_elem(c.mask_kind, m);
                let o = mem.check(ptr + (i * eb) as u64, eb as u64);
                for k in 0..eb {
                    mem.bytes[o + k] = (bits >> (8 * k)) as u8;
                }
                *x = bias;
            }
            (ptr, st, vals)
        }
    };

    // lse `[B, Hq, Tq]` with gaps between rows, heads and batches, NaN
    // bytes throughout.
    let lse_st = [bstride(hq * (2 * tq + 1) + 3), 2 * tq + 1, 2];
    let lse_len = nb * (hq * (2 * tq + 1) + 3);
    let lse_ptr = if c.lse {
        mem.alloc(lse_len * 4, 0xFF)
    } else {
        0
    };

    // The sequence bounds.
    let mut bound_arrays = [0u64; 4];
    let put_i32s = |mem: &mut Memory, xs: &[usize]| {
        let ptr = mem.alloc(xs.len() * 4, 0);
        for (i, &x) in xs.iter().enumerate() {
            let o = mem.check(ptr + 4 * i as u64, 4);
            mem.bytes[o..o + 4].copy_from_slice(&(x as i32).to_le_bytes());
        }
        ptr
    };
    match c.seqs {
        Seqs::Whole => {}
        Seqs::Packed { .. } => {
            // cu_seqlens: start = cu, end = cu + 1 element.
            for (side, n) in [(0, 0), (1, 2)] {
                let mut cu: Vec<usize> = lay
                    .entries
                    .iter()
                    .map(|e| if side == 0 { e.0 .0 } else { e.1 .0 })
                    .collect();
                let last = lay.entries.last().unwrap();
                cu.push(if side == 0 {
                    last.0 .0 + last.0 .1
                } else {
                    last.1 .0 + last.1 .1
                });
                let ptr = put_i32s(&mut mem, &cu);
                bound_arrays[n] = ptr;
                bound_arrays[n + 1] = ptr + 4;
            }
        }
        Seqs::KeyRuns { k } => {
            let starts: Vec<usize> = k[..b].iter().map(|r| r.0).collect();
            let ends: Vec<usize> = k[..b].iter().map(|r| r.1).collect();
            bound_arrays[2] = put_i32s(&mut mem, &starts);
            bound_arrays[3] = put_i32s(&mut mem, &ends);
        }
    }
    Inputs {
        mem,
        rng,
        lay,
        q_ptr,
        k_ptr,
        v_ptr,
        m_ptr,
        lse_ptr,
        bounds: bound_arrays,
        q_st,
        kv_st,
        m_st,
        lse_st,
        lse_len,
        qv,
        kv,
        vv,
        mvals,
    }
}

impl Inputs {
    /// The element index of (tensor batch `tb`, token, head) in `q`-shaped
    /// tensors, and the same in `k`-shaped ones.
    pub fn q_row(&self, c: &Case, tb: usize, token: usize, h: usize) -> usize {
        let (tq, _) = self.lay.tokens;
        tb * tq * c.hq * c.d + token * self.q_st[1] + h * self.q_st[2]
    }

    pub fn k_row(&self, c: &Case, tb: usize, token: usize, h: usize) -> usize {
        let (_, tk) = self.lay.tokens;
        tb * c.hkv * tk * c.d + token * self.kv_st[1] + h * self.kv_st[2]
    }

    /// The reference's scores of local query row `i` of batch entry `bi`,
    /// head `h`, over the entry's keys: `scale · q·k + mask`, `-inf` where
    /// hidden (causal, a bool mask).
    pub fn scores(&self, c: &Case, bi: usize, h: usize, i: usize) -> Vec<f64> {
        let ((qs, _), (ks, kl), tb) = self.lay.entries[bi];
        let applies = c.mask_batches.is_none_or(|f| f[bi] != 0);
        let kh = h / (c.hq / c.hkv);
        let qrow = self.q_row(c, tb, qs + i, h);
        let m_st = self.m_st;
        let mut sc = vec![f64::NEG_INFINITY; kl];
        for (j, s) in sc.iter_mut().enumerate() {
            let krow = self.k_row(c, tb, ks + j, kh);
            let mut dot = 0.0;
            for x in 0..c.d {
                dot += self.qv[qrow + x] * self.kv[krow + x];
            }
            *s = c.scale as f64 * dot;
            if c.mask != MaskShape::None && applies && j >= c.mask_pad {
                *s += self.mvals[bi * m_st[0] + h * m_st[1] + i * m_st[2] + j - c.mask_pad];
            }
            if c.causal && j > i {
                *s = f64::NEG_INFINITY;
            }
        }
        sc
    }
}

/// Runs the kernel of `c` through the interpreter and checks it against
/// a float64 reference; every token of `out` and `lse` outside the
/// sequences must keep its NaN poison. Returns the relative L2 error of
/// the finite rows.
pub fn check(c: Case, kernel: &Kernel, launch: Launch) -> f64 {
    let inp = inputs(&c);
    let (d, b, hq, hkv) = (c.d, c.b, c.hq, c.hkv);
    let (tq, tk) = inp.lay.tokens;
    let (sq, sk) = inp.lay.bounds;
    let nb = inp.lay.batches;
    let es = c.dtype.size_bytes();
    let mut inp = inp;
    let (q_ptr, k_ptr, v_ptr, m_ptr, lse_ptr) =
        (inp.q_ptr, inp.k_ptr, inp.v_ptr, inp.m_ptr, inp.lse_ptr);
    let (q_st, kv_st, m_st, lse_st) = (inp.q_st, inp.kv_st, inp.m_st, inp.lse_st);
    let (lse_len, bound_arrays) = (inp.lse_len, inp.bounds);
    // NaN poison: rows outside the sequences must keep it.
    let o_ptr = inp.mem.alloc(nb * tq * hq * d * es, 0xFF);

    let name = kernel.name().to_string();
    let mut params: HashMap<String, u64> = HashMap::new();
    let mut set = |n: &str, v: u64| {
        params.insert(format!("{name}_{n}"), v);
    };
    set("q", q_ptr);
    set("k", k_ptr);
    set("v", v_ptr);
    set("out", o_ptr);
    set("mask", m_ptr);
    for (t, st) in [("q", q_st), ("k", kv_st), ("v", kv_st), ("out", q_st)] {
        for (dim, x) in ["b", "s", "h"].iter().zip(st) {
            set(&format!("{t}_stride_{dim}"), x as u64);
        }
    }
    for (dim, x) in ["b", "h", "q"].iter().zip(m_st) {
        set(&format!("mask_stride_{dim}"), x as u64);
    }
    set("lse", lse_ptr);
    for (dim, x) in ["b", "h", "q"].iter().zip(lse_st) {
        set(&format!("lse_stride_{dim}"), x as u64);
    }
    for (n, ptr) in ["q_start", "q_end", "k_start", "k_end"]
        .iter()
        .zip(bound_arrays)
    {
        set(n, ptr);
    }
    set("seq_q", sq as u64);
    set("seq_k", sk as u64);
    set("tokens_q", tq as u64);
    set("tokens_k", tk as u64);
    set("mask_kind", c.mask_kind.code() as u64);
    set("mask_pad", c.mask_pad as u64);
    let batches_ptr = match c.mask_batches {
        Some(flags) => {
            let ptr = inp.mem.alloc(4 * b, 0);
            for (i, f) in flags[..b].iter().enumerate() {
                let o = inp.mem.check(ptr + 4 * i as u64, 4);
                inp.mem.bytes[o..o + 4].copy_from_slice(&f.to_le_bytes());
            }
            ptr
        }
        None => 0,
    };
    set("mask_batches", batches_ptr);
    set("group", (hq / hkv) as u64);
    set(
        "scale_log2",
        (c.scale * std::f32::consts::LOG2_E).to_bits() as u64,
    );
    assert_eq!(params.len(), PARAMS.len() + 1);

    let prog = Program::new(kernel);
    let block_m = launch.block_m;
    let grid = [sq.div_ceil(block_m), hq, b];
    let grid = Grid {
        size: grid,
        threads: launch.threads,
        smem_bytes: launch.smem_bytes,
        divergence: false,
    };
    super::launch(&prog, &params, grid, &mut inp.mem);

    // The reference, in f64, in each batch entry's local positions.
    let group = hq / hkv;
    let (mut num, mut den) = (0f64, 0f64);
    let mut lse_written = vec![false; if c.lse { lse_len } else { 0 }];
    let mut out_written = vec![false; nb * tq * hq];
    for (bi, &((qs, ql), (ks, _), tb)) in inp.lay.entries.iter().enumerate() {
        for h in 0..hq {
            let kh = h / group;
            for i in 0..ql {
                let qrow = inp.q_row(&c, tb, qs + i, h);
                out_written[(tb * tq + qs + i) * hq + h] = true;
                let sc = inp.scores(&c, bi, h, i);
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let has_nan = sc.iter().any(|s| s.is_nan());
                let mut out = vec![0f64; d];
                let mut lse = f64::NEG_INFINITY;
                if has_nan {
                    out.fill(f64::NAN);
                    lse = f64::NAN;
                } else if mx > f64::NEG_INFINITY {
                    let mut sum = 0.0;
                    for (j, &s) in sc.iter().enumerate() {
                        let p = (s - mx).exp();
                        sum += p;
                        let vrow = inp.k_row(&c, tb, ks + j, kh);
                        for (o, &v) in out.iter_mut().zip(&inp.vv[vrow..vrow + d]) {
                            *o += p * v;
                        }
                    }
                    for o in &mut out {
                        *o /= sum;
                    }
                    lse = mx + sum.ln();
                }
                if c.lse {
                    let n = tb * (hq * (2 * tq + 1) + 3) + h * lse_st[1] + (qs + i) * lse_st[2];
                    lse_written[n] = true;
                    let got = get(&inp.mem, DType::F32, lse_ptr, n);
                    let at = format!("{c:?}: lse ({bi},{h},{i})");
                    if lse.is_nan() {
                        assert!(got.is_nan(), "{at}: want NaN, got {got}");
                    } else if lse == f64::NEG_INFINITY {
                        assert_eq!(got, f64::NEG_INFINITY, "{at}");
                    } else {
                        let err = (got - lse).abs();
                        assert!(err <= 2e-5 * (1.0 + lse.abs()), "{at}: {got} vs {lse}");
                    }
                }
                for (x, &want) in out.iter().enumerate() {
                    let got = get(&inp.mem, c.dtype, o_ptr, qrow + x);
                    if want.is_nan() {
                        assert!(
                            got.is_nan(),
                            "{c:?}: ({bi},{i},{h},{x}) want NaN, got {got}"
                        );
                    } else if mx == f64::NEG_INFINITY {
                        assert_eq!(got.to_bits(), 0, "{c:?}: masked row ({bi},{i},{h})");
                    } else {
                        assert!(got.is_finite(), "{c:?}: ({bi},{i},{h},{x}) got {got}");
                        num += (got - want).powi(2);
                        den += want.powi(2);
                    }
                }
            }
        }
    }
    // Nothing is written outside the sequences' rows, nor between the
    // rows of the lse.
    for (n, written) in out_written.iter().enumerate() {
        if !written {
            let row = n * d * es;
            let o = inp.mem.check(o_ptr + row as u64, (d * es) as u64);
            assert!(
                inp.mem.bytes[o..o + d * es].iter().all(|&x| x == 0xFF),
                "{c:?}: out row (token, head) {n} outside the sequences was written"
            );
        }
    }
    for (n, written) in lse_written.iter().enumerate() {
        let untouched = get(&inp.mem, DType::F32, lse_ptr, n).is_nan();
        assert!(*written || untouched, "{c:?}: lse gap {n} was written");
    }
    let err = (num / den.max(1e-30)).sqrt();
    let tol = match c.dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
    };
    assert!(err <= tol, "{c:?}: relative L2 error {err}");
    err
}

/// A case of `d`, `causal`, `dtype`: 2 batches, 4 query heads over 2
/// K/V heads, `sq` × `sk`, no mask, the lse asked for.
pub fn case(d: usize, causal: bool, dtype: DType, sq: usize, sk: usize) -> Case {
    Case {
        d,
        causal,
        dtype,
        b: 2,
        hq: 4,
        hkv: 2,
        sq,
        sk,
        mask: MaskShape::None,
        mask_kind: MaskKind::F32,
        mask_pad: 0,
        seqs: Seqs::Whole,
        nan_q: false,
        mask_batches: None,
        lse: true,
        scale: 1.0 / (d as f32).sqrt(),
    }
}

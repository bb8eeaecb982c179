//! Cases drawn field by field for the `safetensors_structured` target:
//! shapes (mostly consistent, sometimes not; zero and huge sizes; ranks
//! other than 4), dtypes, masks, metadata strings and element bytes (NaN,
//! Inf, subnormals), written as a well-formed safetensors file.

use std::collections::HashMap;

use arbitrary::Arbitrary;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A size: small, a head size (declared or not), zero or anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Dim {
    Small(u8),
    HeadSize(u8),
    Zero,
    Any(u64),
}

impl Dim {
    fn get(self) -> usize {
        const HEAD_SIZES: [usize; 16] = [
            8, 32, 40, 48, 64, 72, 80, 96, 112, 128, 160, 192, 224, 256, 264, 65,
        ];
        match self {
            Dim::Small(n) => usize::from(n % 9),
            Dim::HeadSize(i) => HEAD_SIZES[usize::from(i) % HEAD_SIZES.len()],
            Dim::Zero => 0,
            Dim::Any(n) => n as usize,
        }
    }
}

/// A size of `k`, `v` or the mask: the one it should have, or another.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Like {
    Same,
    Other(Dim),
}

impl Like {
    fn get(self, same: usize) -> usize {
        match self {
            Like::Same => same,
            Like::Other(d) => d.get(),
        }
    }
}

/// A dtype: the ones a case may hold and two it may not.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum DtypeSel {
    F32,
    F16,
    Bf16,
    Bool,
    U8,
    I32,
    I64,
    F64,
    I8,
}

impl DtypeSel {
    fn get(self) -> Dtype {
        match self {
            DtypeSel::F32 => Dtype::F32,
            DtypeSel::F16 => Dtype::F16,
            DtypeSel::Bf16 => Dtype::BF16,
            DtypeSel::Bool => Dtype::BOOL,
            DtypeSel::U8 => Dtype::U8,
            DtypeSel::I32 => Dtype::I32,
            DtypeSel::I64 => Dtype::I64,
            DtypeSel::F64 => Dtype::F64,
            DtypeSel::I8 => Dtype::I8,
        }
    }
}

/// A metadata string: the expected forms and odd ones.
#[derive(Arbitrary, Debug)]
pub enum Meta {
    Bool(bool),
    Number(f32),
    Text(String),
}

impl Meta {
    fn get(&self) -> String {
        match self {
            Meta::Bool(b) => b.to_string(),
            Meta::Number(x) => x.to_string(),
            Meta::Text(s) => s.clone(),
        }
    }
}

/// One case, field by field.
#[derive(Arbitrary, Debug)]
pub struct Input {
    /// `[B, Sq, Hq, D]`.
    pub q: [Dim; 4],
    /// `k`'s `[B, Sk, Hkv, D]` against `q`'s; `Sk` and `Hkv` are its own.
    pub k: [Like; 4],
    /// `v`'s against `k`'s.
    pub v: [Like; 4],
    /// `Hq` as a multiple of `Hkv` (grouped-query attention) when set.
    pub group: Option<u8>,
    pub dtypes: [DtypeSel; 3],
    /// Rank-4 `q`, `k`, `v` unless set: then `q` gets these sizes.
    pub q_rank: Option<Vec<Dim>>,
    /// `[B, (H,) (Sq,) Sk]`, each size as it should be (1 when broadcast)
    /// or another.
    pub mask: Option<(DtypeSel, Vec<Like>, bool)>,
    pub causal: Option<Meta>,
    pub scale: Option<Meta>,
    /// Tensors left out: bit 0 `q`, 1 `k`, 2 `v`.
    pub omit: u8,
    /// Element bytes, repeated to fill every tensor.
    pub bytes: Vec<u8>,
}

/// The largest file this target writes.
const MAX_BYTES: usize = 1 << 20;

/// The input as a safetensors file, or `None` when it would be too big.
pub fn file(input: &Input) -> Option<Vec<u8>> {
    let [b, sq, hq, d] = input.q.map(Dim::get);
    let mut k_shape = [b, 0, 0, d];
    k_shape[1] = input.k[1].get(sq);
    k_shape[2] = input.k[2].get(1 + hq / 2);
    if let Some(g) = input.group {
        // Hq = g * Hkv.
        k_shape[2] = hq / usize::from(g.max(1));
    }
    k_shape[0] = input.k[0].get(b);
    k_shape[3] = input.k[3].get(d);
    let mut v_shape = k_shape;
    for (i, like) in input.v.iter().enumerate() {
        v_shape[i] = like.get(k_shape[i]);
    }
    let q_shape = match &input.q_rank {
        Some(dims) => dims.iter().take(6).map(|d| d.get()).collect(),
        None => vec![b, sq, hq, d],
    };
    let mut tensors: Vec<(&str, Dtype, Vec<usize>)> = Vec::new();
    let [dq, dk, dv] = input.dtypes.map(DtypeSel::get);
    for (bit, name, dtype, shape) in [
        (0, "q", dq, q_shape),
        (1, "k", dk, k_shape.to_vec()),
        (2, "v", dv, v_shape.to_vec()),
    ] {
        if input.omit & (1 << bit) == 0 {
            tensors.push((name, dtype, shape));
        }
    }
    if let Some((dtype, dims, per_head)) = &input.mask {
        // [B, Sk], [B, Sq, Sk] or [B, H, Sq, Sk], from the sizes listed.
        let natural: &[usize] = match (dims.len(), per_head) {
            (0..=2, _) => &[b, k_shape[1]],
            (3, _) => &[b, sq, k_shape[1]],
            (_, true) => &[b, hq, sq, k_shape[1]],
            (_, false) => &[1, 1, sq, k_shape[1]],
        };
        let shape = natural
            .iter()
            .zip(dims.iter().chain(std::iter::repeat(&Like::Same)))
            .map(|(&n, like)| like.get(n))
            .collect();
        tensors.push(("attn_mask", dtype.get(), shape));
    }

    // Element bytes: the input's, repeated.
    let mut data = Vec::new();
    for (_, dtype, shape) in &tensors {
        let n = shape
            .iter()
            .try_fold(dtype.bitsize() / 8, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= MAX_BYTES)?;
        let fill = if input.bytes.is_empty() {
            &[0x3c][..]
        } else {
            &input.bytes[..]
        };
        data.push(fill.iter().copied().cycle().take(n).collect::<Vec<u8>>());
    }
    if data.iter().map(Vec::len).sum::<usize>() > MAX_BYTES {
        return None;
    }
    let views = tensors
        .iter()
        .zip(&data)
        .map(|((name, dtype, shape), bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes).map(|v| (*name, v))
        })
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let mut metadata = HashMap::new();
    if let Some(m) = &input.causal {
        metadata.insert("causal".to_string(), m.get());
    }
    if let Some(m) = &input.scale {
        metadata.insert("scale".to_string(), m.get());
    }
    // No `__metadata__` rather than an empty one: safetensors 0.8 writes a
    // header it cannot read back for no tensors and empty metadata
    // (safetensors/safetensors PR #761); `sdpa run` never writes that.
    let metadata = (!metadata.is_empty()).then_some(metadata);
    safetensors::serialize(views, metadata).ok()
}

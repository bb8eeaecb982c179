//! Reading attention cases from safetensors files and writing results back.
//!
//! A case holds the tensors `q`, `k`, `v` (`[B, S, H, D]`, all `F32`, `F16`
//! or `BF16`) and optionally `attn_mask` (`BOOL`, `U8`, `I32`, `I64`, `F32`,
//! `F16` or `BF16`, rank 2 to 4), plus the metadata strings `causal`
//! (`true`/`false`) and `scale` (a number). A variable-length case holds
//! packed `q` `[Tq, Hq, D]` and `k`, `v` `[Tk, Hkv, D]` with the `I32`
//! tensors `cu_seqlens_q` and `cu_seqlens_k` (`[B + 1]`), and no mask.
//! Tensor data in a safetensors
//! file need not be aligned for its type, so every tensor is decoded from
//! its little-endian bytes into an owned buffer rather than cast in place.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use sdpa_runtime::half::{bf16, f16};
use sdpa_runtime::{
    AttentionMetadata, AttentionParams, AttnMask, OwnedData, OwnedMaskData, SdpaError, Tensor,
    VarLen,
};

use crate::error::{CliError, Result};

/// The tensor names a case may hold.
const KNOWN_TENSORS: [&str; 7] = [
    "q",
    "k",
    "v",
    "attn_mask",
    "dout",
    "cu_seqlens_q",
    "cu_seqlens_k",
];

/// One attention call read from a file.
#[derive(Debug)]
pub struct Case {
    /// Queries `[B, Sq, Hq, D]` (`[1, Tq, Hq, D]` for a packed case).
    pub q: Tensor,
    /// Keys `[B, Sk, Hkv, D]`.
    pub k: Tensor,
    /// Values `[B, Sk, Hkv, D]`.
    pub v: Tensor,
    /// The optional attention mask.
    pub mask: Option<OwnedMask>,
    /// The optional output gradient `[B, Sq, Hq, D]` (`sdpa run
    /// --backward` needs it).
    pub dout: Option<Tensor>,
    /// The `causal` metadata entry; absent means `false`.
    pub causal: bool,
    /// The `scale` metadata entry; absent means `1/sqrt(D)`.
    pub scale: Option<f32>,
    /// `cu_seqlens_q` and `cu_seqlens_k` of a packed (variable-length)
    /// case, whose tensors were read as rank 3 and are held here with a
    /// batch dimension of 1.
    pub cu_seqlens: Option<(Vec<i32>, Vec<i32>)>,
}

impl Case {
    /// The layer parameters the case asks for, as `sdpa run` builds them:
    /// head counts and head size from the tensors, `causal`, `scale`.
    pub fn params(&self) -> AttentionParams {
        let [_, _, heads_q, head_size] = self.q.shape();
        let [_, _, heads_kv, _] = self.k.shape();
        let mut params = AttentionParams::new(heads_q, head_size)
            .num_kv_heads(heads_kv)
            .causal(self.causal)
            .prefix("sdpa run");
        if let Some(scale) = self.scale {
            params = params.softmax_scale(scale);
        }
        params
    }

    /// The call's metadata, carrying the mask or the sequence offsets if
    /// the case has them.
    pub fn metadata(&self) -> Result<AttentionMetadata<'_>, SdpaError> {
        let mut metadata = AttentionMetadata::default();
        if let Some(mask) = &self.mask {
            metadata = metadata.with_mask(mask.as_attn_mask()?);
        }
        if let Some((cu_q, cu_k)) = &self.cu_seqlens {
            metadata = metadata.with_varlen(VarLen::new(cu_q, cu_k));
        }
        Ok(metadata)
    }

    /// The shape a result shaped like `t` is written with: packed cases
    /// drop the batch dimension of 1 (`[Tq, Hq, D]`); `None` keeps `t`'s.
    pub fn written_shape(&self, t: &Tensor) -> Option<Vec<usize>> {
        self.cu_seqlens.as_ref().map(|_| t.shape()[1..].to_vec())
    }
}

/// An attention mask read from a file: owned elements and their shape.
#[derive(Debug)]
pub struct OwnedMask {
    data: OwnedMaskData,
    shape: Vec<usize>,
}

impl OwnedMask {
    /// The mask as the runtime takes it; the runtime checks its shape.
    pub fn as_attn_mask(&self) -> Result<AttnMask<'_>, SdpaError> {
        AttnMask::new(self.data.as_data(), &self.shape)
    }
}

/// Reads a case from `path`.
pub fn read_case(path: &Path) -> Result<Case> {
    let bytes = std::fs::read(path).map_err(|source| CliError::Read {
        path: path.to_owned(),
        source,
    })?;
    read_case_bytes(&bytes, path)
}

/// Reads a case from the bytes of a safetensors file; `path` names them in
/// messages. Any bytes give a case or an error, never a panic (the fuzz
/// target `safetensors_case` in `fuzz/` checks this).
pub fn read_case_bytes(bytes: &[u8], path: &Path) -> Result<Case> {
    let format = |source| CliError::Format {
        path: path.to_owned(),
        source,
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(format)?;
    let file = SafeTensors::deserialize(bytes).map_err(format)?;

    for name in file.names() {
        if !KNOWN_TENSORS.contains(&name) {
            tracing::warn!(
                "{} holds a tensor {name:?} that sdpa run ignores; it reads q, k, v, attn_mask \
                 and dout",
                path.display()
            );
        }
    }
    let get = |name: &str| -> Result<safetensors::tensor::TensorView<'_>> {
        file.tensor(name).map_err(|_| {
            CliError::Input(format!(
                "{} has no tensor {name:?}; a case needs q, k and v ([B, S, H, D]) and may \
                 hold attn_mask",
                path.display()
            ))
        })
    };
    let cu_seqlens = match (file.tensor("cu_seqlens_q"), file.tensor("cu_seqlens_k")) {
        (Ok(q), Ok(k)) => Some((offsets("cu_seqlens_q", &q)?, offsets("cu_seqlens_k", &k)?)),
        (Err(_), Err(_)) => None,
        _ => {
            return Err(CliError::Input(format!(
                "{} holds only one of cu_seqlens_q and cu_seqlens_k; a packed case needs                  both (I32, [B + 1])",
                path.display()
            )))
        }
    };
    let packed = cu_seqlens.is_some();
    let q = qkv_tensor("q", &get("q")?, packed)?;
    let k = qkv_tensor("k", &get("k")?, packed)?;
    let v = qkv_tensor("v", &get("v")?, packed)?;
    let mask = match file.tensor("attn_mask") {
        Ok(view) => Some(mask_tensor(&view)?),
        Err(_) => None,
    };
    let dout = match file.tensor("dout") {
        Ok(view) => Some(qkv_tensor("dout", &view, packed)?),
        Err(_) => None,
    };

    let empty = HashMap::new();
    let metadata = header.metadata().as_ref().unwrap_or(&empty);
    let causal = metadata
        .get("causal")
        .map(|s| parse_causal(s))
        .transpose()?
        .unwrap_or(false);
    let scale = metadata.get("scale").map(|s| parse_scale(s)).transpose()?;
    Ok(Case {
        q,
        k,
        v,
        mask,
        dout,
        causal,
        scale,
        cu_seqlens,
    })
}

/// Writes `out` as the tensor `out` of a new safetensors file, with
/// `metadata` as its `__metadata__`; a device tensor is copied to the host
/// first.
pub fn write_output(path: &Path, out: &Tensor, metadata: HashMap<String, String>) -> Result<()> {
    write_tensors(path, &[("out", out, None)], metadata)
}

/// Writes each `(name, tensor, shape)` as a tensor of a new safetensors
/// file (with `shape` in place of the tensor's own where given: the same
/// elements, e.g. `lse`'s `[B, Hq, Sq, 1]` written as `[B, Hq, Sq]`), with
/// `metadata` as its `__metadata__`; device tensors are copied to the host
/// first.
pub fn write_tensors(
    path: &Path,
    tensors: &[(&str, &Tensor, Option<Vec<usize>>)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let write = |source: Box<dyn std::error::Error + Send + Sync>| CliError::Write {
        path: path.to_owned(),
        source,
    };
    let mut encoded = Vec::with_capacity(tensors.len());
    for (name, t, shape) in tensors {
        let (dtype, bytes) = host_bytes(t)?;
        let shape = shape.clone().unwrap_or_else(|| t.shape().to_vec());
        encoded.push((*name, dtype, shape, bytes));
    }
    let mut views = Vec::with_capacity(encoded.len());
    for (name, dtype, shape, bytes) in &encoded {
        let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
            .map_err(|e| write(e.into()))?;
        views.push((*name, view));
    }
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| write(e.into()))
}

/// The safetensors dtype and little-endian bytes of `out`, copied to the
/// host first if it lives on a device.
fn host_bytes(out: &Tensor) -> Result<(Dtype, Vec<u8>)> {
    let host;
    let out = match out.host_data() {
        Some(_) => out,
        None => {
            host = out.to_host()?;
            &host
        }
    };
    let Some(data) = out.host_data() else {
        return Err(CliError::Input("the result is not in host memory".into()));
    };
    Ok(match data {
        OwnedData::F32(v) => (Dtype::F32, encode(v, |x| x.to_le_bytes())),
        OwnedData::F16(v) => (Dtype::F16, encode(v, |x| x.to_bits().to_le_bytes())),
        OwnedData::BF16(v) => (Dtype::BF16, encode(v, |x| x.to_bits().to_le_bytes())),
    })
}

/// Reads `q`, `k`, `v` or `dout`: rank 4 (rank 3 when `packed`, read as
/// `[1, T, H, D]`), a floating dtype the kernels take.
fn qkv_tensor(
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
    packed: bool,
) -> Result<Tensor> {
    let dims = view.shape();
    let shape: Option<[usize; 4]> = match (packed, dims) {
        (false, &[b, s, h, d]) => Some([b, s, h, d]),
        (true, &[t, h, d]) => Some([1, t, h, d]),
        _ => None,
    };
    let shape = shape.ok_or_else(|| {
        CliError::Input(if packed {
            format!(
                "tensor {name:?} has shape {dims:?} (rank {}); with cu_seqlens_q and \
                 cu_seqlens_k, q, k, v and dout are packed with rank 3: [tokens, heads, \
                 head_dim]",
                dims.len()
            )
        } else {
            format!(
                "tensor {name:?} has shape {dims:?} (rank {}); q, k and v must have rank 4: \
                 [batch, seq, heads, head_dim] (or rank 3 with cu_seqlens_q and \
                 cu_seqlens_k)",
                dims.len()
            )
        })
    })?;
    check_sizes(name, view.shape())?;
    let bytes = view.data();
    let tensor = match view.dtype() {
        Dtype::F32 => Tensor::from_vec(decode(bytes, f32::from_le_bytes), shape),
        Dtype::F16 => Tensor::from_vec(
            decode(bytes, |b| f16::from_bits(u16::from_le_bytes(b))),
            shape,
        ),
        Dtype::BF16 => Tensor::from_vec(
            decode(bytes, |b| bf16::from_bits(u16::from_le_bytes(b))),
            shape,
        ),
        other => {
            return Err(CliError::Input(format!(
                "tensor {name:?} has dtype {other:?}; q, k and v must be F32, F16 or BF16 \
                 (all three the same)"
            )))
        }
    };
    Ok(tensor?)
}

/// Reads `cu_seqlens_q` or `cu_seqlens_k`: `I32`, rank 1 (the runtime
/// checks the values).
fn offsets(name: &str, view: &safetensors::tensor::TensorView<'_>) -> Result<Vec<i32>> {
    if view.dtype() != Dtype::I32 || view.shape().len() != 1 {
        return Err(CliError::Input(format!(
            "tensor {name:?} has dtype {:?} and shape {:?}; sequence offsets are I32 of shape \
             [B + 1]: 0, then each sequence's end",
            view.dtype(),
            view.shape()
        )));
    }
    Ok(decode(view.data(), i32::from_le_bytes))
}

/// Reads `attn_mask`: one of the mask dtypes, rank 2 to 4 (the runtime
/// checks the rank and the sizes).
fn mask_tensor(view: &safetensors::tensor::TensorView<'_>) -> Result<OwnedMask> {
    check_sizes("attn_mask", view.shape())?;
    let bytes = view.data();
    let data = match view.dtype() {
        Dtype::BOOL => OwnedMaskData::Bool(decode(bytes, |[b]: [u8; 1]| b != 0)),
        Dtype::U8 => OwnedMaskData::U8(bytes.to_vec()),
        Dtype::I32 => OwnedMaskData::I32(decode(bytes, i32::from_le_bytes)),
        Dtype::I64 => OwnedMaskData::I64(decode(bytes, i64::from_le_bytes)),
        Dtype::F32 => OwnedMaskData::F32(decode(bytes, f32::from_le_bytes)),
        Dtype::F16 => OwnedMaskData::F16(decode(bytes, |b| f16::from_bits(u16::from_le_bytes(b)))),
        Dtype::BF16 => {
            OwnedMaskData::BF16(decode(bytes, |b| bf16::from_bits(u16::from_le_bytes(b))))
        }
        other => {
            return Err(CliError::Input(format!(
                "tensor \"attn_mask\" has dtype {other:?}; a mask must be BOOL, U8, I32, I64 \
                 (non-zero = attend) or F32, F16, BF16 (added to the scores)"
            )))
        }
    };
    Ok(OwnedMask {
        data,
        shape: view.shape().to_vec(),
    })
}

/// Refuses a shape whose non-zero sizes multiply past `usize`. safetensors
/// accepts such a shape when a size is zero (`[7, 0, 2^64 - 1, 80]` holds no
/// element), but the strides of its row-major layout overflow: the runtime's
/// `Layout::contiguous` panicked on it in builds with overflow checks (found
/// by the fuzz target `safetensors_structured`).
fn check_sizes(name: &str, shape: &[usize]) -> Result<()> {
    let fits = shape
        .iter()
        .filter(|&&n| n != 0)
        .try_fold(1usize, |a, &n| a.checked_mul(n))
        .is_some();
    if fits {
        return Ok(());
    }
    Err(CliError::Input(format!(
        "tensor {name:?} has shape {shape:?}: its non-zero sizes multiply past the address \
         space, so its strides cannot be computed even though it holds no element; \
         write sizes whose product, zeros left out, fits in 64 bits"
    )))
}

/// Parses the `causal` metadata entry: `true` or `false`, in any case.
fn parse_causal(value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(CliError::Input(format!(
            "metadata causal = {value:?} is not a boolean; write \"true\" or \"false\" \
             (absent means false)"
        ))),
    }
}

/// Parses the `scale` metadata entry: a finite number.
fn parse_scale(value: &str) -> Result<f32> {
    match value.trim().parse::<f32>() {
        Ok(s) if s.is_finite() => Ok(s),
        _ => Err(CliError::Input(format!(
            "metadata scale = {value:?} is not a finite number; write e.g. \"0.125\", or leave \
             it out for 1/sqrt(D)"
        ))),
    }
}

/// Decodes little-endian elements of `N` bytes each, wherever they lie.
fn decode<T, const N: usize>(bytes: &[u8], from_le: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| from_le(c.try_into().expect("chunks_exact yields N bytes")))
        .collect()
}

/// Encodes elements as little-endian bytes.
fn encode<T: Copy, const N: usize>(values: &[T], to_le: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&x| to_le(x)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_values() {
        assert!(parse_causal("True").unwrap());
        assert!(!parse_causal("false").unwrap());
        let err = parse_causal("maybe").unwrap_err().to_string();
        assert!(err.contains("\"maybe\""), "{err}");
        assert_eq!(parse_scale(" 0.125 ").unwrap(), 0.125);
        assert!(parse_scale("inf").is_err());
        assert!(parse_scale("abc").is_err());
    }

    #[test]
    fn unaligned_bytes_decode() {
        let mut bytes = vec![0u8];
        bytes.extend(1.5f32.to_le_bytes());
        bytes.extend((-2.0f32).to_le_bytes());
        assert_eq!(decode(&bytes[1..], f32::from_le_bytes), [1.5, -2.0]);
    }

    /// A safetensors file of empty tensors with these shapes.
    fn empty_tensors(tensors: &[(&str, &str, &[usize])]) -> Vec<u8> {
        let entries: Vec<String> = tensors
            .iter()
            .map(|(name, dtype, shape)| {
                format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[0,0]}}"#)
            })
            .collect();
        let header = format!("{{{}}}", entries.join(","));
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes
    }

    #[test]
    fn empty_shapes_whose_sizes_overflow_are_refused() {
        // The fuzz target's case: no element, but Hq * D overflows.
        let huge = 17_897_656_732_708_567_045;
        let bytes = empty_tensors(&[
            ("q", "F32", &[7, 0, huge, 80]),
            ("k", "F32", &[7, 0, huge / 7, 80]),
            ("v", "F32", &[7, 0, huge / 7, 80]),
        ]);
        let err = read_case_bytes(&bytes, Path::new("case.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tensor \"q\" has shape [7, 0, 17897656732708567045, 80]: its non-zero"),
            "{err}"
        );

        let bytes = empty_tensors(&[
            ("q", "F32", &[1, 0, 1, 64]),
            ("k", "F32", &[1, 0, 1, 64]),
            ("v", "F32", &[1, 0, 1, 64]),
            ("attn_mask", "BOOL", &[0, 1 << 40, 1 << 40]),
        ]);
        let err = read_case_bytes(&bytes, Path::new("case.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tensor \"attn_mask\" has shape"), "{err}");

        // Empty tensors whose sizes fit are a case (of no attention).
        let bytes = empty_tensors(&[
            ("q", "F32", &[1, 0, 2, 32]),
            ("k", "F32", &[1, 0, 2, 32]),
            ("v", "F32", &[1, 0, 2, 32]),
        ]);
        let case = read_case_bytes(&bytes, Path::new("case.safetensors")).unwrap();
        assert_eq!(case.q.shape(), [1, 0, 2, 32]);
    }

    #[test]
    fn round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.safetensors");
        let data: Vec<bf16> = (0..24).map(|i| bf16::from_f32(i as f32 / 4.0)).collect();
        let out = Tensor::from_vec(data.clone(), [1, 2, 3, 4]).unwrap();
        write_output(&path, &out, HashMap::new()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let view = file.tensor("out").unwrap();
        assert_eq!(view.dtype(), Dtype::BF16);
        assert_eq!(qkv_tensor("out", &view, false).unwrap(), out);
    }
}

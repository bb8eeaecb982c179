//! The flags of `sdpa bench` and the cases they ask for, shared by the
//! single-device and the sequence-parallel bench.

use std::path::PathBuf;

use sdpa_runtime::prelude::*;

use crate::error::{CliError, Result};
use crate::options::{BackendArg, DTypeArg};
use crate::presets::{self, Shape};

use super::workload::{self, MaskArg};

/// The flags of `sdpa bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Time one named preset row instead of the whole table of the backend
    /// in use; `--preset list` prints the names and shapes.
    #[arg(long, value_name = "NAME", conflicts_with_all = [
        "batch", "heads", "kv_heads", "seq_q", "seq_k", "head_size", "causal",
    ])]
    pub preset: Option<String>,
    /// Batch size B (with the other shape flags: time this shape only).
    #[arg(long, value_name = "B", help_heading = "Shape")]
    pub batch: Option<usize>,
    /// Query heads Hq.
    #[arg(long, value_name = "H", help_heading = "Shape")]
    pub heads: Option<usize>,
    /// Key/value heads Hkv, a divisor of --heads (GQA/MQA) [default: --heads].
    #[arg(long, value_name = "H", help_heading = "Shape")]
    pub kv_heads: Option<usize>,
    /// Query tokens Sq.
    #[arg(long, value_name = "S", help_heading = "Shape")]
    pub seq_q: Option<usize>,
    /// Key/value tokens Sk [default: --seq-q].
    #[arg(long, value_name = "S", help_heading = "Shape")]
    pub seq_k: Option<usize>,
    /// Head size D; one of the compiled sizes (`sdpa info` lists them).
    #[arg(long, value_name = "D", help_heading = "Shape")]
    pub head_size: Option<usize>,
    /// Element type of q, k, v and the output. Required with the shape
    /// flags; with presets, runs only the rows of this dtype.
    #[arg(long, value_enum, value_name = "DTYPE", help_heading = "Shape")]
    pub dtype: Option<DTypeArg>,
    /// Top-left causal masking (query i sees keys j <= i).
    #[arg(long, help_heading = "Shape")]
    pub causal: bool,
    /// The backend to time. Without this flag, the SDPA_BACKEND environment
    /// variable decides, else auto. Also picks the preset table.
    #[arg(long, value_enum, value_name = "BACKEND")]
    pub backend: Option<BackendArg>,
    /// Also write the results to FILE as a JSON array of objects with the
    /// fields shape ("BxHqxSqxSkxD"), dtype, causal, backend, median_ms,
    /// tflops, plus batch, heads_q, heads_kv, seq_q, seq_k, head_size.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also draw the results as a bar chart in FILE (SVG): throughput per
    /// case, one bar per pass (not with --world-size).
    #[arg(long, value_name = "FILE.svg", conflicts_with = "world_size")]
    pub plot: Option<PathBuf>,
    /// With --plot: draw torch's results from FILE beside ours, one bar per
    /// torch backend. FILE is a JSON array of objects with the fields shape,
    /// backend and tflops (as docs/bench/torch_gpu_masked.py writes them);
    /// rows match cases by shape "BxHqxSqxSkxD", and by dtype and causal
    /// where a row has them.
    #[arg(long, value_name = "FILE", requires = "plot")]
    pub compare: Option<PathBuf>,
    /// Untimed passes before timing [default: as many as fit in 150 ms, at
    /// least 1].
    #[arg(long, value_name = "N")]
    pub warmup: Option<usize>,
    /// Timed passes [default: by time: at least 10 passes and 1 s, stopping
    /// at 2 s once 3 passes are in; half those times per row of the preset
    /// table].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub iters: Option<u64>,
    /// Time sequence-parallel attention (FastVideo's DistributedAttention)
    /// on each of these rank counts, e.g. `1,2,4`: one GPU per rank over
    /// NCCL on CUDA, threads on the CPU. Without shape flags or a preset it
    /// times Wan2.1-14B 720p-like self-attention (1x40x75600x128, bf16);
    /// passes are counted: --warmup [default: 2] and --iters [default: 10].
    #[arg(long, value_name = "N[,N...]", value_delimiter = ',', value_parser = parse_world)]
    pub world_size: Option<Vec<usize>>,
    /// Time the backward pass (`backward_into`, after one forward with the
    /// log-sum-exp) and the forward and backward together instead of the
    /// forward, on either backend; throughput counts 2.5 and 3.5 times the
    /// forward's FLOPs.
    #[arg(long, conflicts_with = "world_size")]
    pub backward: bool,
    /// Time with an attention mask: `key-padding:F` (a [B, Sk] bool mask
    /// keeping the first F·Sk keys of every batch entry; throughput counts
    /// the kept keys only), `bool` (dense [B, 1, Sq, Sk], 90% kept at
    /// random) or `additive` (dense [B, 1, Sq, Sk] in q's dtype). On CUDA
    /// the mask lives on the device, uploaded once before timing.
    #[arg(long, value_name = "MASK", conflicts_with_all = ["world_size", "varlen"])]
    pub mask: Option<MaskArg>,
    /// Time a packed variable-length batch of sequences of these lengths
    /// (each attending within itself, Sq = Sk = its length), e.g.
    /// `--varlen 512,8192,2048`, with --heads, --head-size and --dtype
    /// (not --batch, --seq-q or --seq-k); throughput counts each sequence's
    /// own work. On CUDA the offsets live on the device with max_seqlen
    /// given, as FlashAttention's varlen callers pass them.
    #[arg(long, value_name = "LEN[,LEN...]", value_delimiter = ',',
        value_parser = workload::parse_len,
        conflicts_with_all = ["world_size", "batch", "seq_q", "seq_k", "preset"])]
    pub varlen: Option<Vec<usize>>,
}

/// One line of the results table.
pub(crate) struct Case {
    /// The preset row's name; `None` for the shape of the flags.
    pub(crate) preset: Option<&'static str>,
    /// The problem's sizes and masking.
    pub(crate) shape: Shape,
    /// The element type of q, k, v and the output.
    pub(crate) dtype: DType,
    /// The mask `--mask` asks for.
    pub(crate) mask: Option<MaskArg>,
    /// The sequence lengths of `--varlen` (`shape.batch` is their count,
    /// `shape.seq_q` and `shape.seq_k` the longest).
    pub(crate) varlen: Option<Vec<usize>>,
}

impl Case {
    /// The useful FLOPs of one forward pass: the shape's, counted on the
    /// kept keys for a key-padding mask, and per sequence for `--varlen`.
    pub(crate) fn flops(&self) -> f64 {
        let s = &self.shape;
        if let Some(lens) = &self.varlen {
            return workload::varlen_flops(lens, s.heads_q, s.head_size, s.causal);
        }
        match self.mask {
            Some(m) => s.flops() * m.kept_keys(s.seq_k) as f64 / s.seq_k.max(1) as f64,
            None => s.flops(),
        }
    }

    /// What the case computes besides its shape, for the table and JSON:
    /// `-`, the mask, or `varlen:L1/L2/...`.
    pub(crate) fn workload(&self) -> String {
        match (&self.varlen, self.mask) {
            (Some(lens), _) => format!(
                "varlen:{}",
                lens.iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join("/")
            ),
            (None, Some(m)) => m.to_string(),
            (None, None) => "-".into(),
        }
    }
}

/// Whether any flag that shapes a custom case (all but `--dtype`) was given.
pub(crate) fn has_shape_flags(args: &BenchArgs) -> bool {
    args.batch.is_some()
        || args.heads.is_some()
        || args.kv_heads.is_some()
        || args.seq_q.is_some()
        || args.seq_k.is_some()
        || args.head_size.is_some()
        || args.causal
        || args.varlen.is_some()
}

/// The cases the flags ask for: the shape flags, one preset, or the
/// backend's preset table.
pub(crate) fn cases(args: &BenchArgs, backend: BackendKind) -> Result<Vec<Case>> {
    let dtype_filter = args.dtype.map(DType::from);
    if let Some(lens) = &args.varlen {
        return varlen_case(args, lens).map(|c| vec![c]);
    }
    if has_shape_flags(args) {
        let missing: Vec<&str> = [
            ("--batch", args.batch.is_none()),
            ("--heads", args.heads.is_none()),
            ("--seq-q", args.seq_q.is_none()),
            ("--head-size", args.head_size.is_none()),
            ("--dtype", args.dtype.is_none()),
        ]
        .into_iter()
        .filter_map(|(flag, absent)| absent.then_some(flag))
        .collect();
        if !missing.is_empty() {
            return Err(CliError::Usage(format!(
                "a shape needs --batch, --heads, --seq-q, --head-size and --dtype; missing {} \
                 (or pass --preset NAME, or no shape flags for the preset table)",
                missing.join(", ")
            )));
        }
        let (heads_q, seq_q) = (args.heads.unwrap_or(0), args.seq_q.unwrap_or(0));
        let shape = Shape {
            batch: args.batch.unwrap_or(0),
            heads_q,
            heads_kv: args.kv_heads.unwrap_or(heads_q),
            seq_q,
            seq_k: args.seq_k.unwrap_or(seq_q),
            head_size: args.head_size.unwrap_or(0),
            causal: args.causal,
        };
        if shape.flops() == 0.0 {
            return Err(CliError::Usage(format!(
                "shape {shape} has no work to time; every size must be at least 1"
            )));
        }
        let dtype = dtype_filter.unwrap_or(DType::F32);
        let bytes = |seq: usize, heads: usize| {
            [shape.batch, seq, heads, shape.head_size, dtype.size_bytes()]
                .into_iter()
                .try_fold(1usize, usize::checked_mul)
        };
        if bytes(shape.seq_q, shape.heads_q).is_none()
            || bytes(shape.seq_k, shape.heads_kv).is_none()
        {
            return Err(CliError::Usage(format!(
                "shape {shape} does not fit in this machine's address space"
            )));
        }
        return Ok(vec![Case {
            preset: None,
            shape,
            dtype,
            mask: args.mask,
            varlen: None,
        }]);
    }
    let rows = match &args.preset {
        Some(name) => std::slice::from_ref(presets::find(backend, name)?),
        None => presets::table(backend),
    };
    let dtypes: Vec<DType> = presets::dtypes(backend)
        .iter()
        .copied()
        .filter(|d| dtype_filter.is_none_or(|f| f == *d))
        .collect();
    let dtypes = match (dtypes.is_empty(), dtype_filter) {
        // A dtype the table does not run by default is still timed when asked for.
        (true, Some(d)) => vec![d],
        _ => dtypes,
    };
    Ok(rows
        .iter()
        .flat_map(|p| {
            dtypes.iter().map(|&dtype| Case {
                preset: Some(p.name),
                shape: p.shape,
                dtype,
                mask: args.mask,
                varlen: None,
            })
        })
        .collect())
}

/// The case of `--varlen`: the head flags and the lengths.
fn varlen_case(args: &BenchArgs, lens: &[usize]) -> Result<Case> {
    let (Some(heads_q), Some(head_size), Some(dtype)) = (args.heads, args.head_size, args.dtype)
    else {
        return Err(CliError::Usage(
            "--varlen needs --heads, --head-size and --dtype (and takes --kv-heads, --causal)"
                .into(),
        ));
    };
    let longest = lens.iter().copied().max().unwrap_or(0);
    let shape = Shape {
        batch: lens.len(),
        heads_q,
        heads_kv: args.kv_heads.unwrap_or(heads_q),
        seq_q: longest,
        seq_k: longest,
        head_size,
        causal: args.causal,
    };
    if workload::varlen_flops(lens, heads_q, head_size, false) == 0.0 {
        return Err(CliError::Usage(format!(
            "--varlen {lens:?} with {heads_q} heads of size {head_size} has no work to time;              give at least one sequence of 1 token or more"
        )));
    }
    if workload::cu_seqlens(lens).is_none() {
        return Err(CliError::Usage(format!(
            "--varlen {lens:?} packs more than 2^31 - 1 tokens; cu_seqlens are i32"
        )));
    }
    Ok(Case {
        preset: None,
        shape,
        dtype: DType::from(dtype),
        mask: None,
        varlen: Some(lens.to_vec()),
    })
}

/// Parses one rank count of `--world-size 1,2,4`.
pub fn parse_world(text: &str) -> std::result::Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "{text:?} is not a rank count; pass counts of 1 or more, like 1,2,4"
        )),
    }
}

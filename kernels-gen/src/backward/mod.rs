//! The backward kernels: the gradients `dq`, `dk` and `dv` of attention,
//! from `q`, `k`, `v`, the forward's output `out` and row log-sum-exp
//! `lse`, and the output's gradient `dout`.
//!
//! # The launch contract
//!
//! A variant's backward is three kernels ([`BackwardKernels`]), launched in
//! order on one stream with the same arguments, those of
//! [`BACKWARD_PARAMS`] in its order:
//!
//! 1. [`BackwardKernels::preprocess`], grid `(ceil(Sq / block_m), Hq, B)`:
//!    for every query row, `delta = rowsum(dout ∘ out)` and `lse_log2 =
//!    lse · log2(e)` (`+inf` where `lse` is `-inf`: a row that sees no key,
//!    whose probabilities are then all `exp2(s - inf) = 0`), into the
//!    scratch buffers `delta` and `lse_log2`.
//! 2. [`BackwardKernels::main`], grid `(ceil(Sk / block_n), Hkv, B)`, where
//!    `block_n` is [`BackwardKernels::block_n`]: each CTA holds `block_n`
//!    keys of one K/V head and walks every query head of its group and
//!    every query block of `main.block_m` rows that sees them, recomputing
//!    `P` from `q`, `k` and `lse_log2`. `dk` and `dv` are summed in
//!    registers and written once, in the input dtype (`dk` times `scale`);
//!    each query block's share of `dq` is added to the `f32` scratch
//!    `dq_accum` in key-block order: the CTA of key block `j` waits until
//!    the block's counter in `sem` reads `j`, adds, and sets it to `j + 1`,
//!    so the sums are bit-identical run to run.
//! 3. [`BackwardKernels::convert`], grid `(ceil(Sq / block_m), Hq, B)`:
//!    `dq = dq_accum · scale` in the input dtype.
//!
//! Scratch buffers, all allocated by the caller, dense, row-major:
//!
//! - `dq_accum`: `f32 [B, Hq, Sq, D]`, zeroed before the launches;
//! - `lse_log2`, `delta`: `f32 [B, Hq, Sq]`;
//! - `sem`: `u32 [B, Hq, ceil(Sq / main.block_m)]`, zeroed before the
//!   launches.
//!
//! `q`, `k`, `v`, `out`, `dout`, `dq`, `dk` and `dv` are `[B, S, H, D]`
//! tensors with element strides (batch, token, head) and a contiguous head
//! dimension; `lse` is `f32 [B, Hq, Sq]` with strides (batch, head, query);
//! the mask is the forward's (read in place, any
//! [`crate::attention::mask::MaskKind`], null for none), and so are the
//! sequence bounds (`q_start`, `q_end`, `k_start`, `k_end`, `tokens_q`,
//! `tokens_k`: [`crate::attention::seqs`]): tensors, `lse` included, are
//! addressed at token `start + local`, while the scratch buffers are
//! indexed by local rows (`Sq` bounds every sequence). Keys of a CTA past
//! its sequence's keys and query rows past its sequence's rows take no
//! part; `dk`/`dv` rows of keys no query block reaches are written as
//! zeros.
//!
//! The CTAs of one (batch, K/V head) rely on every CTA of a lower key
//! block having been scheduled before them (as the hardware schedules a
//! grid in order of its linear index); the CTA of key block 0 never waits.

pub mod mma;
mod rows;
mod simt;

use crate::contract::{GpuKernel, ParamKind};
use crate::ptx::{BinOp, Cmp, Instr, Kernel, Operand, Reg, StateSpace, Target, Ty};
use crate::{DType, VariantSpec};

/// The backward kernels' parameters, in launch order: one table for all
/// three kernels.
pub const BACKWARD_PARAMS: [(&str, ParamKind); 58] = [
    ("q", ParamKind::Ptr),
    ("k", ParamKind::Ptr),
    ("v", ParamKind::Ptr),
    ("out", ParamKind::Ptr),
    ("dout", ParamKind::Ptr),
    ("lse", ParamKind::Ptr),
    ("mask", ParamKind::Ptr),
    ("dq", ParamKind::Ptr),
    ("dk", ParamKind::Ptr),
    ("dv", ParamKind::Ptr),
    ("dq_accum", ParamKind::Ptr),
    ("lse_log2", ParamKind::Ptr),
    ("delta", ParamKind::Ptr),
    ("sem", ParamKind::Ptr),
    ("q_start", ParamKind::Ptr),
    ("q_end", ParamKind::Ptr),
    ("k_start", ParamKind::Ptr),
    ("k_end", ParamKind::Ptr),
    ("q_stride_b", ParamKind::U64),
    ("q_stride_s", ParamKind::U64),
    ("q_stride_h", ParamKind::U64),
    ("k_stride_b", ParamKind::U64),
    ("k_stride_s", ParamKind::U64),
    ("k_stride_h", ParamKind::U64),
    ("v_stride_b", ParamKind::U64),
    ("v_stride_s", ParamKind::U64),
    ("v_stride_h", ParamKind::U64),
    ("out_stride_b", ParamKind::U64),
    ("out_stride_s", ParamKind::U64),
    ("out_stride_h", ParamKind::U64),
    ("dout_stride_b", ParamKind::U64),
    ("dout_stride_s", ParamKind::U64),
    ("dout_stride_h", ParamKind::U64),
    ("dq_stride_b", ParamKind::U64),
    ("dq_stride_s", ParamKind::U64),
    ("dq_stride_h", ParamKind::U64),
    ("dk_stride_b", ParamKind::U64),
    ("dk_stride_s", ParamKind::U64),
    ("dk_stride_h", ParamKind::U64),
    ("dv_stride_b", ParamKind::U64),
    ("dv_stride_s", ParamKind::U64),
    ("dv_stride_h", ParamKind::U64),
    ("lse_stride_b", ParamKind::U64),
    ("lse_stride_h", ParamKind::U64),
    ("lse_stride_q", ParamKind::U64),
    ("mask_stride_b", ParamKind::U64),
    ("mask_stride_h", ParamKind::U64),
    ("mask_stride_q", ParamKind::U64),
    ("seq_q", ParamKind::U32),
    ("seq_k", ParamKind::U32),
    ("tokens_q", ParamKind::U32),
    ("tokens_k", ParamKind::U32),
    ("mask_kind", ParamKind::U32),
    ("mask_pad", ParamKind::U32),
    ("heads_q", ParamKind::U32),
    ("group", ParamKind::U32),
    ("scale_log2", ParamKind::F32),
    ("scale", ParamKind::F32),
];

/// The three backward kernels of a variant and how to launch them (the
/// module docs give the contract).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackwardKernels {
    /// `delta` and `lse_log2`, per query row.
    pub preprocess: GpuKernel,
    /// `dk`, `dv` and the `dq_accum` sums, per block of
    /// [`BackwardKernels::block_n`] keys; its `block_m` is the query rows
    /// per `dq` block (the granularity of `sem`).
    pub main: GpuKernel,
    /// Keys per CTA of [`BackwardKernels::main`].
    pub block_n: u32,
    /// `dq` from `dq_accum`.
    pub convert: GpuKernel,
}

impl BackwardKernels {
    /// The architecture all three kernels target.
    pub fn target(&self) -> Target {
        self.main.target
    }
}

/// The entry name of `spec`'s backward kernel `part` (`pre`, `main`,
/// `dq`): `sdpa_bwd_d128_causal_bf16_main`.
fn entry(spec: &VariantSpec, part: &str) -> String {
    let name = spec.kernel_name();
    let stem = name.strip_prefix("sdpa_fwd").unwrap_or(&name);
    format!("sdpa_bwd{stem}_{part}")
}

/// The first token of batch entry `batch`'s sequence on the side whose
/// `start` array is `starts` (`u64`, null for whole entries) and token
/// count `tokens`: the start of [`crate::attention::seqs::sequence`] (0
/// without bounds, else `min(start[batch], tokens)`), read again where a
/// kernel would otherwise hold it in a register across its main loop.
fn sequence_start(k: &mut Kernel, starts: Reg, tokens: Reg, batch: Reg) -> Reg {
    let start = k.mov(Ty::U32, Operand::U(0));
    let given = k.setp(Cmp::Ne, Ty::U64, starts, Operand::U(0));
    let b64 = k.cvt(None, Ty::U64, Ty::U32, batch);
    let at = k.mad(Ty::U64, b64, Operand::U(4), starts);
    k.guard(
        given,
        false,
        Instr::Ld {
            space: StateSpace::GlobalNc,
            ty: Ty::U32,
            dst: vec![start],
            addr: at.into(),
        },
    );
    k.bin_to(BinOp::Min, Ty::U32, start, start, tokens);
    start
}

/// Generates the backward kernels of `spec` (portable sm_80 PTX).
pub fn generate(spec: &VariantSpec) -> BackwardKernels {
    let target = Target::Sm80;
    let (main, block_n) = match spec.dtype {
        DType::F32 => simt::main_kernel(spec, target),
        DType::F16 | DType::BF16 => mma::main_kernel(spec, target),
    };
    BackwardKernels {
        preprocess: rows::preprocess(spec, target),
        main,
        block_n,
        convert: rows::convert(spec, target),
    }
}

#[cfg(test)]
mod tests;

//! The launch contract every generated GPU kernel follows: its parameters,
//! in launch order and by name, the tensor maps of the kernels that take
//! them, the grid, and what a kernel promises about its output.
//!
//! Emitters declare the parameters with [`declare_params`] (and the tensor
//! maps, where they take them, with [`declare_tensor_maps`]) and read them by
//! name through the returned [`Params`] ([`Params::get`],
//! [`Params::strides`], or all of them at once with [`load_args`]); the
//! runtime passes them in the order of [`PARAMS`], then [`SCALE_PARAM`],
//! then, for a kernel with [`GpuKernel::tensor_maps`], the
//! [`TENSOR_MAP_PARAMS`].
//!
//! # The launch contract
//!
//! Every kernel computes one block of [`GpuKernel::block_m`] query rows of one
//! (batch, query head):
//!
//! - grid `(ceil(Sq / block_m), Hq, B)`, block `(threads, 1, 1)`, dynamic
//!   shared memory `smem_bytes` (the runtime raises the function's limit when
//!   it exceeds 48 KB); [`cta_coords`] reads the grid;
//! - parameters, in the order of [`PARAMS`]: the device pointers of `q`, `k`,
//!   `v`, `out`, the mask and the row log-sum-exp `lse`, the sequence
//!   bounds `q_start`, `q_end`, `k_start`, `k_end`, the element strides
//!   (batch, token, head) of each tensor, the mask's element strides (batch,
//!   head, query), `lse`'s element strides (batch, head, query), `Sq`, `Sk`,
//!   the tensors' token counts `tokens_q` and `tokens_k`, the mask's element
//!   kind and front padding, the GQA group size `Hq / Hkv`, and
//!   `softmax_scale · log2(e)`.
//! - Sequences ([`crate::attention::seqs`] holds the rule): batch entry `b`
//!   is one sequence of queries and one of keys. Where `q_start` is null,
//!   its query rows are tokens `[0, Sq)` of batch `b`; otherwise they are
//!   tokens `[q_start[b], q_end[b])` (`i32` arrays indexed by `b`, clamped
//!   to `[0, tokens_q]`, at most `Sq` of them), and its local row `i` is
//!   token `q_start[b] + i`. The same for keys with `k_start`, `k_end`,
//!   `tokens_k` and `Sk`. Every rule below (causal, ragged ends, rows that
//!   see no key) is in local positions, and every tensor, `lse` included,
//!   is addressed at the token `start + local`. Packed variable-length
//!   batches pass `cu_seqlens` as both arrays (`end = start + 1`) and batch
//!   strides 0; key-padding runs pass `k_start`/`k_end` over a padded
//!   layout. The grid's `Sq` is the longest sequence's bound: CTAs past
//!   their sequence's end exit. With sequence bounds the mask is null,
//!   except with `mask_batches`: key bounds made on the device from a
//!   key-only mask ([`crate::key_runs`]) come with that `i32` array
//!   indexed by batch entry, and the mask applies to the entries whose
//!   value is non-zero only (their bounds are then the whole keys). A null
//!   `mask_batches` means the mask, if any, applies to every entry.
//! - The mask, if any, is read in place: element `(b, h, i, j)` at
//!   `b · stride_b + h · stride_h + i · stride_q + (j - mask_pad)`
//!   (broadcast dimensions have stride 0, the key dimension is contiguous),
//!   keys `j < mask_pad` attend; its element kind is `mask_kind`, a
//!   [`crate::attention::mask::MaskKind`] code: an additive `f32`, `f16` or
//!   `bf16` bias, or `u8` (bool), `i32` or `i64` elements where non-zero
//!   attends. A null pointer means no mask.
//! - `lse`, if not null, is an `f32` tensor `[B, Hq, Sq]` at any element
//!   strides: every query row `i < Sq` gets `ln Σ_j exp(scale · q_i · k_j +
//!   mask_ij)` over the keys it sees, `-inf` where it sees none (the rule is
//!   [`crate::attention::store::row_lse`]). A null pointer means the caller
//!   did not ask for it: nothing is written, and the forward pays for one
//!   predicated store per row at most.
//! - Query rows that see no key are written as zeros; everything is computed
//!   in `f32`; offsets are 64-bit.

use crate::ptx::{BinOp, Kernel, Operand, Param, Reg, Special, Target, Ty};

/// The kind of a kernel parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// A device pointer (`u64`).
    Ptr,
    /// An element stride or count (`u64`).
    U64,
    /// A count (`u32`).
    U32,
    /// A float (`f32`).
    F32,
}

impl ParamKind {
    /// The PTX type the parameter is declared and loaded as.
    pub const fn ty(self) -> Ty {
        match self {
            ParamKind::Ptr | ParamKind::U64 => Ty::U64,
            ParamKind::U32 => Ty::U32,
            ParamKind::F32 => Ty::F32,
        }
    }
}

/// The kernel parameters, in launch order.
pub const PARAMS: [(&str, ParamKind); 36] = [
    ("q", ParamKind::Ptr),
    ("k", ParamKind::Ptr),
    ("v", ParamKind::Ptr),
    ("out", ParamKind::Ptr),
    ("mask", ParamKind::Ptr),
    ("lse", ParamKind::Ptr),
    ("q_start", ParamKind::Ptr),
    ("q_end", ParamKind::Ptr),
    ("k_start", ParamKind::Ptr),
    ("k_end", ParamKind::Ptr),
    ("mask_batches", ParamKind::Ptr),
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
    ("mask_stride_b", ParamKind::U64),
    ("mask_stride_h", ParamKind::U64),
    ("mask_stride_q", ParamKind::U64),
    ("lse_stride_b", ParamKind::U64),
    ("lse_stride_h", ParamKind::U64),
    ("lse_stride_q", ParamKind::U64),
    ("seq_q", ParamKind::U32),
    ("seq_k", ParamKind::U32),
    ("tokens_q", ParamKind::U32),
    ("tokens_k", ParamKind::U32),
    ("mask_kind", ParamKind::U32),
    ("mask_pad", ParamKind::U32),
    ("group", ParamKind::U32),
];

/// The last parameter, after [`PARAMS`]: `softmax_scale · log2(e)`.
pub const SCALE_PARAM: (&str, ParamKind) = ("scale_log2", ParamKind::F32);

/// The tensor maps a kernel with [`GpuKernel::tensor_maps`] takes after
/// [`SCALE_PARAM`], in this order: those of `q`, `k` and `v`. Each is a
/// 128-byte `CUtensorMap` passed by value, declared by
/// [`declare_tensor_maps`] and encoded by the runtime with
/// `cuTensorMapEncodeTiled` as [`TensorMaps`] describes.
pub const TENSOR_MAP_PARAMS: [&str; 3] = ["tmap_q", "tmap_k", "tmap_v"];

/// Declares the tensor-map parameters on `k`, after the contract's
/// ([`declare_params`]): the [`TENSOR_MAP_PARAMS`] in their order, each a
/// 128-byte `CUtensorMap` passed by value, `.param .align 64 .b8 NAME[128]`.
pub fn declare_tensor_maps(k: &mut Kernel) -> Vec<Param> {
    TENSOR_MAP_PARAMS
        .iter()
        .map(|name| k.param_bytes(name, 64, 128))
        .collect()
}

/// How the runtime encodes the tensor maps of a kernel that loads its tiles
/// with the Tensor Memory Accelerator (TMA).
///
/// Every map covers one whole input tensor as a 4-D tiled tensor, innermost
/// dimension first: `[D, S, H, B]` (head dimension, tokens, heads, batch),
/// whose byte strides are the tensor's token, head and batch strides (the
/// head dimension is contiguous). The element type is the variant's 16-bit
/// type, the box is `[64, rows, 1, 1]` (one 64-column, 128-byte panel of
/// `rows` tokens of one head), with the 128-byte swizzle, no interleave and
/// out-of-bounds elements read as zero (`CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE`).
///
/// The kernel addresses a box by its coordinates `(column, token, head,
/// batch)`; it never relies on more than the tensor's own elements.
/// Tensors whose strides a map cannot describe (a byte stride not a
/// multiple of 16, a base address not 16-byte aligned) must run another
/// kernel of the variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMaps {
    /// Tokens per box of the `q` map.
    pub q_rows: u32,
    /// Tokens per box of the `k` and `v` maps.
    pub kv_rows: u32,
}

/// The 64-element (128-byte) inner extent of every [`TensorMaps`] box.
pub const TENSOR_MAP_BOX_COLUMNS: u32 = 64;

/// A generated GPU kernel and how to launch it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuKernel {
    /// The PTX module text.
    pub ptx: String,
    /// The entry point's name.
    pub entry: String,
    /// The architecture the PTX targets ([`Target::runs_on`] says which
    /// devices can load it).
    pub target: Target,
    /// Query rows per CTA.
    pub block_m: u32,
    /// Threads per CTA.
    pub threads: u32,
    /// Dynamic shared memory per CTA, in bytes, of a launch without a mask.
    pub smem_bytes: u32,
    /// The dynamic shared memory a launch with a mask adds, in bytes (0
    /// for most kernels): a kernel that stages the mask in shared memory
    /// keeps that tile last and touches it only when a mask is passed, so
    /// launches without one need no more than [`GpuKernel::smem_bytes`].
    pub mask_smem_bytes: u32,
    /// The tensor maps the kernel takes after the contract's parameters
    /// ([`TENSOR_MAP_PARAMS`]), or `None` where it takes none.
    pub tensor_maps: Option<TensorMaps>,
}

/// A launch contract's parameters as declared on one kernel, read by name.
#[derive(Clone, Debug)]
pub struct Params {
    /// The contract's table, in launch order.
    table: Vec<(&'static str, ParamKind)>,
    /// The declared parameters, one per entry of `table`.
    declared: Vec<Param>,
}

/// Declares the forward contract's parameters on `k`, in launch order
/// ([`PARAMS`], then [`SCALE_PARAM`]).
pub fn declare_params(k: &mut Kernel) -> Params {
    declare_table(k, PARAMS.iter().chain([&SCALE_PARAM]).copied())
}

/// Declares the parameters of the contract `table` on `k`, in its order
/// (the backward kernels' table is
/// [`crate::backward::BACKWARD_PARAMS`]).
pub fn declare_table(
    k: &mut Kernel,
    table: impl IntoIterator<Item = (&'static str, ParamKind)>,
) -> Params {
    let table: Vec<_> = table.into_iter().collect();
    let declared = table
        .iter()
        .map(|&(name, kind)| k.param(kind.ty(), name))
        .collect();
    Params { table, declared }
}

impl Params {
    /// Loads the parameter `name` (one of the contract's) into a fresh
    /// register of its kind's type: one `ld.param` per call.
    ///
    /// # Panics
    ///
    /// If the contract has no parameter `name`.
    pub fn get(&self, k: &mut Kernel, name: &str) -> Reg {
        let (i, &(_, kind)) = self
            .table
            .iter()
            .enumerate()
            .find(|(_, p)| p.0 == name)
            .unwrap_or_else(|| panic!("the launch contract has no parameter {name}"));
        k.ld_param(kind.ty(), &self.declared[i])
    }

    /// Loads the three strides of tensor `t`, in their launch order: batch,
    /// token, head for the `[B, S, H, D]` tensors; batch, head, query for
    /// `mask` and `lse`.
    pub fn strides(&self, k: &mut Kernel, t: &str) -> [Reg; 3] {
        let dims = if t == "mask" || t == "lse" {
            ["b", "h", "q"]
        } else {
            ["b", "s", "h"]
        };
        dims.map(|s| self.get(k, &format!("{t}_stride_{s}")))
    }
}

/// The contract's parameters loaded into registers, by name.
#[derive(Clone, Copy, Debug)]
pub struct Args {
    /// `q`'s device pointer.
    pub q: Reg,
    /// `k`'s device pointer.
    pub k: Reg,
    /// `v`'s device pointer.
    pub v: Reg,
    /// The output's device pointer.
    pub out: Reg,
    /// The mask's device pointer (null: no mask).
    pub mask: Reg,
    /// The row log-sum-exp's device pointer (null: not written).
    pub lse: Reg,
    /// `q`'s element strides: batch, token, head.
    pub q_strides: [Reg; 3],
    /// `k`'s element strides.
    pub k_strides: [Reg; 3],
    /// `v`'s element strides.
    pub v_strides: [Reg; 3],
    /// The output's element strides.
    pub out_strides: [Reg; 3],
    /// The mask's element strides: batch, head, query.
    pub mask_strides: [Reg; 3],
    /// The row log-sum-exp's element strides: batch, head, query.
    pub lse_strides: [Reg; 3],
    /// The sequence bounds: `q_start`, `q_end`, `k_start`, `k_end` (null:
    /// every batch entry is one whole sequence).
    pub seq_bounds: [Reg; 4],
    /// The batch entries the mask applies to (null: all).
    pub mask_batches: Reg,
    /// `Sq`.
    pub seq_q: Reg,
    /// `Sk`.
    pub seq_k: Reg,
    /// The token counts of `q` and of `k`/`v`: `[tokens_q, tokens_k]`.
    pub tokens: [Reg; 2],
    /// The mask's [`crate::attention::mask::MaskKind`] code.
    pub mask_kind: Reg,
    /// The mask's front padding: keys before it attend.
    pub mask_pad: Reg,
    /// `Hq / Hkv`.
    pub group: Reg,
    /// `softmax_scale · log2(e)`.
    pub scale_log2: Reg,
}

/// Loads every parameter of `params`, by name, in launch order.
pub fn load_args(k: &mut Kernel, params: &Params) -> Args {
    Args {
        q: params.get(k, "q"),
        k: params.get(k, "k"),
        v: params.get(k, "v"),
        out: params.get(k, "out"),
        mask: params.get(k, "mask"),
        lse: params.get(k, "lse"),
        seq_bounds: ["q_start", "q_end", "k_start", "k_end"].map(|n| params.get(k, n)),
        mask_batches: params.get(k, "mask_batches"),
        q_strides: params.strides(k, "q"),
        k_strides: params.strides(k, "k"),
        v_strides: params.strides(k, "v"),
        out_strides: params.strides(k, "out"),
        mask_strides: params.strides(k, "mask"),
        lse_strides: params.strides(k, "lse"),
        seq_q: params.get(k, "seq_q"),
        seq_k: params.get(k, "seq_k"),
        tokens: ["tokens_q", "tokens_k"].map(|n| params.get(k, n)),
        mask_kind: params.get(k, "mask_kind"),
        mask_pad: params.get(k, "mask_pad"),
        group: params.get(k, "group"),
        scale_log2: params.get(k, SCALE_PARAM.0),
    }
}

/// The K/V head that query head `head` reads: `head / group`, where
/// `group = Hq / Hkv` query heads share one K/V head (grouped-query
/// attention; `group` 1 is multi-head attention).
pub fn kv_head(k: &mut Kernel, head: Reg, group: Reg) -> Reg {
    k.bin(BinOp::Div, Ty::U32, head, group)
}

/// The element offset of one (batch, head) of a tensor or the mask:
/// `batch · stride_b + head · stride_h`, from `batch` and `head` widened to
/// 64 bits.
pub fn head_offset(k: &mut Kernel, batch64: Reg, head64: Reg, stride_b: Reg, stride_h: Reg) -> Reg {
    let off = k.bin(BinOp::Mul, Ty::U64, batch64, stride_b);
    k.mad(Ty::U64, head64, stride_h, off)
}

/// How [`tensor_head_wide`] turns element offsets into byte offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteScale {
    /// The base by one `mad` (`offset · elem_bytes + ptr`), the stride by a
    /// `mul`.
    Mad,
    /// The base by a shift and an add (`(offset << log2 elem_bytes) +
    /// ptr`), the stride by a shift; `elem_bytes` a power of two.
    Shift,
}

/// The byte address of element `[batch, 0, head, 0]` of a tensor whose
/// element strides are `strides` (batch, token, head) and elements
/// `elem_bytes` wide, and its token stride in bytes: `(base, stride)`.
pub fn tensor_head(
    k: &mut Kernel,
    ptr: Reg,
    strides: [Reg; 3],
    batch: Reg,
    head: Reg,
    elem_bytes: u64,
) -> (Reg, Reg) {
    let b64 = k.cvt(None, Ty::U64, Ty::U32, batch);
    let h64 = k.cvt(None, Ty::U64, Ty::U32, head);
    tensor_head_wide(k, ptr, strides, b64, h64, elem_bytes, ByteScale::Mad)
}

/// [`tensor_head`] from `batch` and `head` already widened to 64 bits (a
/// kernel that widens them once for several tensors), scaling to bytes as
/// `scale` says.
///
/// # Panics
///
/// With [`ByteScale::Shift`], if `elem_bytes` is not a power of two.
pub fn tensor_head_wide(
    k: &mut Kernel,
    ptr: Reg,
    strides: [Reg; 3],
    batch64: Reg,
    head64: Reg,
    elem_bytes: u64,
    scale: ByteScale,
) -> (Reg, Reg) {
    let off = head_offset(k, batch64, head64, strides[0], strides[2]);
    match scale {
        ByteScale::Mad => {
            let base = k.mad(Ty::U64, off, Operand::U(elem_bytes), ptr);
            let stride = k.bin(BinOp::Mul, Ty::U64, strides[1], Operand::U(elem_bytes));
            (base, stride)
        }
        ByteScale::Shift => {
            assert!(elem_bytes.is_power_of_two(), "{elem_bytes}-byte elements");
            let shift = Operand::U(elem_bytes.trailing_zeros() as u64);
            let off = k.bin(BinOp::Shl, Ty::U64, off, shift.clone());
            let base = k.bin(BinOp::Add, Ty::U64, off, ptr);
            let stride = k.bin(BinOp::Shl, Ty::U64, strides[1], shift);
            (base, stride)
        }
    }
}

/// The thread index and the CTA's query block, head and batch, from the
/// grid of the contract. With `last_block_first` (the causal tensor-core
/// kernels) query blocks are taken last first: the last blocks see the
/// most keys, so the short ones fill the grid's tail.
pub fn cta_coords(k: &mut Kernel, last_block_first: bool) -> (Reg, Reg, Reg, Reg) {
    let tid = k.mov(Ty::U32, Operand::Special(Special::TidX));
    let qblock = k.mov(Ty::U32, Operand::Special(Special::CtaIdX));
    let qblock = if last_block_first {
        let blocks = k.mov(Ty::U32, Operand::Special(Special::NCtaIdX));
        let last = k.bin(BinOp::Sub, Ty::U32, blocks, Operand::U(1));
        k.bin(BinOp::Sub, Ty::U32, last, qblock)
    } else {
        qblock
    };
    let (head, batch) = cta_head_batch(k);
    (tid, qblock, head, batch)
}

/// The CTA's query head and batch entry, read from the grid: an epilogue
/// reads them again rather than hold registers for them across its main
/// loop.
pub fn cta_head_batch(k: &mut Kernel) -> (Reg, Reg) {
    let head = k.mov(Ty::U32, Operand::Special(Special::CtaIdY));
    let batch = k.mov(Ty::U32, Operand::Special(Special::CtaIdZ));
    (head, batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_load_by_name_as_their_kind() {
        let mut k = Kernel::new("t");
        let p = declare_params(&mut k);
        let _ = load_args(&mut k, &p);
        let _ = p.get(&mut k, "seq_q");
        let text = crate::ptx::Module::new(Target::Sm80).kernel(k).to_string();
        let loads: Vec<&str> = text.lines().filter(|l| l.contains("ld.param")).collect();
        // Every parameter once by `load_args`, in launch order, then the
        // by-name load again.
        assert_eq!(loads.len(), PARAMS.len() + 2);
        for (line, (name, kind)) in loads.iter().zip(PARAMS.iter().chain([&SCALE_PARAM])) {
            assert!(line.contains(&format!("ld.param{} ", kind.ty())), "{line}");
            assert!(line.ends_with(&format!("[t_{name}];")), "{line}");
        }
        assert!(loads[PARAMS.len() + 1].contains("ld.param.u32 %r7, [t_seq_q];"));
    }

    #[test]
    #[should_panic(expected = "no parameter heads")]
    fn unknown_parameters_are_refused() {
        let mut k = Kernel::new("t");
        declare_params(&mut k).get(&mut k, "heads");
    }
}

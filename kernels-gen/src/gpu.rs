//! GPU kernels for a variant: the launch contract every generated kernel
//! follows, and the dispatch from a [`VariantSpec`] to the emitter that
//! writes its PTX.
//!
//! # The launch contract
//!
//! Every kernel computes one block of [`GpuKernel::block_m`] query rows of one
//! (batch, query head):
//!
//! - grid `(ceil(Sq / block_m), Hq, B)`, block `(threads, 1, 1)`, dynamic
//!   shared memory `smem_bytes` (the runtime raises the function's limit when
//!   it exceeds 48 KB);
//! - parameters, in the order of [`PARAMS`]: the device pointers of `q`, `k`,
//!   `v`, `out` and the mask, the element strides (batch, token, head) of each
//!   tensor, the mask's element strides (batch, head, query), `Sq`, `Sk`, the
//!   GQA group size `Hq / Hkv`, and `softmax_scale · log2(e)`.
//! - The mask, if any, is a dense `f32` additive bias whose rows have exactly
//!   `Sk` contiguous entries (the runtime normalises bool, integer and short
//!   masks into it); a null pointer means no mask. Broadcast dimensions have
//!   stride 0.
//! - Query rows that see no key are written as zeros; everything is computed
//!   in `f32`; offsets are 64-bit.

use crate::ptx::{BinOp, Kernel, Operand, Param, Reg, Special, Target, Ty};
use crate::{DType, VariantSpec};

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

/// The kernel parameters, in launch order.
pub const PARAMS: [(&str, ParamKind); 23] = [
    ("q", ParamKind::Ptr),
    ("k", ParamKind::Ptr),
    ("v", ParamKind::Ptr),
    ("out", ParamKind::Ptr),
    ("mask", ParamKind::Ptr),
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
    ("seq_q", ParamKind::U32),
    ("seq_k", ParamKind::U32),
    ("group", ParamKind::U32),
];

/// The last parameter, after [`PARAMS`]: `softmax_scale · log2(e)`.
pub const SCALE_PARAM: (&str, ParamKind) = ("scale_log2", ParamKind::F32);

/// The tensor maps a kernel with [`GpuKernel::tensor_maps`] takes after
/// [`SCALE_PARAM`], in this order: those of `q`, `k` and `v`. Each is a
/// 128-byte `CUtensorMap` passed by value (`.param .align 64 .b8 [128]`),
/// encoded by the runtime with `cuTensorMapEncodeTiled` as
/// [`TensorMaps`] describes.
pub const TENSOR_MAP_PARAMS: [&str; 3] = ["tmap_q", "tmap_k", "tmap_v"];

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

/// The parameters a [`GpuKernel::persistent`] kernel takes last (after
/// its tensor maps, if any): the query heads `Hq` and the batch `B`, which
/// its grid no longer carries.
pub const PERSISTENT_PARAMS: [(&str, ParamKind); 2] =
    [("heads", ParamKind::U32), ("batch", ParamKind::U32)];

/// The 64-element (128-byte) inner extent of every [`TensorMaps`] box.
pub const TENSOR_MAP_BOX_COLUMNS: u32 = 64;

/// A generated GPU kernel and how to launch it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuKernel {
    /// The PTX module text.
    pub ptx: String,
    /// The entry point's name.
    pub entry: String,
    /// The architecture the PTX targets.
    pub target: Target,
    /// Query rows per CTA.
    pub block_m: u32,
    /// Threads per CTA.
    pub threads: u32,
    /// Dynamic shared memory per CTA, in bytes.
    pub smem_bytes: u32,
    /// The tensor maps the kernel takes after the contract's parameters
    /// ([`TENSOR_MAP_PARAMS`]), or `None` where it takes none.
    pub tensor_maps: Option<TensorMaps>,
    /// The kernel loops over the contract's tiles (query block, head,
    /// batch) itself, CTA `i` taking tiles `i`, `i + gridDim.x`, ... in the
    /// grid's order: launch it with a grid of `(min(tiles, SMs), 1, 1)`
    /// (one CTA per SM; any positive count is correct) and
    /// [`PERSISTENT_PARAMS`] last.
    pub persistent: bool,
}

/// Declares the contract's parameters on `k`, in order, returning them.
pub fn declare_params(k: &mut Kernel) -> Vec<Param> {
    let mut out: Vec<_> = PARAMS
        .iter()
        .map(|&(name, kind)| {
            let ty = match kind {
                ParamKind::Ptr | ParamKind::U64 => Ty::U64,
                ParamKind::U32 => Ty::U32,
                ParamKind::F32 => Ty::F32,
            };
            k.param(ty, name)
        })
        .collect();
    out.push(k.param(Ty::F32, SCALE_PARAM.0));
    out
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
    /// `Sq`.
    pub seq_q: Reg,
    /// `Sk`.
    pub seq_k: Reg,
    /// `Hq / Hkv`.
    pub group: Reg,
    /// `softmax_scale · log2(e)`.
    pub scale_log2: Reg,
}

/// Loads every parameter [`declare_params`] declared, in order, each as its
/// kind's type.
pub fn load_args(k: &mut Kernel, params: &[Param]) -> Args {
    let kinds = PARAMS.iter().chain([&SCALE_PARAM]).map(|&(_, kind)| kind);
    let p: Vec<_> = params
        .iter()
        .zip(kinds)
        .map(|(prm, kind)| {
            let ty = match kind {
                ParamKind::Ptr | ParamKind::U64 => Ty::U64,
                ParamKind::U32 => Ty::U32,
                ParamKind::F32 => Ty::F32,
            };
            k.ld_param(ty, prm)
        })
        .collect();
    let strides = |i: usize| [p[5 + 3 * i], p[6 + 3 * i], p[7 + 3 * i]];
    Args {
        q: p[0],
        k: p[1],
        v: p[2],
        out: p[3],
        mask: p[4],
        q_strides: strides(0),
        k_strides: strides(1),
        v_strides: strides(2),
        out_strides: strides(3),
        mask_strides: strides(4),
        seq_q: p[20],
        seq_k: p[21],
        group: p[22],
        scale_log2: p[23],
    }
}

/// The thread index and the CTA's query block, head and batch, from the
/// grid of the contract. Causal kernels take query blocks last first: the
/// last blocks see the most keys, so the short ones fill the grid's tail.
pub fn cta_coords(k: &mut Kernel, causal: bool) -> (Reg, Reg, Reg, Reg) {
    let tid = k.mov(Ty::U32, Operand::Special(Special::TidX));
    let qblock = k.mov(Ty::U32, Operand::Special(Special::CtaIdX));
    let qblock = if causal {
        let blocks = k.mov(Ty::U32, Operand::Special(Special::NCtaIdX));
        let last = k.bin(BinOp::Sub, Ty::U32, blocks, Operand::U(1));
        k.bin(BinOp::Sub, Ty::U32, last, qblock)
    } else {
        qblock
    };
    let head = k.mov(Ty::U32, Operand::Special(Special::CtaIdY));
    let batch = k.mov(Ty::U32, Operand::Special(Special::CtaIdZ));
    (tid, qblock, head, batch)
}

/// Stores one output row fragment: each `(lo, hi)` pair of f32 accumulators
/// times `inv`, rounded to the 16-bit `packed` type, as one 32-bit store at
/// `addr + 16·t` for the `t`-th pair, where the row is `inside` the
/// sequence. The epilogue of both tensor-core emitters.
pub fn store_scaled_pairs(
    k: &mut Kernel,
    pairs: impl IntoIterator<Item = (Reg, Reg)>,
    inv: Reg,
    addr: Reg,
    inside: Reg,
    packed: Ty,
) {
    use crate::ptx::{Addr, Instr, StateSpace};
    for (t, (lo, hi)) in pairs.into_iter().enumerate() {
        let x0 = k.bin(BinOp::Mul, Ty::F32, lo, inv);
        let x1 = k.bin(BinOp::Mul, Ty::F32, hi, inv);
        let pk = k.reg(Ty::B32);
        k.push(Instr::CvtPack {
            ty: packed,
            dst: pk,
            hi: x1,
            lo: x0,
        });
        k.guard(
            inside,
            false,
            Instr::St {
                space: StateSpace::Global,
                ty: Ty::B32,
                addr: Addr::at(addr, (t * 16) as i64),
                src: vec![pk],
            },
        );
    }
}

/// Generates the GPU kernel of `spec` for `target`.
pub fn generate(spec: &VariantSpec, target: Target) -> GpuKernel {
    match spec.dtype {
        DType::F32 => crate::simt::generate(spec, target),
        DType::F16 | DType::BF16 => crate::fa2::generate(spec, target),
    }
}

/// Generates the Hopper (sm_90a, `wgmma`) kernel of `spec`, or `None` where
/// there is none (32-bit elements, head sizes not in
/// [`crate::sm90::HEAD_SIZES`]: 48, 64, 80, 96, 112, 128, 160, 192, 224,
/// 256): use [`generate`] then. Same parameters and launch contract.
pub fn generate_sm90(spec: &VariantSpec) -> Option<GpuKernel> {
    crate::sm90::generate(spec)
}

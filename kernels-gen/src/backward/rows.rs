//! The row kernels around the backward's main kernel: the preprocess
//! (`delta = rowsum(dout ∘ out)` and `lse_log2`) and the conversion of the
//! `f32` `dq` sums into the input dtype. One warp per query row, each lane
//! two adjacent elements of the head dimension at a time. Rows are local
//! to their batch entry's sequence ([`crate::attention::seqs`]): the
//! tensors (`lse` included) are read and written at the row's token, the
//! scratch buffers at the local row; warps past the sequence's rows exit.

use super::BACKWARD_PARAMS;
use crate::attention::seqs::{sequence, Side};
use crate::contract::{declare_table, tensor_head, GpuKernel, Params};
use crate::ptx::{Addr, BinOp, Cmp, Instr, Kernel, Module, Operand, Reg, StateSpace, Target, Ty};
use crate::{DType, VariantSpec};

/// Warps (query rows) per CTA of the row kernels.
const ROWS_PER_CTA: usize = 8;

const LOG2E: f32 = std::f32::consts::LOG2_E;

/// A warp's query row and its place in the dense `[B, Hq, Sq]` scratch.
struct Row {
    /// The lane.
    lane: Reg,
    /// The query row's token: its sequence's start plus the local row.
    token: Reg,
    /// The batch.
    batch: Reg,
    /// The query head.
    head: Reg,
    /// `(batch · Hq + head) · Sq + row` (the local row), 64-bit: its index in the
    /// dense `[B, Hq, Sq]` scratch.
    dense: Reg,
}

/// Declares the contract, reads the grid and exits the warps whose row is
/// past their sequence's query rows.
fn begin(k: &mut Kernel) -> (Params, Row) {
    let params = declare_table(k, BACKWARD_PARAMS);
    k.launch_bounds((ROWS_PER_CTA * 32) as u32, None);
    let (tid, block, head, batch) = crate::contract::cta_coords(k, false);
    let lane = k.bin(BinOp::And, Ty::U32, tid, Operand::U(31));
    let warp = k.bin(BinOp::Shr, Ty::U32, tid, Operand::U(5));
    let row = k.mad(Ty::U32, block, Operand::U(ROWS_PER_CTA as u64), warp);
    let seq_q = params.get(k, "seq_q");
    let side = Side {
        starts: params.get(k, "q_start"),
        ends: params.get(k, "q_end"),
        tokens: params.get(k, "tokens_q"),
        bound: seq_q,
    };
    let seq = sequence(k, side, batch);
    let past = k.setp(Cmp::Ge, Ty::U32, row, seq.len);
    k.guard(past, false, Instr::Ret);
    let token = k.bin(BinOp::Add, Ty::U32, seq.start, row);
    let heads_q = params.get(k, "heads_q");
    let bh = k.mad(Ty::U32, batch, heads_q, head);
    let bh64 = k.cvt(None, Ty::U64, Ty::U32, bh);
    let sq64 = k.cvt(None, Ty::U64, Ty::U32, seq_q);
    let row64 = k.cvt(None, Ty::U64, Ty::U32, row);
    let dense = k.mad(Ty::U64, bh64, sq64, row64);
    (
        params,
        Row {
            lane,
            token,
            batch,
            head,
            dense,
        },
    )
}

/// The byte address of the row's token of tensor `name` at this (batch,
/// head).
fn tensor_row(k: &mut Kernel, params: &Params, name: &str, r: &Row, elem: u64) -> Reg {
    let ptr = params.get(k, name);
    let strides = params.strides(k, name);
    let (base, stride) = tensor_head(k, ptr, strides, r.batch, r.head, elem);
    let row64 = k.cvt(None, Ty::U64, Ty::U32, r.token);
    k.mad(Ty::U64, row64, stride, base)
}

/// The element pairs lane `lane` handles: pair `lane + 32 · t` for each
/// `t`, with whether it exists (`None`: always).
fn pairs(k: &mut Kernel, lane: Reg, d: usize) -> Vec<(Reg, Option<Reg>)> {
    let n_pairs = d / 2;
    (0..n_pairs.div_ceil(32))
        .map(|t| {
            let pair = k.bin(BinOp::Add, Ty::U32, lane, Operand::U(32 * t as u64));
            let exists = (32 * (t + 1) > n_pairs)
                .then(|| k.setp(Cmp::Lt, Ty::U32, pair, Operand::U(n_pairs as u64)));
            (pair, exists)
        })
        .collect()
}

/// Loads the two elements of `dtype` at `addr` as `f32` (zeros where
/// `pred` does not hold).
fn load_pair(k: &mut Kernel, dtype: DType, addr: Reg, pred: Option<Reg>) -> [Reg; 2] {
    let guarded = |k: &mut Kernel, i: Instr| match pred {
        Some(p) => k.guard(p, false, i),
        None => k.push(i),
    };
    match dtype {
        DType::F32 => {
            let v = [0, 1].map(|_| k.mov(Ty::F32, Operand::F32(0.0)));
            let ld = Instr::Ld {
                space: StateSpace::Global,
                ty: Ty::F32,
                dst: v.to_vec(),
                addr: Addr::at(addr, 0),
            };
            guarded(k, ld);
            v
        }
        DType::BF16 | DType::F16 => {
            let w = k.mov(Ty::B32, Operand::U(0));
            let ld = Instr::Ld {
                space: StateSpace::Global,
                ty: Ty::B32,
                dst: vec![w],
                addr: Addr::at(addr, 0),
            };
            guarded(k, ld);
            if dtype == DType::BF16 {
                // bf16 is the upper half of an f32: shifts are exact.
                let lo_bits = k.bin(BinOp::Shl, Ty::B32, w, Operand::U(16));
                let hi_bits = k.bin(BinOp::And, Ty::B32, w, Operand::U(0xFFFF_0000));
                [lo_bits, hi_bits].map(|b| k.mov(Ty::F32, b))
            } else {
                let (lo, hi) = (k.reg(Ty::B16), k.reg(Ty::B16));
                k.push(Instr::Unpack { lo, hi, src: w });
                [lo, hi].map(|h| k.cvt(None, Ty::F32, Ty::F16, h))
            }
        }
    }
}

/// Stores two `f32` as elements of `dtype` at `addr` (rounded to nearest)
/// where `pred` holds.
fn store_pair(k: &mut Kernel, dtype: DType, addr: Reg, pred: Option<Reg>, v: [Reg; 2]) {
    let st = match dtype {
        DType::F32 => Instr::St {
            space: StateSpace::Global,
            ty: Ty::F32,
            addr: Addr::at(addr, 0),
            src: v.to_vec(),
        },
        DType::BF16 | DType::F16 => {
            let ty = if dtype == DType::BF16 {
                Ty::BF16x2
            } else {
                Ty::F16x2
            };
            let w = k.reg(Ty::B32);
            k.push(Instr::CvtPack {
                ty,
                dst: w,
                hi: v[1],
                lo: v[0],
            });
            Instr::St {
                space: StateSpace::Global,
                ty: Ty::B32,
                addr: Addr::at(addr, 0),
                src: vec![w],
            }
        }
    };
    match pred {
        Some(p) => k.guard(p, false, st),
        None => k.push(st),
    }
}

/// Stores the `f32` `value` at global `addr` where `pred` holds.
fn store_f32_if(k: &mut Kernel, pred: Reg, addr: Reg, value: Reg) {
    k.guard(
        pred,
        false,
        Instr::St {
            space: StateSpace::Global,
            ty: Ty::F32,
            addr: Addr::at(addr, 0),
            src: vec![value],
        },
    );
}

/// Sums `x` over the warp (butterfly: every lane gets the same bits).
fn warp_sum(k: &mut Kernel, mut x: Reg) -> Reg {
    for mask in [16, 8, 4, 2, 1] {
        let other = k.reg(Ty::F32);
        k.push(Instr::ShflBfly {
            dst: other,
            src: x,
            lane_mask: mask,
        });
        x = k.bin(BinOp::Add, Ty::F32, x, other);
    }
    x
}

/// A row kernel's launch description.
fn kernel(target: Target, entry: String, k: Kernel) -> GpuKernel {
    GpuKernel {
        ptx: Module::new(target).kernel(k).to_string(),
        entry,
        target,
        block_m: ROWS_PER_CTA as u32,
        threads: (ROWS_PER_CTA * 32) as u32,
        smem_bytes: 0,
        mask_smem_bytes: 0,
        tensor_maps: None,
    }
}

/// The preprocess kernel: `delta = rowsum(dout ∘ out)` and `lse_log2 =
/// lse · log2(e)` (`+inf` for `lse = -inf`) per query row.
pub(super) fn preprocess(spec: &VariantSpec, target: Target) -> GpuKernel {
    kernel(target, super::entry(spec, "pre"), preprocess_body(spec))
}

/// The instructions of [`preprocess`].
pub(super) fn preprocess_body(spec: &VariantSpec) -> Kernel {
    let mut k = Kernel::new(super::entry(spec, "pre"));
    k.comment(format!(
        "backward preprocess: delta = rowsum(dout * out), lse in log2; d={} {}",
        spec.head_size, spec.dtype
    ));
    let (params, r) = begin(&mut k);
    let elem = spec.dtype.size_bytes() as u64;
    let o_row = tensor_row(&mut k, &params, "out", &r, elem);
    let do_row = tensor_row(&mut k, &params, "dout", &r, elem);
    let mut acc = k.mov(Ty::F32, Operand::F32(0.0));
    for (pair, exists) in pairs(&mut k, r.lane, spec.head_size) {
        let off = k.bin(BinOp::MulWide, Ty::U32, pair, Operand::U(2 * elem));
        let oa = k.bin(BinOp::Add, Ty::U64, o_row, off);
        let da = k.bin(BinOp::Add, Ty::U64, do_row, off);
        let o = load_pair(&mut k, spec.dtype, oa, exists);
        let d = load_pair(&mut k, spec.dtype, da, exists);
        acc = k.mad(Ty::F32, o[0], d[0], acc);
        acc = k.mad(Ty::F32, o[1], d[1], acc);
    }
    let delta = warp_sum(&mut k, acc);
    let lead = k.setp(Cmp::Eq, Ty::U32, r.lane, Operand::U(0));
    let dense4 = k.bin(BinOp::Shl, Ty::U64, r.dense, Operand::U(2));
    let delta_ptr = params.get(&mut k, "delta");
    let delta_addr = k.bin(BinOp::Add, Ty::U64, delta_ptr, dense4);
    store_f32_if(&mut k, lead, delta_addr, delta);
    // lse[b, h, token] through its strides.
    let lse_ptr = params.get(&mut k, "lse");
    let [lsb, lsh, lsq] = params.strides(&mut k, "lse");
    let b64 = k.cvt(None, Ty::U64, Ty::U32, r.batch);
    let h64 = k.cvt(None, Ty::U64, Ty::U32, r.head);
    let row64 = k.cvt(None, Ty::U64, Ty::U32, r.token);
    let off = crate::contract::head_offset(&mut k, b64, h64, lsb, lsh);
    let off = k.mad(Ty::U64, row64, lsq, off);
    let lse_addr = k.mad(Ty::U64, off, Operand::U(4), lse_ptr);
    let lse = k.mov(Ty::F32, Operand::F32(0.0));
    k.guard(
        lead,
        false,
        Instr::Ld {
            space: StateSpace::Global,
            ty: Ty::F32,
            dst: vec![lse],
            addr: Addr::at(lse_addr, 0),
        },
    );
    let lse2 = k.bin(BinOp::Mul, Ty::F32, lse, Operand::F32(LOG2E));
    let none = k.setp(Cmp::Eq, Ty::F32, lse, Operand::F32(f32::NEG_INFINITY));
    k.selp_to(Ty::F32, lse2, Operand::F32(f32::INFINITY), lse2, none);
    let lse2_ptr = params.get(&mut k, "lse_log2");
    let lse2_addr = k.bin(BinOp::Add, Ty::U64, lse2_ptr, dense4);
    store_f32_if(&mut k, lead, lse2_addr, lse2);
    k.push(Instr::Ret);
    k
}

/// The conversion kernel: `dq = dq_accum · scale` in the input dtype.
pub(super) fn convert(spec: &VariantSpec, target: Target) -> GpuKernel {
    kernel(target, super::entry(spec, "dq"), convert_body(spec))
}

/// The instructions of [`convert`].
pub(super) fn convert_body(spec: &VariantSpec) -> Kernel {
    let mut k = Kernel::new(super::entry(spec, "dq"));
    k.comment(format!(
        "backward dq: dq = dq_accum * scale; d={} {}",
        spec.head_size, spec.dtype
    ));
    let (params, r) = begin(&mut k);
    let elem = spec.dtype.size_bytes() as u64;
    let d = spec.head_size as u64;
    let dq_row = tensor_row(&mut k, &params, "dq", &r, elem);
    let accum = params.get(&mut k, "dq_accum");
    let acc_row = k.bin(BinOp::Mul, Ty::U64, r.dense, Operand::U(4 * d));
    let acc_row = k.bin(BinOp::Add, Ty::U64, acc_row, accum);
    let scale = params.get(&mut k, "scale");
    for (pair, exists) in pairs(&mut k, r.lane, spec.head_size) {
        let src_off = k.bin(BinOp::MulWide, Ty::U32, pair, Operand::U(8));
        let src = k.bin(BinOp::Add, Ty::U64, acc_row, src_off);
        let v = load_pair(&mut k, DType::F32, src, exists);
        let v = v.map(|x| k.bin(BinOp::Mul, Ty::F32, x, scale));
        let dst_off = k.bin(BinOp::MulWide, Ty::U32, pair, Operand::U(2 * elem));
        let dst = k.bin(BinOp::Add, Ty::U64, dq_row, dst_off);
        store_pair(&mut k, spec.dtype, dst, exists, v);
    }
    k.push(Instr::Ret);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_kernels_read_and_write_what_the_contract_says() {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            for d in [8, 40, 64, 72, 128, 256] {
                let spec = VariantSpec::new(d, false, dtype).unwrap();
                let pre = preprocess(&spec, Target::Sm80);
                assert!(pre.ptx.contains("shfl.sync.bfly.b32"), "{}", pre.ptx);
                assert_eq!(pre.ptx.matches("st.global.f32").count(), 2);
                let cv = convert(&spec, Target::Sm80);
                let stores = cv.ptx.matches("st.global").count();
                assert_eq!(stores, (d / 2).div_ceil(32), "d={d} {dtype}");
                assert!(!cv.ptx.contains("shfl"));
            }
        }
    }
}

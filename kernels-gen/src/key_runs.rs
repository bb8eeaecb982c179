//! The key-runs kernel: turns a mask that depends only on the batch entry
//! and the key (key padding, `[B, Sk]`) into the launch contract's key
//! sequence bounds on the device, so that a mask in device memory runs as
//! per-batch key lengths without a copy to the host.
//!
//! # Contract
//!
//! Grid `(B, 1, 1)`, block [`THREADS`], no dynamic shared memory beyond
//! [`SMEM_BYTES`]; parameters in the order of [`KEY_RUNS_PARAMS`]: the
//! mask's address, its [`MaskKind`] code, its batch stride (elements; 0
//! when broadcast), its front padding, `Sk`, whether the call is causal
//! (`0`/`1`), the output's address and `B`.
//!
//! CTA `b` reads keys `0..Sk` of mask row `b` (keys before the padding
//! attend; a key attends where its bias is `0`, is hidden where it is
//! `-inf`, and anything else is a bias that must be added) and writes
//! three `i32` arrays of `B` entries into `runs`: `starts` at `runs[0..B]`,
//! `ends` at `runs[B..2B]` and `masked` at `runs[2B..3B]`:
//!
//! - the keys that attend form one run `[lo, hi)` (none at all: `[0, 0)`),
//!   no other bias is present, and (causal only) `lo` is 0 — the kernels'
//!   causal rule is in local positions: `starts[b] = lo`, `ends[b] = hi`,
//!   `masked[b] = 0` (the attention kernels skip the mask for `b`);
//! - otherwise `starts[b] = 0`, `ends[b] = Sk`, `masked[b] = 1` (the
//!   attention kernels add the mask for `b`).

use crate::attention::mask::{load_bias, per_kind, MaskKind};
use crate::contract::{declare_table, ParamKind};
use crate::ptx::{
    Addr, BinOp, Cmp, Instr, Kernel, Module, Operand, Reg, Special, StateSpace, Target, Ty,
};

/// Threads per CTA.
pub const THREADS: u32 = 512;

/// Keys each thread loads per step, independent loads in flight together.
const UNROLL: u64 = 4;

/// Shared memory: four `u32` per warp.
pub const SMEM_BYTES: u32 = THREADS / 32 * 16;

/// The entry point's name.
pub const ENTRY: &str = "sdpa_key_runs";

/// The kernel's parameters, in launch order.
pub const KEY_RUNS_PARAMS: [(&str, ParamKind); 8] = [
    ("mask", ParamKind::Ptr),
    ("mask_kind", ParamKind::U32),
    ("mask_stride_b", ParamKind::U64),
    ("mask_pad", ParamKind::U32),
    ("seq_k", ParamKind::U32),
    ("causal", ParamKind::U32),
    ("runs", ParamKind::Ptr),
    ("batch", ParamKind::U32),
];

/// The key-runs kernel's PTX module (portable: sm_80 and later).
pub fn generate() -> String {
    Module::new(Target::Sm80).kernel(kernel()).to_string()
}

/// The key-runs kernel's body.
fn kernel() -> Kernel {
    let mut k = Kernel::new(ENTRY);
    let params = declare_table(&mut k, KEY_RUNS_PARAMS);
    k.launch_bounds(THREADS, None);
    k.dynamic_shared(16);
    let tid = k.mov(Ty::U32, Operand::Special(Special::TidX));
    let batch = k.mov(Ty::U32, Operand::Special(Special::CtaIdX));
    let mask = params.get(&mut k, "mask");
    let kind = params.get(&mut k, "mask_kind");
    let stride_b = params.get(&mut k, "mask_stride_b");
    let pad = params.get(&mut k, "mask_pad");
    let seq_k = params.get(&mut k, "seq_k");
    let causal = params.get(&mut k, "causal");
    let runs = params.get(&mut k, "runs");
    let n_batch = params.get(&mut k, "batch");

    // This thread's first attending key, one past its last, how many
    // attend, and whether it saw a bias other than 0 and -inf.
    let lo = k.mov(Ty::U32, Operand::U(u32::MAX as u64));
    let hi = k.mov(Ty::U32, Operand::U(0));
    let count = k.mov(Ty::U32, Operand::U(0));
    let other = k.mov(Ty::U32, Operand::U(0));
    // Row b's element of key j is at (b · stride_b + j - pad) · bytes.
    let b64 = k.cvt(None, Ty::U64, Ty::U32, batch);
    let row = k.bin(BinOp::Mul, Ty::U64, b64, stride_b);
    per_kind(&mut k, kind, |k, mk| {
        scan(k, mk, mask, row, pad, seq_k, tid, [lo, hi, count, other])
    });

    // Warp, then CTA reductions.
    let lane = k.bin(BinOp::And, Ty::U32, tid, Operand::U(31));
    let warp = k.bin(BinOp::Shr, Ty::U32, tid, Operand::U(5));
    let ops = [BinOp::Min, BinOp::Max, BinOp::Add, BinOp::Or];
    let vals = [lo, hi, count, other];
    for (v, op) in vals.into_iter().zip(ops) {
        for mask in [16, 8, 4, 2, 1] {
            let o = k.reg(Ty::U32);
            k.push(Instr::ShflBfly {
                dst: o,
                src: v,
                lane_mask: mask,
            });
            k.bin_to(op, Ty::U32, v, v, o);
        }
    }
    let smem = k.mov(Ty::U32, Operand::Symbol("smem".into()));
    let slot = k.mad(Ty::U32, warp, Operand::U(16), smem);
    let first_lane = k.setp(Cmp::Eq, Ty::U32, lane, Operand::U(0));
    k.guard(
        first_lane,
        false,
        Instr::St {
            space: StateSpace::Shared,
            ty: Ty::U32,
            addr: slot.into(),
            src: vals.to_vec(),
        },
    );
    k.push(Instr::BarSync(0));
    let not_first = k.setp(Cmp::Ne, Ty::U32, tid, Operand::U(0));
    k.guard(not_first, false, Instr::Ret);
    for w in 1..THREADS / 32 {
        let got: Vec<Reg> = (0..4).map(|_| k.reg(Ty::U32)).collect();
        k.push(Instr::Ld {
            space: StateSpace::Shared,
            ty: Ty::U32,
            dst: got.clone(),
            addr: Addr {
                base: Operand::Reg(smem),
                offset: 16 * w as i64,
            },
        });
        for ((v, op), g) in vals.into_iter().zip(ops).zip(got) {
            k.bin_to(op, Ty::U32, v, v, g);
        }
    }

    // One run, nothing else, and (causal) from key 0; no key at all is the
    // empty run [0, 0).
    let none = k.setp(Cmp::Eq, Ty::U32, count, Operand::U(0));
    k.selp_to(Ty::U32, lo, Operand::U(0), lo, none);
    let span = k.bin(BinOp::Sub, Ty::U32, hi, lo);
    let gaps = k.setp(Cmp::Ne, Ty::U32, span, count);
    let masked = k.reg(Ty::Pred);
    let biased = k.setp(Cmp::Ne, Ty::U32, other, Operand::U(0));
    k.bin_to(BinOp::Or, Ty::Pred, masked, gaps, biased);
    let is_causal = k.setp(Cmp::Ne, Ty::U32, causal, Operand::U(0));
    let late = k.setp(Cmp::Ne, Ty::U32, lo, Operand::U(0));
    let late_causal = k.reg(Ty::Pred);
    k.bin_to(BinOp::And, Ty::Pred, late_causal, is_causal, late);
    k.bin_to(BinOp::Or, Ty::Pred, masked, masked, late_causal);
    let start = k.selp(Ty::U32, Operand::U(0), lo, masked);
    let end = k.selp(Ty::U32, seq_k, hi, masked);
    let flag = k.selp(Ty::U32, Operand::U(1), Operand::U(0), masked);
    let nb64 = k.cvt(None, Ty::U64, Ty::U32, n_batch);
    let at = k.mad(Ty::U64, b64, Operand::U(4), runs);
    let step = k.bin(BinOp::Mul, Ty::U64, nb64, Operand::U(4));
    for v in [start, end, flag] {
        k.push(Instr::St {
            space: StateSpace::Global,
            ty: Ty::U32,
            addr: at.into(),
            src: vec![v],
        });
        k.bin_to(BinOp::Add, Ty::U64, at, at, step);
    }
    k.push(Instr::Ret);
    k
}

/// The scan of one mask kind: steps of `UNROLL · THREADS` keys, uniform
/// over the CTA (so every branch is), each thread loading keys `base + u ·
/// THREADS + tid` of the step, updating `[lo, hi, count, other]`.
#[allow(clippy::too_many_arguments)]
fn scan(
    k: &mut Kernel,
    kind: MaskKind,
    mask: Reg,
    row: Reg,
    pad: Reg,
    seq_k: Reg,
    tid: Reg,
    [lo, hi, count, other]: [Reg; 4],
) {
    let base = k.mov(Ty::U32, Operand::U(0));
    let top = k.label("runs_loop");
    let done = k.label("runs_done");
    k.push(Instr::Label(top.clone()));
    let out = k.setp(Cmp::Ge, Ty::U32, base, seq_k);
    k.branch_if(out, false, &done);
    let j = k.bin(BinOp::Add, Ty::U32, base, tid);
    let mut biases = Vec::new();
    let mut keys = Vec::new();
    for u in 0..UNROLL {
        let key = k.bin(BinOp::Add, Ty::U32, j, Operand::U(u * THREADS as u64));
        let inside = k.setp(Cmp::Lt, Ty::U32, key, seq_k);
        let not_padded = k.setp(Cmp::Ge, Ty::U32, key, pad);
        let read = k.reg(Ty::Pred);
        k.bin_to(BinOp::And, Ty::Pred, read, inside, not_padded);
        // Element offset row + key - pad (only formed where key >= pad).
        let col = k.bin(BinOp::Sub, Ty::U32, key, pad);
        let col64 = k.cvt(None, Ty::U64, Ty::U32, col);
        let e = k.bin(BinOp::Add, Ty::U64, row, col64);
        let addr = k.mad(Ty::U64, e, Operand::U(kind.bytes()), mask);
        biases.push((load_bias(k, kind, read, addr.into()), inside));
        keys.push(key);
    }
    for ((bias, inside), key) in biases.into_iter().zip(keys) {
        let zero = k.setp(Cmp::Eq, Ty::F32, bias, Operand::F32(0.0));
        let attends = k.reg(Ty::Pred);
        k.bin_to(BinOp::And, Ty::Pred, attends, zero, inside);
        let after = k.bin(BinOp::Add, Ty::U32, key, Operand::U(1));
        let lo_new = k.bin(BinOp::Min, Ty::U32, lo, key);
        let hi_new = k.bin(BinOp::Max, Ty::U32, hi, after);
        let count_new = k.bin(BinOp::Add, Ty::U32, count, Operand::U(1));
        k.selp_to(Ty::U32, lo, lo_new, lo, attends);
        k.selp_to(Ty::U32, hi, hi_new, hi, attends);
        k.selp_to(Ty::U32, count, count_new, count, attends);
        // A bias that is neither 0 nor -inf must be added.
        let hidden = k.setp(Cmp::Eq, Ty::F32, bias, Operand::F32(f32::NEG_INFINITY));
        let plain = k.reg(Ty::Pred);
        k.bin_to(BinOp::Or, Ty::Pred, plain, zero, hidden);
        let odd = k.selp(Ty::U32, Operand::U(0), Operand::U(1), plain);
        k.bin_to(BinOp::Or, Ty::U32, other, other, odd);
    }
    k.bin_to(
        BinOp::Add,
        Ty::U32,
        base,
        base,
        Operand::U(UNROLL * THREADS as u64),
    );
    k.push(Instr::Bra {
        target: top,
        uni: true,
    });
    k.push(Instr::Label(done));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_has_the_entry_and_every_kind() {
        let ptx = generate();
        assert!(ptx.contains(&format!(".entry {ENTRY}(")), "{ptx}");
        for ty in ["ld.global.nc.f32", "ld.global.nc.u8", "ld.global.nc.u16"] {
            assert!(ptx.contains(ty), "no {ty}");
        }
        assert_eq!(ptx.matches("bar.sync 0;").count(), 1);
    }

    use crate::interp::{launch, Grid, Memory, Program};
    use std::collections::HashMap;

    /// One mask row's elements as `kind` stores them, from "attend"
    /// (`Some(0.0)` or any other bias for float kinds) per key.
    fn bytes(kind: MaskKind, row: &[f32]) -> Vec<u8> {
        row.iter()
            .flat_map(|&x| -> Vec<u8> {
                let keep = x == 0.0;
                match kind {
                    MaskKind::F32 => x.to_le_bytes().to_vec(),
                    MaskKind::F16 => crate::interp::f32_to_f16(x).to_le_bytes().to_vec(),
                    MaskKind::Bf16 => crate::interp::f32_to_bf16(x).to_le_bytes().to_vec(),
                    MaskKind::U8 => vec![u8::from(keep) * 7],
                    MaskKind::I32 => (i32::from(keep) * -3).to_le_bytes().to_vec(),
                    // A non-zero high half alone must read as "attend".
                    MaskKind::I64 => (i64::from(keep) << 40).to_le_bytes().to_vec(),
                }
            })
            .collect()
    }

    /// The run the kernel must write for a row of biases (keys before
    /// `pad` attend): `(start, end, masked)`.
    fn expected(row: &[f32], pad: usize, causal: bool) -> (u32, u32, u32) {
        let sk = row.len() + pad;
        let bias = |j: usize| if j < pad { 0.0 } else { row[j - pad] };
        let seen: Vec<usize> = (0..sk).filter(|&j| bias(j) == 0.0).collect();
        let other = (0..sk).any(|j| bias(j) != 0.0 && bias(j) != f32::NEG_INFINITY);
        let (lo, hi) = match (seen.first(), seen.last()) {
            (Some(&a), Some(&b)) => (a, b + 1),
            _ => (0, 0),
        };
        let gaps = hi - lo != seen.len();
        if gaps || other || (causal && lo > 0) {
            (0, sk as u32, 1)
        } else {
            (lo as u32, hi as u32, 0)
        }
    }

    #[test]
    fn interpreted_runs_match_the_rule_for_every_kind() {
        let prog = Program::new(&kernel());
        let inf = f32::NEG_INFINITY;
        let sk_row = 2500; // more than one step of UNROLL · THREADS keys
        let run = |lo: usize, hi: usize| -> Vec<f32> {
            (0..sk_row)
                .map(|j| if (lo..hi).contains(&j) { 0.0 } else { inf })
                .collect()
        };
        let mut rows = vec![
            run(0, 2100),
            run(37, 2500),
            run(5, 6),
            run(0, 0),
            run(0, 2500),
        ];
        let mut gap = run(10, 2400);
        gap[2000] = inf;
        rows.push(gap);
        let mut biased = run(0, 900);
        biased[3] = -0.5;
        rows.push(biased);
        for kind in MaskKind::ALL {
            let float = matches!(kind, MaskKind::F32 | MaskKind::F16 | MaskKind::Bf16);
            for (pad, causal) in [(0, false), (3, true), (0, true)] {
                let rows: Vec<&Vec<f32>> = rows
                    .iter()
                    .filter(|r| float || r.iter().all(|&x| x == 0.0 || x == inf))
                    .collect();
                let b = rows.len();
                let mut mem = Memory::new();
                let data: Vec<u8> = rows.iter().flat_map(|r| bytes(kind, r)).collect();
                let mask = mem.alloc(data.len(), 0);
                let at = mem.check(mask, data.len() as u64);
                mem.bytes[at..at + data.len()].copy_from_slice(&data);
                let out = mem.alloc(12 * b, 0xAB);
                let params: HashMap<String, u64> = [
                    ("mask", mask),
                    ("mask_kind", u64::from(kind.code())),
                    ("mask_stride_b", sk_row as u64),
                    ("mask_pad", pad as u64),
                    ("seq_k", (sk_row + pad) as u64),
                    ("causal", u64::from(causal)),
                    ("runs", out),
                    ("batch", b as u64),
                ]
                .into_iter()
                .map(|(n, v)| (format!("{ENTRY}_{n}"), v))
                .collect();
                // Thread 0 alone combines the warps' results.
                let grid = Grid {
                    size: [b, 1, 1],
                    threads: THREADS as usize,
                    smem_bytes: SMEM_BYTES as usize,
                    divergence: true,
                };
                launch(&prog, &params, grid, &mut mem);
                let at = mem.check(out, 12 * b as u64);
                let word = |i: usize| {
                    u32::from_le_bytes(mem.bytes[at + 4 * i..at + 4 * i + 4].try_into().unwrap())
                };
                for (e, row) in rows.iter().enumerate() {
                    let got = (word(e), word(b + e), word(2 * b + e));
                    assert_eq!(
                        got,
                        expected(row, pad, causal),
                        "{kind:?} pad {pad} causal {causal} entry {e}"
                    );
                }
            }
        }
    }
}

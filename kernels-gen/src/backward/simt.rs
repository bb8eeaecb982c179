//! The backward's main kernel for `f32` variants, on the CUDA cores (FFMA),
//! following the launch contract of [`super`]: a CTA of [`THREADS`]
//! threads owns `block_n` keys of one K/V head and walks, for every query
//! head of the group, every query block of `block_m` rows that sees them.
//!
//! # Structure
//!
//! - **Keys to lanes**, as the forward kernel ([`crate::simt`]) maps query
//!   rows: a group of `lanes` consecutive lanes shares `rows` keys (key
//!   `g + r · THREADS / lanes` for group `g`); each lane holds `D / lanes`
//!   columns of those keys' `k` (times `scale · log2(e)`), `v` and the `dk`
//!   and `dv` accumulators in registers, interleaved in chunks of `width`
//!   (4, 2 or 1) floats (chunk `c` of lane `t` is columns `(c · lanes + t) · width ..`).
//!   `dk` and `dv` are summed over every query head of the group and every
//!   query block in registers, and written once at the end (`dk` times
//!   `scale`).
//! - **Query blocks through shared memory.** Per step, `block_m` rows of
//!   `q` and `dout` and their `lse_log2` and `delta` are copied into shared
//!   memory (rows past `Sq` as zeros, with `lse_log2 = +inf` so that their
//!   probabilities are 0). Then each row `i` is one iteration of a run-time
//!   loop: every lane forms its partial `q_i · k` and `dout_i · v` over its
//!   columns, `log2(lanes)` butterfly shuffles complete them, and the lane
//!   computes `P = ex2(s + bias · log2(e) − lse_log2_i)` (the mask's bias
//!   only where a mask was passed: the loop is emitted once without it and
//!   once per [`MaskKind`], chosen by uniform branches; keys past the
//!   sequence's and, causal, after the row are `-inf`)
//!   and `dS = P · (dP − delta_i)`, adds `P · dout_i` to `dv` and
//!   `dS · q_i` to `dk`, and the group's lane 0 writes `dS` to shared
//!   memory (stored key-major, `[key][row]`).
//! - **dq.** With `dS` of the block in shared memory and the CTA's `k` tile
//!   (unscaled, loaded once), each thread forms a 4-row × 8-column tile of
//!   `dS · K` (columns `4c ..` and `D/2 + 4c ..`: conflict-free vector
//!   loads). Before its first addition thread 0 spins with `ld.acquire`
//!   until the block's counter in `sem` reads this CTA's key block; after a
//!   `bar.sync` every thread adds its tile to `dq_accum` with
//!   `red.global.add.f32`; after another `bar.sync` thread 0 fences and
//!   releases the counter as key block + 1. The sums are therefore made in
//!   key-block order, bit-identical run to run.
//! - **Order.** A CTA visits its query blocks last first, so that all
//!   CTAs of a (batch, head) work at once, each a hand-off behind the CTA of
//!   the key block before (going up, a causal CTA would wait until the first
//!   CTA reached its diagonal: causal ran as long as non-causal).
//! - **Causal** (top-left): the CTA stops at query block
//!   `floor(j0 / block_m)`, the first that can see its first key `j0`, so
//!   each query block's contributors are a prefix of the key blocks (the
//!   counter's protocol needs it); every block above it is visited, fully
//!   hidden ones too.
//!
//! **Sequences** ([`crate::attention::seqs`]): every position above is
//! local to the batch entry's sequences (`Sq` and `Sk` read as their
//! lengths), tensors are addressed at token `start + local`, the scratch
//! buffers at the local row. A CTA whose first key is past the sequence's
//! keys exits at once: the contributors of every query block are still a
//! prefix of the key blocks, so no counter waits for it. A CTA whose keys
//! no query block reaches (causal, fewer rows than keys) visits nothing
//! and writes zeros.
//!
//! Rows of `q`, `k`, `v`, `dout`, `dk` and `dv` are accessed with vectors
//! of up to 16 bytes: their starts must be 16-byte aligned, as for the
//! forward kernel. Every branch is uniform over the CTA except thread 0's
//! spin.

use super::BACKWARD_PARAMS;
use crate::attention::mask::{hide_if, load_bias, per_kind, MaskKind};
use crate::attention::seqs::{sequence, token_offset, Side};
use crate::contract::{declare_table, tensor_head_wide, ByteScale, GpuKernel, Params};
use crate::ptx::{
    Addr, BinOp, Cmp, Instr, Kernel, Module, Operand, Reg, Special, StateSpace, Target, Ty, UnOp,
};
use crate::{DType, VariantSpec};

/// Threads per CTA: two CTAs fit an SM at up to 255 registers, so one
/// CTA's wait on a `dq` counter hides under the other's work.
pub(crate) const THREADS: u32 = 128;
/// The shared-memory budget of one CTA (two fit an SM's 228 KB).
const SMEM_BUDGET: u32 = 99 * 1024;
/// Keys per iteration of the `dq` product's loop.
const DQ_UNROLL: u32 = 4;

/// The shape of one head size's kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Head size.
    pub d: u32,
    /// Consecutive lanes that share a key.
    pub lanes: u32,
    /// Keys per lane group.
    pub rows: u32,
    /// Columns per chunk (one vector access).
    pub width: u32,
    /// Query rows per step (the `dq` block, the granularity of `sem`).
    pub block_m: u32,
    /// Query rows per iteration of the row loop.
    pub unroll: u32,
}

impl Plan {
    /// The plan of head size `d` (a multiple of 8 in 8..=256): the
    /// (lanes, rows) split with the least work per FMA within the register
    /// budget, and the largest query block that fits the shared memory.
    ///
    /// Per query row a lane loads `2·C` floats of `q` and `dout` (`C = d /
    /// lanes`), runs `2·rows·log2(lanes)` shuffles, about `6·rows` scalar
    /// instructions (mask, `ex2`, `dS`, its store) and `4·rows·C` FMAs; the
    /// `dq` additions cost about one per `block_n` keys. Budget: `rows·C`
    /// at most 32 (`k`, `v`, `dk`, `dv`: 128 registers), 16 to 64 keys per
    /// CTA. Every head size then assembles without spilling at 105 to 255
    /// registers (sm_90).
    ///
    /// Measured (H200, 1×16×4096² f32, TFLOP/s counting 2.5× the forward's
    /// FLOPs): d=64 (4 lanes × 2 keys) 27.4, causal 23.2; d=128 (8 × 2)
    /// 23.2, causal 19.5; d=256 (16 × 2) 18.5, causal 16.3; d=72 (8 × 2,
    /// scalar chunks) 15.6.
    pub fn new(d: u32) -> Plan {
        let mut best: Option<(f64, Plan)> = None;
        for lanes in [1, 2, 4, 8, 16, 32] {
            if !d.is_multiple_of(lanes) {
                continue;
            }
            let c = d / lanes;
            for rows in [1, 2, 4] {
                let block_n = THREADS / lanes * rows;
                if rows * c > 32 || !(16..=64).contains(&block_n) {
                    continue;
                }
                let work = (2 * c + 2 * rows * lanes.ilog2() + 6 * rows) as f64;
                let cost = work / (4 * rows * c) as f64 + 1.0 / block_n as f64;
                if best.is_none_or(|(b, _)| cost < b) {
                    best = Some((cost, Plan::with(d, lanes, rows)));
                }
            }
        }
        best.expect("every head size has a plan").1
    }

    /// The plan of head size `d` with `lanes` lanes per key and `rows` keys
    /// per lane group.
    pub fn with(d: u32, lanes: u32, rows: u32) -> Plan {
        let c = d / lanes;
        let width = if c.is_multiple_of(4) {
            4
        } else if c.is_multiple_of(2) {
            2
        } else {
            1
        };
        let mut p = Plan {
            d,
            lanes,
            rows,
            width,
            block_m: 16,
            unroll: if c <= 8 { 2 } else { 1 },
        };
        for m in [64, 32] {
            let q = Plan { block_m: m, ..p };
            if q.smem_bytes() <= SMEM_BUDGET {
                p = q;
                break;
            }
        }
        p
    }

    /// Keys per CTA.
    pub fn block_n(&self) -> u32 {
        THREADS / self.lanes * self.rows
    }

    /// Columns per lane.
    fn cols(&self) -> u32 {
        self.d / self.lanes
    }

    /// Chunks per lane.
    fn chunks(&self) -> u32 {
        self.cols() / self.width
    }

    /// Bytes of one `f32` row of `q`, `dout` or `k` in shared memory.
    fn row_bytes(&self) -> u32 {
        4 * self.d
    }

    /// Bytes of one key's row of `dS` (`block_m` rows plus 4 floats of
    /// padding, so the lanes 0 of a warp's groups store to distinct banks).
    fn ds_pitch(&self) -> u32 {
        4 * (self.block_m + 4)
    }

    /// Shared-memory offsets: the `q` tile, `dout`, `k`, `dS`, `lse_log2`,
    /// `delta`, and the end.
    fn layout(&self) -> [u32; 7] {
        let q = 0;
        let dout = q + self.block_m * self.row_bytes();
        let k = dout + self.block_m * self.row_bytes();
        let ds = k + self.block_n() * self.row_bytes();
        let lse = ds + self.block_n() * self.ds_pitch();
        let delta = lse + 4 * self.block_m;
        let end = delta + 4 * self.block_m;
        [q, dout, k, ds, lse, delta, end]
    }

    /// Dynamic shared memory per CTA.
    pub fn smem_bytes(&self) -> u32 {
        self.layout()[6]
    }
}

/// The main kernel of the `f32` variant `spec` and its keys per CTA.
pub(super) fn main_kernel(spec: &VariantSpec, target: Target) -> (GpuKernel, u32) {
    assert_eq!(spec.dtype, DType::F32, "the CUDA-core backward is f32 only");
    let plan = Plan::new(spec.head_size as u32);
    let entry = format!("{}_bwd", spec.kernel_name());
    let k = build(&entry, spec.causal, plan);
    let g = GpuKernel {
        ptx: Module::new(target).kernel(k).to_string(),
        entry,
        target,
        block_m: plan.block_m,
        threads: THREADS,
        smem_bytes: plan.smem_bytes(),
        mask_smem_bytes: 0,
        tensor_maps: None,
    };
    (g, plan.block_n())
}

/// The kernel named `entry` laid out by `plan`.
pub(crate) fn build(entry: &str, causal: bool, plan: Plan) -> Kernel {
    let mut e = Emitter {
        k: Kernel::new(entry),
        plan,
        causal,
    };
    e.emit();
    e.k
}

fn u(x: u32) -> Operand {
    Operand::U(x as u64)
}

fn f(x: f32) -> Operand {
    Operand::F32(x)
}

struct Emitter {
    k: Kernel,
    plan: Plan,
    causal: bool,
}

const LOG2E: f32 = std::f32::consts::LOG2_E;

/// What the masked row loop of one element kind reads, set up before the
/// loop.
struct MaskRead {
    kind: MaskKind,
    /// The mask's device pointer.
    ptr: Reg,
    /// Per key slot: the key is below the sequence's keys and at or past
    /// `mask_pad` (keys before it attend).
    key_ok: Vec<Reg>,
}

impl MaskRead {
    fn new(params: &Params, k: &mut Kernel, cta: &Cta, kind: MaskKind) -> MaskRead {
        let ptr = params.get(k, "mask");
        let pad = params.get(k, "mask_pad");
        let key_ok = cta
            .keys
            .iter()
            .zip(&cta.key_ok)
            .map(|(&key, &ok)| {
                let read = k.setp(Cmp::Ge, Ty::U32, key, pad);
                k.bin_to(BinOp::And, Ty::Pred, read, read, ok);
                read
            })
            .collect();
        MaskRead { kind, ptr, key_ok }
    }
}

/// What the CTA holds for its whole life.
struct Cta {
    tid: Reg,
    /// `tid == 0`.
    lead: Reg,
    /// Lane 0 of its key group.
    group_lead: Reg,
    /// `THREADS / lanes` groups: this thread's group.
    grp: Reg,
    batch64: Reg,
    /// The key block index and its first key.
    kblock: Reg,
    j0: Reg,
    /// The batch entry's query rows: `Sq` without sequence bounds.
    len_q: Reg,
    /// The token of the batch entry's first query row (0 without sequence
    /// bounds).
    q_start: Reg,
    /// Keys of this CTA below `Sk`, rounded up to [`DQ_UNROLL`].
    n_keys: Reg,
    sbase: Reg,
    /// Shared address of this lane's first column in row 0 of the `q` tile.
    slane: Reg,
    /// Byte offset of this lane's first column in a global row.
    lane_g: Reg,
    /// Per key slot: whether the key is below `Sk`.
    key_ok: Vec<Reg>,
    /// Per key slot: the key.
    keys: Vec<Reg>,
    /// Per key slot: a query row `i` hides the key where `thr > i`
    /// (unsigned): the key itself for causal, 0 otherwise, and `u32::MAX`
    /// for keys past `Sk`.
    thr: Vec<Reg>,
    /// Per key slot: `k · scale_log2`, `v`, and the accumulators, by
    /// chunk-major column.
    kq: Vec<Vec<Reg>>,
    v: Vec<Vec<Reg>>,
    dk: Vec<Vec<Reg>>,
    dv: Vec<Vec<Reg>>,
}

/// What one query head needs.
struct Head {
    qhead: Reg,
    qstride: Reg,
    dohead: Reg,
    dostride: Reg,
    /// Byte addresses of this head's row 0 in `lse_log2`, `delta`,
    /// `dq_accum` and of its first counter in `sem`.
    lse: Reg,
    delta: Reg,
    accum: Reg,
    sem: Reg,
    has_mask: Reg,
    /// Per key slot: the mask's element offset of (row 0, key): the
    /// (batch, head) offset plus `key - mask_pad`.
    mask_keys: Vec<Reg>,
    /// The mask's query stride in elements.
    mask_row: Reg,
}

impl Emitter {
    fn emit(&mut self) {
        let plan = self.plan;
        self.k.comment(format!(
            "backward main (f32, CUDA cores): d={} causal={} lanes={} keys/group={} \
             block_n={} block_m={}",
            plan.d,
            self.causal,
            plan.lanes,
            plan.rows,
            plan.block_n(),
            plan.block_m
        ));
        let params = declare_table(&mut self.k, BACKWARD_PARAMS);
        // Two CTAs per SM: without it ptxas aims at three and spills (d=96:
        // 168 registers, 12 bytes spilled).
        self.k.launch_bounds(THREADS, Some(2));
        self.k.dynamic_shared(16);
        let cta = self.prologue(&params);
        self.head_loop(&params, &cta);
        self.epilogue(&params, &cta);
        self.k.push(Instr::Ret);
    }

    /// Loads `n` (1, 2 or 4) `f32` from `space` at `addr`, zeros where `pred`
    /// is false.
    fn load(&mut self, space: StateSpace, pred: Option<Reg>, addr: Addr, n: u32) -> Vec<Reg> {
        let k = &mut self.k;
        let dst = k.regs(Ty::F32, n as usize);
        if pred.is_some() {
            for &r in &dst {
                k.mov_to(Ty::F32, r, f(0.0));
            }
        }
        let ld = Instr::Ld {
            space,
            ty: Ty::F32,
            dst: dst.clone(),
            addr,
        };
        match pred {
            Some(p) => k.guard(p, false, ld),
            None => k.push(ld),
        }
        dst
    }

    fn store(&mut self, space: StateSpace, pred: Option<Reg>, addr: Addr, src: Vec<Reg>) {
        let st = Instr::St {
            space,
            ty: Ty::F32,
            addr,
            src,
        };
        match pred {
            Some(p) => self.k.guard(p, false, st),
            None => self.k.push(st),
        }
    }

    /// Coordinates, this thread's keys (`k` and `v` in registers), the
    /// CTA's `k` tile in shared memory, zeroed accumulators.
    fn prologue(&mut self, params: &Params) -> Cta {
        let plan = self.plan;
        let (lanes, width) = (plan.lanes, plan.width);
        let k_ptr = params.get(&mut self.k, "k");
        let v_ptr = params.get(&mut self.k, "v");
        let ks = params.strides(&mut self.k, "k");
        let vs = params.strides(&mut self.k, "v");
        let sides = ["q", "k"].map(|x| Side {
            starts: params.get(&mut self.k, &format!("{x}_start")),
            ends: params.get(&mut self.k, &format!("{x}_end")),
            tokens: params.get(&mut self.k, &format!("tokens_{x}")),
            bound: params.get(&mut self.k, &format!("seq_{x}")),
        });
        let scale_log2 = params.get(&mut self.k, "scale_log2");

        let k = &mut self.k;
        let tid = k.mov(Ty::U32, Operand::Special(Special::TidX));
        let kblock = k.mov(Ty::U32, Operand::Special(Special::CtaIdX));
        let kv_head = k.mov(Ty::U32, Operand::Special(Special::CtaIdY));
        let batch = k.mov(Ty::U32, Operand::Special(Special::CtaIdZ));
        // The batch entry's sequences; key blocks past its keys take no
        // part (no query block waits for them: a block's contributors are
        // a prefix of the key blocks below the keys' end).
        let [sq, sk] = sides.map(|side| sequence(k, side, batch));
        let seq_k = sk.len;
        let j0 = k.bin(BinOp::Mul, Ty::U32, kblock, u(plan.block_n()));
        let past = k.setp(Cmp::Ge, Ty::U32, j0, seq_k);
        k.guard(past, false, Instr::Ret);
        let lead = k.setp(Cmp::Eq, Ty::U32, tid, u(0));
        let lane = k.bin(BinOp::And, Ty::U32, tid, u(lanes - 1));
        let group_lead = k.setp(Cmp::Eq, Ty::U32, lane, u(0));
        let grp = k.bin(BinOp::Shr, Ty::U32, tid, u(lanes.trailing_zeros()));
        let batch64 = k.cvt(None, Ty::U64, Ty::U32, batch);
        let kvh64 = k.cvt(None, Ty::U64, Ty::U32, kv_head);
        let lane_g = k.bin(BinOp::MulWide, Ty::U32, lane, u(width * 4));
        let (khead, kstride) = tensor_head_wide(k, k_ptr, ks, batch64, kvh64, 4, ByteScale::Shift);
        let (vhead, vstride) = tensor_head_wide(k, v_ptr, vs, batch64, kvh64, 4, ByteScale::Shift);
        // Key 0 of the sequence.
        let ks64 = k.cvt(None, Ty::U64, Ty::U32, sk.start);
        let khead = k.mad(Ty::U64, ks64, kstride, khead);
        let vhead = k.mad(Ty::U64, ks64, vstride, vhead);
        // Keys of this CTA below Sk, rounded up for the dq loop.
        let left = k.bin(BinOp::Sub, Ty::U32, seq_k, j0);
        let n_keys = k.bin(BinOp::Min, Ty::U32, left, u(plan.block_n()));
        let n_keys = k.bin(BinOp::Add, Ty::U32, n_keys, u(DQ_UNROLL - 1));
        let n_keys = k.bin(BinOp::And, Ty::U32, n_keys, u(!(DQ_UNROLL - 1)));

        let mut keys = Vec::new();
        let mut key_ok = Vec::new();
        let mut thr = Vec::new();
        let first = k.bin(BinOp::Add, Ty::U32, j0, grp);
        for r in 0..plan.rows {
            let key = if r == 0 {
                first
            } else {
                k.bin(BinOp::Add, Ty::U32, first, u(r * THREADS / lanes))
            };
            let ok = k.setp(Cmp::Lt, Ty::U32, key, seq_k);
            let seen_from = if self.causal {
                Operand::from(key)
            } else {
                u(0)
            };
            thr.push(k.selp(Ty::U32, seen_from, u(u32::MAX), ok));
            keys.push(key);
            key_ok.push(ok);
        }

        let mut kq = Vec::new();
        let mut v = Vec::new();
        for r in 0..plan.rows as usize {
            let k = &mut self.k;
            let key64 = k.cvt(None, Ty::U64, Ty::U32, keys[r]);
            let ka = k.mad(Ty::U64, key64, kstride, khead);
            let ka = k.bin(BinOp::Add, Ty::U64, ka, lane_g);
            let va = k.mad(Ty::U64, key64, vstride, vhead);
            let va = k.bin(BinOp::Add, Ty::U64, va, lane_g);
            let (mut kr, mut vr) = (Vec::new(), Vec::new());
            for c in 0..plan.chunks() {
                let off = (c * lanes * width * 4) as i64;
                let kv = self.load(
                    StateSpace::GlobalNc,
                    Some(key_ok[r]),
                    Addr::at(ka, off),
                    width,
                );
                for x in kv {
                    kr.push(self.k.bin(BinOp::Mul, Ty::F32, x, scale_log2));
                }
                vr.extend(self.load(
                    StateSpace::GlobalNc,
                    Some(key_ok[r]),
                    Addr::at(va, off),
                    width,
                ));
            }
            kq.push(kr);
            v.push(vr);
        }
        let k = &mut self.k;
        let per_slot = plan.cols() as usize;
        let zeros = |k: &mut Kernel| -> Vec<Vec<Reg>> {
            (0..plan.rows)
                .map(|_| (0..per_slot).map(|_| k.mov(Ty::F32, f(0.0))).collect())
                .collect()
        };
        let dk = zeros(k);
        let dv = zeros(k);
        let sbase = k.mov(Ty::U32, Operand::Symbol("smem".into()));
        let slane = k.mad(Ty::U32, lane, u(width * 4), sbase);
        let cta = Cta {
            tid,
            lead,
            group_lead,
            grp,
            batch64,
            kblock,
            j0,
            len_q: sq.len,
            q_start: sq.start,
            n_keys,
            sbase,
            slane,
            lane_g,
            key_ok,
            keys,
            thr,
            kq,
            v,
            dk,
            dv,
        };
        // The CTA's k tile, unscaled, for dq (read after the first step's
        // barriers).
        let k_off = plan.layout()[2];
        self.load_tile(&cta, plan.block_n(), khead, kstride, j0, seq_k, k_off);
        cta
    }

    /// Copies rows `row0 .. row0 + n_rows` of a global `f32` tensor (head
    /// base `head`, token stride `stride` bytes) into shared memory at
    /// `soff`, rows at or past `limit` as zeros: 16-byte granules,
    /// consecutive threads on consecutive granules of a row.
    #[allow(clippy::too_many_arguments)]
    fn load_tile(
        &mut self,
        cta: &Cta,
        n_rows: u32,
        head: Reg,
        stride: Reg,
        row0: Reg,
        limit: Reg,
        soff: u32,
    ) {
        let plan = self.plan;
        let per_row = plan.d / 4;
        let total = n_rows * per_row;
        for i in 0..total.div_ceil(THREADS) {
            let k = &mut self.k;
            let g = k.bin(BinOp::Add, Ty::U32, cta.tid, u(i * THREADS));
            let (row, col) = if per_row.is_power_of_two() {
                (
                    k.bin(BinOp::Shr, Ty::U32, g, u(per_row.trailing_zeros())),
                    k.bin(BinOp::And, Ty::U32, g, u(per_row - 1)),
                )
            } else {
                (
                    k.bin(BinOp::Div, Ty::U32, g, u(per_row)),
                    k.bin(BinOp::Rem, Ty::U32, g, u(per_row)),
                )
            };
            let grow = k.bin(BinOp::Add, Ty::U32, row0, row);
            let live = k.setp(Cmp::Lt, Ty::U32, grow, limit);
            let inside = ((i + 1) * THREADS > total).then(|| {
                let p = k.setp(Cmp::Lt, Ty::U32, g, u(total));
                k.bin_to(BinOp::And, Ty::Pred, live, live, p);
                p
            });
            let grow64 = k.cvt(None, Ty::U64, Ty::U32, grow);
            let col64 = k.bin(BinOp::MulWide, Ty::U32, col, u(16));
            let ga = k.mad(Ty::U64, grow64, stride, head);
            let ga = k.bin(BinOp::Add, Ty::U64, ga, col64);
            let sa = k.mad(Ty::U32, row, u(plan.row_bytes()), cta.sbase);
            let sa = k.mad(Ty::U32, col, u(16), sa);
            let vals = self.load(StateSpace::GlobalNc, Some(live), Addr::at(ga, 0), 4);
            self.store(StateSpace::Shared, inside, Addr::at(sa, soff as i64), vals);
        }
    }

    /// The loop over the group's query heads and, inside, their query
    /// blocks.
    fn head_loop(&mut self, params: &Params, cta: &Cta) {
        let plan = self.plan;
        let q_ptr = params.get(&mut self.k, "q");
        let do_ptr = params.get(&mut self.k, "dout");
        let qs = params.strides(&mut self.k, "q");
        let dos = params.strides(&mut self.k, "dout");
        let mask = params.get(&mut self.k, "mask");
        let ms = params.strides(&mut self.k, "mask");
        let lse_ptr = params.get(&mut self.k, "lse_log2");
        let delta_ptr = params.get(&mut self.k, "delta");
        let accum_ptr = params.get(&mut self.k, "dq_accum");
        let sem_ptr = params.get(&mut self.k, "sem");
        let heads_q = params.get(&mut self.k, "heads_q");
        let group = params.get(&mut self.k, "group");

        let mask_pad = params.get(&mut self.k, "mask_pad");

        let k = &mut self.k;
        let kv_head = k.mov(Ty::U32, Operand::Special(Special::CtaIdY));
        let batch = k.mov(Ty::U32, Operand::Special(Special::CtaIdZ));
        // Row 0 of the sequence in q and dout.
        let q_ptr = {
            let off = token_offset(k, cta.q_start, qs[1]);
            k.mad(Ty::U64, off, u(4), q_ptr)
        };
        let do_ptr = {
            let off = token_offset(k, cta.q_start, dos[1]);
            k.mad(Ty::U64, off, u(4), do_ptr)
        };
        // The sequence's query blocks: ceil(len_q / block_m); causal CTAs
        // start at the first that sees key j0.
        let nqb = k.bin(BinOp::Add, Ty::U32, cta.len_q, u(plan.block_m - 1));
        let nqb = k.bin(BinOp::Div, Ty::U32, nqb, u(plan.block_m));
        let qb_start = if self.causal {
            k.bin(BinOp::Div, Ty::U32, cta.j0, u(plan.block_m))
        } else {
            k.mov(Ty::U32, u(0))
        };
        let done = k.label("heads_done");
        let nothing = k.setp(Cmp::Ge, Ty::U32, qb_start, nqb);
        k.branch_if(nothing, false, &done);
        let mask_row = ms[2];
        let has_mask = k.setp(Cmp::Ne, Ty::U64, mask, u(0));
        let pad64 = k.cvt(None, Ty::U64, Ty::U32, mask_pad);
        let hh = k.mov(Ty::U32, u(0));
        let head_top = k.label("head");
        k.push(Instr::Label(head_top.clone()));

        let h = k.mad(Ty::U32, kv_head, group, hh);
        let h64 = k.cvt(None, Ty::U64, Ty::U32, h);
        let (qhead, qstride) =
            tensor_head_wide(k, q_ptr, qs, cta.batch64, h64, 4, ByteScale::Shift);
        let (dohead, dostride) =
            tensor_head_wide(k, do_ptr, dos, cta.batch64, h64, 4, ByteScale::Shift);
        let bh = k.mad(Ty::U32, batch, heads_q, h);
        // Row 0 of this head in the dense [B, Hq, Sq] scratch, and its
        // first counter in sem, [B, Hq, ceil(Sq / block_m)]: sized by the
        // bound Sq (read here, not held across the loop).
        let seq_q = params.get(k, "seq_q");
        let dense = k.bin(BinOp::MulWide, Ty::U32, bh, seq_q);
        let dense4 = k.bin(BinOp::Shl, Ty::U64, dense, u(2));
        let nqb_all = k.bin(BinOp::Add, Ty::U32, seq_q, u(plan.block_m - 1));
        let nqb_all = k.bin(BinOp::Div, Ty::U32, nqb_all, u(plan.block_m));
        let lse = k.bin(BinOp::Add, Ty::U64, lse_ptr, dense4);
        let delta = k.bin(BinOp::Add, Ty::U64, delta_ptr, dense4);
        let accum = k.mad(Ty::U64, dense4, u(plan.d), accum_ptr);
        let sem_off = k.bin(BinOp::MulWide, Ty::U32, bh, nqb_all);
        let sem = k.mad(Ty::U64, sem_off, u(4), sem_ptr);
        // The mask's (row 0, key) element offset per key slot: column
        // key - mask_pad.
        let mhead = crate::contract::head_offset(k, cta.batch64, h64, ms[0], ms[1]);
        let mhead = k.bin(BinOp::Sub, Ty::U64, mhead, pad64);
        let mask_keys = cta
            .keys
            .iter()
            .map(|&key| {
                let key64 = k.cvt(None, Ty::U64, Ty::U32, key);
                k.bin(BinOp::Add, Ty::U64, mhead, key64)
            })
            .collect();
        let head = Head {
            qhead,
            qstride,
            dohead,
            dostride,
            lse,
            delta,
            accum,
            sem,
            has_mask,
            mask_keys,
            mask_row,
        };

        // Last block first: every CTA then starts at once (causal ones
        // included; going up, the CTA of the last key block would wait for
        // the first to reach the diagonal, as long as a whole non-causal
        // pass).
        let qb = k.bin(BinOp::Sub, Ty::U32, nqb, u(1));
        let block_top = k.label("qblock");
        k.push(Instr::Label(block_top.clone()));
        self.step(params, cta, &head, qb);
        let k = &mut self.k;
        let more = k.setp(Cmp::Gt, Ty::U32, qb, qb_start);
        k.bin_to(BinOp::Sub, Ty::U32, qb, qb, u(1));
        k.branch_if(more, false, &block_top);

        k.bin_to(BinOp::Add, Ty::U32, hh, hh, u(1));
        let more = k.setp(Cmp::Lt, Ty::U32, hh, group);
        k.branch_if(more, false, &head_top);
        k.push(Instr::Label(done));
    }

    /// One query block `qb` of one head: load, the row loop, dq.
    fn step(&mut self, params: &Params, cta: &Cta, head: &Head, qb: Reg) {
        let plan = self.plan;
        let [q_off, do_off, _, _, lse_off, delta_off, _] = plan.layout();
        let i0 = self.k.bin(BinOp::Mul, Ty::U32, qb, u(plan.block_m));
        self.load_tile(
            cta,
            plan.block_m,
            head.qhead,
            head.qstride,
            i0,
            cta.len_q,
            q_off,
        );
        self.load_tile(
            cta,
            plan.block_m,
            head.dohead,
            head.dostride,
            i0,
            cta.len_q,
            do_off,
        );
        // lse_log2 (+inf past Sq) and delta (0 past Sq) of the block's rows.
        let k = &mut self.k;
        let row = k.bin(BinOp::Add, Ty::U32, i0, cta.tid);
        let live = k.setp(Cmp::Lt, Ty::U32, row, cta.len_q);
        let mine = k.setp(Cmp::Lt, Ty::U32, cta.tid, u(plan.block_m));
        let row4 = k.bin(BinOp::MulWide, Ty::U32, row, u(4));
        let la = k.bin(BinOp::Add, Ty::U64, head.lse, row4);
        let da = k.bin(BinOp::Add, Ty::U64, head.delta, row4);
        let lse = k.mov(Ty::F32, f(f32::INFINITY));
        let delta = k.mov(Ty::F32, f(0.0));
        for (dst, addr) in [(lse, la), (delta, da)] {
            k.guard(
                live,
                false,
                Instr::Ld {
                    space: StateSpace::Global,
                    ty: Ty::F32,
                    dst: vec![dst],
                    addr: Addr::at(addr, 0),
                },
            );
        }
        let sa = k.mad(Ty::U32, cta.tid, u(4), cta.sbase);
        self.store(
            StateSpace::Shared,
            Some(mine),
            Addr::at(sa, lse_off as i64),
            vec![lse],
        );
        self.store(
            StateSpace::Shared,
            Some(mine),
            Addr::at(sa, delta_off as i64),
            vec![delta],
        );
        self.k.push(Instr::BarSync(0));

        // The rows to visit: up to Sq, rounded up to the unroll (rows past
        // Sq are zeros with lse +inf: they weigh nothing).
        let k = &mut self.k;
        let left = k.bin(BinOp::Sub, Ty::U32, cta.len_q, i0);
        let iend = k.bin(BinOp::Min, Ty::U32, left, u(plan.block_m));
        let iend = k.bin(BinOp::Add, Ty::U32, iend, u(plan.unroll - 1));
        let iend = k.bin(BinOp::And, Ty::U32, iend, u(!(plan.unroll - 1)));
        let masked = k.label("masked_rows");
        let rows_done = k.label("rows_done");
        k.branch_if(head.has_mask, false, &masked);
        self.row_loop(cta, head, i0, iend, None);
        self.k.push(Instr::Bra {
            target: rows_done.clone(),
            uni: true,
        });
        self.k.push(Instr::Label(masked));
        // One loop per element kind of the mask, behind uniform branches.
        let kind = params.get(&mut self.k, "mask_kind");
        let mut kernel = std::mem::replace(&mut self.k, Kernel::new("per_kind"));
        per_kind(&mut kernel, kind, |k, mk| {
            std::mem::swap(k, &mut self.k);
            let mask = MaskRead::new(params, &mut self.k, cta, mk);
            self.row_loop(cta, head, i0, iend, Some(&mask));
            std::mem::swap(k, &mut self.k);
        });
        self.k = kernel;
        self.k.push(Instr::Label(rows_done));
        self.k.push(Instr::BarSync(0));

        self.dq(cta, head, qb, i0);
    }

    /// The loop over the block's rows `0 .. iend`: scores, `P`, `dS`, the
    /// `dk` and `dv` sums, `dS` into shared memory.
    // Key slots index several per-slot arrays at once (scores, k, v, the
    // accumulators, limits, mask addresses): plain index loops read best.
    #[allow(clippy::needless_range_loop)]
    fn row_loop(
        &mut self,
        cta: &Cta,
        head: &Head,
        i0: Reg,
        iend: Reg,
        with_mask: Option<&MaskRead>,
    ) {
        let plan = self.plan;
        let [_, do_off, _, ds_off, lse_off, delta_off, _] = plan.layout();
        let (lanes, width) = (plan.lanes, plan.width);
        let k = &mut self.k;
        let ii = k.mov(Ty::U32, u(0));
        let qp = k.mov(Ty::U32, cta.slane);
        // lse_log2[ii] (and delta at a fixed offset), and dS[key slot 0][ii].
        let lp = k.mov(Ty::U32, cta.sbase);
        let dsp = k.mad(Ty::U32, cta.grp, u(plan.ds_pitch()), cta.sbase);
        let top = k.label(if with_mask.is_some() { "row_m" } else { "row" });
        k.push(Instr::Label(top.clone()));
        for un in 0..plan.unroll {
            let k = &mut self.k;
            let row = k.bin(BinOp::Add, Ty::U32, i0, ii);
            let row = if un == 0 {
                row
            } else {
                k.bin(BinOp::Add, Ty::U32, row, u(un))
            };
            let roff = un * plan.row_bytes();
            // This lane's columns of q_i and dout_i.
            let mut qv = Vec::new();
            let mut dov = Vec::new();
            for c in 0..plan.chunks() {
                let off = roff + c * lanes * width * 4;
                qv.extend(self.load(StateSpace::Shared, None, Addr::at(qp, off as i64), width));
                let off = off + do_off;
                dov.extend(self.load(StateSpace::Shared, None, Addr::at(qp, off as i64), width));
            }
            let k = &mut self.k;
            let rows = plan.rows as usize;
            // Partial dot products.
            let mut s = Vec::new();
            let mut dp = Vec::new();
            for r in 0..rows {
                let a = k.bin(BinOp::Mul, Ty::F32, qv[0], cta.kq[r][0]);
                let b = k.bin(BinOp::Mul, Ty::F32, dov[0], cta.v[r][0]);
                for e in 1..qv.len() {
                    k.mad_to(Ty::F32, a, qv[e], cta.kq[r][e], a);
                    k.mad_to(Ty::F32, b, dov[e], cta.v[r][e], b);
                }
                s.push(a);
                dp.push(b);
            }
            // Butterfly sums over the key's lanes.
            let mut dist = 1;
            while dist < lanes {
                let mut others = Vec::new();
                for &x in s.iter().chain(&dp) {
                    let o = k.reg(Ty::F32);
                    k.push(Instr::ShflBfly {
                        dst: o,
                        src: x,
                        lane_mask: dist,
                    });
                    others.push((x, o));
                }
                for (x, o) in others {
                    k.bin_to(BinOp::Add, Ty::F32, x, x, o);
                }
                dist *= 2;
            }
            let lse = k.reg(Ty::F32);
            let delta = k.reg(Ty::F32);
            for (dst, off) in [(lse, lse_off), (delta, delta_off)] {
                k.push(Instr::Ld {
                    space: StateSpace::Shared,
                    ty: Ty::F32,
                    dst: vec![dst],
                    addr: Addr::at(lp, (off + 4 * un) as i64),
                });
            }
            if let Some(m) = with_mask {
                let row_in = k.setp(Cmp::Lt, Ty::U32, row, cta.len_q);
                let row64 = k.cvt(None, Ty::U64, Ty::U32, row);
                let roff64 = k.bin(BinOp::Mul, Ty::U64, row64, head.mask_row);
                for r in 0..rows {
                    let ok = k.reg(Ty::Pred);
                    k.bin_to(BinOp::And, Ty::Pred, ok, m.key_ok[r], row_in);
                    let e = k.bin(BinOp::Add, Ty::U64, head.mask_keys[r], roff64);
                    let addr = k.mad(Ty::U64, e, Operand::U(m.kind.bytes()), m.ptr);
                    let bias = load_bias(k, m.kind, ok, Addr::at(addr, 0));
                    k.mad_to(Ty::F32, s[r], bias, f(LOG2E), s[r]);
                }
            }
            for r in 0..rows {
                let hidden = k.setp(Cmp::Gt, Ty::U32, cta.thr[r], row);
                hide_if(k, s[r], hidden);
                let x = k.bin(BinOp::Sub, Ty::F32, s[r], lse);
                let p = k.un(UnOp::Ex2, Ty::F32, x);
                let t = k.bin(BinOp::Sub, Ty::F32, dp[r], delta);
                let ds = k.bin(BinOp::Mul, Ty::F32, p, t);
                let st = Instr::St {
                    space: StateSpace::Shared,
                    ty: Ty::F32,
                    addr: Addr::at(
                        dsp,
                        (ds_off + r as u32 * (THREADS / lanes) * plan.ds_pitch() + 4 * un) as i64,
                    ),
                    src: vec![ds],
                };
                k.guard(cta.group_lead, false, st);
                for e in 0..qv.len() {
                    k.mad_to(Ty::F32, cta.dv[r][e], p, dov[e], cta.dv[r][e]);
                    k.mad_to(Ty::F32, cta.dk[r][e], ds, qv[e], cta.dk[r][e]);
                }
            }
        }
        let k = &mut self.k;
        k.bin_to(BinOp::Add, Ty::U32, ii, ii, u(plan.unroll));
        k.bin_to(
            BinOp::Add,
            Ty::U32,
            qp,
            qp,
            u(plan.unroll * plan.row_bytes()),
        );
        k.bin_to(BinOp::Add, Ty::U32, lp, lp, u(4 * plan.unroll));
        k.bin_to(BinOp::Add, Ty::U32, dsp, dsp, u(4 * plan.unroll));
        let more = k.setp(Cmp::Lt, Ty::U32, ii, iend);
        k.branch_if(more, false, &top);
    }

    /// `dq_accum += dS · K` for the block, in key-block order under the
    /// block's counter.
    fn dq(&mut self, cta: &Cta, head: &Head, qb: Reg, i0: Reg) {
        let plan = self.plan;
        let [_, _, k_off, ds_off, _, _, _] = plan.layout();
        let d = plan.d;
        let col_groups = d / 8;
        let tiles = plan.block_m / 4 * col_groups;
        let k = &mut self.k;
        let qb64 = k.cvt(None, Ty::U64, Ty::U32, qb);
        let sem_addr = k.mad(Ty::U64, qb64, u(4), head.sem);
        for pass in 0..tiles.div_ceil(THREADS) {
            let k = &mut self.k;
            let t = k.bin(BinOp::Add, Ty::U32, cta.tid, u(pass * THREADS));
            let valid =
                ((pass + 1) * THREADS > tiles).then(|| k.setp(Cmp::Lt, Ty::U32, t, u(tiles)));
            let t = match valid {
                Some(v) => k.selp(Ty::U32, t, u(0), v),
                None => t,
            };
            let (rg, cg) = if col_groups.is_power_of_two() {
                (
                    k.bin(BinOp::Shr, Ty::U32, t, u(col_groups.trailing_zeros())),
                    k.bin(BinOp::And, Ty::U32, t, u(col_groups - 1)),
                )
            } else {
                (
                    k.bin(BinOp::Div, Ty::U32, t, u(col_groups)),
                    k.bin(BinOp::Rem, Ty::U32, t, u(col_groups)),
                )
            };
            let dsp = k.mad(Ty::U32, rg, u(16), cta.sbase);
            let kp = k.mad(Ty::U32, cg, u(16), cta.sbase);
            let acc: Vec<Vec<Reg>> = (0..4)
                .map(|_| (0..8).map(|_| k.mov(Ty::F32, f(0.0))).collect())
                .collect();
            let n = k.mov(Ty::U32, u(0));
            let top = k.label("dq_keys");
            k.push(Instr::Label(top.clone()));
            for nu in 0..DQ_UNROLL {
                let dsv = self.load(
                    StateSpace::Shared,
                    None,
                    Addr::at(dsp, (ds_off + nu * plan.ds_pitch()) as i64),
                    4,
                );
                let krow = k_off + nu * plan.row_bytes();
                let mut kv = self.load(StateSpace::Shared, None, Addr::at(kp, krow as i64), 4);
                kv.extend(self.load(
                    StateSpace::Shared,
                    None,
                    Addr::at(kp, (krow + 2 * d) as i64),
                    4,
                ));
                let k = &mut self.k;
                for (r, &x) in dsv.iter().enumerate() {
                    for (c, &y) in kv.iter().enumerate() {
                        k.mad_to(Ty::F32, acc[r][c], x, y, acc[r][c]);
                    }
                }
            }
            let k = &mut self.k;
            k.bin_to(BinOp::Add, Ty::U32, n, n, u(DQ_UNROLL));
            k.bin_to(
                BinOp::Add,
                Ty::U32,
                dsp,
                dsp,
                u(DQ_UNROLL * plan.ds_pitch()),
            );
            k.bin_to(BinOp::Add, Ty::U32, kp, kp, u(DQ_UNROLL * plan.row_bytes()));
            let more = k.setp(Cmp::Lt, Ty::U32, n, cta.n_keys);
            k.branch_if(more, false, &top);

            if pass == 0 {
                self.wait_turn(cta, sem_addr);
            }
            let k = &mut self.k;
            // Columns 4·cg .. and D/2 + 4·cg .. of rows i0 + 4·rg ...
            let row0 = k.mad(Ty::U32, rg, u(4), i0);
            let col4 = k.bin(BinOp::MulWide, Ty::U32, cg, u(16));
            for (r, accs) in acc.iter().enumerate() {
                let row = k.bin(BinOp::Add, Ty::U32, row0, u(r as u32));
                let ok = k.setp(Cmp::Lt, Ty::U32, row, cta.len_q);
                if let Some(v) = valid {
                    k.bin_to(BinOp::And, Ty::Pred, ok, ok, v);
                }
                let row64 = k.cvt(None, Ty::U64, Ty::U32, row);
                let ra = k.mad(Ty::U64, row64, u(4 * d), head.accum);
                let ra = k.bin(BinOp::Add, Ty::U64, ra, col4);
                for (c, &x) in accs.iter().enumerate() {
                    let off = if c < 4 {
                        4 * c as u32
                    } else {
                        2 * d + 4 * (c as u32 - 4)
                    };
                    k.guard(
                        ok,
                        false,
                        Instr::RedAddF32 {
                            addr: Addr::at(ra, off as i64),
                            src: x,
                        },
                    );
                }
            }
        }
        // Release: every thread's additions before the counter moves on.
        let k = &mut self.k;
        k.push(Instr::BarSync(0));
        let next = k.bin(BinOp::Add, Ty::U32, cta.kblock, u(1));
        k.guard(cta.lead, false, Instr::FenceGpu);
        k.guard(
            cta.lead,
            false,
            Instr::StRelease {
                addr: Addr::at(sem_addr, 0),
                src: next.into(),
            },
        );
    }

    /// Thread 0 spins until the counter at `sem_addr` reads this CTA's key
    /// block; then the CTA meets at a barrier.
    fn wait_turn(&mut self, cta: &Cta, sem_addr: Reg) {
        let k = &mut self.k;
        let skip = k.label("waited");
        let spin = k.label("spin");
        k.guard(
            cta.lead,
            true,
            Instr::Bra {
                target: skip.clone(),
                uni: false,
            },
        );
        k.push(Instr::Label(spin.clone()));
        let seen = k.reg(Ty::U32);
        k.push(Instr::LdAcquire {
            dst: seen,
            addr: Addr::at(sem_addr, 0),
        });
        let not_yet = k.setp(Cmp::Ne, Ty::U32, seen, cta.kblock);
        k.guard(
            not_yet,
            false,
            Instr::Bra {
                target: spin,
                uni: false,
            },
        );
        k.push(Instr::Label(skip));
        k.push(Instr::BarSync(0));
    }

    /// `dk · scale` and `dv` of the keys below `Sk`.
    fn epilogue(&mut self, params: &Params, cta: &Cta) {
        let plan = self.plan;
        let (lanes, width) = (plan.lanes, plan.width);
        let dk_ptr = params.get(&mut self.k, "dk");
        let dv_ptr = params.get(&mut self.k, "dv");
        let dks = params.strides(&mut self.k, "dk");
        let dvs = params.strides(&mut self.k, "dv");
        let scale = params.get(&mut self.k, "scale");
        let k = &mut self.k;
        let kv_head = k.mov(Ty::U32, Operand::Special(Special::CtaIdY));
        let kvh64 = k.cvt(None, Ty::U64, Ty::U32, kv_head);
        let (dkhead, dkstride) =
            tensor_head_wide(k, dk_ptr, dks, cta.batch64, kvh64, 4, ByteScale::Shift);
        let (dvhead, dvstride) =
            tensor_head_wide(k, dv_ptr, dvs, cta.batch64, kvh64, 4, ByteScale::Shift);
        // The sequence's first key, read again rather than held across the
        // loop.
        let starts = params.get(k, "k_start");
        let tokens = params.get(k, "tokens_k");
        let batch = k.mov(Ty::U32, Operand::Special(Special::CtaIdZ));
        let k_start = super::sequence_start(k, starts, tokens, batch);
        let ks64 = k.cvt(None, Ty::U64, Ty::U32, k_start);
        let dkhead = k.mad(Ty::U64, ks64, dkstride, dkhead);
        let dvhead = k.mad(Ty::U64, ks64, dvstride, dvhead);
        for r in 0..plan.rows as usize {
            let k = &mut self.k;
            let key64 = k.cvt(None, Ty::U64, Ty::U32, cta.keys[r]);
            let ka = k.mad(Ty::U64, key64, dkstride, dkhead);
            let ka = k.bin(BinOp::Add, Ty::U64, ka, cta.lane_g);
            let va = k.mad(Ty::U64, key64, dvstride, dvhead);
            let va = k.bin(BinOp::Add, Ty::U64, va, cta.lane_g);
            for c in 0..plan.chunks() {
                let off = (c * lanes * width * 4) as i64;
                let cols = (c * width) as usize..((c + 1) * width) as usize;
                let dk: Vec<Reg> = cta.dk[r][cols.clone()]
                    .iter()
                    .map(|&x| self.k.bin(BinOp::Mul, Ty::F32, x, scale))
                    .collect();
                self.store(
                    StateSpace::Global,
                    Some(cta.key_ok[r]),
                    Addr::at(ka, off),
                    dk,
                );
                let dv = cta.dv[r][cols].to_vec();
                self.store(
                    StateSpace::Global,
                    Some(cta.key_ok[r]),
                    Addr::at(va, off),
                    dv,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(d: usize, causal: bool) -> VariantSpec {
        VariantSpec::new(d, causal, DType::F32).unwrap()
    }

    #[test]
    fn plans_fit_the_limits() {
        for d in (8..=256).step_by(8) {
            let p = Plan::new(d);
            assert!(d.is_multiple_of(p.lanes * p.width), "{p:?}");
            assert!(p.rows * p.cols() <= 32, "{p:?}");
            assert!((16..=64).contains(&p.block_n()), "{p:?}");
            assert!(p.smem_bytes() <= SMEM_BUDGET, "{p:?}");
            assert!(p.block_m.is_multiple_of(4 * p.unroll), "{p:?}");
            assert!(p.block_n().is_multiple_of(DQ_UNROLL), "{p:?}");
        }
    }

    #[test]
    fn the_semaphore_protocol_is_emitted_in_order() {
        for d in [8, 40, 64, 128, 256] {
            for causal in [false, true] {
                let (g, block_n) = main_kernel(&spec(d, causal), Target::Sm80);
                let plan = Plan::new(d as u32);
                assert_eq!(block_n, plan.block_n());
                assert_eq!(g.block_m, plan.block_m);
                assert_eq!(g.threads, THREADS);
                let text = &g.ptx;
                let at = |s: &str| text.find(s).unwrap_or_else(|| panic!("{s} missing"));
                let acquire = at("ld.acquire.gpu.global.u32");
                let red = at("red.global.add.f32");
                let fence = at("fence.acq_rel.gpu;");
                let release = at("st.release.gpu.global.u32");
                assert!(acquire < red && red < fence && fence < release, "d={d}");
                assert_eq!(text.matches("ld.acquire").count(), 1);
                assert_eq!(text.matches("st.release").count(), 1);
                assert!(text.contains(".extern .shared"), "dynamic shared memory");
                assert!(text.contains("ex2.approx.ftz.f32"));
            }
        }
    }
}

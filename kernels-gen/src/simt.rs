//! The portable GPU kernel: attention on the CUDA cores (no tensor cores),
//! for every element type, with scores, softmax and accumulation in `f32`.
//! It serves `f32` variants and any GPU or element type the tensor-core
//! kernel does not cover.
//!
//! # Structure
//!
//! A CTA of [`THREADS`] threads computes [`Plan::block_m`] query rows of one
//! (batch, head), following the launch contract of [`crate::contract`].
//!
//! - **Rows to lanes.** Each query row is owned by a group of `lanes`
//!   consecutive lanes and each group owns `rows` rows ([`Plan::new`] picks
//!   them per head size: 4 × 4 for 64, 8 × 4 for 128, 16 × 4 for 256). A
//!   lane holds `D / lanes` columns of each of its rows' `q` (pre-multiplied
//!   by `scale·log2(e)`) and of their output accumulators, in registers. Its
//!   columns are interleaved in chunks of `width` (4 or 2) floats: chunk `c`
//!   of lane `t` is columns `(c·lanes + t)·width ..`, so the lanes of a group
//!   read one contiguous run of shared memory (no bank conflicts) and every
//!   group of a warp reads the same one (a broadcast).
//!   Owning several rows per group is the register blocking of this kernel:
//!   every K or V value read from shared memory feeds `rows` FMAs, and the
//!   shared-memory and shuffle traffic stays below the FMA rate.
//! - **Keys through shared memory.** K and V stream through shared memory
//!   in tiles of `tile` keys, converted to `f32` once when loaded (16-byte
//!   global loads by all threads, 64-bit address arithmetic, rows past the
//!   CTA's last visible key zero-filled), `bar.sync` between the load and
//!   the use and after the use. Tiles take at most 32 KB (two CTAs fit an
//!   SM by registers, and no opt-in above 48 KB is needed).
//! - **Groups of keys.** A tile is processed in groups of `group` (8) keys
//!   by a run-time loop, which keeps the unrolled code of one iteration
//!   small (about 1,500 instructions at most). For each key every
//!   lane computes its partial dot product over its columns and `log2(lanes)`
//!   `shfl.sync.bfly` steps complete it in every lane of the group; then the
//!   mask (only when the mask pointer is non-null; a uniform branch) and the
//!   causal / ragged-end `-inf` (only in groups that need it; a uniform
//!   branch) are applied, and the online softmax updates the row: block max,
//!   shift `m_new` (0 while the row has seen only `-inf`, so no
//!   `ex2(-inf - -inf)`), `p = ex2(s - shift)`, rescale `ex2(m_old - shift)`
//!   of the running sum and accumulators, `acc += p·V`.
//!   The lanes of a group hold identical scores and sums, so no reduction is
//!   needed at the end.
//! - **Sequences** ([`crate::attention::seqs`]): the prologue reads the
//!   batch entry's query and key sequences once; rows and keys are local to
//!   them from there (`Sq` and `Sk` below are their lengths), every tensor
//!   is addressed from token `start`, and a CTA whose rows all lie past its
//!   sequence's end leaves at once. The epilogue reads the query sequence
//!   again rather than hold it across the loop.
//! - **Causal** (top-left): a CTA stops at key `min(Sk, Sq, last row + 1)`.
//! - **NaN.** `max.f32` ignores a NaN operand, so a NaN score leaves the
//!   running max finite (or `-inf`) and `ex2(NaN - shift)` = NaN reaches the
//!   sum and the row's output: NaN propagates, it is never mistaken for a
//!   fully masked row. A row whose sum is exactly 0 (every key `-inf`) is
//!   written as zeros.
//! - **Branches** are all uniform over the CTA (they depend on `Sk`, `Sq`,
//!   the block index and the mask pointer only), so the shuffles always run
//!   with the whole warp.
//!
//! Global rows of `q`, `k`, `v` and `out` are accessed with vectors of up to
//! 16 bytes: every row start must be 16-byte aligned (base pointers and
//! strides times the element size multiples of 16 bytes). The mask is read
//! in place one element at a time, of any
//! [`crate::attention::mask::MaskKind`] (one specialised body per kind
//! behind uniform branches, inside the masked path only), and needs no
//! alignment beyond its element's.
//!
//! # Testing without a GPU
//!
//! The unit tests run the emitted instruction list through a small lock-step
//! interpreter of one CTA (uniform branches and full-warp shuffles are
//! asserted, every global access is bounds-checked, shared memory starts as
//! NaN) and compare with a float64 reference: ragged lengths, GQA, causal
//! with `Sq` above and below `Sk`, packed variable lengths and key runs
//! (rows outside the sequences must keep their NaN poison), dense and
//! broadcast masks of every element kind with front padding, fully masked
//! rows and NaN rows, in all three element types. With `PTXAS` set they also
//! assemble a sample of variants for sm_80 and sm_90 and require zero spills.

use crate::attention::at_token;
use crate::attention::mask::{
    add_kind_bias, hide_unless, key_end, mask_column_limit, mask_of_head_wide, mask_row_offset,
    per_kind, row_key_end,
};
use crate::attention::seqs::{sequence, Sequence, Side};
use crate::attention::softmax::{
    exp2_shifted, pack, reduce_pairwise, scale, update_max, update_sum,
};
use crate::attention::store::{exit_past_end, lse_rows, row_inverse, store_lse};
use crate::contract::{
    cta_coords, cta_head_batch, declare_params, kv_head, tensor_head_wide, ByteScale, GpuKernel,
    Params, SCALE_PARAM,
};
use crate::ptx::{
    Addr, BinOp, Cmp, Instr, Kernel, Module, Operand, Reg, Special, StateSpace, Target, Ty,
};
use crate::{DType, VariantSpec};

/// Threads per CTA.
const THREADS: u32 = 128;
/// The shared-memory budget of one K tile plus one V tile.
const TILE_BYTES: u32 = 32 * 1024;

/// The shape of one head size's kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Head size.
    pub d: u32,
    /// Consecutive lanes that share a query row.
    pub lanes: u32,
    /// Query rows per lane group.
    pub rows: u32,
    /// Columns per chunk (one shared-memory vector load).
    pub width: u32,
    /// Keys per softmax step.
    pub group: u32,
    /// Keys per shared-memory tile.
    pub tile: u32,
}

impl Plan {
    /// The plan of head size `d` (a multiple of 8 in 8..=256): the
    /// (lanes, rows) split with the least shared-memory and shuffle traffic
    /// per FMA, within the register budget.
    ///
    /// Per key, a lane loads `2·d/lanes` floats of K and V from shared
    /// memory, runs `rows·log2(lanes)` shuffles and `2·rows·d/lanes` FMAs.
    /// On H100 the loads cost in proportion to the bytes each thread reads
    /// (a broadcast `ld.shared.v4` takes as long as four scalar ones), so
    /// the cost per FMA is `(2·d/lanes + rows·log2(lanes)) / (2·rows·d/lanes)`.
    /// Measured (f32, H100, 1×24×4096², d=128): 4 lanes × 2 rows 25.7
    /// TFLOP/s, 8 × 4 30.7, 16 × 4 20.5; d=256: 8 × 2 22.7, 16 × 4 26.0;
    /// d=64: 4 × 4 32.9, 8 × 4 23.6 — the model's order.
    ///
    /// Budget: `rows·d/lanes` (q, and again the accumulators) at most 72
    /// registers and `rows·group` scores at most 32, which ptxas fits in
    /// 255 registers without spilling; 32 to 128 rows per CTA.
    pub fn new(d: u32) -> Plan {
        let mut best: Option<(f64, Plan)> = None;
        for lanes in [2, 4, 8, 16] {
            if !d.is_multiple_of(2 * lanes) {
                continue;
            }
            for rows in [1, 2, 4] {
                let p = Plan::with(d, lanes, rows);
                let per_row = rows * d / lanes;
                if per_row > 72 || rows * p.group > 32 || !(32..=128).contains(&p.block_m()) {
                    continue;
                }
                let traffic = 2.0 * d as f64 / lanes as f64 + (rows * lanes.ilog2()) as f64;
                let cost = traffic / (2 * per_row) as f64;
                if best.is_none_or(|(c, _)| cost < c) {
                    best = Some((cost, p));
                }
            }
        }
        best.expect("every head size has a plan").1
    }

    /// The plan of head size `d` with `lanes` lanes per row and `rows`
    /// rows per lane group.
    pub fn with(d: u32, lanes: u32, rows: u32) -> Plan {
        let per_lane = d / lanes;
        let width = if per_lane.is_multiple_of(4) { 4 } else { 2 };
        let group = 8;
        let tile = (TILE_BYTES / (2 * 4 * d) / group * group).clamp(group, 64);
        Plan {
            d,
            lanes,
            rows,
            width,
            group,
            tile,
        }
    }

    /// Query rows per CTA.
    pub fn block_m(&self) -> u32 {
        THREADS / self.lanes * self.rows
    }

    /// Chunks per lane per row.
    fn chunks(&self) -> u32 {
        self.d / (self.lanes * self.width)
    }

    /// Bytes of one `f32` row of a shared tile.
    fn row_bytes(&self) -> u32 {
        self.d * 4
    }

    /// Dynamic shared memory: one K tile and one V tile of `f32`.
    pub fn smem_bytes(&self) -> u32 {
        2 * self.tile * self.row_bytes()
    }
}

/// Generates the CUDA-core kernel of `spec`.
pub fn generate(spec: &VariantSpec, target: Target) -> GpuKernel {
    let plan = Plan::new(spec.head_size as u32);
    let entry = spec.kernel_name();
    let k = build(spec, plan);
    GpuKernel {
        ptx: Module::new(target).kernel(k).to_string(),
        entry,
        target,
        block_m: plan.block_m(),
        threads: THREADS,
        smem_bytes: plan.smem_bytes(),
        mask_smem_bytes: 0,
        tensor_maps: None,
    }
}

/// The kernel of `spec` laid out by `plan`.
pub(crate) fn build(spec: &VariantSpec, plan: Plan) -> Kernel {
    let mut e = Emitter {
        k: Kernel::new(spec.kernel_name()),
        plan,
        dtype: spec.dtype,
        causal: spec.causal,
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

/// What the prologue computes for the key loop and the epilogue.
struct Ctx {
    tid: Reg,
    /// Keys this CTA visits: `[0, kend)`.
    kend: Reg,
    /// Groups ending at or below this need no `-inf` masking.
    full_lim: Reg,
    has_mask: Reg,
    khead: Reg,
    vhead: Reg,
    kstride: Reg,
    vstride: Reg,
    sbase: Reg,
    /// Shared address of this lane's first column in tile row 0.
    slane: Reg,
    /// Per row: the first key it does not see (`min(Sk, i + 1)` causal).
    lims: Vec<Reg>,
    /// Per row: the mask columns it reads ([`mask_column_limit`]) if the
    /// row exists, else 0.
    mask_lims: Vec<Reg>,
    /// Per row: the element offset of its mask row's key 0
    /// ([`mask_row_offset`]).
    mask_rows: Vec<Reg>,
    /// Per row: q (scaled) by chunk-major column index.
    q: Vec<Vec<Reg>>,
    /// Per row: the output accumulator, same layout as `q`.
    acc: Vec<Vec<Reg>>,
    /// Per row: running max (scaled by log2(e)).
    m: Vec<Reg>,
    /// Per row: running sum.
    l: Vec<Reg>,
}

struct Emitter {
    k: Kernel,
    plan: Plan,
    dtype: DType,
    causal: bool,
}

impl Emitter {
    fn es(&self) -> u32 {
        self.dtype.size_bytes() as u32
    }

    /// Batch entry `batch`'s sequence of side `side` (`"q"` or `"k"`),
    /// from the contract's bounds ([`sequence`]).
    fn sequence(&mut self, params: &Params, batch: Reg, side: &str) -> Sequence {
        let k = &mut self.k;
        let starts = params.get(k, &format!("{side}_start"));
        let ends = params.get(k, &format!("{side}_end"));
        let tokens = params.get(k, &format!("tokens_{side}"));
        let bound = params.get(k, &format!("seq_{side}"));
        let side = Side {
            starts,
            ends,
            tokens,
            bound,
        };
        sequence(k, side, batch)
    }

    /// Loads `n` consecutive elements (2, 4 or 8: at most 16 bytes) from
    /// global `addr` as `f32`, zeros where `pred` is false.
    fn load_elems(&mut self, pred: Reg, base: Reg, offset: u32, n: u32) -> Vec<Reg> {
        let k = &mut self.k;
        match self.dtype {
            DType::F32 => {
                let mut out = Vec::new();
                for part in 0..n.div_ceil(4) {
                    let m = (n - 4 * part).min(4);
                    let dst = k.regs(Ty::F32, m as usize);
                    for &r in &dst {
                        k.mov_to(Ty::F32, r, f(0.0));
                    }
                    k.guard(
                        pred,
                        false,
                        Instr::Ld {
                            space: StateSpace::GlobalNc,
                            ty: Ty::F32,
                            dst: dst.clone(),
                            addr: Addr::at(base, (offset + 16 * part) as i64),
                        },
                    );
                    out.extend(dst);
                }
                out
            }
            DType::F16 | DType::BF16 => {
                let words = k.regs(Ty::B32, (n / 2) as usize);
                for &w in &words {
                    k.mov_to(Ty::B32, w, u(0));
                }
                k.guard(
                    pred,
                    false,
                    Instr::Ld {
                        space: StateSpace::GlobalNc,
                        ty: Ty::B32,
                        dst: words.clone(),
                        addr: Addr::at(base, offset as i64),
                    },
                );
                words.into_iter().flat_map(|w| self.widen(w)).collect()
            }
        }
    }

    /// The two 16-bit elements packed in `w` as `f32` (low half first).
    fn widen(&mut self, w: Reg) -> [Reg; 2] {
        let k = &mut self.k;
        match self.dtype {
            DType::BF16 => {
                // bf16 is the upper half of an f32: a shift is the exact
                // conversion (`cvt.f32.bf16` needs PTX 7.1).
                let lo_bits = k.bin(BinOp::Shl, Ty::B32, w, u(16));
                let hi_bits = k.bin(BinOp::And, Ty::B32, w, u(0xFFFF_0000));
                let lo = k.reg(Ty::F32);
                let hi = k.reg(Ty::F32);
                k.mov_to(Ty::B32, lo, lo_bits);
                k.mov_to(Ty::B32, hi, hi_bits);
                [lo, hi]
            }
            _ => {
                let lo_h = k.reg(Ty::B16);
                let hi_h = k.reg(Ty::B16);
                k.push(Instr::Unpack {
                    lo: lo_h,
                    hi: hi_h,
                    src: w,
                });
                let lo = k.cvt(None, Ty::F32, Ty::F16, lo_h);
                let hi = k.cvt(None, Ty::F32, Ty::F16, hi_h);
                [lo, hi]
            }
        }
    }

    /// Stores `vals` (2 or 4 `f32`) as consecutive elements at global
    /// `base + offset` where `pred` holds.
    fn store_elems(&mut self, pred: Reg, base: Reg, offset: u32, vals: &[Reg]) {
        let k = &mut self.k;
        let (ty, src) = match self.dtype {
            DType::F32 => (Ty::F32, vals.to_vec()),
            DType::F16 | DType::BF16 => {
                let packed = if self.dtype == DType::F16 {
                    Ty::F16x2
                } else {
                    Ty::BF16x2
                };
                let words = vals
                    .chunks(2)
                    .map(|pair| {
                        let w = k.reg(Ty::B32);
                        pack(k, packed, w, pair[0], pair[1]);
                        w
                    })
                    .collect();
                (Ty::B32, words)
            }
        };
        k.guard(
            pred,
            false,
            Instr::St {
                space: StateSpace::Global,
                ty,
                addr: Addr::at(base, offset as i64),
                src,
            },
        );
    }

    fn emit(&mut self) {
        let plan = self.plan;
        // `.minnctapersm 2` allows 255 registers (2 · 128 · 256 = 64K) and
        // keeps ptxas from capping some variants at 128 registers and
        // spilling (d=80 f16 on sm_90 did without it).
        self.k.launch_bounds(THREADS, Some(2));
        self.k.dynamic_shared(16);
        self.k.comment(format!(
            "CUDA-core attention: d={} causal={} {}; {} lanes x {} rows per group, \
             block_m {}, {}-key tiles, {}-key groups",
            plan.d,
            self.causal,
            self.dtype,
            plan.lanes,
            plan.rows,
            plan.block_m(),
            plan.tile,
            plan.group
        ));
        let params = declare_params(&mut self.k);
        let ctx = self.prologue(&params);
        self.key_loop(&ctx, &params);
        self.epilogue(&ctx, &params);
        self.k.push(Instr::Ret);
    }

    /// Coordinates, bases, the causal bounds, q in registers, the mask rows
    /// and the softmax state.
    fn prologue(&mut self, params: &Params) -> Ctx {
        let plan = self.plan;
        let (lanes, rows, width) = (plan.lanes, plan.rows, plan.width);
        let es = self.es();

        let q_ptr = params.get(&mut self.k, "q");
        let k_ptr = params.get(&mut self.k, "k");
        let v_ptr = params.get(&mut self.k, "v");
        let mask = params.get(&mut self.k, "mask");
        let batches = params.get(&mut self.k, "mask_batches");
        let qs = params.strides(&mut self.k, "q");
        let ks = params.strides(&mut self.k, "k");
        let vs = params.strides(&mut self.k, "v");
        let ms = params.strides(&mut self.k, "mask");
        let group = params.get(&mut self.k, "group");
        let scale = params.get(&mut self.k, SCALE_PARAM.0);
        let mask_pad = params.get(&mut self.k, "mask_pad");

        // Query blocks in grid order, causal or not.
        let (tid, qblock, head, batch) = cta_coords(&mut self.k, false);
        // Rows and keys are local to the batch entry's sequences from here.
        let q_seq = self.sequence(params, batch, "q");
        let k_seq = self.sequence(params, batch, "k");
        let (seq_q, seq_k) = (q_seq.len, k_seq.len);
        let k = &mut self.k;
        let i0 = k.bin(BinOp::Mul, Ty::U32, qblock, u(plan.block_m()));
        exit_past_end(k, i0, seq_q);
        let lane = k.bin(BinOp::And, Ty::U32, tid, u(lanes - 1));
        let grp = k.bin(BinOp::Shr, Ty::U32, tid, u(lanes.trailing_zeros()));
        let kv_head = kv_head(k, head, group);
        let b64 = k.cvt(None, Ty::U64, Ty::U32, batch);
        let h64 = k.cvt(None, Ty::U64, Ty::U32, head);
        let kvh64 = k.cvt(None, Ty::U64, Ty::U32, kv_head);
        // Byte offset of this lane's first column in a global row.
        let lane_g = k.bin(BinOp::MulWide, Ty::U32, lane, u(width * es));

        let es64 = es as u64;
        let (qhead, qstride) = tensor_head_wide(k, q_ptr, qs, b64, h64, es64, ByteScale::Shift);
        let (khead, kstride) = tensor_head_wide(k, k_ptr, ks, b64, kvh64, es64, ByteScale::Shift);
        let (vhead, vstride) = tensor_head_wide(k, v_ptr, vs, b64, kvh64, es64, ByteScale::Shift);
        // Local row 0 of each is token `start` of its sequence.
        let qhead = at_token(k, qhead, q_seq.start, qstride);
        let khead = at_token(k, khead, k_seq.start, kstride);
        let vhead = at_token(k, vhead, k_seq.start, vstride);

        // The rows of this thread: grp + r·(threads/lanes).
        let base_row = k.bin(BinOp::Add, Ty::U32, i0, grp);
        let mut row_regs = Vec::new();
        let mut valid = Vec::new();
        for r in 0..rows {
            let row = if r == 0 {
                base_row
            } else {
                k.bin(BinOp::Add, Ty::U32, base_row, u(r * THREADS / lanes))
            };
            valid.push(k.setp(Cmp::Lt, Ty::U32, row, seq_q));
            row_regs.push(row);
        }

        // q, scaled by softmax_scale·log2(e); rows past Sq read as zeros.
        let mut q = Vec::new();
        for r in 0..rows as usize {
            let k = &mut self.k;
            let row64 = k.cvt(None, Ty::U64, Ty::U32, row_regs[r]);
            let qa = k.mad(Ty::U64, row64, qstride, qhead);
            let qa = k.bin(BinOp::Add, Ty::U64, qa, lane_g);
            let mut qr = Vec::new();
            for c in 0..plan.chunks() {
                let vals = self.load_elems(valid[r], qa, c * lanes * width * es, width);
                for v in vals {
                    qr.push(self.k.bin(BinOp::Mul, Ty::F32, v, scale));
                }
            }
            q.push(qr);
        }

        // Causal bounds. Non-causal: every row sees keys [0, Sk).
        let k = &mut self.k;
        let kend = key_end(
            k,
            i0,
            plan.block_m() as usize,
            Some(seq_q),
            seq_k,
            self.causal,
        );
        let (full_lim, lims) = if self.causal {
            let full = row_key_end(k, i0, seq_k);
            let lims = row_regs
                .iter()
                .map(|&row| row_key_end(k, row, seq_k))
                .collect();
            (full, lims)
        } else {
            (seq_k, vec![seq_k; rows as usize])
        };

        // Mask rows: element offsets b·msb + h·msh + i·msq - pad, scaled by
        // the element kind's size where the mask is read.
        let (has_mask, mhead) = mask_of_head_wide(k, mask, batches, b64, h64, ms[0], ms[1]);
        let col_lim = mask_column_limit(k, seq_k, mask_pad);
        let mut mask_rows = Vec::new();
        let mut mask_lims = Vec::new();
        for r in 0..rows as usize {
            mask_rows.push(mask_row_offset(k, mhead, row_regs[r], ms[2], mask_pad));
            mask_lims.push(k.selp(Ty::U32, col_lim, u(0), valid[r]));
        }

        let sbase = k.mov(Ty::U32, Operand::Symbol("smem".into()));
        let slane = k.mad(Ty::U32, lane, u(width * 4), sbase);

        let per_lane = (plan.d / lanes) as usize;
        let m = (0..rows)
            .map(|_| k.mov(Ty::F32, f(f32::NEG_INFINITY)))
            .collect();
        let l = (0..rows).map(|_| k.mov(Ty::F32, f(0.0))).collect();
        let acc = (0..rows)
            .map(|_| (0..per_lane).map(|_| k.mov(Ty::F32, f(0.0))).collect())
            .collect();

        Ctx {
            tid,
            kend,
            full_lim,
            has_mask,
            khead,
            vhead,
            kstride,
            vstride,
            sbase,
            slane,
            lims,
            mask_lims,
            mask_rows,
            q,
            acc,
            m,
            l,
        }
    }

    /// The loop over key tiles and, inside, over groups of keys.
    fn key_loop(&mut self, ctx: &Ctx, params: &Params) {
        let plan = self.plan;
        let k = &mut self.k;
        let done = k.label("done");
        let tile_top = k.label("tile");
        let group_top = k.label("group");
        let j0 = k.mov(Ty::U32, u(0));
        let none = k.setp(Cmp::Eq, Ty::U32, ctx.kend, u(0));
        k.branch_if(none, false, &done);

        k.push(Instr::Label(tile_top.clone()));
        let tile_end = k.bin(BinOp::Add, Ty::U32, j0, u(plan.tile));
        let tile_end = k.bin(BinOp::Min, Ty::U32, tile_end, ctx.kend);
        self.load_tile(ctx, j0, tile_end);
        let k = &mut self.k;
        k.push(Instr::BarSync(0));
        let jg = k.mov(Ty::U32, j0);
        let gsm = k.mov(Ty::U32, ctx.slane);

        k.push(Instr::Label(group_top.clone()));
        self.group_body(ctx, params, jg, gsm);
        let k = &mut self.k;
        k.bin_to(BinOp::Add, Ty::U32, jg, jg, u(plan.group));
        k.bin_to(
            BinOp::Add,
            Ty::U32,
            gsm,
            gsm,
            u(plan.group * plan.row_bytes()),
        );
        let more = k.setp(Cmp::Lt, Ty::U32, jg, tile_end);
        k.branch_if(more, false, &group_top);

        k.push(Instr::BarSync(0));
        k.bin_to(BinOp::Add, Ty::U32, j0, j0, u(plan.tile));
        let more = k.setp(Cmp::Lt, Ty::U32, j0, ctx.kend);
        k.branch_if(more, false, &tile_top);
        k.push(Instr::Label(done));
    }

    /// Copies keys `j0..j0 + tile` of K and V into shared memory as `f32`,
    /// rows at or past `tile_end` as zeros. Each thread moves 16-byte
    /// granules, consecutive threads consecutive granules of a row.
    fn load_tile(&mut self, ctx: &Ctx, j0: Reg, tile_end: Reg) {
        let plan = self.plan;
        let gran_elems = 16 / self.es();
        let per_row = plan.d / gran_elems;
        let total = plan.tile * per_row;
        let v_off = plan.tile * plan.row_bytes();
        for i in 0..total.div_ceil(THREADS) {
            let k = &mut self.k;
            let g = if i == 0 {
                ctx.tid
            } else {
                k.bin(BinOp::Add, Ty::U32, ctx.tid, u(i * THREADS))
            };
            let (key, col) = if per_row.is_power_of_two() {
                (
                    k.bin(BinOp::Shr, Ty::U32, g, u(per_row.trailing_zeros())),
                    k.bin(BinOp::And, Ty::U32, g, u(per_row - 1)),
                )
            } else {
                let key = k.bin(BinOp::Div, Ty::U32, g, u(per_row));
                let col = k.bin(BinOp::Rem, Ty::U32, g, u(per_row));
                (key, col)
            };
            let row = k.bin(BinOp::Add, Ty::U32, j0, key);
            let live = k.setp(Cmp::Lt, Ty::U32, row, tile_end);
            let row64 = k.cvt(None, Ty::U64, Ty::U32, row);
            let col64 = k.bin(BinOp::MulWide, Ty::U32, col, u(16));
            let soff = k.mad(Ty::U32, key, u(plan.row_bytes()), ctx.sbase);
            let soff = k.mad(Ty::U32, col, u(gran_elems * 4), soff);
            // Only the last pass can run past the tile.
            let inside = ((i + 1) * THREADS > total)
                .then(|| k.setp(Cmp::Lt, Ty::U32, ctx.tid, u(total - i * THREADS)));
            for (head, stride, off) in
                [(ctx.khead, ctx.kstride, 0), (ctx.vhead, ctx.vstride, v_off)]
            {
                let k = &mut self.k;
                let ga = k.mad(Ty::U64, row64, stride, head);
                let ga = k.bin(BinOp::Add, Ty::U64, ga, col64);
                let vals = self.load_elems(live, ga, 0, gran_elems);
                for (n, four) in vals.chunks(4).enumerate() {
                    let st = Instr::St {
                        space: StateSpace::Shared,
                        ty: Ty::F32,
                        addr: Addr::at(soff, (off + 16 * n as u32) as i64),
                        src: four.to_vec(),
                    };
                    match inside {
                        Some(p) => self.k.guard(p, false, st),
                        None => self.k.push(st),
                    }
                }
            }
        }
    }

    /// One group of `group` keys starting at key `jg`, whose K row 0 (this
    /// lane's first column) is at shared address `gsm`.
    // Rows index several per-row arrays at once (scores, limits, mask rows,
    // softmax state): plain index loops read best.
    #[allow(clippy::needless_range_loop)]
    fn group_body(&mut self, ctx: &Ctx, params: &Params, jg: Reg, gsm: Reg) {
        let plan = self.plan;
        let (lanes, rows, width, gk) = (
            plan.lanes,
            plan.rows as usize,
            plan.width,
            plan.group as usize,
        );
        let rb = plan.row_bytes();
        let chunk_stride = lanes * width * 4;
        let k = &mut self.k;

        // Partial dot products over this lane's columns.
        let mut s: Vec<Vec<Option<Reg>>> = vec![vec![None; gk]; rows];
        for key in 0..gk {
            for c in 0..plan.chunks() {
                let kv = k.regs(Ty::F32, width as usize);
                k.push(Instr::Ld {
                    space: StateSpace::Shared,
                    ty: Ty::F32,
                    dst: kv.clone(),
                    addr: Addr::at(gsm, (key as u32 * rb + c * chunk_stride) as i64),
                });
                for r in 0..rows {
                    for (e, &kx) in kv.iter().enumerate() {
                        let qx = ctx.q[r][(c * width) as usize + e];
                        s[r][key] = Some(match s[r][key] {
                            None => k.bin(BinOp::Mul, Ty::F32, qx, kx),
                            Some(acc) => {
                                k.mad_to(Ty::F32, acc, qx, kx, acc);
                                acc
                            }
                        });
                    }
                }
            }
        }
        let s: Vec<Vec<Reg>> = s
            .into_iter()
            .map(|row| row.into_iter().map(|x| x.expect("d > 0")).collect())
            .collect();

        // Butterfly sums over the lane group: every lane gets the scores.
        let mut dist = 1;
        while dist < lanes {
            let mut others = Vec::new();
            for row in &s {
                for &x in row {
                    let o = k.reg(Ty::F32);
                    k.push(Instr::ShflBfly {
                        dst: o,
                        src: x,
                        lane_mask: dist,
                    });
                    others.push((x, o));
                }
            }
            for (x, o) in others {
                k.bin_to(BinOp::Add, Ty::F32, x, x, o);
            }
            dist *= 2;
        }

        // The mask's bias, scaled by log2(e), only if there is one: one
        // body per element kind. Its pointer, kind and padding are read
        // from the parameters here, so that no register holds them across
        // the loop.
        let no_mask = k.label("no_mask");
        k.branch_if(ctx.has_mask, true, &no_mask);
        let mask = params.get(k, "mask");
        let kind = params.get(k, "mask_kind");
        let pad = params.get(k, "mask_pad");
        let jg64 = k.cvt(None, Ty::U64, Ty::U32, jg);
        // Key jg + key reads mask column jg + key - pad.
        let col0 = k.bin(BinOp::Sub, Ty::U32, jg, pad);
        let cols: Vec<Reg> = (0..gk)
            .map(|key| k.bin(BinOp::Add, Ty::U32, col0, u(key as u32)))
            .collect();
        per_kind(k, kind, |k, kind| {
            let bytes = kind.bytes();
            for r in 0..rows {
                let at = k.bin(BinOp::Add, Ty::U64, ctx.mask_rows[r], jg64);
                let mp = k.mad(Ty::U64, at, Operand::U(bytes), mask);
                for (key, &x) in s[r].iter().enumerate() {
                    let inside = k.setp(Cmp::Lt, Ty::U32, cols[key], ctx.mask_lims[r]);
                    let addr = Addr::at(mp, (bytes * key as u64) as i64);
                    add_kind_bias(k, kind, x, inside, addr);
                }
            }
        });
        k.push(Instr::Label(no_mask));

        // Keys past a row's limit (Sk, or its diagonal) are -inf, in the
        // groups that reach past the CTA's smallest limit only.
        let full = k.label("full");
        let group_end = k.bin(BinOp::Add, Ty::U32, jg, u(plan.group));
        let is_full = k.setp(Cmp::Le, Ty::U32, group_end, ctx.full_lim);
        k.branch_if(is_full, false, &full);
        for r in 0..rows {
            let left = k.bin(BinOp::Sub, Ty::S32, ctx.lims[r], jg);
            for (key, &x) in s[r].iter().enumerate() {
                let seen = k.setp(Cmp::Gt, Ty::S32, left, Operand::S(key as i64));
                hide_unless(k, x, seen);
            }
        }
        k.push(Instr::Label(full));

        // Online softmax; p overwrites s.
        for r in 0..rows {
            let m = reduce_pairwise(k, &s[r], BinOp::Max);
            let (shift, resc) = update_max(k, ctx.m[r], m);
            for &x in &s[r] {
                exp2_shifted(k, x, shift);
            }
            let sum = reduce_pairwise(k, &s[r], BinOp::Add);
            update_sum(k, ctx.l[r], resc, sum);
            scale(k, ctx.acc[r].iter().copied(), resc);
        }

        // acc += p · V.
        let v_off = plan.tile * rb;
        for (key, _) in s[0].iter().enumerate() {
            for c in 0..plan.chunks() {
                let vv = k.regs(Ty::F32, width as usize);
                k.push(Instr::Ld {
                    space: StateSpace::Shared,
                    ty: Ty::F32,
                    dst: vv.clone(),
                    addr: Addr::at(gsm, (v_off + key as u32 * rb + c * chunk_stride) as i64),
                });
                for r in 0..rows {
                    for (e, &vx) in vv.iter().enumerate() {
                        let a = ctx.acc[r][(c * width) as usize + e];
                        k.mad_to(Ty::F32, a, s[r][key], vx, a);
                    }
                }
            }
        }
    }

    /// `out = acc / sum` (zeros where the sum is 0), converted and stored
    /// for the rows that exist; and their log-sum-exp where the contract's
    /// `lse` is not null, written by the group's lane 0 (the lanes of a
    /// group hold the same max and sum).
    fn epilogue(&mut self, ctx: &Ctx, params: &Params) {
        let plan = self.plan;
        let (lanes, rows, width) = (plan.lanes, plan.rows, plan.width);
        let es = self.es();
        let o_ptr = params.get(&mut self.k, "out");
        let os = params.strides(&mut self.k, "out");
        let lse_ptr = params.get(&mut self.k, "lse");
        let lse_strides = params.strides(&mut self.k, "lse");
        let qblock = self.k.mov(Ty::U32, Operand::Special(Special::CtaIdX));
        let (head, batch) = cta_head_batch(&mut self.k);
        // The query sequence again: no register holds it across the loop.
        let q_seq = self.sequence(params, batch, "q");
        let seq_q = q_seq.len;
        let k = &mut self.k;
        let b64 = k.cvt(None, Ty::U64, Ty::U32, batch);
        let h64 = k.cvt(None, Ty::U64, Ty::U32, head);
        let lane = k.bin(BinOp::And, Ty::U32, ctx.tid, u(lanes - 1));
        let grp = k.bin(BinOp::Shr, Ty::U32, ctx.tid, u(lanes.trailing_zeros()));
        let lane_g = k.bin(BinOp::MulWide, Ty::U32, lane, u(width * es));
        let base_row = k.mad(Ty::U32, qblock, u(plan.block_m()), grp);
        let (ohead, ostride) =
            tensor_head_wide(k, o_ptr, os, b64, h64, es as u64, ByteScale::Shift);
        let ohead = at_token(k, ohead, q_seq.start, ostride);
        let first_lane = k.setp(Cmp::Eq, Ty::U32, lane, u(0));
        let lse = lse_rows(
            k,
            lse_ptr,
            lse_strides,
            b64,
            h64,
            q_seq.start,
            Some(first_lane),
        );
        for r in 0..rows as usize {
            let k = &mut self.k;
            let row = if r == 0 {
                base_row
            } else {
                k.bin(BinOp::Add, Ty::U32, base_row, u(r as u32 * THREADS / lanes))
            };
            let valid = k.setp(Cmp::Lt, Ty::U32, row, seq_q);
            let (empty, inv) = row_inverse(k, ctx.l[r]);
            let outs: Vec<Reg> = ctx.acc[r]
                .iter()
                .map(|&a| {
                    let o = k.bin(BinOp::Mul, Ty::F32, a, inv);
                    k.selp(Ty::F32, f(0.0), o, empty)
                })
                .collect();
            let row64 = k.cvt(None, Ty::U64, Ty::U32, row);
            let oa = k.mad(Ty::U64, row64, ostride, ohead);
            let oa = k.bin(BinOp::Add, Ty::U64, oa, lane_g);
            for c in 0..plan.chunks() {
                let vals = &outs[(c * width) as usize..((c + 1) * width) as usize];
                self.store_elems(valid, oa, c * lanes * width * es, vals);
            }
            store_lse(&mut self.k, &lse, ctx.m[r], ctx.l[r], row, valid);
        }
    }
}

#[cfg(test)]
mod tests;

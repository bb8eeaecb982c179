//! The portable GPU kernel: attention on the CUDA cores (no tensor cores),
//! for every element type, with scores, softmax and accumulation in `f32`.
//! It serves `f32` variants and any GPU or element type the tensor-core
//! kernel does not cover.
//!
//! # Structure
//!
//! A CTA of [`THREADS`] threads computes [`Plan::block_m`] query rows of one
//! (batch, head), following the launch contract of [`crate::gpu`].
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
//! one `f32` at a time and needs no alignment beyond 4 bytes.
//!
//! # Testing without a GPU
//!
//! The unit tests run the emitted instruction list through a small lock-step
//! interpreter of one CTA (uniform branches and full-warp shuffles are
//! asserted, every global access is bounds-checked, shared memory starts as
//! NaN) and compare with a float64 reference: ragged lengths, GQA, causal
//! with `Sq` above and below `Sk`, dense and broadcast masks, fully masked
//! rows and NaN rows, in all three element types. With `PTXAS` set they also
//! assemble a sample of variants for sm_80 and sm_90 and require zero spills.

use crate::gpu::{declare_params, GpuKernel, PARAMS, SCALE_PARAM};
use crate::ptx::{
    Addr, BinOp, Cmp, Instr, Kernel, Module, Operand, Param, Reg, Special, StateSpace, Target, Ty,
    UnOp,
};
use crate::{DType, VariantSpec};

/// Threads per CTA.
const THREADS: u32 = 128;
const LOG2E: f32 = std::f32::consts::LOG2_E;
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
    /// Per row: `Sk` if the row exists, else 0 (bounds of its mask loads).
    mask_lims: Vec<Reg>,
    /// Per row: the byte address of its mask row.
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
    /// log2 of the element size.
    fn log2_es(&self) -> u32 {
        self.dtype.size_bytes().trailing_zeros()
    }

    fn es(&self) -> u32 {
        self.dtype.size_bytes() as u32
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
                        k.push(Instr::CvtPack {
                            ty: packed,
                            dst: w,
                            hi: pair[1],
                            lo: pair[0],
                        });
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

    /// `ptr + (b·stride_b + h·stride_h)·elem` and `stride_s·elem`, in bytes.
    fn head_base(
        &mut self,
        ptr: Reg,
        strides: [Reg; 3],
        b64: Reg,
        h64: Reg,
        les: u32,
    ) -> (Reg, Reg) {
        let k = &mut self.k;
        let off = k.bin(BinOp::Mul, Ty::U64, b64, strides[0]);
        let off = k.mad(Ty::U64, h64, strides[2], off);
        let off = k.bin(BinOp::Shl, Ty::U64, off, u(les));
        let base = k.bin(BinOp::Add, Ty::U64, off, ptr);
        let stride = k.bin(BinOp::Shl, Ty::U64, strides[1], u(les));
        (base, stride)
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
        self.key_loop(&ctx);
        self.epilogue(&ctx, &params);
        self.k.push(Instr::Ret);
    }

    /// Loads the parameter `name` (its type from the launch contract).
    fn param(&mut self, params: &[Param], name: &str) -> Reg {
        let (i, ty) = if name == SCALE_PARAM.0 {
            (PARAMS.len(), Ty::F32)
        } else {
            let i = PARAMS
                .iter()
                .position(|p| p.0 == name)
                .unwrap_or_else(|| panic!("no parameter {name}"));
            let ty = match PARAMS[i].1 {
                crate::gpu::ParamKind::Ptr | crate::gpu::ParamKind::U64 => Ty::U64,
                crate::gpu::ParamKind::U32 => Ty::U32,
                crate::gpu::ParamKind::F32 => Ty::F32,
            };
            (i, ty)
        };
        self.k.ld_param(ty, &params[i])
    }

    /// The strides of tensor `t` (`q`, `k`, `v`, `out`: batch, token, head;
    /// `mask`: batch, head, query).
    fn strides(&mut self, params: &[Param], t: &str) -> [Reg; 3] {
        let dims = if t == "mask" {
            ["b", "h", "q"]
        } else {
            ["b", "s", "h"]
        };
        dims.map(|s| self.param(params, &format!("{t}_stride_{s}")))
    }

    /// Coordinates, bases, the causal bounds, q in registers, the mask rows
    /// and the softmax state.
    fn prologue(&mut self, params: &[Param]) -> Ctx {
        let plan = self.plan;
        let (lanes, rows, width) = (plan.lanes, plan.rows, plan.width);
        let les = self.log2_es();
        let es = self.es();

        let q_ptr = self.param(params, "q");
        let k_ptr = self.param(params, "k");
        let v_ptr = self.param(params, "v");
        let mask = self.param(params, "mask");
        let qs = self.strides(params, "q");
        let ks = self.strides(params, "k");
        let vs = self.strides(params, "v");
        let ms = self.strides(params, "mask");
        let seq_q = self.param(params, "seq_q");
        let seq_k = self.param(params, "seq_k");
        let group = self.param(params, "group");
        let scale = self.param(params, SCALE_PARAM.0);

        let k = &mut self.k;
        let tid = k.mov(Ty::U32, Operand::Special(Special::TidX));
        let qblock = k.mov(Ty::U32, Operand::Special(Special::CtaIdX));
        let head = k.mov(Ty::U32, Operand::Special(Special::CtaIdY));
        let batch = k.mov(Ty::U32, Operand::Special(Special::CtaIdZ));
        let lane = k.bin(BinOp::And, Ty::U32, tid, u(lanes - 1));
        let grp = k.bin(BinOp::Shr, Ty::U32, tid, u(lanes.trailing_zeros()));
        let i0 = k.bin(BinOp::Mul, Ty::U32, qblock, u(plan.block_m()));
        let kv_head = k.bin(BinOp::Div, Ty::U32, head, group);
        let b64 = k.cvt(None, Ty::U64, Ty::U32, batch);
        let h64 = k.cvt(None, Ty::U64, Ty::U32, head);
        let kvh64 = k.cvt(None, Ty::U64, Ty::U32, kv_head);
        // Byte offset of this lane's first column in a global row.
        let lane_g = k.bin(BinOp::MulWide, Ty::U32, lane, u(width * es));

        let (qhead, qstride) = self.head_base(q_ptr, qs, b64, h64, les);
        let (khead, kstride) = self.head_base(k_ptr, ks, b64, kvh64, les);
        let (vhead, vstride) = self.head_base(v_ptr, vs, b64, kvh64, les);

        // The rows of this thread: grp + r·(threads/lanes).
        let k = &mut self.k;
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
        let (kend, full_lim, lims) = if self.causal {
            let last = k.bin(BinOp::Add, Ty::U32, i0, u(plan.block_m()));
            let last = k.bin(BinOp::Min, Ty::U32, last, seq_q);
            let kend = k.bin(BinOp::Min, Ty::U32, last, seq_k);
            let first = k.bin(BinOp::Add, Ty::U32, i0, u(1));
            let full = k.bin(BinOp::Min, Ty::U32, first, seq_k);
            let lims = row_regs
                .iter()
                .map(|&row| {
                    let l = k.bin(BinOp::Add, Ty::U32, row, u(1));
                    k.bin(BinOp::Min, Ty::U32, l, seq_k)
                })
                .collect();
            (kend, full, lims)
        } else {
            (seq_k, seq_k, vec![seq_k; rows as usize])
        };

        // Mask rows: mask + 4·(b·msb + h·msh + i·msq).
        let has_mask = k.setp(Cmp::Ne, Ty::U64, mask, u(0));
        let mhead = k.bin(BinOp::Mul, Ty::U64, b64, ms[0]);
        let mhead = k.mad(Ty::U64, h64, ms[1], mhead);
        let mut mask_rows = Vec::new();
        let mut mask_lims = Vec::new();
        for r in 0..rows as usize {
            let row64 = k.cvt(None, Ty::U64, Ty::U32, row_regs[r]);
            let off = k.mad(Ty::U64, row64, ms[2], mhead);
            let off = k.bin(BinOp::Shl, Ty::U64, off, u(2));
            mask_rows.push(k.bin(BinOp::Add, Ty::U64, off, mask));
            mask_lims.push(k.selp(Ty::U32, seq_k, u(0), valid[r]));
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
    fn key_loop(&mut self, ctx: &Ctx) {
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
        self.group_body(ctx, jg, gsm);
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
    fn group_body(&mut self, ctx: &Ctx, jg: Reg, gsm: Reg) {
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

        // The additive mask, scaled by log2(e), only if there is one.
        let no_mask = k.label("no_mask");
        k.branch_if(ctx.has_mask, true, &no_mask);
        let jg4 = k.bin(BinOp::MulWide, Ty::U32, jg, u(4));
        for r in 0..rows {
            let mp = k.bin(BinOp::Add, Ty::U64, ctx.mask_rows[r], jg4);
            let left = k.bin(BinOp::Sub, Ty::S32, ctx.mask_lims[r], jg);
            for (key, &x) in s[r].iter().enumerate() {
                let inside = k.setp(Cmp::Gt, Ty::S32, left, Operand::S(key as i64));
                let mv = k.mov(Ty::F32, f(0.0));
                k.guard(
                    inside,
                    false,
                    Instr::Ld {
                        space: StateSpace::GlobalNc,
                        ty: Ty::F32,
                        dst: vec![mv],
                        addr: Addr::at(mp, 4 * key as i64),
                    },
                );
                k.mad_to(Ty::F32, x, mv, f(LOG2E), x);
            }
        }
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
                k.selp_to(Ty::F32, x, x, f(f32::NEG_INFINITY), seen);
            }
        }
        k.push(Instr::Label(full));

        // Online softmax; p overwrites s.
        for r in 0..rows {
            let mut level: Vec<Reg> = s[r].clone();
            while level.len() > 1 {
                level = level
                    .chunks(2)
                    .map(|p| {
                        if p.len() == 2 {
                            k.bin(BinOp::Max, Ty::F32, p[0], p[1])
                        } else {
                            p[0]
                        }
                    })
                    .collect();
            }
            let m_new = k.bin(BinOp::Max, Ty::F32, ctx.m[r], level[0]);
            let all_inf = k.setp(Cmp::Eq, Ty::F32, m_new, f(f32::NEG_INFINITY));
            let shift = k.selp(Ty::F32, f(0.0), m_new, all_inf);
            let dm = k.bin(BinOp::Sub, Ty::F32, ctx.m[r], shift);
            let resc = k.un(UnOp::Ex2, Ty::F32, dm);
            k.mov_to(Ty::F32, ctx.m[r], m_new);
            for &x in &s[r] {
                let t = k.bin(BinOp::Sub, Ty::F32, x, shift);
                k.un_to(UnOp::Ex2, Ty::F32, x, t);
            }
            let mut level: Vec<Reg> = s[r].clone();
            while level.len() > 1 {
                level = level
                    .chunks(2)
                    .map(|p| {
                        if p.len() == 2 {
                            k.bin(BinOp::Add, Ty::F32, p[0], p[1])
                        } else {
                            p[0]
                        }
                    })
                    .collect();
            }
            k.mad_to(Ty::F32, ctx.l[r], ctx.l[r], resc, level[0]);
            for &a in &ctx.acc[r] {
                k.bin_to(BinOp::Mul, Ty::F32, a, a, resc);
            }
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
    /// for the rows that exist.
    fn epilogue(&mut self, ctx: &Ctx, params: &[Param]) {
        let plan = self.plan;
        let (lanes, rows, width) = (plan.lanes, plan.rows, plan.width);
        let les = self.log2_es();
        let es = self.es();
        let o_ptr = self.param(params, "out");
        let os = self.strides(params, "out");
        let seq_q = self.param(params, "seq_q");
        let k = &mut self.k;
        let qblock = k.mov(Ty::U32, Operand::Special(Special::CtaIdX));
        let head = k.mov(Ty::U32, Operand::Special(Special::CtaIdY));
        let batch = k.mov(Ty::U32, Operand::Special(Special::CtaIdZ));
        let b64 = k.cvt(None, Ty::U64, Ty::U32, batch);
        let h64 = k.cvt(None, Ty::U64, Ty::U32, head);
        let lane = k.bin(BinOp::And, Ty::U32, ctx.tid, u(lanes - 1));
        let grp = k.bin(BinOp::Shr, Ty::U32, ctx.tid, u(lanes.trailing_zeros()));
        let lane_g = k.bin(BinOp::MulWide, Ty::U32, lane, u(width * es));
        let base_row = k.mad(Ty::U32, qblock, u(plan.block_m()), grp);
        let (ohead, ostride) = self.head_base(o_ptr, os, b64, h64, les);
        for r in 0..rows as usize {
            let k = &mut self.k;
            let row = if r == 0 {
                base_row
            } else {
                k.bin(BinOp::Add, Ty::U32, base_row, u(r as u32 * THREADS / lanes))
            };
            let valid = k.setp(Cmp::Lt, Ty::U32, row, seq_q);
            let empty = k.setp(Cmp::Eq, Ty::F32, ctx.l[r], f(0.0));
            let inv = k.un(UnOp::Rcp, Ty::F32, ctx.l[r]);
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(d: usize, causal: bool, dtype: DType) -> VariantSpec {
        VariantSpec::new(d, causal, dtype).unwrap()
    }

    /// The variants the ptxas check covers: a sample of head sizes, or
    /// every one when `SIMT_ALL_HEAD_SIZES` is set.
    fn sample() -> Vec<VariantSpec> {
        let mut out = Vec::new();
        let all = std::env::var_os("SIMT_ALL_HEAD_SIZES").is_some();
        let sizes: Vec<usize> = if all {
            (8..=256).step_by(8).collect()
        } else {
            vec![8, 40, 64, 72, 80, 128, 136, 144, 256]
        };
        for d in sizes {
            for causal in [false, true] {
                for dtype in [DType::F32, DType::F16, DType::BF16] {
                    out.push(spec(d, causal, dtype));
                }
            }
        }
        out
    }

    /// Assembles the sample with `ptxas` when `PTXAS` names the binary
    /// (`PTXAS=/path/to/ptxas cargo test -p kernels-gen simt`): every
    /// variant must assemble for sm_80 and sm_90 without spilling.
    #[test]
    fn assembles_without_spills_when_ptxas_is_available() {
        let Some(ptxas) = std::env::var_os("PTXAS") else {
            return;
        };
        let dir = std::env::temp_dir().join(format!("simt-ptx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut report = String::new();
        let mut failures = Vec::new();
        for s in sample() {
            let k = generate(&s, Target::Sm80);
            let path = dir.join(format!("{}.ptx", k.entry));
            std::fs::write(&path, &k.ptx).unwrap();
            for arch in ["sm_80", "sm_90"] {
                let out = std::process::Command::new(&ptxas)
                    .arg(format!("-arch={arch}"))
                    .arg("-v")
                    .arg(&path)
                    .arg("-o")
                    .arg(dir.join(format!("{}.{arch}.cubin", k.entry)))
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stderr).to_string();
                if !out.status.success()
                    || !text.contains("0 bytes spill stores, 0 bytes spill loads")
                {
                    failures.push(format!("{} {arch}: {text}", k.entry));
                }
                let regs = text
                    .split("Used ")
                    .nth(1)
                    .and_then(|t| t.split(' ').next())
                    .unwrap_or("?");
                report.push_str(&format!(
                    "{} {arch}: {regs} registers, smem {} B, block_m {}\n",
                    k.entry, k.smem_bytes, k.block_m
                ));
            }
        }
        std::fs::write(dir.join("report.txt"), &report).unwrap();
        eprintln!("{report}(files in {})", dir.display());
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// Writes the sample's PTX and a `manifest.json` of launch metadata
    /// (the format of `tests/gpu/ptx_harness.py`) into `SIMT_PTX_DIR` when
    /// that is set, for running these kernels on a GPU.
    #[test]
    fn writes_ptx_for_the_gpu_harness_when_asked() {
        let Some(dir) = std::env::var_os("SIMT_PTX_DIR") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        // `SIMT_PLAN=lanes,rows` overrides the plan (for experiments).
        let forced: Option<(u32, u32)> = std::env::var("SIMT_PLAN").ok().map(|p| {
            let v: Vec<u32> = p.split(',').map(|x| x.parse().unwrap()).collect();
            (v[0], v[1])
        });
        let mut manifest = Vec::new();
        for s in sample() {
            let mut k = generate(&s, Target::Sm80);
            if let Some((lanes, rows)) = forced {
                let d = s.head_size as u32;
                if !d.is_multiple_of(lanes * 2) {
                    continue;
                }
                let plan = Plan::with(d, lanes, rows);
                k.ptx = Module::new(Target::Sm80)
                    .kernel(build(&s, plan))
                    .to_string();
                k.block_m = plan.block_m();
                k.smem_bytes = plan.smem_bytes();
            }
            std::fs::write(dir.join(format!("{}.ptx", k.entry)), &k.ptx).unwrap();
            manifest.push(format!(
                "{{\"entry\": \"{}\", \"head_size\": {}, \"causal\": {}, \"dtype\": \"{}\", \
                 \"block_m\": {}, \"threads\": {}, \"smem_bytes\": {}}}",
                k.entry, s.head_size, s.causal, s.dtype, k.block_m, k.threads, k.smem_bytes
            ));
        }
        let text = format!("[\n{}\n]\n", manifest.join(",\n"));
        std::fs::write(dir.join("manifest.json"), text).unwrap();
    }

    // ---- text checks ----

    #[test]
    fn the_text_has_the_contract_entry_and_the_expected_forms() {
        for (d, causal, dtype) in [
            (64, false, DType::F32),
            (128, true, DType::F16),
            (256, false, DType::BF16),
            (8, true, DType::F32),
        ] {
            let s = spec(d, causal, dtype);
            let k = generate(&s, Target::Sm80);
            assert_eq!(k.entry, s.kernel_name());
            assert_eq!(k.threads, THREADS);
            assert!(k.smem_bytes <= 48 * 1024);
            assert_eq!(k.block_m, Plan::new(d as u32).block_m());
            let t = &k.ptx;
            assert!(t.contains(&format!(".visible .entry {}(", k.entry)), "{t}");
            assert_eq!(t.matches(".param ").count(), PARAMS.len() + 1);
            assert!(t.contains(".maxntid 128, 1, 1"));
            assert!(t.contains(".extern .shared .align 16 .b8 smem[];"));
            assert!(t.contains("mov.u32 %r") && t.contains(", smem;"));
            assert!(t.contains("ex2.approx.ftz.f32"));
            assert!(t.contains("shfl.sync.bfly.b32"));
            assert!(t.contains("bar.sync 0;"));
            assert!(t.contains("rcp.rn.f32"));
            assert!(t.contains("mul.wide.u32") && t.contains("mad.lo.u64"));
            assert!(!t.contains("mma") && !t.contains("ldmatrix") && !t.contains("cp.async"));
            assert!(!t.contains(".aligned"));
            // Shuffles are never predicated.
            assert!(!t
                .lines()
                .any(|l| l.trim_start().starts_with('@') && l.contains("shfl")));
            match dtype {
                DType::F32 => {
                    assert!(t.contains("ld.global.nc.v4.f32") || t.contains("ld.global.nc.v2.f32"))
                }
                DType::F16 => {
                    assert!(t.contains("cvt.f32.f16") && t.contains("cvt.rn.f16x2.f32"));
                    assert!(t.contains("mov.b32 {%h"));
                }
                DType::BF16 => {
                    assert!(t.contains("cvt.rn.bf16x2.f32"));
                    // PTX 7.0 has no cvt.f32.bf16: the widening is a shift.
                    assert!(!t.contains("cvt.f32.bf16"));
                }
            }
        }
    }

    #[test]
    fn plans_fit_the_limits() {
        for d in (8..=256).step_by(8) {
            let p = Plan::new(d);
            assert_eq!(d % (p.lanes * p.width), 0, "{p:?}");
            assert!(p.smem_bytes() <= TILE_BYTES, "{p:?}");
            assert_eq!(p.tile % p.group, 0, "{p:?}");
            assert!(p.block_m() >= 32 && p.block_m() <= 128, "{p:?}");
            // q and the accumulators in registers stay within budget.
            assert!(
                p.rows * d / p.lanes <= 72 && p.rows * p.group <= 32,
                "{p:?}"
            );
        }
        let shape = |d| {
            let p = Plan::new(d);
            (p.lanes, p.rows, p.width, p.tile, p.block_m())
        };
        assert_eq!(shape(64), (4, 4, 4, 64, 128));
        assert_eq!(shape(128), (8, 4, 4, 32, 64));
        assert_eq!(shape(256), (16, 4, 4, 16, 32));
        assert_eq!(shape(80), (8, 4, 2, 48, 64));
        assert_eq!(shape(136), (4, 2, 2, 24, 64));
    }

    // ---- an interpreter of the emitted instructions ----

    use crate::ptx::{BinOp, Cmp, Instr, Operand, Reg, Special, StateSpace, Ty, UnOp};
    use std::collections::HashMap;

    fn f16_to_f32(h: u16) -> f32 {
        let neg = h >> 15 != 0;
        let exp = ((h >> 10) & 0x1f) as i32;
        let man = (h & 0x3ff) as u32;
        let v = if exp == 0 {
            man as f32 * 2f32.powi(-24)
        } else if exp == 31 {
            if man == 0 {
                f32::INFINITY
            } else {
                f32::NAN
            }
        } else {
            f32::from_bits((((exp + 112) as u32) << 23) | (man << 13))
        };
        if neg {
            -v
        } else {
            v
        }
    }

    fn f32_to_f16(x: f32) -> u16 {
        let sign = if x.is_sign_negative() { 0x8000u16 } else { 0 };
        if x.is_nan() {
            return 0x7e00;
        }
        let a = x.abs() as f64;
        if a >= 65520.0 {
            return sign | 0x7c00;
        }
        if a < 2f64.powi(-14) {
            return sign | (a / 2f64.powi(-24)).round_ties_even() as u16;
        }
        let mut e = a.log2().floor() as i32;
        if 2f64.powi(e) > a {
            e -= 1;
        }
        if 2f64.powi(e + 1) <= a {
            e += 1;
        }
        let mut mant = ((a / 2f64.powi(e) - 1.0) * 1024.0).round_ties_even() as u32;
        if mant == 1024 {
            mant = 0;
            e += 1;
        }
        if e > 15 {
            return sign | 0x7c00;
        }
        sign | (((e + 15) as u16) << 10) | mant as u16
    }

    fn f32_to_bf16(x: f32) -> u16 {
        if x.is_nan() {
            return 0x7fc0;
        }
        let b = x.to_bits();
        ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }

    fn bf16_to_f32(h: u16) -> f32 {
        f32::from_bits((h as u32) << 16)
    }

    #[test]
    fn half_conversions_round_to_nearest_even() {
        for x in [0.0f32, 1.0, -2.5, 65504.0, 1e-7, 0.1, 3.0e-5, -7.0e4] {
            let h = f32_to_f16(x);
            let back = f16_to_f32(h);
            assert!(
                (back - x).abs() <= x.abs() * 1e-3 + 6e-8 || back.is_infinite(),
                "{x} {back}"
            );
        }
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00); // tie to even
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
    }

    /// Device memory: one byte array; every access must fall inside one
    /// allocation.
    struct Memory {
        bytes: Vec<u8>,
        allocs: Vec<(u64, u64)>,
    }

    const HEAP: u64 = 0x1_0000;

    impl Memory {
        fn new() -> Memory {
            Memory {
                bytes: Vec::new(),
                allocs: Vec::new(),
            }
        }
        fn alloc(&mut self, len: usize, fill: u8) -> u64 {
            // 256-byte aligned, with a gap between allocations.
            let start = (self.bytes.len() as u64).div_ceil(256) * 256 + 256;
            self.bytes.resize(start as usize, 0xEE);
            self.bytes.resize(start as usize + len, fill);
            self.allocs.push((HEAP + start, HEAP + start + len as u64));
            HEAP + start
        }
        fn check(&self, addr: u64, n: u64) -> usize {
            assert!(
                self.allocs.iter().any(|&(a, b)| addr >= a && addr + n <= b),
                "global access out of bounds: {addr:#x}+{n}"
            );
            (addr - HEAP) as usize
        }
    }

    fn bytes_of(ty: Ty) -> u64 {
        match ty {
            Ty::B16 | Ty::F16 | Ty::BF16 => 2,
            Ty::B64 | Ty::U64 | Ty::S64 => 8,
            _ => 4,
        }
    }

    /// Runs one CTA of 128 threads in lock step. Branches must be uniform
    /// over the CTA, shuffles must run with every lane.
    struct Cta<'a> {
        body: &'a [Instr],
        labels: &'a HashMap<String, usize>,
        params: &'a HashMap<String, u64>,
        ctaid: [u32; 3],
        regs: Vec<Vec<u64>>,
        init: Vec<Vec<bool>>,
        smem: Vec<u8>,
    }

    const N: usize = THREADS as usize;

    impl Cta<'_> {
        fn read(&self, op: &Operand, t: usize) -> u64 {
            match op {
                Operand::Reg(r) => {
                    let s = r.id as usize;
                    assert!(self.init[s][t], "read of unset register {r}");
                    self.regs[s][t]
                }
                Operand::U(x) => *x,
                Operand::S(x) => *x as u64,
                Operand::F32(x) => x.to_bits() as u64,
                Operand::Special(Special::TidX) => t as u64,
                Operand::Special(Special::CtaIdX) => self.ctaid[0] as u64,
                Operand::Special(Special::CtaIdY) => self.ctaid[1] as u64,
                Operand::Special(Special::CtaIdZ) => self.ctaid[2] as u64,
                #[allow(unreachable_patterns)]
                Operand::Special(other) => panic!("the interpreter does not know {other}"),
                Operand::Symbol(s) => {
                    assert_eq!(s, "smem");
                    0
                }
            }
        }
        fn write(&mut self, r: Reg, t: usize, v: u64) {
            let s = r.id as usize;
            self.regs[s][t] = v;
            self.init[s][t] = true;
        }

        fn run(&mut self, mem: &mut Memory) {
            let mut pc = 0;
            loop {
                let instr = &self.body[pc];
                pc += 1;
                let (active, inner): ([bool; N], &Instr) = match instr {
                    Instr::Guard {
                        pred,
                        negate,
                        instr,
                    } => {
                        let mut a = [false; N];
                        for (t, x) in a.iter_mut().enumerate() {
                            *x = (self.read(&Operand::Reg(*pred), t) != 0) != *negate;
                        }
                        (a, instr)
                    }
                    i => ([true; N], i),
                };
                match inner {
                    Instr::Comment(_) | Instr::Label(_) => {}
                    Instr::Bra { target, .. } => {
                        let n = active.iter().filter(|&&x| x).count();
                        assert!(n == 0 || n == N, "divergent branch to {target}");
                        if n == N {
                            pc = self.labels[target];
                        }
                    }
                    Instr::Ret => {
                        assert!(active.iter().all(|&x| x));
                        return;
                    }
                    Instr::BarSync(_) => assert!(active.iter().all(|&x| x)),
                    Instr::ShflBfly {
                        dst,
                        src,
                        lane_mask,
                    } => {
                        assert!(active.iter().all(|&x| x), "predicated shuffle");
                        let vals: Vec<u64> = (0..N)
                            .map(|t| self.read(&Operand::Reg(*src), t ^ *lane_mask as usize))
                            .collect();
                        for (t, v) in vals.into_iter().enumerate() {
                            self.write(*dst, t, v & 0xffff_ffff);
                        }
                    }
                    i => {
                        for (t, &on) in active.iter().enumerate() {
                            if on {
                                self.exec(i, t, mem);
                            }
                        }
                    }
                }
            }
        }

        fn exec(&mut self, i: &Instr, t: usize, mem: &mut Memory) {
            let f = |x: u64| f32::from_bits(x as u32);
            let fb = |x: f32| x.to_bits() as u64;
            match i {
                Instr::LdParam { dst, param, .. } => {
                    let v = *self
                        .params
                        .get(&param.name)
                        .unwrap_or_else(|| panic!("no value for {}", param.name));
                    self.write(*dst, t, v);
                }
                Instr::Mov { ty, dst, src } => {
                    let v = self.read(src, t);
                    let v = if bytes_of(*ty) == 8 {
                        v
                    } else {
                        v & 0xffff_ffff
                    };
                    self.write(*dst, t, v);
                }
                Instr::Bin { op, ty, dst, a, b } => {
                    let (x, y) = (self.read(a, t), self.read(b, t));
                    let v = match ty {
                        Ty::F32 => fb(match op {
                            BinOp::Add => f(x) + f(y),
                            BinOp::Sub => f(x) - f(y),
                            BinOp::Mul => f(x) * f(y),
                            BinOp::Min => f(x).min(f(y)),
                            BinOp::Max => f(x).max(f(y)),
                            _ => panic!("{i}"),
                        }),
                        Ty::U32 | Ty::B32 => {
                            let (x, y) = (x as u32, y as u32);
                            match op {
                                BinOp::MulWide => x as u64 * y as u64,
                                _ => {
                                    (match op {
                                        BinOp::Add => x.wrapping_add(y),
                                        BinOp::Sub => x.wrapping_sub(y),
                                        BinOp::Mul => x.wrapping_mul(y),
                                        BinOp::Min => x.min(y),
                                        BinOp::Max => x.max(y),
                                        BinOp::And => x & y,
                                        BinOp::Or => x | y,
                                        BinOp::Xor => x ^ y,
                                        BinOp::Shl => x.checked_shl(y).unwrap_or(0),
                                        BinOp::Shr => x.checked_shr(y).unwrap_or(0),
                                        BinOp::Div => x / y,
                                        BinOp::Rem => x % y,
                                        BinOp::MulWide => unreachable!(),
                                    }) as u64
                                }
                            }
                        }
                        Ty::S32 => {
                            let (x, y) = (x as u32 as i32, y as u32 as i32);
                            (match op {
                                BinOp::Add => x.wrapping_add(y),
                                BinOp::Sub => x.wrapping_sub(y),
                                BinOp::Min => x.min(y),
                                BinOp::Max => x.max(y),
                                _ => panic!("{i}"),
                            }) as u32 as u64
                        }
                        Ty::U64 | Ty::B64 | Ty::S64 => match op {
                            BinOp::Add => x.wrapping_add(y),
                            BinOp::Sub => x.wrapping_sub(y),
                            BinOp::Mul => x.wrapping_mul(y),
                            BinOp::Shl => x << y,
                            BinOp::And => x & y,
                            _ => panic!("{i}"),
                        },
                        Ty::Pred => match op {
                            BinOp::And => x & y,
                            BinOp::Or => x | y,
                            _ => panic!("{i}"),
                        },
                        _ => panic!("{i}"),
                    };
                    self.write(*dst, t, v);
                }
                Instr::Mad {
                    ty,
                    wide,
                    dst,
                    a,
                    b,
                    c,
                } => {
                    assert!(!wide);
                    let (x, y, z) = (self.read(a, t), self.read(b, t), self.read(c, t));
                    let v = match ty {
                        Ty::F32 => fb(f(x).mul_add(f(y), f(z))),
                        Ty::U32 | Ty::S32 => {
                            ((x as u32).wrapping_mul(y as u32).wrapping_add(z as u32)) as u64
                        }
                        Ty::U64 => x.wrapping_mul(y).wrapping_add(z),
                        _ => panic!("{i}"),
                    };
                    self.write(*dst, t, v);
                }
                Instr::Un { op, ty, dst, a } => {
                    assert_eq!(*ty, Ty::F32);
                    let x = f(self.read(a, t));
                    let v = match op {
                        UnOp::Ex2 => {
                            let x = if x.is_subnormal() { 0.0 } else { x };
                            let r = (x as f64).exp2() as f32;
                            if r.is_subnormal() {
                                0.0
                            } else {
                                r
                            }
                        }
                        UnOp::Rcp => 1.0 / x,
                        _ => panic!("{i}"),
                    };
                    self.write(*dst, t, fb(v));
                }
                Instr::Setp { cmp, ty, dst, a, b } => {
                    let (x, y) = (self.read(a, t), self.read(b, t));
                    use std::cmp::Ordering;
                    let ord = match ty {
                        Ty::F32 => f(x).partial_cmp(&f(y)),
                        Ty::U32 => Some((x as u32).cmp(&(y as u32))),
                        Ty::S32 => Some((x as u32 as i32).cmp(&(y as u32 as i32))),
                        Ty::U64 => Some(x.cmp(&y)),
                        _ => panic!("{i}"),
                    };
                    let v = match ord {
                        None => false, // ordered comparisons are false on NaN
                        Some(o) => match cmp {
                            Cmp::Eq => o == Ordering::Equal,
                            Cmp::Ne => o != Ordering::Equal,
                            Cmp::Lt => o == Ordering::Less,
                            Cmp::Le => o != Ordering::Greater,
                            Cmp::Gt => o == Ordering::Greater,
                            Cmp::Ge => o != Ordering::Less,
                        },
                    };
                    self.write(*dst, t, v as u64);
                }
                Instr::Selp {
                    dst, a, b, pred, ..
                } => {
                    let p = self.read(&Operand::Reg(*pred), t) != 0;
                    let v = if p { self.read(a, t) } else { self.read(b, t) };
                    self.write(*dst, t, v);
                }
                Instr::Cvt {
                    dst_ty,
                    src_ty,
                    dst,
                    src,
                    ..
                } => {
                    let x = self.read(src, t);
                    let v = match (dst_ty, src_ty) {
                        (Ty::U64, Ty::U32) => x as u32 as u64,
                        (Ty::F32, Ty::F16) => fb(f16_to_f32(x as u16)),
                        _ => panic!("{i}"),
                    };
                    self.write(*dst, t, v);
                }
                Instr::CvtPack { ty, dst, hi, lo } => {
                    let (h, l) = (
                        f(self.read(&Operand::Reg(*hi), t)),
                        f(self.read(&Operand::Reg(*lo), t)),
                    );
                    let conv = if *ty == Ty::F16x2 {
                        f32_to_f16
                    } else {
                        f32_to_bf16
                    };
                    self.write(*dst, t, ((conv(h) as u64) << 16) | conv(l) as u64);
                }
                Instr::Unpack { lo, hi, src } => {
                    let x = self.read(&Operand::Reg(*src), t);
                    self.write(*lo, t, x & 0xffff);
                    self.write(*hi, t, (x >> 16) & 0xffff);
                }
                Instr::Ld {
                    space,
                    ty,
                    dst,
                    addr,
                } => {
                    let size = bytes_of(*ty);
                    let a = self.read(&addr.base, t).wrapping_add(addr.offset as u64);
                    let n = dst.len() as u64;
                    assert_eq!(a % (size * n), 0, "misaligned {i}");
                    for (e, &d) in dst.iter().enumerate() {
                        let ea = a + e as u64 * size;
                        let bytes: &[u8] = match space {
                            StateSpace::Shared => {
                                assert!(ea + size <= self.smem.len() as u64, "smem OOB {i}");
                                &self.smem[ea as usize..(ea + size) as usize]
                            }
                            _ => {
                                let o = mem.check(ea, size);
                                &mem.bytes[o..o + size as usize]
                            }
                        };
                        let mut v = 0u64;
                        for (k, &byte) in bytes.iter().enumerate() {
                            v |= (byte as u64) << (8 * k);
                        }
                        self.write(d, t, v);
                    }
                }
                Instr::St {
                    space,
                    ty,
                    addr,
                    src,
                } => {
                    let size = bytes_of(*ty);
                    let a = self.read(&addr.base, t).wrapping_add(addr.offset as u64);
                    let n = src.len() as u64;
                    assert_eq!(a % (size * n), 0, "misaligned {i}");
                    for (e, &r) in src.iter().enumerate() {
                        let v = self.read(&Operand::Reg(r), t);
                        let ea = a + e as u64 * size;
                        let out: &mut [u8] = match space {
                            StateSpace::Shared => {
                                assert!(ea + size <= self.smem.len() as u64, "smem OOB {i}");
                                &mut self.smem[ea as usize..(ea + size) as usize]
                            }
                            _ => {
                                let o = mem.check(ea, size);
                                &mut mem.bytes[o..o + size as usize]
                            }
                        };
                        for (k, byte) in out.iter_mut().enumerate() {
                            *byte = (v >> (8 * k)) as u8;
                        }
                    }
                }
                _ => panic!("the interpreter does not know {i}"),
            }
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum MaskKind {
        None,
        /// `[B, H, Sq, Sk]` with random values, some -inf, and query row 1
        /// of every (b, h) fully masked.
        Dense,
        /// `[B, 1, Sq, Sk]` broadcast over heads (stride 0), no -inf.
        PerBatch,
    }

    #[derive(Clone, Copy, Debug)]
    struct Case {
        d: usize,
        causal: bool,
        dtype: DType,
        b: usize,
        hq: usize,
        hkv: usize,
        sq: usize,
        sk: usize,
        mask: MaskKind,
        /// Puts a NaN into q at (batch 0, row 2, head 0).
        nan_q: bool,
        /// softmax_scale.
        scale: f32,
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// Rounds `x` to the element type; returns the stored bits and value.
    fn quantise(dtype: DType, x: f32) -> (u32, f32) {
        match dtype {
            DType::F32 => (x.to_bits(), x),
            DType::F16 => {
                let h = f32_to_f16(x);
                (h as u32, f16_to_f32(h))
            }
            DType::BF16 => {
                let h = f32_to_bf16(x);
                (h as u32, bf16_to_f32(h))
            }
        }
    }

    fn put(mem: &mut Memory, dtype: DType, base: u64, index: usize, bits: u32) {
        let es = dtype.size_bytes();
        let o = mem.check(base + (index * es) as u64, es as u64);
        for k in 0..es {
            mem.bytes[o + k] = (bits >> (8 * k)) as u8;
        }
    }

    fn get(mem: &Memory, dtype: DType, base: u64, index: usize) -> f64 {
        let es = dtype.size_bytes();
        let o = mem.check(base + (index * es) as u64, es as u64);
        let mut v = 0u32;
        for k in 0..es {
            v |= (mem.bytes[o + k] as u32) << (8 * k);
        }
        match dtype {
            DType::F32 => f32::from_bits(v) as f64,
            DType::F16 => f16_to_f32(v as u16) as f64,
            DType::BF16 => bf16_to_f32(v as u16) as f64,
        }
    }

    /// Runs the kernel of `c` through the interpreter and checks it against
    /// a float64 reference. Returns the relative L2 error of the finite
    /// rows.
    fn check(c: Case) -> f64 {
        let s = spec(c.d, c.causal, c.dtype);
        let plan = Plan::new(c.d as u32);
        let kernel = build(&s, plan);
        let body = kernel.body();
        let mut rng = Rng(0x5eed ^ (c.d as u64 * 31 + c.sq as u64 * 7 + c.sk as u64));
        let (d, b, hq, hkv, sq, sk) = (c.d, c.b, c.hq, c.hkv, c.sq, c.sk);

        // Layouts (strides in elements): q and out [B, Sq, H, D]; k and v
        // [B, H, Sk, D] (a transposed view); the mask [B, H, Sq, Sk].
        let q_st = [sq * hq * d, hq * d, d];
        let kv_st = [hkv * sk * d, d, sk * d];
        let mut mem = Memory::new();
        let es = c.dtype.size_bytes();
        let q_ptr = mem.alloc(b * sq * hq * d * es, 0);
        let k_ptr = mem.alloc(b * sk * hkv * d * es, 0);
        let v_ptr = mem.alloc(b * sk * hkv * d * es, 0);
        let o_ptr = mem.alloc(b * sq * hq * d * es, 0xAB);
        let mut qv = vec![0f64; b * sq * hq * d];
        let mut kv = vec![0f64; b * sk * hkv * d];
        let mut vv = vec![0f64; b * sk * hkv * d];
        for (i, x) in qv.iter_mut().enumerate() {
            let (bits, val) = quantise(c.dtype, rng.next() * 2.0);
            put(&mut mem, c.dtype, q_ptr, i, bits);
            *x = val as f64;
        }
        for (i, x) in kv.iter_mut().enumerate() {
            let (bits, val) = quantise(c.dtype, rng.next() * 2.0);
            put(&mut mem, c.dtype, k_ptr, i, bits);
            *x = val as f64;
        }
        for (i, x) in vv.iter_mut().enumerate() {
            let (bits, val) = quantise(c.dtype, rng.next());
            put(&mut mem, c.dtype, v_ptr, i, bits);
            *x = val as f64;
        }
        if c.nan_q {
            let i = 2 * q_st[1] + 3;
            let (bits, _) = quantise(c.dtype, f32::NAN);
            put(&mut mem, c.dtype, q_ptr, i, bits);
            qv[i] = f64::NAN;
        }
        let (m_ptr, m_st, mvals) = match c.mask {
            MaskKind::None => (0, [0, 0, 0], Vec::new()),
            MaskKind::Dense | MaskKind::PerBatch => {
                let heads = if c.mask == MaskKind::Dense { hq } else { 1 };
                let n = b * heads * sq * sk;
                let ptr = mem.alloc(n * 4, 0);
                let mut vals = vec![0f64; n];
                for (i, x) in vals.iter_mut().enumerate() {
                    let row = (i / sk) % sq;
                    let mut m = rng.next() * 2.0;
                    if c.mask == MaskKind::Dense && (row == 1 || rng.next() > 0.7) {
                        m = f32::NEG_INFINITY;
                    }
                    put(&mut mem, DType::F32, ptr, i, m.to_bits());
                    *x = m as f64;
                }
                let st = if c.mask == MaskKind::Dense {
                    [hq * sq * sk, sq * sk, sk]
                } else {
                    [sq * sk, 0, sk]
                };
                (ptr, st, vals)
            }
        };

        let name = kernel.name().to_string();
        let mut params: HashMap<String, u64> = HashMap::new();
        let mut set = |n: &str, v: u64| {
            params.insert(format!("{name}_{n}"), v);
        };
        set("q", q_ptr);
        set("k", k_ptr);
        set("v", v_ptr);
        set("out", o_ptr);
        set("mask", m_ptr);
        for (t, st) in [("q", q_st), ("k", kv_st), ("v", kv_st), ("out", q_st)] {
            for (dim, x) in ["b", "s", "h"].iter().zip(st) {
                set(&format!("{t}_stride_{dim}"), x as u64);
            }
        }
        for (dim, x) in ["b", "h", "q"].iter().zip(m_st) {
            set(&format!("mask_stride_{dim}"), x as u64);
        }
        set("seq_q", sq as u64);
        set("seq_k", sk as u64);
        set("group", (hq / hkv) as u64);
        set(
            "scale_log2",
            (c.scale * std::f32::consts::LOG2_E).to_bits() as u64,
        );

        // Renumber the registers densely over all classes, so that a
        // register's id is its slot.
        let mut labels = HashMap::new();
        let mut slots: HashMap<Reg, u32> = HashMap::new();
        let mut body = body.to_vec();
        for (pc, i) in body.iter_mut().enumerate() {
            if let Instr::Label(l) = i {
                labels.insert(l.clone(), pc);
            }
            regs_of(i, &mut |r| {
                let n = slots.len() as u32;
                r.id = *slots.entry(*r).or_insert(n);
            });
        }
        let body = &body[..];

        let block_m = plan.block_m() as usize;
        for bz in 0..b {
            for hy in 0..hq {
                for bx in 0..sq.div_ceil(block_m) {
                    let mut cta = Cta {
                        body,
                        labels: &labels,
                        params: &params,
                        ctaid: [bx as u32, hy as u32, bz as u32],
                        regs: vec![vec![0; N]; slots.len()],
                        init: vec![vec![false; N]; slots.len()],
                        // Shared memory starts as NaN garbage.
                        smem: vec![0xFF; plan.smem_bytes() as usize],
                    };
                    cta.run(&mut mem);
                }
            }
        }

        // The reference, in f64.
        let group = hq / hkv;
        let (mut num, mut den) = (0f64, 0f64);
        for bi in 0..b {
            for h in 0..hq {
                let kh = h / group;
                for i in 0..sq {
                    let qrow = bi * q_st[0] + i * q_st[1] + h * q_st[2];
                    let mut sc = vec![f64::NEG_INFINITY; sk];
                    for (j, s) in sc.iter_mut().enumerate() {
                        let krow = bi * kv_st[0] + j * kv_st[1] + kh * kv_st[2];
                        let mut dot = 0.0;
                        for x in 0..d {
                            dot += qv[qrow + x] * kv[krow + x];
                        }
                        *s = c.scale as f64 * dot;
                        if c.mask != MaskKind::None {
                            *s += mvals[bi * m_st[0] + h * m_st[1] + i * m_st[2] + j];
                        }
                        if c.causal && j > i {
                            *s = f64::NEG_INFINITY;
                        }
                    }
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let has_nan = sc.iter().any(|s| s.is_nan());
                    let mut out = vec![0f64; d];
                    if has_nan {
                        out.fill(f64::NAN);
                    } else if mx > f64::NEG_INFINITY {
                        let mut sum = 0.0;
                        for (j, &s) in sc.iter().enumerate() {
                            let p = (s - mx).exp();
                            sum += p;
                            let vrow = bi * kv_st[0] + j * kv_st[1] + kh * kv_st[2];
                            for x in 0..d {
                                out[x] += p * vv[vrow + x];
                            }
                        }
                        for o in &mut out {
                            *o /= sum;
                        }
                    }
                    for (x, &want) in out.iter().enumerate() {
                        let got = get(&mem, c.dtype, o_ptr, qrow + x);
                        if want.is_nan() {
                            assert!(
                                got.is_nan(),
                                "{c:?}: ({bi},{i},{h},{x}) want NaN, got {got}"
                            );
                        } else if mx == f64::NEG_INFINITY {
                            assert_eq!(got.to_bits(), 0, "{c:?}: masked row ({bi},{i},{h})");
                        } else {
                            assert!(got.is_finite(), "{c:?}: ({bi},{i},{h},{x}) got {got}");
                            num += (got - want).powi(2);
                            den += want.powi(2);
                        }
                    }
                }
            }
        }
        let err = (num / den.max(1e-30)).sqrt();
        let tol = match c.dtype {
            DType::F32 => 1e-5,
            DType::F16 => 2e-3,
            DType::BF16 => 1e-2,
        };
        assert!(err <= tol, "{c:?}: relative L2 error {err}");
        err
    }

    /// Applies `f` to every register an instruction names.
    fn regs_of(i: &mut Instr, f: &mut dyn FnMut(&mut Reg)) {
        let op = |o: &mut Operand, f: &mut dyn FnMut(&mut Reg)| {
            if let Operand::Reg(r) = o {
                f(r)
            }
        };
        match i {
            Instr::Guard { pred, instr, .. } => {
                f(pred);
                regs_of(instr, f);
            }
            Instr::LdParam { dst, .. } => f(dst),
            Instr::Mov { dst, src, .. } => {
                f(dst);
                op(src, f);
            }
            Instr::Bin { dst, a, b, .. } | Instr::Setp { dst, a, b, .. } => {
                f(dst);
                op(a, f);
                op(b, f);
            }
            Instr::Mad { dst, a, b, c, .. } => {
                f(dst);
                op(a, f);
                op(b, f);
                op(c, f);
            }
            Instr::Un { dst, a, .. } => {
                f(dst);
                op(a, f);
            }
            Instr::Selp {
                dst, a, b, pred, ..
            } => {
                f(dst);
                op(a, f);
                op(b, f);
                f(pred);
            }
            Instr::Cvt { dst, src, .. } => {
                f(dst);
                op(src, f);
            }
            Instr::CvtPack { dst, hi, lo, .. } => {
                f(dst);
                f(hi);
                f(lo);
            }
            Instr::Unpack { lo, hi, src } => {
                f(lo);
                f(hi);
                f(src);
            }
            Instr::Ld { dst, addr, .. } => {
                dst.iter_mut().for_each(&mut *f);
                op(&mut addr.base, f);
            }
            Instr::St { src, addr, .. } => {
                src.iter_mut().for_each(&mut *f);
                op(&mut addr.base, f);
            }
            Instr::ShflBfly { dst, src, .. } => {
                f(dst);
                f(src);
            }
            _ => {}
        }
    }

    fn case(d: usize, causal: bool, dtype: DType, sq: usize, sk: usize) -> Case {
        Case {
            d,
            causal,
            dtype,
            b: 2,
            hq: 4,
            hkv: 2,
            sq,
            sk,
            mask: MaskKind::None,
            nan_q: false,
            scale: 1.0 / (d as f32).sqrt(),
        }
    }

    #[test]
    fn interpreted_kernel_matches_the_reference_f32() {
        for d in [8, 40, 64, 80, 128, 136, 256] {
            for causal in [false, true] {
                // Ragged Sq and Sk, more than one key tile.
                let plan = Plan::new(d as u32);
                let sk = plan.tile as usize + 13;
                check(case(d, causal, DType::F32, 37, sk));
            }
        }
    }

    #[test]
    fn interpreted_kernel_matches_the_reference_16_bit() {
        for dtype in [DType::F16, DType::BF16] {
            for d in [8, 48, 128, 136, 160] {
                check(case(d, d % 16 == 0, dtype, 21, 45));
            }
        }
    }

    #[test]
    fn causal_with_unequal_lengths() {
        // Sq > Sk: rows past Sk see every key; Sq < Sk: later keys unseen.
        for (sq, sk) in [(150, 30), (20, 100), (129, 129)] {
            check(case(64, true, DType::F32, sq, sk));
            check(case(128, true, DType::F32, sq, sk));
        }
    }

    #[test]
    fn masks_fully_masked_rows_and_nan() {
        for d in [16, 96, 192] {
            for causal in [false, true] {
                let mut c = case(d, causal, DType::F32, 35, 41);
                c.mask = MaskKind::Dense;
                check(c);
                c.mask = MaskKind::PerBatch;
                check(c);
                c.mask = MaskKind::None;
                c.nan_q = true;
                check(c);
            }
        }
        let mut c = case(64, false, DType::BF16, 33, 70);
        c.mask = MaskKind::Dense;
        c.nan_q = true;
        check(c);
    }

    #[test]
    fn mqa_and_one_key() {
        let mut c = case(32, false, DType::F32, 5, 1);
        c.hkv = 1;
        check(c);
        let mut c = case(32, true, DType::F16, 70, 1);
        c.hkv = 1;
        c.b = 1;
        check(c);
    }
}

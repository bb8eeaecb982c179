//! The Hopper (sm_90a) forward kernel for 16-bit element types: `wgmma`
//! products from 128-byte-swizzled shared memory, `cp.async` loads of K and
//! V double-buffered under the products, and an online softmax in
//! registers. It keeps the launch contract of [`crate::gpu`].
//!
//! # Structure
//!
//! A CTA of `wgs` consumer warpgroups computes `64 · wgs` query rows of one
//! (batch, head); consumer warpgroup `w` owns rows `64w..64w + 63`, and
//! warp `i` of it rows `16i..16i + 15` of those, so a row of the scores
//! lives in the four lanes of a quad exactly as with `mma.sync`. K and V
//! stream through `block_n`-key blocks in shared-memory stages:
//!
//! - `S = Q·K(n)ᵀ`: `wgmma m64n{block_n}k16`, A (Q) and B (K) both K-major
//!   from shared-memory descriptors;
//! - masking where needed (ragged ends, the causal diagonal, a mask
//!   tensor), online softmax, `P` packed to 16 bits: the accumulator
//!   layout of two adjacent n8 slices is the register A fragment of a
//!   `wgmma`;
//! - `O += P·V(n)`: `wgmma m64n{d}k16` with A from registers and B (V, a
//!   `[keys, d]` row-major tile) N-major, read through the transpose bit.
//!
//! With `overlap` (the default) block `n + 1`'s `Q·Kᵀ` is issued together
//! with block `n`'s `P·V`, and the softmax of `n + 1` runs while the `P·V`
//! is in flight; K/V have three stages, block `n + 2` loading while `n` and
//! `n + 1` are in use. Without a producer every thread copies its share of
//! each block with `cp.async` and one CTA barrier per block publishes the
//! copies and frees a stage. With `producer`, warpgroup 0 does all copies
//! and hands stages over through full/empty mbarriers, the consumers issue
//! their products in turns (ping-pong, named barriers), and `setmaxnreg`
//! moves registers from the producer to the consumers.
//!
//! Default tiles (measured on an H100 SXM, `tests/gpu/ptx_harness.py`,
//! bf16, 2026-11-27): three consumer warpgroups (192 query rows) and
//! 96-key blocks, no producer: 498-518 TFLOP/s at d=128 against 466-483
//! for two warpgroups and 128-key blocks (each K/V byte copied from L2
//! serves 1.5 times the rows), and 355 at d=64. The warp-specialised
//! variant is correct but measured no faster (458-465 at d=128, two
//! consumers).
//!
//! Other head sizes (multiples of 16, [`HEAD_SIZES`] enabled): up to 128
//! the same tiles; 160 and 192 three warpgroups and 48-key blocks (the
//! output alone is 96 registers); 224 and 256 two warpgroups (the output
//! is 128 registers) and 80-key blocks with K and V in two stages each
//! ([`Sm90Config::split_kv`]): Q (64 KB) and four 40 KB tiles fit in 225
//! KB. Measured (same harness, 2026-11-27): 517-557 TFLOP/s at d=256
//! against 308 for the sm_80 kernel, 489-516 at 192, 395 at 80.
//!
//! # Shared memory
//!
//! Every tile (Q, K, V) is stored as `ceil(d / 64)` column panels of 64 elements
//! (128 bytes a row); inside a panel, rows are 128 bytes apart and the
//! 16-byte chunk `c` of row `r` sits at chunk `c ^ (r % 8)`: the 128-byte
//! swizzle, whose atom (8 rows, 1024 bytes) the descriptors step over with
//! a stride byte offset of 1024. Panels start 1024-byte aligned (the base is
//! aligned at run time), so the hardware's swizzle, computed from address
//! bits, matches the one the loads write.
//!
//! - A K-major operand (Q, K) at k-step `kk` starts at panel `kk / 4`, byte
//!   `32 · (kk % 4)` of the row; the leading byte offset is unused.
//! - V as an N-major B: a k-step (16 keys) is 2048 bytes; the leading byte
//!   offset is the distance between 64-column panels.
//! - Where `d` is not a multiple of 64 the columns past `d` are neither
//!   copied nor read: `Q·Kᵀ` runs `d / 16` k-steps, and `P·V` is
//!   `m64n{d}` over a partial last panel (checked on an H100 at d=80, 96,
//!   112, 160 and 224, in one product and per panel).

use crate::gpu::{
    cta_coords, declare_params, load_args, store_scaled_pairs, GpuKernel, TensorMaps,
    PERSISTENT_PARAMS, TENSOR_MAP_PARAMS,
};
use crate::ptx::{
    Addr, BinOp, Cmp, Instr, Kernel, Module, Operand, Param, Reg, Special, StateSpace, Target, Ty,
    UnOp, WgmmaA,
};
use crate::{DType, VariantSpec};

const LOG2E: f32 = std::f32::consts::LOG2_E;

/// Registers per thread of the producer warpgroup when warp-specialised;
/// the consumers share the rest of the 64 K register file
/// ([`Sm90Config::consumer_regs`]).
const PRODUCER_REGS: u32 = 24;

/// The most dynamic shared memory a CTA may use on compute capability 9.0.
const SMEM_LIMIT: usize = 232_448;

/// The shape of one variant's sm_90a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sm90Config {
    /// Head size (a multiple of 16, at most 256).
    pub d: usize,
    /// `BF16` or `F16`.
    pub ab: Ty,
    /// Top-left causal.
    pub causal: bool,
    /// Consumer warpgroups per CTA, 64 query rows each.
    pub wgs: usize,
    /// Keys per block (a multiple of 16, at most 256).
    pub block_n: usize,
    /// Issue `P·V` as one `m64n64` product per 64-column panel of V rather
    /// than one `m64n{d}` product over all of them.
    pub pv_per_panel: bool,
    /// Issue block `n + 1`'s `Q·Kᵀ` with block `n`'s `P·V` and run the
    /// softmax of `n + 1` under the latter (three K/V stages instead of
    /// two).
    pub overlap: bool,
    /// Warp-specialised: a producer warpgroup issues every K/V copy and
    /// hands stages over through mbarriers; the consumer warpgroups take
    /// turns issuing their products (ping-pong) with `setmaxnreg` moving
    /// registers from the producer to them. Implies `overlap`.
    pub producer: bool,
    /// With a producer: the consumers take turns issuing their products.
    pub ping_pong: bool,
    /// With `overlap`: K and V get two stages each instead of three shared
    /// (K, V) stages; block `n`'s loop iteration copies K(n + 2) and
    /// V(n + 1). A third less shared memory for the same blocks: what
    /// lets d=256 overlap.
    pub split_kv: bool,
    /// `P·V` as `m64n{d}` even where `d` is not a multiple of 64 (a partial
    /// last swizzle panel of V) rather than over the padded width.
    pub pv_exact: bool,
    /// With a producer: one thread of it loads Q, K and V with TMA
    /// (`cp.async.bulk.tensor` through the tensor maps of
    /// [`crate::gpu::TensorMaps`]), completing on mbarriers, instead of
    /// the warpgroup's `cp.async` copies.
    pub tma: bool,
    /// With TMA: each CTA loops over tiles (query block, head, batch)
    /// `gridDim.x` apart, the producer loading the next tile's Q and K/V
    /// while the consumers finish the current one. The runtime launches
    /// one CTA per SM at most and passes [`crate::gpu::PERSISTENT_PARAMS`].
    pub persistent: bool,
    /// Skip `O *= alpha` in a warp whose 16 rows all kept their maximum
    /// (every `alpha` is 1), decided by a warp vote: the common case once
    /// the first blocks have set the row maxima.
    pub lazy_rescale: bool,
    /// With TMA, not persistent: each consumer warpgroup writes its output
    /// rows into its own rows of Q's (by then unread) shared tile and
    /// stores them from there in 16-byte row-contiguous pieces, instead of
    /// 4-byte stores straight from the accumulators.
    pub staged_store: bool,
}

impl Sm90Config {
    /// The configuration of a variant, or `None` where this kernel cannot
    /// apply (32-bit elements, head sizes not a multiple of 16 or above
    /// 256). [`generate`] further keeps to [`HEAD_SIZES`].
    ///
    /// The default is warp-specialised: a producer warpgroup loading with
    /// TMA and consumer warpgroups of 64 query rows with `setmaxnreg`, no
    /// ping-pong; consumers and keys per block by head size (measured on an
    /// H100, `docs/hopper.md`): three consumers (160 registers) and
    /// 128-key blocks up to d=64, three and 96 keys at 80 to 112, two (240
    /// registers) and 128 keys at 128, 112 keys up to 192, 80 above; K/V stages as many as fit (2 or 3); the output rescaled
    /// lazily where not causal.
    pub fn new(spec: &VariantSpec) -> Option<Sm90Config> {
        let mut cfg = Sm90Config::cp_async(spec)?;
        cfg.wgs = 2;
        cfg.producer = true;
        cfg.ping_pong = false;
        cfg.split_kv = false;
        cfg.pv_per_panel = false;
        cfg.tma = true;
        // Measured on an H100: +2-5% without a mask of causality, a loss
        // with one (`docs/hopper.md`).
        cfg.lazy_rescale = !spec.causal;
        // Three consumers (160 registers each) where S, P and O fit them:
        // 11-17% faster than two at d=64, 80 and 96, 4-7% at 48 and 112.
        (cfg.wgs, cfg.block_n) = match cfg.d {
            0..=64 => (3, 128),
            65..=112 => (3, 96),
            113..=128 => (2, 128),
            129..=192 => (2, 112),
            _ => (2, 80),
        };
        Some(cfg)
    }

    /// The configuration without a producer or TMA: every thread copies
    /// with `cp.async` and a CTA barrier per block publishes the copies.
    /// For tensors whose strides a tensor map cannot describe, and for
    /// comparison; `None` where [`Sm90Config::new`] is.
    pub fn cp_async(spec: &VariantSpec) -> Option<Sm90Config> {
        let ab = match spec.dtype {
            DType::BF16 => Ty::BF16,
            DType::F16 => Ty::F16,
            DType::F32 => return None,
        };
        let d = spec.head_size;
        let mut cfg = Sm90Config {
            d,
            ab,
            causal: spec.causal,
            wgs: 3,
            block_n: 96,
            pv_per_panel: false,
            overlap: true,
            producer: false,
            ping_pong: true,
            split_kv: false,
            pv_exact: false,
            tma: false,
            persistent: false,
            lazy_rescale: false,
            staged_store: false,
        };
        if !d.is_multiple_of(16) || d > 256 {
            return None;
        }
        // A partial last panel of V is read as such (measured correct on
        // an H100), not padded: `m64n80` rather than `m64n128` at d=80.
        cfg.pv_exact = !d.is_multiple_of(64);
        match d.next_multiple_of(64) {
            // Three warpgroups, 96-key blocks, three (K, V) stages.
            64 | 128 => {}
            192 => cfg.block_n = 48,
            // Q alone is 64 KB: two warpgroups, 80-key blocks in split
            // stages (225 KB).
            _ => {
                cfg.wgs = 2;
                cfg.block_n = 80;
                cfg.split_kv = true;
                // The causal d=224 kernel checked on the device issues
                // P·V per panel; the single product is unmeasured there.
                cfg.pv_per_panel = spec.causal && d == 224;
            }
        }
        Some(cfg)
    }

    /// The width of the shared-memory tiles: `d` rounded up to whole
    /// 64-column swizzle panels (columns past `d` are never copied).
    pub fn d_pad(&self) -> usize {
        self.d.next_multiple_of(64)
    }

    /// The `N` of the `P·V` product(s): `d`, or the padded width.
    pub fn pv_n(&self) -> usize {
        if self.pv_exact {
            self.d
        } else {
            self.d_pad()
        }
    }

    /// Query rows per CTA.
    pub fn block_m(&self) -> usize {
        64 * self.wgs
    }

    /// Threads per CTA.
    pub fn threads(&self) -> usize {
        128 * (self.wgs + usize::from(self.producer))
    }

    /// Bytes of one K or V tile.
    fn kv_tile(&self) -> usize {
        self.block_n * self.d_pad() * 2
    }

    /// Registers per consumer thread when warp-specialised: what the
    /// producer leaves of the register file, in steps of 8, at most 240
    /// (two consumers: 240, three: 160).
    pub fn consumer_regs(&self) -> u32 {
        let left = 65536 - 128 * PRODUCER_REGS as usize;
        ((left / (128 * self.wgs)) / 8 * 8).min(240) as u32
    }

    /// K/V stages in shared memory.
    pub fn stages(&self) -> usize {
        if self.tma {
            // As many as fit beside Q and the barriers, two to three.
            let fixed = 1024 + self.block_m() * self.d_pad() * 2 + 8 * (3 * 3 + 2);
            (SMEM_LIMIT.saturating_sub(fixed) / (2 * self.kv_tile())).clamp(2, 3)
        } else if self.split_kv {
            // Two for K and two for V: as many tiles as two (K, V) stages.
            2
        } else if self.overlap || self.producer {
            3
        } else {
            2
        }
    }

    /// Dynamic shared memory: 1 KB of alignment slack, Q, and a K and a V
    /// tile per stage.
    pub fn smem_bytes(&self) -> usize {
        1024 + self.block_m() * self.d_pad() * 2
            + 2 * self.stages() * self.kv_tile()
            + self.barrier_bytes()
    }

    /// The full and empty mbarriers of the stages (warp-specialised only):
    /// with TMA, K-full, V-full and empty per stage, then Q-full and
    /// Q-empty.
    fn barrier_bytes(&self) -> usize {
        if self.tma {
            8 * (3 * self.stages() + 2)
        } else if self.producer {
            16 * self.stages()
        } else {
            0
        }
    }

    fn packed(&self) -> Ty {
        if self.ab == Ty::BF16 {
            Ty::BF16x2
        } else {
            Ty::F16x2
        }
    }
}

/// The head sizes whose sm_90a kernel is checked on an H100 and measured
/// faster than the sm_80 one (`docs/hopper.md`). d=32 is correct but
/// slower (197-220 TFLOP/s against 219-225).
pub const HEAD_SIZES: [usize; 10] = [48, 64, 80, 96, 112, 128, 160, 192, 224, 256];

/// Generates the sm_90a kernel of a variant, or `None` where there is none
/// (32-bit elements, head sizes not in [`HEAD_SIZES`]).
pub fn generate(spec: &VariantSpec) -> Option<GpuKernel> {
    if !HEAD_SIZES.contains(&spec.head_size) {
        return None;
    }
    Sm90Config::new(spec).map(|cfg| generate_with(spec, cfg))
}

/// Generates the sm_90a kernel of a variant with the tiles of `cfg`.
pub fn generate_with(spec: &VariantSpec, cfg: Sm90Config) -> GpuKernel {
    let entry = spec.kernel_name();
    let k = Emitter::new(&entry, cfg).emit();
    GpuKernel {
        ptx: Module::new(Target::Sm90a).kernel(k).to_string(),
        entry,
        target: Target::Sm90a,
        block_m: cfg.block_m() as u32,
        threads: cfg.threads() as u32,
        smem_bytes: cfg.smem_bytes() as u32,
        tensor_maps: cfg.tma.then_some(TensorMaps {
            q_rows: cfg.block_m() as u32,
            kv_rows: cfg.block_n as u32,
        }),
        persistent: cfg.persistent,
    }
}

/// The descriptor bits other than the start address: 128-byte swizzle and
/// the two byte offsets.
fn desc_bits(lbo: usize, sbo: usize) -> u64 {
    (((lbo >> 4) as u64) << 16) | (((sbo >> 4) as u64) << 32) | (1u64 << 62)
}

struct Emitter {
    k: Kernel,
    cfg: Sm90Config,
    /// The loader's row of this thread (set once the loader is).
    lrow: Option<Reg>,
    /// Whether this thread's 16-byte chunk lies inside the head size
    /// (`None`: always; the tiles are padded to whole panels).
    chunk_ok: Option<Reg>,
    /// Persistent: the CTA's count of key blocks before the current tile,
    /// which the stages and their barrier phases continue from.
    g0: Option<Reg>,
    /// Persistent: the CTA's count of tiles with keys before the current
    /// one (Q's barrier phases).
    q_phase: Option<Reg>,
    /// Staged stores: where this consumer warpgroup's rows are.
    staging: Option<Staging>,
}

/// A consumer warpgroup's output staging ([`Sm90Config::staged_store`]).
#[derive(Clone, Copy, Debug)]
struct Staging {
    /// Shared address of the warpgroup's first row in Q's first panel.
    smem: Reg,
    /// The warpgroup's first query row.
    row_base: Reg,
    /// The thread's index in its warpgroup.
    ltid: Reg,
    /// The warpgroup's named barrier.
    bar: Reg,
}

impl Emitter {
    fn new(name: &str, cfg: Sm90Config) -> Emitter {
        Emitter {
            k: Kernel::new(name),
            cfg,
            lrow: None,
            chunk_ok: None,
            g0: None,
            q_phase: None,
            staging: None,
        }
    }

    fn u(x: usize) -> Operand {
        Operand::U(x as u64)
    }

    /// A descriptor for the shared address `addr` with `bits`.
    fn desc(&mut self, addr: Reg, bits: u64) -> Reg {
        let k = &mut self.k;
        let a = k.bin(BinOp::Shr, Ty::U32, addr, Operand::U(4));
        let a = k.bin(BinOp::And, Ty::U32, a, Operand::U(0x3fff));
        let a = k.cvt(None, Ty::U64, Ty::U32, a);
        k.bin(BinOp::Or, Ty::U64, a, Operand::U(bits))
    }

    /// `desc` moved on by `bytes` (a multiple of 16).
    fn desc_at(&mut self, desc: Reg, bytes: usize) -> Reg {
        if bytes == 0 {
            desc
        } else {
            self.k.bin(BinOp::Add, Ty::U64, desc, Self::u(bytes >> 4))
        }
    }

    /// Issues this thread's `cp.async` copies of `rows` rows of a tile:
    /// global row `grow` (and every `rpp` after it) from `src` (stepping
    /// `pass_step` bytes) into shared `dst` (stepping `rpp · 128` bytes).
    /// Rows at or past `seq` are zero-filled without reading memory.
    #[allow(clippy::too_many_arguments)]
    fn load_tile(
        &mut self,
        rows: usize,
        rpp: usize,
        src: Reg,
        pass_step: Reg,
        grow: Reg,
        seq: Reg,
        dst: Reg,
        enable: Option<Reg>,
    ) {
        let lrow = self.lrow.expect("loader set up");
        let k = &mut self.k;
        let mut s = src;
        for pass in 0..rows.div_ceil(rpp) {
            if pass > 0 {
                s = k.bin(BinOp::Add, Ty::U64, s, pass_step);
            }
            let row = k.bin(BinOp::Add, Ty::U32, grow, Self::u(pass * rpp));
            let valid = k.setp(Cmp::Lt, Ty::U32, row, seq);
            let size = k.selp(Ty::U32, Operand::U(16), Operand::U(0), valid);
            let cp = Instr::CpAsync16 {
                dst: Addr::at(dst, (pass * rpp * 128) as i64),
                src: s.into(),
                src_size: size.into(),
            };
            // A last, partial pass: only the threads of its rows copy.
            let mut go = enable;
            if (pass + 1) * rpp > rows {
                let fits = k.setp(Cmp::Lt, Ty::U32, lrow, Self::u(rows - pass * rpp));
                if let Some(e) = enable {
                    k.bin_to(BinOp::And, Ty::Pred, fits, fits, e);
                }
                go = Some(fits);
            }
            // Chunks past the head size are never read: not copied.
            if let Some(ok) = self.chunk_ok {
                go = Some(match go {
                    Some(e) => {
                        let both = k.reg(Ty::Pred);
                        k.bin_to(BinOp::And, Ty::Pred, both, e, ok);
                        both
                    }
                    None => ok,
                });
            }
            match go {
                Some(e) => k.guard(e, false, cp),
                None => k.push(cp),
            }
        }
    }

    /// Reduces `xs` (at least one) with `op` through four independent
    /// chains joined at the end, so that the chains' latencies overlap.
    fn tree(&mut self, xs: &[Reg], op: BinOp) -> Reg {
        let k = &mut self.k;
        let mut acc: Vec<Reg> = xs.iter().take(4).copied().collect();
        for (i, &x) in xs.iter().enumerate().skip(4) {
            acc[i % 4] = k.bin(op, Ty::F32, acc[i % 4], x);
        }
        while acc.len() > 1 {
            let b = acc.pop().expect("two or more");
            let a = acc.pop().expect("two or more");
            acc.insert(0, k.bin(op, Ty::F32, a, b));
        }
        acc[0]
    }

    /// Reduces `x` over the four lanes of a quad with `op`.
    fn quad_reduce(&mut self, x: Reg, op: BinOp) -> Reg {
        let mut acc = x;
        for mask in [1, 2] {
            let other = self.k.reg(Ty::F32);
            self.k.push(Instr::ShflBfly {
                dst: other,
                src: acc,
                lane_mask: mask,
            });
            acc = self.k.bin(op, Ty::F32, acc, other);
        }
        acc
    }

    /// `S = Q·K(block)ᵀ` for the K tile of descriptor `k_desc` (no fence,
    /// no commit).
    fn s_gemm(&mut self, c: &Core, k_desc: Reg) {
        let cfg = self.cfg;
        let (bm, bn) = (cfg.block_m(), cfg.block_n);
        for kk in 0..cfg.d / 16 {
            let within = (kk % 4) * 32;
            let qa = self.desc_at(c.q_desc, (kk / 4) * bm * 128 + within);
            let kb = self.desc_at(k_desc, (kk / 4) * bn * 128 + within);
            self.k.push(Instr::Wgmma {
                n: bn as u32,
                ab: cfg.ab,
                d: c.s_acc.clone(),
                a: WgmmaA::Desc {
                    desc: qa,
                    trans: false,
                },
                b: kb,
                scale_d: if kk == 0 { c.p_false } else { c.p_true },
                trans_b: false,
            });
        }
    }

    /// `O += P·V(block)` for the V tile of descriptor `v_desc` (no fence,
    /// no commit).
    fn pv_gemm(&mut self, c: &Core, v_desc: Reg) {
        let cfg = self.cfg;
        let (d, bn) = (cfg.pv_n(), cfg.block_n);
        for (j, a) in c.p.iter().enumerate() {
            let vb = self.desc_at(v_desc, j * 16 * 128);
            if cfg.pv_per_panel {
                for pn in 0..d.div_ceil(64) {
                    let vbp = self.desc_at(vb, pn * bn * 128);
                    let n = (d - 64 * pn).min(64);
                    self.k.push(Instr::Wgmma {
                        n: n as u32,
                        ab: cfg.ab,
                        d: c.o_acc[32 * pn..32 * pn + n / 2].to_vec(),
                        a: WgmmaA::Regs(*a),
                        b: vbp,
                        scale_d: c.p_true,
                        trans_b: true,
                    });
                }
            } else {
                self.k.push(Instr::Wgmma {
                    n: d as u32,
                    ab: cfg.ab,
                    d: c.o_acc.clone(),
                    a: WgmmaA::Regs(*a),
                    b: vb,
                    scale_d: c.p_true,
                    trans_b: true,
                });
            }
        }
    }

    /// Scores of the block starting at key `j0` to the log2 domain, masking
    /// where needed, online softmax: `S` becomes the unnormalised weights,
    /// the running max and sum move on. Returns the factor each row's `O`
    /// must be rescaled by.
    fn softmax(&mut self, c: &Core, j0: Reg) -> [Reg; 2] {
        let cfg = self.cfg;
        let bn = cfg.block_n;
        let n_tiles_s = bn / 8;
        let neg_inf = Operand::F32(f32::NEG_INFINITY);
        let row_offset = |r: usize| Self::u(8 * r);
        let k = &mut self.k;
        // Unmasked blocks keep the raw scores and fold the scale into the
        // exponent (`ex2(s · scale − max)`, one FMA); the masking path
        // scales them first and then uses a factor of 1. A negative scale
        // would turn the raw maximum into a minimum: it takes that path.
        let factor = k.mov(Ty::F32, c.scale_log2);
        let block_end = k.bin(BinOp::Add, Ty::U32, j0, Self::u(bn));
        let ragged = k.setp(Cmp::Gt, Ty::U32, block_end, c.seq_k);
        let need = k.reg(Ty::Pred);
        k.bin_to(BinOp::Or, Ty::Pred, need, ragged, c.has_mask);
        k.bin_to(BinOp::Or, Ty::Pred, need, need, c.negative_scale);
        if cfg.causal {
            // The block crosses the diagonal of the CTA's first row.
            let last_key = k.bin(BinOp::Add, Ty::U32, j0, Self::u(bn - 1));
            let diag = k.setp(Cmp::Gt, Ty::U32, last_key, c.q0);
            k.bin_to(BinOp::Or, Ty::Pred, need, need, diag);
        }
        let skip_mask = k.label("unmasked");
        k.branch_if(need, true, &skip_mask);
        {
            for &r in &c.s_acc {
                k.bin_to(BinOp::Mul, Ty::F32, r, r, c.scale_log2);
            }
            k.mov_to(Ty::F32, factor, Operand::F32(1.0));
            let kbase = k.bin(BinOp::Add, Ty::U32, j0, c.tq2);
            let skip_bias = k.label("no_bias");
            // Additive mask, in the log2 domain.
            k.branch_if(c.has_mask, true, &skip_bias);
            let mut row_in = Vec::new();
            let mut mask_rows = Vec::new();
            for r in 0..2 {
                let row = k.bin(BinOp::Add, Ty::U32, c.row0, row_offset(r));
                row_in.push(k.setp(Cmp::Lt, Ty::U32, row, c.seq_q));
                let r64 = k.cvt(None, Ty::U64, Ty::U32, row);
                let o = k.mad(Ty::U64, r64, c.msq, c.mask_head);
                mask_rows.push(k.mad(Ty::U64, o, Operand::U(4), c.m_ptr));
            }
            for t in 0..n_tiles_s {
                for e in 0..4 {
                    let s = c.s_acc[4 * t + e];
                    let r = e / 2;
                    let key = k.bin(BinOp::Add, Ty::U32, kbase, Self::u(8 * t + e % 2));
                    let kin = k.setp(Cmp::Lt, Ty::U32, key, c.seq_k);
                    let ok = k.reg(Ty::Pred);
                    k.bin_to(BinOp::And, Ty::Pred, ok, kin, row_in[r]);
                    let key64 = k.cvt(None, Ty::U64, Ty::U32, key);
                    let addr = k.mad(Ty::U64, key64, Operand::U(4), mask_rows[r]);
                    let bias = k.mov(Ty::F32, Operand::F32(0.0));
                    k.guard(
                        ok,
                        false,
                        Instr::Ld {
                            space: StateSpace::GlobalNc,
                            ty: Ty::F32,
                            dst: vec![bias],
                            addr: addr.into(),
                        },
                    );
                    k.mad_to(Ty::F32, s, bias, Operand::F32(LOG2E), s);
                }
            }
            k.push(Instr::Label(skip_bias));
            // Keys past Sk, and (causal) keys after the row, do not exist.
            let rows: Vec<Reg> = (0..2)
                .map(|r| k.bin(BinOp::Add, Ty::U32, c.row0, row_offset(r)))
                .collect();
            for t in 0..n_tiles_s {
                for e in 0..4 {
                    let s = c.s_acc[4 * t + e];
                    let key = k.bin(BinOp::Add, Ty::U32, kbase, Self::u(8 * t + e % 2));
                    let hide = k.setp(Cmp::Ge, Ty::U32, key, c.seq_k);
                    if cfg.causal {
                        let after = k.setp(Cmp::Gt, Ty::U32, key, rows[e / 2]);
                        k.bin_to(BinOp::Or, Ty::Pred, hide, hide, after);
                    }
                    k.selp_to(Ty::F32, s, neg_inf.clone(), s, hide);
                }
            }
        }
        k.push(Instr::Label(skip_mask));

        // Row maxima over the block, across the quad; rescale factors.
        let mut shift = Vec::new();
        let mut alpha = Vec::new();
        for (r, &m_old) in c.m_run.iter().enumerate() {
            let row: Vec<Reg> = (0..n_tiles_s)
                .flat_map(|t| [c.s_acc[4 * t + 2 * r], c.s_acc[4 * t + 2 * r + 1]])
                .collect();
            let m = self.tree(&row, BinOp::Max);
            let m = self.quad_reduce(m, BinOp::Max);
            let k = &mut self.k;
            let m = k.bin(BinOp::Mul, Ty::F32, m, factor);
            let m_new = k.bin(BinOp::Max, Ty::F32, m_old, m);
            // A row that has seen only hidden keys keeps max -inf; shifting
            // by 0 keeps NaN out and makes every hidden weight exactly 0.
            let none = k.setp(Cmp::Eq, Ty::F32, m_new, neg_inf.clone());
            let sh = k.selp(Ty::F32, Operand::F32(0.0), m_new, none);
            let diff = k.bin(BinOp::Sub, Ty::F32, m_old, sh);
            let a = k.un(UnOp::Ex2, Ty::F32, diff);
            k.mov_to(Ty::F32, m_old, m_new);
            shift.push(sh);
            alpha.push(a);
        }
        let k = &mut self.k;
        let neg_shift: Vec<Reg> = shift
            .iter()
            .map(|&sh| k.un(UnOp::Neg, Ty::F32, sh))
            .collect();
        for (i, &s) in c.s_acc.iter().enumerate() {
            let x = k.mad(Ty::F32, s, factor, neg_shift[(i % 4) / 2]);
            k.un_to(UnOp::Ex2, Ty::F32, s, x);
        }
        for (r, (&l, &a)) in c.l_run.iter().zip(&alpha).enumerate() {
            let row: Vec<Reg> = (0..n_tiles_s)
                .flat_map(|t| [c.s_acc[4 * t + 2 * r], c.s_acc[4 * t + 2 * r + 1]])
                .collect();
            let b = self.tree(&row, BinOp::Add);
            self.k.mad_to(Ty::F32, l, l, a, b);
        }
        [alpha[0], alpha[1]]
    }

    /// `O *= alpha` per row, and the weights in `S` packed into `P`'s
    /// register A fragments (k-step `j` covers S slices `2j` and `2j + 1`).
    fn rescale_and_pack(&mut self, c: &Core, alpha: [Reg; 2]) {
        let packed = self.cfg.packed();
        let k = &mut self.k;
        let kept = k.label("kept_max");
        if self.cfg.lazy_rescale {
            let same = k.setp(Cmp::Eq, Ty::F32, alpha[0], Operand::F32(1.0));
            let same1 = k.setp(Cmp::Eq, Ty::F32, alpha[1], Operand::F32(1.0));
            k.bin_to(BinOp::And, Ty::Pred, same, same, same1);
            let all = k.reg(Ty::Pred);
            k.push(Instr::VoteAll {
                dst: all,
                src: same,
            });
            k.branch_if(all, false, &kept);
        }
        for (i, &o) in c.o_acc.iter().enumerate() {
            k.bin_to(BinOp::Mul, Ty::F32, o, o, alpha[(i % 4) / 2]);
        }
        if self.cfg.lazy_rescale {
            k.push(Instr::Label(kept));
        }
        for (j, p) in c.p.iter().enumerate() {
            let lo = &c.s_acc[8 * j..8 * j + 4];
            let hi = &c.s_acc[8 * j + 4..8 * j + 8];
            for (dst, (h, l)) in p.iter().zip([
                (lo[1], lo[0]),
                (lo[3], lo[2]),
                (hi[1], hi[0]),
                (hi[3], hi[2]),
            ]) {
                k.push(Instr::CvtPack {
                    ty: packed,
                    dst: *dst,
                    hi: h,
                    lo: l,
                });
            }
        }
    }

    /// Issues the copies of the next K and V block into the stage at byte
    /// offset `stage` (a register), then moves the pointers on a block.
    fn load_block(&mut self, ld: &Loads, stage: Reg, enable: Option<Reg>) {
        let (bn, tile) = (self.cfg.block_n, self.cfg.kv_tile());
        let k_dst = self.k.bin(BinOp::Add, Ty::U32, ld.k_dst0, stage);
        let v_dst = self.k.bin(BinOp::Add, Ty::U32, k_dst, Self::u(tile));
        self.load_tile(
            bn, ld.rpp, ld.k_src, ld.k_pass, ld.grow, ld.seq_k, k_dst, enable,
        );
        self.load_tile(
            bn, ld.rpp, ld.v_src, ld.v_pass, ld.v_grow, ld.seq_k, v_dst, enable,
        );
        let k = &mut self.k;
        k.push(Instr::CpAsyncCommit);
        k.bin_to(BinOp::Add, Ty::U64, ld.k_src, ld.k_src, ld.k_block);
        k.bin_to(BinOp::Add, Ty::U64, ld.v_src, ld.v_src, ld.v_block);
        k.bin_to(BinOp::Add, Ty::U32, ld.grow, ld.grow, Self::u(bn));
        if ld.v_grow != ld.grow {
            k.bin_to(BinOp::Add, Ty::U32, ld.v_grow, ld.v_grow, Self::u(bn));
        }
    }

    /// Split stages: issues the copies of the next K block into the K
    /// slot at byte offset `slot` (a register) and moves its pointer on
    /// (no commit).
    fn load_k(&mut self, ld: &Loads, slot: Reg, enable: Option<Reg>) {
        let bn = self.cfg.block_n;
        let dst = self.k.bin(BinOp::Add, Ty::U32, ld.k_dst0, slot);
        self.load_tile(
            bn, ld.rpp, ld.k_src, ld.k_pass, ld.grow, ld.seq_k, dst, enable,
        );
        let k = &mut self.k;
        k.bin_to(BinOp::Add, Ty::U64, ld.k_src, ld.k_src, ld.k_block);
        k.bin_to(BinOp::Add, Ty::U32, ld.grow, ld.grow, Self::u(bn));
    }

    /// Split stages: the same for the next V block, into the V slot at
    /// byte offset `slot` (the V slots follow the two K slots).
    fn load_v(&mut self, ld: &Loads, slot: Reg, enable: Option<Reg>) {
        let (bn, tile) = (self.cfg.block_n, self.cfg.kv_tile());
        let dst = self.k.bin(BinOp::Add, Ty::U32, ld.k_dst0, slot);
        let dst = self.k.bin(BinOp::Add, Ty::U32, dst, Self::u(2 * tile));
        self.load_tile(
            bn, ld.rpp, ld.v_src, ld.v_pass, ld.v_grow, ld.seq_k, dst, enable,
        );
        let k = &mut self.k;
        k.bin_to(BinOp::Add, Ty::U64, ld.v_src, ld.v_src, ld.v_block);
        k.bin_to(BinOp::Add, Ty::U32, ld.v_grow, ld.v_grow, Self::u(bn));
    }

    /// Split stages: the byte offset of the slot of block `n + plus`, and
    /// the same in descriptor units.
    fn slot_of(&mut self, n: Reg, plus: usize) -> (Reg, Reg) {
        let tile = self.cfg.kv_tile();
        let k = &mut self.k;
        let m = k.bin(BinOp::Add, Ty::U32, n, Self::u(plus));
        let s = k.bin(BinOp::And, Ty::U32, m, Operand::U(1));
        let bytes = k.bin(BinOp::Mul, Ty::U32, s, Self::u(tile));
        let s64 = k.cvt(None, Ty::U64, Ty::U32, s);
        let units = k.bin(BinOp::Mul, Ty::U64, s64, Self::u(tile >> 4));
        (bytes, units)
    }

    /// Byte offset of the stage of block `n`, and the same in descriptor
    /// units.
    fn stage_of(&mut self, n: Reg, plus: usize) -> (Reg, Reg) {
        let stages = self.cfg.stages();
        let stride = 2 * self.cfg.kv_tile();
        let k = &mut self.k;
        let m = if plus > 0 {
            k.bin(BinOp::Add, Ty::U32, n, Self::u(plus))
        } else {
            n
        };
        let s = k.bin(BinOp::Rem, Ty::U32, m, Self::u(stages));
        let bytes = k.bin(BinOp::Mul, Ty::U32, s, Self::u(stride));
        let s64 = k.cvt(None, Ty::U64, Ty::U32, s);
        let units = k.bin(BinOp::Mul, Ty::U64, s64, Self::u(stride >> 4));
        (bytes, units)
    }

    /// Waits for this thread's copies (all but the newest `pending`
    /// groups), hands them to the async proxy, and meets the CTA.
    fn landed(&mut self, pending: u32) {
        self.k.push(Instr::CpAsyncWait(pending));
        self.k.push(Instr::FenceProxyAsync);
        self.k.push(Instr::BarSync(0));
    }

    /// Writes `O / sum` of this thread's rows (rows that saw no key are 0),
    /// and returns with `ret`.
    #[allow(clippy::too_many_arguments)]
    fn epilogue(
        &mut self,
        c: &Core,
        tq: Reg,
        row0: Reg,
        seq_q: Reg,
        o_base: Reg,
        o_stride: Reg,
        ret: bool,
    ) {
        let n_tiles_o = self.cfg.d / 8;
        // ---- epilogue: O / sum, rows that saw no key are 0 ----
        let packed = self.cfg.packed();
        if let Some(st) = self.staging {
            self.staged_epilogue(c, tq, row0, seq_q, o_base, o_stride, st);
            if ret {
                self.k.push(Instr::Ret);
            }
            return;
        }
        let k = &mut self.k;
        let tq4 = k.bin(BinOp::Shl, Ty::U32, tq, Operand::U(2));
        let tq4 = k.cvt(None, Ty::U64, Ty::U32, tq4);
        for (r, &l) in c.l_run.iter().enumerate() {
            let sum = self.quad_reduce(l, BinOp::Add);
            let k = &mut self.k;
            let empty = k.setp(Cmp::Eq, Ty::F32, sum, Operand::F32(0.0));
            let inv = k.un(UnOp::Rcp, Ty::F32, sum);
            k.selp_to(Ty::F32, inv, Operand::F32(0.0), inv, empty);
            let row = k.bin(BinOp::Add, Ty::U32, row0, Self::u(8 * r));
            let inside = k.setp(Cmp::Lt, Ty::U32, row, seq_q);
            let r64 = k.cvt(None, Ty::U64, Ty::U32, row);
            let addr = k.mad(Ty::U64, r64, o_stride, o_base);
            let addr = k.bin(BinOp::Add, Ty::U64, addr, tq4);
            let pairs =
                (0..n_tiles_o).map(|t| (c.o_acc[4 * t + 2 * r], c.o_acc[4 * t + 2 * r + 1]));
            store_scaled_pairs(k, pairs, inv, addr, inside, packed);
        }
        if ret {
            self.k.push(Instr::Ret);
        }
    }

    /// The staged epilogue: `O / sum` rounded into the warpgroup's rows of
    /// Q's tile (128-byte swizzled, as Q was), then row-contiguous 16-byte
    /// stores of rows inside the sequence.
    #[allow(clippy::too_many_arguments)]
    fn staged_epilogue(
        &mut self,
        c: &Core,
        tq: Reg,
        row0: Reg,
        seq_q: Reg,
        o_base: Reg,
        o_stride: Reg,
        st: Staging,
    ) {
        let cfg = self.cfg;
        let (d, bm) = (cfg.d, cfg.block_m());
        let packed = cfg.packed();
        let k = &mut self.k;
        // This thread's rows in the warpgroup: lr and lr + 8 (lr % 8 = g).
        let lr = k.bin(BinOp::Sub, Ty::U32, row0, st.row_base);
        let sw = k.bin(BinOp::And, Ty::U32, lr, Operand::U(7));
        let tq4 = k.bin(BinOp::Shl, Ty::U32, tq, Operand::U(2));
        for (r, &l) in c.l_run.iter().enumerate() {
            let sum = self.quad_reduce(l, BinOp::Add);
            let k = &mut self.k;
            let empty = k.setp(Cmp::Eq, Ty::F32, sum, Operand::F32(0.0));
            let inv = k.un(UnOp::Rcp, Ty::F32, sum);
            k.selp_to(Ty::F32, inv, Operand::F32(0.0), inv, empty);
            let row = k.bin(BinOp::Add, Ty::U32, lr, Self::u(8 * r));
            let row_at = k.mad(Ty::U32, row, Operand::U(128), st.smem);
            let row_at = k.bin(BinOp::Add, Ty::U32, row_at, tq4);
            // Chunk cc of the row sits at chunk cc ^ (row % 8).
            let chunk_at: Vec<Reg> = (0..8)
                .map(|cc| {
                    let x = k.bin(BinOp::Xor, Ty::U32, sw, Self::u(cc));
                    let x = k.bin(BinOp::Shl, Ty::U32, x, Operand::U(4));
                    k.bin(BinOp::Add, Ty::U32, row_at, x)
                })
                .collect();
            for t in 0..d / 8 {
                let x0 = k.bin(BinOp::Mul, Ty::F32, c.o_acc[4 * t + 2 * r], inv);
                let x1 = k.bin(BinOp::Mul, Ty::F32, c.o_acc[4 * t + 2 * r + 1], inv);
                let pk = k.reg(Ty::B32);
                k.push(Instr::CvtPack {
                    ty: packed,
                    dst: pk,
                    hi: x1,
                    lo: x0,
                });
                k.push(Instr::St {
                    space: StateSpace::Shared,
                    ty: Ty::B32,
                    addr: Addr::at(chunk_at[t % 8], ((t / 8) * bm * 128) as i64),
                    src: vec![pk],
                });
            }
        }
        let k = &mut self.k;
        k.push(Instr::NamedBarrier {
            arrive: false,
            id: st.bar.into(),
            threads: 128,
        });
        let chunks = d / 8;
        for j in 0..64 * chunks / 128 {
            let idx = k.bin(BinOp::Add, Ty::U32, st.ltid, Self::u(128 * j));
            let row = k.bin(BinOp::Div, Ty::U32, idx, Self::u(chunks));
            let ch = k.bin(BinOp::Rem, Ty::U32, idx, Self::u(chunks));
            let panel = k.bin(BinOp::Shr, Ty::U32, ch, Operand::U(3));
            let cc = k.bin(BinOp::And, Ty::U32, ch, Operand::U(7));
            let r8 = k.bin(BinOp::And, Ty::U32, row, Operand::U(7));
            let x = k.bin(BinOp::Xor, Ty::U32, cc, r8);
            let x = k.bin(BinOp::Shl, Ty::U32, x, Operand::U(4));
            let at = k.mad(Ty::U32, panel, Self::u(bm * 128), st.smem);
            let at = k.mad(Ty::U32, row, Operand::U(128), at);
            let at = k.bin(BinOp::Add, Ty::U32, at, x);
            let v = k.regs(Ty::B32, 4);
            k.push(Instr::Ld {
                space: StateSpace::Shared,
                ty: Ty::B32,
                dst: v.clone(),
                addr: at.into(),
            });
            let grow = k.bin(BinOp::Add, Ty::U32, st.row_base, row);
            let inside = k.setp(Cmp::Lt, Ty::U32, grow, seq_q);
            let g64 = k.cvt(None, Ty::U64, Ty::U32, grow);
            let addr = k.mad(Ty::U64, g64, o_stride, o_base);
            let ch16 = k.bin(BinOp::Shl, Ty::U32, ch, Operand::U(4));
            let ch16 = k.cvt(None, Ty::U64, Ty::U32, ch16);
            let addr = k.bin(BinOp::Add, Ty::U64, addr, ch16);
            k.guard(
                inside,
                false,
                Instr::St {
                    space: StateSpace::Global,
                    ty: Ty::B32,
                    addr: addr.into(),
                    src: v,
                },
            );
        }
    }

    /// Waits until the mbarrier at `addr` has completed the phase of
    /// parity `parity`.
    fn mbar_wait(&mut self, addr: Reg, parity: Reg) {
        let k = &mut self.k;
        let top = k.label("mbar_wait");
        k.push(Instr::Label(top.clone()));
        let done = k.reg(Ty::Pred);
        k.push(Instr::MbarTryWait {
            done,
            addr: addr.into(),
            parity: parity.into(),
        });
        k.branch_if(done, true, &top);
    }

    /// The stage of block `blk` (a register): the address of its mbarrier
    /// `bar` and the parity of the phase block `blk` completes.
    fn stage_barrier(&mut self, sbar: Reg, blk: Reg, bar: Bar) -> (Reg, Reg) {
        let stages = self.cfg.stages();
        let row = match bar {
            Bar::Full => 0,
            Bar::VFull => 1,
            Bar::Empty if self.cfg.tma => 2,
            Bar::Empty => 1,
        };
        let k = &mut self.k;
        let s = k.bin(BinOp::Rem, Ty::U32, blk, Self::u(stages));
        let base = if row > 0 {
            k.bin(BinOp::Add, Ty::U32, sbar, Self::u(8 * stages * row))
        } else {
            sbar
        };
        let addr = k.mad(Ty::U32, s, Operand::U(8), base);
        let round = k.bin(BinOp::Div, Ty::U32, blk, Self::u(stages));
        let parity = k.bin(BinOp::And, Ty::U32, round, Operand::U(1));
        (addr, parity)
    }

    /// Ping-pong (round robin over the consumers): waits for the previous
    /// consumer warpgroup to have issued its products (`sync`), or lets
    /// the next one issue (`arrive`). Consumer `c` waits on barrier
    /// `1 + c` and arrives on `1 + (c + 1) % wgs`.
    fn ping_pong(&mut self, cwg: Reg, arrive: bool) {
        if !self.cfg.ping_pong {
            return;
        }
        let wgs = self.cfg.wgs;
        let k = &mut self.k;
        let id = if arrive {
            let next = k.bin(BinOp::Add, Ty::U32, cwg, Operand::U(1));
            let next = k.bin(BinOp::Rem, Ty::U32, next, Self::u(wgs));
            k.bin(BinOp::Add, Ty::U32, next, Operand::U(1))
        } else {
            k.bin(BinOp::Add, Ty::U32, cwg, Operand::U(1))
        };
        k.push(Instr::NamedBarrier {
            arrive,
            id: id.into(),
            threads: 256,
        });
    }

    /// Block `n` of the tile counted over the CTA's whole run (persistent),
    /// for its stage and barrier phase.
    fn gblk(&mut self, n: Reg) -> Reg {
        match self.g0 {
            Some(g0) => self.k.bin(BinOp::Add, Ty::U32, n, g0),
            None => n,
        }
    }

    /// The consumer warpgroups' side of the warp-specialised kernel: Q,
    /// then per block wait for its stage, products in turns with the other
    /// consumer, softmax under the P·V, release of the stage.
    #[allow(clippy::too_many_arguments)]
    fn ws_consumer(
        &mut self,
        c: &Core,
        rpp: usize,
        q: (Reg, Reg, Reg, usize, Reg),
        sbar: Reg,
        cwg: Reg,
        n_blocks: Reg,
        k_desc0: Reg,
        v_desc0: Reg,
    ) {
        let cfg = self.cfg;
        let bn = cfg.block_n;
        let (q_src, q_pass, q_grow, q_rows, q_dst) = q;
        if !cfg.tma {
            self.load_tile(q_rows, rpp, q_src, q_pass, q_grow, c.seq_q, q_dst, None);
            let k = &mut self.k;
            k.push(Instr::CpAsyncCommit);
            k.push(Instr::CpAsyncWait(0));
            k.push(Instr::FenceProxyAsync);
            // (Barriers 1..=wgs are the ping-pong's.)
            k.push(Instr::BarSyncCount {
                id: 15,
                threads: (128 * cfg.wgs) as u32,
            });
        }
        let k = &mut self.k;
        let n = k.mov(Ty::U32, Operand::U(0));
        let j0 = k.mov(Ty::U32, Operand::U(0));
        let done = k.label("consumed");
        let none = k.setp(Cmp::Eq, Ty::U32, n_blocks, Operand::U(0));
        k.branch_if(none, false, &done);
        if cfg.tma {
            // Q's box lands on the barrier after the stages'.
            let q_bar = k.bin(BinOp::Add, Ty::U32, sbar, Self::u(24 * cfg.stages()));
            let parity = match self.q_phase {
                Some(ph) => k.bin(BinOp::And, Ty::U32, ph, Operand::U(1)),
                None => n,
            };
            self.mbar_wait(q_bar, parity);
        }
        let k = &mut self.k;
        // Consumer 0 goes first: the last consumer lets it.
        let is_last = k.setp(Cmp::Eq, Ty::U32, cwg, Self::u(cfg.wgs - 1));
        if cfg.ping_pong {
            k.guard(
                is_last,
                false,
                Instr::NamedBarrier {
                    arrive: true,
                    id: Operand::U(1),
                    threads: 256,
                },
            );
        }

        // Block 0: scores and softmax.
        let g = self.gblk(n);
        let (full, parity) = self.stage_barrier(sbar, g, Bar::Full);
        self.mbar_wait(full, parity);
        self.ping_pong(cwg, false);
        let k_first = match self.g0 {
            Some(_) => {
                let (_, at) = self.stage_of(g, 0);
                self.k.bin(BinOp::Add, Ty::U64, k_desc0, at)
            }
            None => k_desc0,
        };
        self.k.push(Instr::WgmmaFence);
        self.s_gemm(c, k_first);
        self.k.push(Instr::WgmmaCommit);
        self.ping_pong(cwg, true);
        self.k.push(Instr::WgmmaWait(0));
        let alpha = self.softmax(c, j0);
        self.rescale_and_pack(c, alpha);
        let tail = self.k.label("last_block");
        let single = self.k.setp(Cmp::Le, Ty::U32, n_blocks, Operand::U(1));
        self.k.branch_if(single, false, &tail);

        // Block n + 1's scores with block n's P·V.
        let loop_top = self.k.label("key_block");
        self.k.push(Instr::Label(loop_top.clone()));
        let n1 = self.k.bin(BinOp::Add, Ty::U32, n, Operand::U(1));
        let g1 = self.gblk(n1);
        let (full, parity) = self.stage_barrier(sbar, g1, Bar::Full);
        self.mbar_wait(full, parity);
        let g = self.gblk(n);
        if cfg.tma {
            let (full, parity) = self.stage_barrier(sbar, g, Bar::VFull);
            self.mbar_wait(full, parity);
        }
        self.ping_pong(cwg, false);
        let (_, cur) = self.stage_of(g, 0);
        let (_, next) = self.stage_of(g, 1);
        let k = &mut self.k;
        k.bin_to(BinOp::Add, Ty::U32, j0, j0, Self::u(bn));
        let k_desc = k.bin(BinOp::Add, Ty::U64, k_desc0, next);
        let v_desc = k.bin(BinOp::Add, Ty::U64, v_desc0, cur);
        k.push(Instr::WgmmaFence);
        self.s_gemm(c, k_desc);
        self.k.push(Instr::WgmmaCommit);
        self.pv_gemm(c, v_desc);
        self.k.push(Instr::WgmmaCommit);
        self.ping_pong(cwg, true);
        self.k.push(Instr::WgmmaWait(1));
        let alpha = self.softmax(c, j0);
        let k = &mut self.k;
        k.bin_to(BinOp::Add, Ty::U32, n, n, Operand::U(1));
        let n1 = k.bin(BinOp::Add, Ty::U32, n, Operand::U(1));
        let again = k.setp(Cmp::Lt, Ty::U32, n1, n_blocks);
        let leave = k.label("last_pack");
        k.branch_if(again, true, &leave);
        // (A basic block of its own: see the non-specialised loop.)
        for last in [false, true] {
            if last {
                self.k.push(Instr::Label(leave.clone()));
            }
            self.k.push(Instr::WgmmaWait(0));
            let prev = self.k.bin(BinOp::Sub, Ty::U32, n, Operand::U(1));
            let prev = self.gblk(prev);
            let (empty, _) = self.stage_barrier(sbar, prev, Bar::Empty);
            let state = self.k.reg(Ty::B64);
            self.k.push(Instr::MbarArrive {
                state,
                addr: empty.into(),
                expect_tx: None,
            });
            self.rescale_and_pack(c, alpha);
            if !last {
                self.k.push(Instr::Bra {
                    target: loop_top.clone(),
                    uni: true,
                });
            }
        }

        // The last block's P·V.
        self.k.push(Instr::Label(tail));
        let g = self.gblk(n);
        if self.g0.is_some() {
            // Every Q·Kᵀ of the tile is done: Q's buffer may take the
            // next tile's.
            let k = &mut self.k;
            let q_empty = k.bin(
                BinOp::Add,
                Ty::U32,
                sbar,
                Self::u(8 * (3 * cfg.stages() + 1)),
            );
            let state = k.reg(Ty::B64);
            k.push(Instr::MbarArrive {
                state,
                addr: q_empty.into(),
                expect_tx: None,
            });
        }
        if cfg.tma {
            let (full, parity) = self.stage_barrier(sbar, g, Bar::VFull);
            self.mbar_wait(full, parity);
        }
        self.ping_pong(cwg, false);
        let (_, cur) = self.stage_of(g, 0);
        let v_desc = self.k.bin(BinOp::Add, Ty::U64, v_desc0, cur);
        self.k.push(Instr::WgmmaFence);
        self.pv_gemm(c, v_desc);
        self.k.push(Instr::WgmmaCommit);
        // The last consumer has no one left to let go.
        if cfg.ping_pong {
            let k = &mut self.k;
            let next = k.bin(BinOp::Add, Ty::U32, cwg, Operand::U(2));
            k.guard(
                is_last,
                true,
                Instr::NamedBarrier {
                    arrive: true,
                    id: next.into(),
                    threads: 256,
                },
            );
        }
        self.k.push(Instr::WgmmaWait(0));
        if self.g0.is_some() {
            // The last block's stage goes back to the producer, who moves
            // on to the next tile.
            let (empty, _) = self.stage_barrier(sbar, g, Bar::Empty);
            let state = self.k.reg(Ty::B64);
            self.k.push(Instr::MbarArrive {
                state,
                addr: empty.into(),
                expect_tx: None,
            });
        }
        self.k.push(Instr::Label(done));
    }

    /// The producer warpgroup's side: per block, wait until its stage is
    /// free, copy K and V into it, and once the previous block's copies
    /// have landed, hand that block's stage over.
    fn ws_producer(&mut self, ld: &Loads, sbar: Reg, n_blocks: Reg, label: &str) {
        let stages = self.cfg.stages();
        let stride = 2 * self.cfg.kv_tile();
        let k = &mut self.k;
        k.push(Instr::Label(label.to_string()));
        k.push(Instr::SetMaxNReg {
            inc: false,
            regs: PRODUCER_REGS,
        });
        let none = k.setp(Cmp::Eq, Ty::U32, n_blocks, Operand::U(0));
        k.guard(none, false, Instr::Ret);
        let b = k.mov(Ty::U32, Operand::U(0));
        let top = k.label("produce");
        k.push(Instr::Label(top.clone()));
        let s = k.bin(BinOp::Rem, Ty::U32, b, Self::u(stages));
        let off = k.bin(BinOp::Mul, Ty::U32, s, Self::u(stride));
        // Block b reuses the stage of block b - stages.
        let reuse = k.setp(Cmp::Ge, Ty::U32, b, Self::u(stages));
        let free = k.label("stage_free");
        k.branch_if(reuse, true, &free);
        let old = k.bin(BinOp::Sub, Ty::U32, b, Self::u(stages));
        let (empty, parity) = self.stage_barrier(sbar, old, Bar::Empty);
        self.mbar_wait(empty, parity);
        self.k.push(Instr::Label(free));
        self.load_block(ld, off, None);
        let k = &mut self.k;
        let later = k.setp(Cmp::Ne, Ty::U32, b, Operand::U(0));
        let skip = k.label("first_block");
        k.branch_if(later, true, &skip);
        k.push(Instr::CpAsyncWait(1));
        k.push(Instr::FenceProxyAsync);
        let prev = k.bin(BinOp::Sub, Ty::U32, b, Operand::U(1));
        let (full, _) = self.stage_barrier(sbar, prev, Bar::Full);
        let state = self.k.reg(Ty::B64);
        self.k.push(Instr::MbarArrive {
            state,
            addr: full.into(),
            expect_tx: None,
        });
        let k = &mut self.k;
        k.push(Instr::Label(skip));
        k.bin_to(BinOp::Add, Ty::U32, b, b, Operand::U(1));
        let again = k.setp(Cmp::Lt, Ty::U32, b, n_blocks);
        k.branch_if(again, false, &top);
        k.push(Instr::CpAsyncWait(0));
        k.push(Instr::FenceProxyAsync);
        let prev = k.bin(BinOp::Sub, Ty::U32, b, Operand::U(1));
        let (full, _) = self.stage_barrier(sbar, prev, Bar::Full);
        let state = self.k.reg(Ty::B64);
        self.k.push(Instr::MbarArrive {
            state,
            addr: full.into(),
            expect_tx: None,
        });
        self.k.push(Instr::Ret);
    }

    /// Persistent: moves the tile registers of `t` to tile `idx`, the
    /// order of the non-persistent grid (query block fastest, then head,
    /// then batch; causal query blocks last first).
    fn locate(&mut self, t: &Tiles, idx: Reg) {
        let cfg = self.cfg;
        let (bm, bn) = (cfg.block_m(), cfg.block_n);
        let k = &mut self.k;
        let x = k.bin(BinOp::Rem, Ty::U32, idx, t.nq);
        let rest = k.bin(BinOp::Div, Ty::U32, idx, t.nq);
        let head = k.bin(BinOp::Rem, Ty::U32, rest, t.heads);
        k.mov_to(Ty::U32, t.head, head);
        let batch = k.bin(BinOp::Div, Ty::U32, rest, t.heads);
        k.mov_to(Ty::U32, t.batch, batch);
        let qblock = if cfg.causal {
            let last = k.bin(BinOp::Sub, Ty::U32, t.nq, Operand::U(1));
            k.bin(BinOp::Sub, Ty::U32, last, x)
        } else {
            x
        };
        let q0 = k.bin(BinOp::Mul, Ty::U32, qblock, Self::u(bm));
        k.mov_to(Ty::U32, t.q0, q0);
        let kv_head = k.bin(BinOp::Div, Ty::U32, head, t.group);
        k.mov_to(Ty::U32, t.kv_head, kv_head);
        let key_end = if cfg.causal {
            let last = k.bin(BinOp::Add, Ty::U32, q0, Self::u(bm));
            k.bin(BinOp::Min, Ty::U32, last, t.seq_k)
        } else {
            t.seq_k
        };
        let n = k.bin(BinOp::Add, Ty::U32, key_end, Self::u(bn - 1));
        let n = k.bin(BinOp::Div, Ty::U32, n, Self::u(bn));
        k.mov_to(Ty::U32, t.n_blocks, n);
    }

    /// Persistent: the next tile of this CTA, and the loop back to `top`
    /// (which leaves once the tiles run out).
    fn next_tile(&mut self, idx: Reg, top: &str) {
        let k = &mut self.k;
        let step = k.mov(Ty::U32, Operand::Special(Special::NCtaIdX));
        k.bin_to(BinOp::Add, Ty::U32, idx, idx, step);
        k.push(Instr::Bra {
            target: top.to_string(),
            uni: false,
        });
    }

    /// The TMA producer: warpgroup 0 gives its registers away and one
    /// thread of it issues every copy. Per tile, once Q's buffer is free,
    /// Q's box; then per block, once its stage is free, K's and V's
    /// panels, each tile completing its bytes on its own full barrier.
    #[allow(clippy::too_many_arguments)]
    fn tma_producer(
        &mut self,
        maps: &[Param],
        sbar: Reg,
        sq: Reg,
        sk0: Reg,
        tid: Reg,
        t: &Tiles,
        label: &str,
    ) {
        let cfg = self.cfg;
        let (stages, bn, bm) = (cfg.stages(), cfg.block_n, cfg.block_m());
        let panels = cfg.d_pad() / 64;
        let tile = cfg.kv_tile();
        let (q0, head, kv_head, batch, n_blocks) = (t.q0, t.head, t.kv_head, t.batch, t.n_blocks);
        let k = &mut self.k;
        k.push(Instr::Label(label.to_string()));
        k.push(Instr::SetMaxNReg {
            inc: false,
            regs: PRODUCER_REGS,
        });
        let leader = k.setp(Cmp::Eq, Ty::U32, tid, Operand::U(0));
        k.guard(leader, true, Instr::Ret);
        let map: Vec<Reg> = maps
            .iter()
            .map(|p| {
                let r = k.reg(Ty::B64);
                k.push(Instr::CvtaParam {
                    dst: r,
                    param: p.clone(),
                });
                r
            })
            .collect();
        // Persistent: this CTA's tile, tiles with keys so far, blocks so far.
        let (idx, done, g) = (
            k.mov(Ty::U32, Operand::Special(Special::CtaIdX)),
            k.mov(Ty::U32, Operand::U(0)),
            k.mov(Ty::U32, Operand::U(0)),
        );
        let tile_top = k.label("produce_tile");
        let next = k.label("next_tile");
        k.push(Instr::Label(tile_top.clone()));
        if cfg.persistent {
            let over = k.setp(Cmp::Ge, Ty::U32, idx, t.total);
            k.guard(over, false, Instr::Ret);
            self.locate(t, idx);
        }
        let k = &mut self.k;
        let none = k.setp(Cmp::Eq, Ty::U32, n_blocks, Operand::U(0));
        if cfg.persistent {
            k.branch_if(none, false, &next);
            // Q's buffer is free once the consumers are past the previous
            // tile's last Q·Kᵀ.
            let first = k.setp(Cmp::Eq, Ty::U32, done, Operand::U(0));
            let q_free = k.label("q_free");
            k.branch_if(first, false, &q_free);
            let q_empty = k.bin(BinOp::Add, Ty::U32, sbar, Self::u(8 * (3 * stages + 1)));
            let prev = k.bin(BinOp::Sub, Ty::U32, done, Operand::U(1));
            let parity = k.bin(BinOp::And, Ty::U32, prev, Operand::U(1));
            self.mbar_wait(q_empty, parity);
            self.k.push(Instr::Label(q_free));
        } else {
            k.guard(none, false, Instr::Ret);
        }
        // Q: one box of `bm` rows per panel.
        let k = &mut self.k;
        let q_bar = k.bin(BinOp::Add, Ty::U32, sbar, Self::u(24 * stages));
        let state = k.reg(Ty::B64);
        k.push(Instr::MbarArrive {
            state,
            addr: q_bar.into(),
            expect_tx: Some((bm * cfg.d_pad() * 2) as u32),
        });
        for p in 0..panels {
            let dst = k.bin(BinOp::Add, Ty::U32, sq, Self::u(p * bm * 128));
            k.push(Instr::TmaLoad {
                dst,
                map: map[0],
                coords: vec![Self::u(64 * p), q0.into(), head.into(), batch.into()],
                mbar: q_bar,
            });
        }
        let b = k.mov(Ty::U32, Operand::U(0));
        let key = k.mov(Ty::U32, Operand::U(0));
        let top = k.label("produce");
        k.push(Instr::Label(top.clone()));
        // Blocks count over the CTA's run for their stage and phase.
        let gb = k.bin(BinOp::Add, Ty::U32, b, g);
        let s = k.bin(BinOp::Rem, Ty::U32, gb, Self::u(stages));
        let off = k.bin(BinOp::Mul, Ty::U32, s, Self::u(2 * tile));
        let k_dst = k.bin(BinOp::Add, Ty::U32, sk0, off);
        // Block gb reuses the stage of block gb - stages.
        let reuse = k.setp(Cmp::Ge, Ty::U32, gb, Self::u(stages));
        let free = k.label("stage_free");
        k.branch_if(reuse, true, &free);
        let old = k.bin(BinOp::Sub, Ty::U32, gb, Self::u(stages));
        let (empty, parity) = self.stage_barrier(sbar, old, Bar::Empty);
        self.mbar_wait(empty, parity);
        self.k.push(Instr::Label(free));
        for (which, bar, m) in [(0, Bar::Full, map[1]), (1, Bar::VFull, map[2])] {
            let (full, _) = self.stage_barrier(sbar, gb, bar);
            let k = &mut self.k;
            let state = k.reg(Ty::B64);
            k.push(Instr::MbarArrive {
                state,
                addr: full.into(),
                expect_tx: Some(tile as u32),
            });
            for p in 0..panels {
                let dst = k.bin(
                    BinOp::Add,
                    Ty::U32,
                    k_dst,
                    Self::u(which * tile + p * bn * 128),
                );
                k.push(Instr::TmaLoad {
                    dst,
                    map: m,
                    coords: vec![Self::u(64 * p), key.into(), kv_head.into(), batch.into()],
                    mbar: full,
                });
            }
        }
        let k = &mut self.k;
        k.bin_to(BinOp::Add, Ty::U32, b, b, Operand::U(1));
        k.bin_to(BinOp::Add, Ty::U32, key, key, Self::u(bn));
        let again = k.setp(Cmp::Lt, Ty::U32, b, n_blocks);
        k.branch_if(again, false, &top);
        if cfg.persistent {
            k.bin_to(BinOp::Add, Ty::U32, g, g, n_blocks);
            k.bin_to(BinOp::Add, Ty::U32, done, done, Operand::U(1));
            k.push(Instr::Label(next));
            self.next_tile(idx, &tile_top);
        } else {
            k.push(Instr::Ret);
        }
    }

    fn emit(mut self) -> Kernel {
        let cfg = self.cfg;
        let (d, bn) = (cfg.d, cfg.block_n);
        let dp = cfg.d_pad();
        let bm = cfg.block_m();
        let threads = cfg.threads();
        assert!(d.is_multiple_of(16) && bn.is_multiple_of(16) && bn <= 256);
        assert!(!cfg.split_kv || (cfg.overlap && !cfg.producer));
        let ws = cfg.producer;
        let stages = cfg.stages();
        // Loading threads: the producer warpgroup, or everyone.
        let loaders = if ws { 128 } else { threads };
        let cpr = dp / 8; // 16-byte chunks per (padded) row
        let rpp = loaders / cpr; // rows per loading pass
                                 // Every pass starts on a swizzle atom: a thread's row keeps its
                                 // swizzle phase.
        assert!(cfg.tma || (loaders.is_multiple_of(cpr) && rpp.is_multiple_of(8)));
        assert!(!cfg.tma || ws, "TMA loads come from the producer warpgroup");
        let rpp = rpp.max(1);
        let tile = cfg.kv_tile();

        let params = declare_params(&mut self.k);
        let maps: Vec<Param> = if cfg.tma {
            TENSOR_MAP_PARAMS
                .iter()
                .map(|name| self.k.param_bytes(name, 64, 128))
                .collect()
        } else {
            Vec::new()
        };
        let tiling: Vec<Param> = if cfg.persistent {
            assert!(
                cfg.tma && !cfg.ping_pong,
                "persistent kernels load with TMA, no ping-pong"
            );
            PERSISTENT_PARAMS
                .iter()
                .map(|&(name, _)| self.k.param(Ty::U32, name))
                .collect()
        } else {
            Vec::new()
        };
        self.k.launch_bounds(threads as u32, Some(1));
        self.k.dynamic_shared(1024);
        self.k.comment(format!(
            "wgmma attention: d={d} causal={} {}, {} consumer warpgroups, block {bm}x{bn}, \
             {} stages, overlap {}, producer warpgroup {}",
            cfg.causal,
            cfg.ab.name(),
            cfg.wgs,
            cfg.stages(),
            cfg.overlap,
            cfg.producer,
        ));

        // ---- parameters ----
        let k = &mut self.k;
        let a = load_args(k, &params);
        let (q_ptr, k_ptr, v_ptr, o_ptr, m_ptr) = (a.q, a.k, a.v, a.out, a.mask);
        let (qs, ks, vs, os) = (a.q_strides, a.k_strides, a.v_strides, a.out_strides);
        let [msb, msh, msq] = a.mask_strides;
        let (seq_q, seq_k, group, scale_log2) = (a.seq_q, a.seq_k, a.group, a.scale_log2);
        let tiling: Vec<Reg> = tiling.iter().map(|p| k.ld_param(Ty::U32, p)).collect();

        // ---- thread and block coordinates ----
        let (tid, qblock, head, batch) = cta_coords(k, cfg.causal);
        let lane = k.bin(BinOp::And, Ty::U32, tid, Operand::U(31));
        let warp = k.bin(BinOp::Shr, Ty::U32, tid, Operand::U(5));
        let wg = k.bin(BinOp::Shr, Ty::U32, tid, Operand::U(7));
        let g = k.bin(BinOp::Shr, Ty::U32, lane, Operand::U(2));
        let tq = k.bin(BinOp::And, Ty::U32, lane, Operand::U(3));
        let q0 = k.bin(BinOp::Mul, Ty::U32, qblock, Self::u(bm));
        let kv_head = k.bin(BinOp::Div, Ty::U32, head, group);

        let elem = 2u64;
        let tensor_base = |k: &mut Kernel, ptr: Reg, st: [Reg; 3], h: Reg| {
            let b64 = k.cvt(None, Ty::U64, Ty::U32, batch);
            let h64 = k.cvt(None, Ty::U64, Ty::U32, h);
            let off = k.bin(BinOp::Mul, Ty::U64, b64, st[0]);
            let off = k.mad(Ty::U64, h64, st[2], off);
            let base = k.mad(Ty::U64, off, Operand::U(elem), ptr);
            let stride = k.bin(BinOp::Mul, Ty::U64, st[1], Operand::U(elem));
            (base, stride)
        };
        let (q_base, q_stride) = tensor_base(k, q_ptr, qs, head);
        let (k_base, k_stride) = tensor_base(k, k_ptr, ks, kv_head);
        let (v_base, v_stride) = tensor_base(k, v_ptr, vs, kv_head);
        let (o_base, o_stride) = tensor_base(k, o_ptr, os, head);

        // Shared tiles, from a 1024-byte aligned base: Q, then the stages
        // of (K, V).
        let raw = k.mov(Ty::U32, Operand::Symbol("smem".into()));
        let sbase = k.bin(BinOp::Add, Ty::U32, raw, Operand::U(1023));
        let sq = k.bin(BinOp::And, Ty::U32, sbase, Operand::U(!1023u32 as u64));
        let sk0 = k.bin(BinOp::Add, Ty::U32, sq, Self::u(bm * dp * 2));

        // The consumer warpgroup of this thread (the producer is warpgroup
        // 0 when there is one), and its first query row.
        let cwg = if ws {
            k.bin(BinOp::Sub, Ty::U32, wg, Operand::U(1))
        } else {
            wg
        };
        let ltid = if ws {
            k.bin(BinOp::And, Ty::U32, tid, Operand::U(127))
        } else {
            tid
        };
        // ---- loader: thread t copies chunk t % cpr of row t / cpr ----
        let lrow = k.bin(BinOp::Div, Ty::U32, ltid, Self::u(cpr));
        self.lrow = Some(lrow);
        let k = &mut self.k;
        let chunk = k.bin(BinOp::Rem, Ty::U32, ltid, Self::u(cpr));
        if d < dp {
            self.chunk_ok = Some(k.setp(Cmp::Lt, Ty::U32, chunk, Self::u(d / 8)));
        }
        let k = &mut self.k;
        let panel = k.bin(BinOp::Shr, Ty::U32, chunk, Operand::U(3));
        let cc = k.bin(BinOp::And, Ty::U32, chunk, Operand::U(7));
        let r8 = k.bin(BinOp::And, Ty::U32, lrow, Operand::U(7));
        let swz = k.bin(BinOp::Xor, Ty::U32, cc, r8);
        let swz = k.bin(BinOp::Shl, Ty::U32, swz, Operand::U(4));
        let in_panel = k.mad(Ty::U32, lrow, Operand::U(128), swz);
        let q_dst = k.mad(Ty::U32, panel, Self::u(bm * 128), in_panel);
        let q_dst = k.bin(BinOp::Add, Ty::U32, q_dst, sq);
        // Warp-specialised, each consumer warpgroup loads its own 64 rows.
        let (q_dst, q_row0, q_rows) = if ws {
            let off = k.mad(Ty::U32, cwg, Self::u(64 * 128), q_dst);
            (off, k.mad(Ty::U32, cwg, Operand::U(64), q0), 64)
        } else {
            (q_dst, q0, bm)
        };
        let kv_off = k.mad(Ty::U32, panel, Self::u(bn * 128), in_panel);
        let k_dst0 = k.bin(BinOp::Add, Ty::U32, kv_off, sk0);
        let chunk_bytes = k.bin(BinOp::Shl, Ty::U32, chunk, Operand::U(4));
        let chunk64 = k.cvt(None, Ty::U64, Ty::U32, chunk_bytes);
        let lrow64 = k.cvt(None, Ty::U64, Ty::U32, lrow);
        let src_of = |k: &mut Kernel, base: Reg, stride: Reg| {
            let s = k.mad(Ty::U64, lrow64, stride, base);
            k.bin(BinOp::Add, Ty::U64, s, chunk64)
        };
        let q0_64 = k.cvt(None, Ty::U64, Ty::U32, q_row0);
        let q_first = k.mad(Ty::U64, q0_64, q_stride, q_base);
        let q_src = src_of(k, q_first, q_stride);
        let q_pass = k.bin(BinOp::Mul, Ty::U64, q_stride, Self::u(rpp));
        let q_grow = k.bin(BinOp::Add, Ty::U32, q_row0, lrow);
        let ld = Loads {
            k_src: src_of(k, k_base, k_stride),
            v_src: src_of(k, v_base, v_stride),
            k_pass: k.bin(BinOp::Mul, Ty::U64, k_stride, Self::u(rpp)),
            v_pass: k.bin(BinOp::Mul, Ty::U64, v_stride, Self::u(rpp)),
            k_block: k.bin(BinOp::Mul, Ty::U64, k_stride, Self::u(bn)),
            v_block: k.bin(BinOp::Mul, Ty::U64, v_stride, Self::u(bn)),
            grow: k.mov(Ty::U32, lrow),
            v_grow: lrow,
            seq_k,
            k_dst0,
            rpp,
        };
        let ld = if cfg.split_kv {
            Loads {
                v_grow: k.mov(Ty::U32, lrow),
                ..ld
            }
        } else {
            Loads {
                v_grow: ld.grow,
                ..ld
            }
        };

        // ---- descriptors ----
        let k_bits = desc_bits(16, 1024);
        let v_bits = desc_bits(bn * 128, 1024);
        let wg_q = k.mad(Ty::U32, cwg, Self::u(64 * 128), sq);
        let q_desc = self.desc(wg_q, k_bits);
        let k_desc0 = self.desc(sk0, k_bits);
        let k = &mut self.k;
        // V follows K in each stage, or the two K slots when split.
        let v_first = if cfg.split_kv { 2 * tile } else { tile };
        let sv0 = k.bin(BinOp::Add, Ty::U32, sk0, Self::u(v_first));
        let v_desc0 = self.desc(sv0, v_bits);
        let k = &mut self.k;

        // This thread's score rows: row0 and row0 + 8.
        let warp_in_wg = k.bin(BinOp::And, Ty::U32, warp, Operand::U(3));
        let row0 = k.mad(Ty::U32, cwg, Operand::U(64), q0);
        let row0 = k.mad(Ty::U32, warp_in_wg, Operand::U(16), row0);
        let row0 = k.bin(BinOp::Add, Ty::U32, row0, g);

        // Number of key blocks: causal CTAs stop at their last row.
        let key_end = if cfg.causal {
            let last = k.bin(BinOp::Add, Ty::U32, q0, Self::u(bm));
            k.bin(BinOp::Min, Ty::U32, last, seq_k)
        } else {
            seq_k
        };
        let n_blocks = k.bin(BinOp::Add, Ty::U32, key_end, Self::u(bn - 1));
        let n_blocks = k.bin(BinOp::Div, Ty::U32, n_blocks, Self::u(bn));

        let has_mask = k.setp(Cmp::Ne, Ty::U64, m_ptr, Operand::U(0));
        let mask_head = {
            let b64 = k.cvt(None, Ty::U64, Ty::U32, batch);
            let h64 = k.cvt(None, Ty::U64, Ty::U32, head);
            let off = k.bin(BinOp::Mul, Ty::U64, b64, msb);
            k.mad(Ty::U64, h64, msh, off)
        };
        let zero = k.mov(Ty::U32, Operand::U(0));
        let p_true = k.setp(Cmp::Eq, Ty::U32, zero, Operand::U(0));
        let p_false = k.setp(Cmp::Ne, Ty::U32, zero, Operand::U(0));
        let neg_inf = Operand::F32(f32::NEG_INFINITY);
        let c = Core {
            s_acc: k.regs(Ty::F32, bn / 2),
            o_acc: (0..cfg.pv_n() / 2)
                .map(|_| k.mov(Ty::F32, Operand::F32(0.0)))
                .collect(),
            p: (0..bn / 16)
                .map(|_| {
                    let r = k.regs(Ty::B32, 4);
                    [r[0], r[1], r[2], r[3]]
                })
                .collect(),
            m_run: [k.mov(Ty::F32, neg_inf.clone()), k.mov(Ty::F32, neg_inf)],
            l_run: [
                k.mov(Ty::F32, Operand::F32(0.0)),
                k.mov(Ty::F32, Operand::F32(0.0)),
            ],
            q_desc,
            negative_scale: k.setp(Cmp::Lt, Ty::F32, scale_log2, Operand::F32(0.0)),
            p_true,
            p_false,
            scale_log2,
            seq_q,
            seq_k,
            has_mask,
            mask_head,
            m_ptr,
            msq,
            row0,
            tq2: k.bin(BinOp::Shl, Ty::U32, tq, Operand::U(1)),
            q0,
        };

        let producer_label = self.k.label("producer");
        if ws {
            // Stage barriers: full (the producer's 128 threads arrive),
            // empty (the consumers' threads arrive).
            let k = &mut self.k;
            let sbar = k.bin(BinOp::Add, Ty::U32, sk0, Self::u(stages * 2 * tile));
            let first = k.setp(Cmp::Eq, Ty::U32, tid, Operand::U(0));
            if cfg.tma {
                // K-full and V-full (the leader's arrival and the bytes),
                // empty (the consumers' threads), then Q-full and Q-empty.
                for s in 0..3 * stages + 2 {
                    let count = if (2 * stages..3 * stages).contains(&s) || s == 3 * stages + 1 {
                        (128 * cfg.wgs) as u32
                    } else {
                        1
                    };
                    let init = Instr::MbarInit {
                        addr: Addr::at(sbar, (8 * s) as i64),
                        count,
                    };
                    k.guard(first, false, init);
                }
                k.guard(first, false, Instr::FenceMbarrierInit);
            } else {
                for s in 0..stages {
                    let full = Instr::MbarInit {
                        addr: Addr::at(sbar, (8 * s) as i64),
                        count: 128,
                    };
                    let empty = Instr::MbarInit {
                        addr: Addr::at(sbar, (8 * (stages + s)) as i64),
                        count: (128 * cfg.wgs) as u32,
                    };
                    k.guard(first, false, full);
                    k.guard(first, false, empty);
                }
            }
            k.push(Instr::BarSync(0));
            // (Both roles read the tile count: computed before they part.)
            let tiles = if cfg.persistent {
                let (heads, batches) = (tiling[0], tiling[1]);
                let nq = k.bin(BinOp::Add, Ty::U32, seq_q, Self::u(bm - 1));
                let nq = k.bin(BinOp::Div, Ty::U32, nq, Self::u(bm));
                let total = k.bin(BinOp::Mul, Ty::U32, nq, heads);
                let total = k.bin(BinOp::Mul, Ty::U32, total, batches);
                Tiles {
                    total,
                    nq,
                    heads,
                    group,
                    seq_k,
                    head,
                    batch,
                    q0,
                    kv_head,
                    n_blocks,
                }
            } else {
                Tiles {
                    total: n_blocks,
                    nq: n_blocks,
                    heads: n_blocks,
                    group,
                    seq_k,
                    head,
                    batch,
                    q0,
                    kv_head,
                    n_blocks,
                }
            };
            let k = &mut self.k;
            let is_producer = k.setp(Cmp::Eq, Ty::U32, wg, Operand::U(0));
            k.branch_if(is_producer, false, &producer_label);
            k.push(Instr::SetMaxNReg {
                inc: true,
                regs: cfg.consumer_regs(),
            });
            if cfg.persistent {
                // The consumers' tile loop: where the tile lies, fresh
                // accumulators, the key blocks, the output.
                let k = &mut self.k;
                let idx = k.mov(Ty::U32, Operand::Special(Special::CtaIdX));
                let row_in = k.mad(Ty::U32, cwg, Operand::U(64), g);
                let row_in = k.mad(Ty::U32, warp_in_wg, Operand::U(16), row_in);
                let g0 = k.mov(Ty::U32, Operand::U(0));
                let q_phase = k.mov(Ty::U32, Operand::U(0));
                self.g0 = Some(g0);
                self.q_phase = Some(q_phase);
                let top = k.label("consume_tile");
                k.push(Instr::Label(top.clone()));
                let over = k.setp(Cmp::Ge, Ty::U32, idx, tiles.total);
                k.guard(over, false, Instr::Ret);
                self.locate(&tiles, idx);
                let k = &mut self.k;
                k.bin_to(BinOp::Add, Ty::U32, c.row0, q0, row_in);
                let b64 = k.cvt(None, Ty::U64, Ty::U32, batch);
                let h64 = k.cvt(None, Ty::U64, Ty::U32, head);
                let off = k.bin(BinOp::Mul, Ty::U64, b64, msb);
                k.mad_to(Ty::U64, c.mask_head, h64, msh, off);
                let off = k.bin(BinOp::Mul, Ty::U64, b64, os[0]);
                let off = k.mad(Ty::U64, h64, os[2], off);
                k.mad_to(Ty::U64, o_base, off, Operand::U(elem), o_ptr);
                for &o in &c.o_acc {
                    k.mov_to(Ty::F32, o, Operand::F32(0.0));
                }
                for r in 0..2 {
                    k.mov_to(Ty::F32, c.m_run[r], Operand::F32(f32::NEG_INFINITY));
                    k.mov_to(Ty::F32, c.l_run[r], Operand::F32(0.0));
                }
                self.ws_consumer(
                    &c,
                    rpp,
                    (q_src, q_pass, q_grow, q_rows, q_dst),
                    sbar,
                    cwg,
                    n_blocks,
                    k_desc0,
                    v_desc0,
                );
                self.epilogue(&c, tq, row0, seq_q, o_base, o_stride, false);
                let k = &mut self.k;
                k.bin_to(BinOp::Add, Ty::U32, g0, g0, n_blocks);
                let any = k.setp(Cmp::Ne, Ty::U32, n_blocks, Operand::U(0));
                let one = k.selp(Ty::U32, Operand::U(1), Operand::U(0), any);
                k.bin_to(BinOp::Add, Ty::U32, q_phase, q_phase, one);
                self.next_tile(idx, &top);
                self.g0 = None;
                self.q_phase = None;
            } else {
                self.ws_consumer(
                    &c,
                    rpp,
                    (q_src, q_pass, q_grow, q_rows, q_dst),
                    sbar,
                    cwg,
                    n_blocks,
                    k_desc0,
                    v_desc0,
                );
                if cfg.staged_store && cfg.tma {
                    // Each warpgroup has its Q rows to itself: its named
                    // barrier is 8 + its index (the ping-pong's are 1..).
                    let k = &mut self.k;
                    self.staging = Some(Staging {
                        smem: k.mad(Ty::U32, cwg, Operand::U(64 * 128), sq),
                        row_base: k.mad(Ty::U32, cwg, Operand::U(64), q0),
                        ltid: k.bin(BinOp::And, Ty::U32, tid, Operand::U(127)),
                        bar: k.bin(BinOp::Add, Ty::U32, cwg, Operand::U(8)),
                    });
                }
                self.epilogue(&c, tq, row0, seq_q, o_base, o_stride, true);
                self.staging = None;
            }
            if cfg.tma {
                self.tma_producer(&maps, sbar, sq, sk0, tid, &tiles, &producer_label);
            } else {
                self.ws_producer(&ld, sbar, n_blocks, &producer_label);
            }
            return self.k;
        }

        // ---- prologue: Q and K(0), V(0) in stage 0 ----
        self.load_tile(q_rows, rpp, q_src, q_pass, q_grow, seq_q, q_dst, None);
        let zero_off = self.k.mov(Ty::U32, Operand::U(0));
        if cfg.split_kv {
            // Q and K(0); then K(1) and V(0).
            self.load_k(&ld, zero_off, None);
            self.k.push(Instr::CpAsyncCommit);
        } else {
            self.load_block(&ld, zero_off, None);
        }
        let n = self.k.mov(Ty::U32, Operand::U(0));
        let j0 = self.k.mov(Ty::U32, Operand::U(0));
        let loop_top = self.k.label("key_block");
        let loop_end = self.k.label("epilogue");
        let none = self.k.setp(Cmp::Eq, Ty::U32, n_blocks, Operand::U(0));
        self.k.branch_if(none, false, &loop_end);

        if cfg.overlap {
            // K(1), V(1) in stage 1; S(0) and its softmax.
            let one = self.k.setp(Cmp::Gt, Ty::U32, n_blocks, Operand::U(1));
            if cfg.split_kv {
                let off1 = self.k.mov(Ty::U32, Self::u(tile));
                self.load_k(&ld, off1, Some(one));
                self.load_v(&ld, zero_off, None);
                self.k.push(Instr::CpAsyncCommit);
            } else {
                let off1 = self.k.mov(Ty::U32, Self::u(2 * tile));
                self.load_block(&ld, off1, Some(one));
            }
            self.landed(1);
            self.k.push(Instr::WgmmaFence);
            self.s_gemm(&c, k_desc0);
            self.k.push(Instr::WgmmaCommit);
            self.k.push(Instr::WgmmaWait(0));
            let alpha = self.softmax(&c, j0);
            self.rescale_and_pack(&c, alpha);
            let tail = self.k.label("last_block");
            let single = self.k.setp(Cmp::Le, Ty::U32, n_blocks, Operand::U(1));
            self.k.branch_if(single, false, &tail);

            // Block n + 1's scores and block n's P·V in flight together;
            // the softmax of block n + 1 runs under the P·V.
            self.k.push(Instr::Label(loop_top.clone()));
            self.landed(0);
            let (cur, next) = if cfg.split_kv {
                // K(n + 2) into K(n)'s slot, V(n + 1) into V(n - 1)'s.
                let n2 = self.k.bin(BinOp::Add, Ty::U32, n, Operand::U(2));
                let more = self.k.setp(Cmp::Lt, Ty::U32, n2, n_blocks);
                let (cur_off, cur) = self.slot_of(n, 0);
                let (next_off, next) = self.slot_of(n, 1);
                self.load_k(&ld, cur_off, Some(more));
                self.load_v(&ld, next_off, None);
                self.k.push(Instr::CpAsyncCommit);
                (cur, next)
            } else {
                let (load_off, _) = self.stage_of(n, 2);
                let n2 = self.k.bin(BinOp::Add, Ty::U32, n, Operand::U(2));
                let more = self.k.setp(Cmp::Lt, Ty::U32, n2, n_blocks);
                self.load_block(&ld, load_off, Some(more));
                let (_, cur) = self.stage_of(n, 0);
                let (_, next) = self.stage_of(n, 1);
                (cur, next)
            };
            let k = &mut self.k;
            k.bin_to(BinOp::Add, Ty::U32, j0, j0, Self::u(bn));
            let k_desc = k.bin(BinOp::Add, Ty::U64, k_desc0, next);
            let v_desc = k.bin(BinOp::Add, Ty::U64, v_desc0, cur);
            k.push(Instr::WgmmaFence);
            self.s_gemm(&c, k_desc);
            self.k.push(Instr::WgmmaCommit);
            self.pv_gemm(&c, v_desc);
            self.k.push(Instr::WgmmaCommit);
            self.k.push(Instr::WgmmaWait(1));
            let alpha = self.softmax(&c, j0);
            // The wait for P·V starts a basic block of its own: ptxas
            // hoists a `wgmma.wait_group` to the top of its block, which
            // would put it before the softmax it is meant to overlap.
            let k = &mut self.k;
            k.bin_to(BinOp::Add, Ty::U32, n, n, Operand::U(1));
            let n1 = k.bin(BinOp::Add, Ty::U32, n, Operand::U(1));
            let again = k.setp(Cmp::Lt, Ty::U32, n1, n_blocks);
            let leave = k.label("last_pack");
            k.branch_if(again, true, &leave);
            k.push(Instr::WgmmaWait(0));
            self.rescale_and_pack(&c, alpha);
            self.k.push(Instr::Bra {
                target: loop_top.clone(),
                uni: true,
            });
            self.k.push(Instr::Label(leave));
            self.k.push(Instr::WgmmaWait(0));
            self.rescale_and_pack(&c, alpha);

            // The last block's P·V.
            let k = &mut self.k;
            k.push(Instr::Label(tail));
            let cur = if cfg.split_kv {
                // V(last) came with the last loop iteration's copies.
                self.landed(0);
                self.slot_of(n, 0).1
            } else {
                self.stage_of(n, 0).1
            };
            let v_desc = self.k.bin(BinOp::Add, Ty::U64, v_desc0, cur);
            self.k.push(Instr::WgmmaFence);
            self.pv_gemm(&c, v_desc);
            self.k.push(Instr::WgmmaCommit);
            self.k.push(Instr::WgmmaWait(0));
        } else {
            self.k.push(Instr::Label(loop_top.clone()));
            // Block n has landed, and every warpgroup is done with block
            // n - 1: its stage takes block n + 1.
            self.landed(0);
            let k = &mut self.k;
            let n1 = k.bin(BinOp::Add, Ty::U32, n, Operand::U(1));
            let more = k.setp(Cmp::Lt, Ty::U32, n1, n_blocks);
            let (load_off, _) = self.stage_of(n, 1);
            self.load_block(&ld, load_off, Some(more));
            let (_, cur) = self.stage_of(n, 0);
            let k = &mut self.k;
            let k_desc = k.bin(BinOp::Add, Ty::U64, k_desc0, cur);
            let v_desc = k.bin(BinOp::Add, Ty::U64, v_desc0, cur);
            k.push(Instr::WgmmaFence);
            self.s_gemm(&c, k_desc);
            self.k.push(Instr::WgmmaCommit);
            self.k.push(Instr::WgmmaWait(0));
            let alpha = self.softmax(&c, j0);
            self.rescale_and_pack(&c, alpha);
            self.k.push(Instr::WgmmaFence);
            self.pv_gemm(&c, v_desc);
            let k = &mut self.k;
            k.push(Instr::WgmmaCommit);
            k.push(Instr::WgmmaWait(0));
            k.bin_to(BinOp::Add, Ty::U32, n, n, Operand::U(1));
            k.bin_to(BinOp::Add, Ty::U32, j0, j0, Self::u(bn));
            let again = k.setp(Cmp::Lt, Ty::U32, n, n_blocks);
            k.branch_if(again, false, &loop_top);
        }

        let k = &mut self.k;
        k.push(Instr::Label(loop_end));
        k.push(Instr::CpAsyncWait(0));
        self.epilogue(&c, tq, row0, seq_q, o_base, o_stride, true);
        self.k
    }
}

/// Persistent kernels: the tile count and the registers that say where the
/// current tile lies, which [`Emitter::locate`] moves from tile to tile.
struct Tiles {
    /// Tiles in all: `nq · heads · batch`.
    total: Reg,
    /// Query blocks per (head, batch).
    nq: Reg,
    heads: Reg,
    group: Reg,
    seq_k: Reg,
    head: Reg,
    batch: Reg,
    q0: Reg,
    kv_head: Reg,
    n_blocks: Reg,
}

/// Which mbarrier of a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bar {
    /// K and V have landed (with TMA: K has).
    Full,
    /// With TMA: V has landed.
    VFull,
    /// Every consumer is done with the stage.
    Empty,
}

/// The registers of the products and the softmax.
struct Core {
    /// Scores, then weights: `block_n / 2` accumulators, slice-major.
    s_acc: Vec<Reg>,
    /// The output accumulators: `d / 2`.
    o_acc: Vec<Reg>,
    /// The weights as register A fragments, one per 16 keys.
    p: Vec<[Reg; 4]>,
    m_run: [Reg; 2],
    l_run: [Reg; 2],
    q_desc: Reg,
    /// `scale_log2 < 0`: every block takes the masking path.
    negative_scale: Reg,
    p_true: Reg,
    p_false: Reg,
    scale_log2: Reg,
    seq_q: Reg,
    seq_k: Reg,
    has_mask: Reg,
    mask_head: Reg,
    m_ptr: Reg,
    msq: Reg,
    /// This thread's first score row (the other is 8 below).
    row0: Reg,
    /// `2 · (lane % 4)`: this thread's first key in each n8 slice.
    tq2: Reg,
    /// The CTA's first query row.
    q0: Reg,
}

/// A thread's share of the K and V copies.
struct Loads {
    k_src: Reg,
    v_src: Reg,
    k_pass: Reg,
    v_pass: Reg,
    k_block: Reg,
    v_block: Reg,
    /// Global key row of this thread's first copy in the next K block.
    grow: Reg,
    /// The same for the next V block (`grow` itself unless K and V
    /// stages are split).
    v_grow: Reg,
    seq_k: Reg,
    /// Shared address of this thread's first K chunk in stage 0.
    k_dst0: Reg,
    /// Rows per pass.
    rpp: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(d: usize, causal: bool, dtype: DType) -> VariantSpec {
        VariantSpec::new(d, causal, dtype).unwrap()
    }

    #[test]
    fn applies_to_the_measured_16_bit_head_sizes() {
        for d in HEAD_SIZES {
            assert!(generate(&spec(d, false, DType::BF16)).is_some(), "{d}");
            assert!(generate(&spec(d, true, DType::F16)).is_some(), "{d}");
        }
        // Correct but slower than sm_80; not a multiple of 16; 32-bit.
        assert!(generate(&spec(32, false, DType::BF16)).is_none());
        assert!(generate(&spec(72, false, DType::BF16)).is_none());
        assert!(generate(&spec(128, false, DType::F32)).is_none());
    }

    #[test]
    fn head_size_256_splits_k_and_v_stages_within_shared_memory() {
        let s = spec(256, false, DType::BF16);
        let k = generate_with(&s, Sm90Config::cp_async(&s).unwrap());
        assert_eq!((k.block_m, k.threads), (128, 256));
        // Q, two K and two V slots of 80 keys, 1 KB of slack.
        assert_eq!(k.smem_bytes, 1024 + (128 + 4 * 80) * 512);
        assert!(k.smem_bytes <= 232_448);
        assert!(k
            .ptx
            .contains("wgmma.mma_async.sync.aligned.m64n80k16.f32.bf16.bf16"));
        assert!(k
            .ptx
            .contains("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16"));
    }

    #[test]
    fn head_sizes_off_the_panel_width_pad_tiles_but_not_products() {
        let s = spec(80, false, DType::F16);
        let k = generate_with(&s, Sm90Config::cp_async(&s).unwrap());
        // Tiles padded to 128 columns; Q·Kᵀ over 5 k-steps, P·V m64n80.
        assert_eq!(k.smem_bytes, 1024 + (192 + 6 * 96) * 128 * 2);
        assert!(k
            .ptx
            .contains("wgmma.mma_async.sync.aligned.m64n80k16.f32.f16.f16"));
        assert!(!k.ptx.contains("m64n128k16"));
        assert_eq!(k.ptx.matches("m64n96k16").count(), 2 * 5);
    }

    #[test]
    fn uses_wgmma_with_swizzled_descriptors() {
        let s = spec(128, false, DType::BF16);
        let k = generate_with(&s, Sm90Config::cp_async(&s).unwrap());
        assert_eq!(k.target, Target::Sm90a);
        assert!(k.ptx.contains(".target sm_90a"));
        assert!(k
            .ptx
            .contains("wgmma.mma_async.sync.aligned.m64n96k16.f32.bf16.bf16"));
        assert!(k.ptx.contains("wgmma.fence.sync.aligned;"));
        assert!(k.ptx.contains("fence.proxy.async.shared::cta;"));
        assert!(k
            .ptx
            .contains("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16"));
        assert_eq!(k.block_m, 192);
        assert_eq!(k.threads, 384);
        assert_eq!(k.smem_bytes, 1024 + (192 + 6 * 96) * 128 * 2);
    }

    #[test]
    fn the_producer_variant_specialises_warpgroups() {
        let s = spec(128, true, DType::BF16);
        let mut cfg = Sm90Config::cp_async(&s).unwrap();
        cfg.producer = true;
        cfg.wgs = 2;
        cfg.block_n = 128;
        let k = generate_with(&s, cfg);
        assert_eq!(k.threads, 384);
        assert_eq!(k.tensor_maps, None);
        assert!(k.ptx.contains("setmaxnreg.dec.sync.aligned.u32 24;"));
        assert!(k.ptx.contains("setmaxnreg.inc.sync.aligned.u32 240;"));
        assert!(k.ptx.contains("mbarrier.try_wait.parity.shared::cta.b64"));
        assert_eq!(k.smem_bytes, 1024 + (128 + 6 * 128) * 128 * 2 + 48);
    }

    #[test]
    fn the_default_loads_with_tma_through_three_tensor_maps() {
        for (d, wgs, rows) in [
            (64, 3, 128),
            (96, 3, 96),
            (128, 2, 128),
            (192, 2, 112),
            (256, 2, 80),
        ] {
            let k = generate(&spec(d, false, DType::BF16)).unwrap();
            assert_eq!((k.block_m, k.threads), (64 * wgs, 128 * (wgs + 1)), "d={d}");
            assert_eq!(
                k.tensor_maps,
                Some(TensorMaps {
                    q_rows: 64 * wgs,
                    kv_rows: rows
                }),
                "d={d}"
            );
            assert!(k.smem_bytes as usize <= SMEM_LIMIT, "d={d}");
            for name in TENSOR_MAP_PARAMS {
                assert!(
                    k.ptx
                        .contains(&format!(".param .align 64 .b8 {}_{name}[128]", k.entry)),
                    "d={d} {name}"
                );
            }
            assert!(k.ptx.contains(
                "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
            ));
            assert!(k.ptx.contains("mbarrier.arrive.expect_tx.shared::cta.b64"));
            assert!(k.ptx.contains("fence.mbarrier_init.release.cluster;"));
            assert!(!k.ptx.contains("cp.async.ca") && !k.ptx.contains("cp.async.cg"));
        }
        // The output is rescaled lazily (a warp vote) where not causal.
        let plain = generate(&spec(128, false, DType::F16)).unwrap();
        assert!(plain.ptx.contains("vote.sync.all.pred"));
        // d=128: Q (32 KB) and three stages of 128-key K and V tiles.
        let k = generate(&spec(128, true, DType::F16)).unwrap();
        assert!(!k.ptx.contains("vote.sync"));
        assert_eq!(k.smem_bytes, 1024 + (128 + 6 * 128) * 256 + 88);
    }

    #[test]
    fn the_persistent_variant_loops_over_tiles() {
        let s = spec(128, true, DType::BF16);
        let cfg = Sm90Config {
            persistent: true,
            ..Sm90Config::new(&s).unwrap()
        };
        let k = generate_with(&s, cfg);
        assert!(k.persistent);
        assert!(!generate(&s).unwrap().persistent);
        for (name, _) in PERSISTENT_PARAMS {
            assert!(k.ptx.contains(&format!(".param .u32 {}_{name}", k.entry)));
        }
        assert!(k.ptx.contains("%nctaid.x"));
        // Q-full and Q-empty after the three stages' three barriers.
        assert_eq!(k.smem_bytes, 1024 + (128 + 6 * 128) * 256 + 88);
    }

    #[test]
    fn the_staged_store_writes_rows_through_shared_memory() {
        let s = spec(80, false, DType::BF16);
        let cfg = Sm90Config {
            staged_store: true,
            ..Sm90Config::new(&s).unwrap()
        };
        let k = generate_with(&s, cfg);
        // 64 rows of 10 chunks per warpgroup: 5 row-contiguous 16-byte
        // stores per thread; the plain kernel stores 4 bytes at a time.
        assert_eq!(k.ptx.matches("st.global.v4.b32").count(), 5);
        assert_eq!(k.ptx.matches("ld.shared.v4.b32").count(), 5);
        assert!(k.ptx.contains("bar.sync %r"));
        let plain = generate(&s).unwrap();
        assert!(!plain.ptx.contains("st.global.v4"));
    }

    /// Assembles every variant with `ptxas` for sm_90a when `PTXAS` names
    /// the binary (`PTXAS=/path/to/ptxas cargo test -p kernels-gen sm90`):
    /// none may spill.
    #[test]
    fn assembles_without_spills_when_ptxas_is_available() {
        let Some(ptxas) = std::env::var_os("PTXAS") else {
            return;
        };
        let dir = std::env::temp_dir().join(format!("sm90-ptx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut failures = Vec::new();
        for d in HEAD_SIZES {
            for causal in [false, true] {
                for dtype in [DType::BF16, DType::F16] {
                    let s = spec(d, causal, dtype);
                    // The default (TMA), cp.async, cp.async with a producer.
                    for form in 0..3 {
                        if form == 2 && !matches!(d, 64 | 128) {
                            continue;
                        }
                        let mut cfg = Sm90Config::new(&s).unwrap();
                        if form > 0 {
                            cfg = Sm90Config::cp_async(&s).unwrap();
                        }
                        if form == 2 {
                            cfg.producer = true;
                            cfg.wgs = 2;
                            cfg.block_n = 128;
                        }
                        let k = generate_with(&s, cfg);
                        let path = dir.join(format!("{}-{form}.ptx", k.entry));
                        std::fs::write(&path, &k.ptx).unwrap();
                        let out = std::process::Command::new(&ptxas)
                            .args(["-arch=sm_90a", "-v"])
                            .arg(&path)
                            .arg("-o")
                            .arg(path.with_extension("cubin"))
                            .output()
                            .unwrap();
                        let text = String::from_utf8_lossy(&out.stderr).to_string();
                        if !out.status.success()
                            || !text.contains("0 bytes spill stores, 0 bytes spill loads")
                            || text.contains("warning")
                            || text.contains("C7512")
                        {
                            failures.push(format!("{} form {form}: {text}", k.entry));
                        }
                    }
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn descriptor_bits() {
        // 128-byte swizzle in bits 62-63, offsets >> 4 at 16 and 32.
        assert_eq!(desc_bits(16, 1024), (1 << 62) | (64 << 32) | (1 << 16));
    }
}

//! The Hopper (sm_90a) forward kernel for 16-bit element types: `wgmma`
//! products from 128-byte-swizzled shared memory, fed by TMA from a
//! producer warpgroup, and an online softmax in registers. It keeps the
//! launch contract of [`crate::gpu`], plus the tensor maps of
//! [`crate::gpu::TensorMaps`].
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
//! Block `n + 1`'s `Q·Kᵀ` is issued together with block `n`'s `P·V`, and
//! the softmax of `n + 1` runs while the `P·V` is in flight.
//!
//! The default ([`Sm90Config::new`]) is warp-specialised: warpgroup 0 is a
//! producer that gives its registers to the consumers (`setmaxnreg`) and
//! whose one thread loads Q, then each block's K and V, with TMA onto
//! per-stage mbarriers; the consumers hand stages back through empty
//! mbarriers and never meet at a CTA barrier. Two or three consumers by
//! head size; measured on an H100 (`docs/hopper.md`): 640 TFLOP/s on the
//! Wan2.1 480p self-attention through the runtime. [`Sm90Config::cp_async`]
//! builds the earlier kernel without a producer, where every thread copies
//! its share with `cp.async` and a CTA barrier per block publishes it.
//! Options tried and left off: ping-pong consumers, a `cp.async`
//! producer, persistent CTAs, staged output stores.
//!
//! # Modules
//!
//! - `config`: [`Sm90Config`], the tiles and the shared-memory budget;
//! - `products`: the two `wgmma` products and their descriptors;
//! - `softmax`: masking, the online softmax, the output's rescale, P;
//! - `pipeline`: the mbarrier hand-over, the consumers' loop, the TMA and
//!   `cp.async` producers, ping-pong, persistent tiles;
//! - `copies`: `cp.async` copies and stage arithmetic (no producer);
//! - `epilogue`: the output stores;
//! - this module: the kernel's parameters, coordinates, shared-memory
//!   layout and the order of all of the above ([`generate_with`]).
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

use crate::contract::{
    cta_coords, declare_params, load_args, GpuKernel, TensorMaps, TENSOR_MAP_PARAMS,
};
use crate::ptx::{
    Addr, BinOp, Cmp, Instr, Kernel, Module, Operand, Param, Reg, Special, Target, Ty,
};
use crate::VariantSpec;

mod config;
mod copies;
mod epilogue;
mod pipeline;
mod products;
mod softmax;
#[cfg(test)]
mod tests;

pub use config::Sm90Config;
use copies::Loads;
use epilogue::{Output, Staging};
use pipeline::Tiles;

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
    /// Leader release: whether this thread gives stages back for its
    /// warpgroup (`None`: every consumer thread does).
    releaser: Option<Reg>,
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
            releaser: None,
        }
    }

    fn u(x: usize) -> Operand {
        Operand::U(x as u64)
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
            ["heads", "batch"]
                .iter()
                .map(|&name| self.k.param(Ty::U32, name))
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
        let out = Output {
            tq,
            row0,
            seq_q,
            o_base,
            o_stride,
        };
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
                        // Empty and Q-empty: the consumers' threads, or
                        // their warpgroups' leaders.
                        (if cfg.leader_release { 1 } else { 128 } * cfg.wgs) as u32
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
            let (total, nq, heads) = if cfg.persistent {
                let (heads, batches) = (tiling[0], tiling[1]);
                let nq = k.bin(BinOp::Add, Ty::U32, seq_q, Self::u(bm - 1));
                let nq = k.bin(BinOp::Div, Ty::U32, nq, Self::u(bm));
                let total = k.bin(BinOp::Mul, Ty::U32, nq, heads);
                let total = k.bin(BinOp::Mul, Ty::U32, total, batches);
                (total, nq, heads)
            } else {
                // Never read: without persistence the grid places the tile.
                (n_blocks, n_blocks, n_blocks)
            };
            let tiles = Tiles {
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
            };
            let k = &mut self.k;
            let is_producer = k.setp(Cmp::Eq, Ty::U32, wg, Operand::U(0));
            k.branch_if(is_producer, false, &producer_label);
            k.push(Instr::SetMaxNReg {
                inc: true,
                regs: cfg.consumer_regs(),
            });
            if cfg.tma && cfg.leader_release {
                let lt = k.bin(BinOp::And, Ty::U32, tid, Operand::U(127));
                self.releaser = Some(k.setp(Cmp::Eq, Ty::U32, lt, Operand::U(0)));
            }
            // Persistent: the consumers' tile loop around the key blocks
            // (where the tile lies, fresh accumulators; after them the
            // output and the next tile).
            let tile_loop = if cfg.persistent {
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
                Some((idx, top, g0, q_phase))
            } else {
                None
            };
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
            if let Some((idx, top, g0, q_phase)) = tile_loop {
                self.epilogue(&c, &out, false);
                let k = &mut self.k;
                k.bin_to(BinOp::Add, Ty::U32, g0, g0, n_blocks);
                let any = k.setp(Cmp::Ne, Ty::U32, n_blocks, Operand::U(0));
                let one = k.selp(Ty::U32, Operand::U(1), Operand::U(0), any);
                k.bin_to(BinOp::Add, Ty::U32, q_phase, q_phase, one);
                self.next_tile(idx, &top);
                self.g0 = None;
                self.q_phase = None;
            } else {
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
                self.epilogue(&c, &out, true);
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
        self.epilogue(&c, &out, true);
        self.k
    }
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

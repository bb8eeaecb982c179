//! The tensor-core forward kernel for 16-bit element types, in the manner of
//! FlashAttention-2 on sm_80: `mma.sync` m16n8k16 products, `ldmatrix` from
//! padded shared memory, `cp.async` loads of K and V overlapping the
//! products, and an online softmax in registers.
//!
//! # Structure
//!
//! A CTA of `warps` warps computes `16 · warps · m_tiles` query rows of one
//! (batch, head); each warp owns `m_tiles` tiles of 16 rows, so a row of the
//! scores lives in the four lanes of a quad. Per key block of `block_n` keys:
//!
//! 1. V(n) starts loading; K(n) (loaded during the previous block) is
//!    waited for;
//! 2. `S = Q·K(n)ᵀ` with Q's fragments in registers (head sizes ≤ 128) or
//!    re-read from shared memory (larger ones);
//! 3. K(n + 1) starts loading into the freed K buffer;
//! 4. masking (only on blocks that need it: ragged ends, the causal
//!    diagonal, a mask tensor), online softmax, `P` packed to 16 bits — the
//!    accumulator layout of two adjacent n8 tiles is exactly an A fragment;
//! 5. V(n) is waited for and `O += P·V(n)` runs with `ldmatrix.trans`.
//!
//! Rows and keys are local to the batch entry's sequences
//! ([`crate::attention::seqs`], read once in the prologue, the query one
//! again in the epilogue): tiles are loaded from token `start`, rows past a
//! sequence's end are zero-filled by the `cp.async` source size, and a CTA
//! whose rows all lie past its sequence's end leaves at once. Causal CTAs
//! stop at the block holding their last row's diagonal: blocks above it
//! are never loaded. Head sizes that are odd multiples of 8 use one
//! m16n8k8 product for the last 8 columns of `Q·Kᵀ` and an `.x2` load for the
//! last n8 tile of `P·V`, so 40 runs as 40, not 48 or 64.
//!
//! Shared-memory rows are padded so that their pitch is an odd number of 16
//! byte chunks: the eight row addresses of every `ldmatrix` then fall in
//! distinct bank groups, for every head size, without a swizzle.

use crate::attention::mask::{
    block_needs_mask, key_blocks, mask_fragment, mask_of_head, FragmentMask,
};
use crate::attention::softmax::{
    exp2_with_row_sums, pack_a_fragment, quad_reduce, reduce_chain, scale, scale_rows, update_max,
    update_sum,
};
use crate::attention::store::{exit_past_end, lse_rows, quad_writer, store_output, OutputRows};
use crate::attention::{at_token, sequence_of, AccFragment, SeqSide};
use crate::contract::{
    cta_coords, cta_head_batch, declare_params, kv_head, load_args, tensor_head, GpuKernel,
};
use crate::ptx::{Addr, BinOp, Cmp, Instr, Kernel, MmaShape, Module, Operand, Reg, Target, Ty};
use crate::{DType, VariantSpec};

/// The shape of one variant's kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fa2Config {
    /// Head size.
    pub d: usize,
    /// `BF16` or `F16`.
    pub ab: Ty,
    /// Top-left causal.
    pub causal: bool,
    /// Warps per CTA.
    pub warps: usize,
    /// 16-row m-tiles per warp: the K and V fragments each warp reads from
    /// shared memory serve this many products.
    pub m_tiles: usize,
    /// Query rows per CTA: `16 · warps · m_tiles`.
    pub block_m: usize,
    /// Keys per block.
    pub block_n: usize,
    /// Keep Q's fragments in registers for the whole loop.
    pub q_in_regs: bool,
    /// Bytes between consecutive rows of a shared-memory tile.
    pub pitch: usize,
}

impl Fa2Config {
    /// The configuration of a 16-bit variant.
    ///
    /// Tile choices: 64 keys per block up to head size 128, 32 above, so
    /// that the S accumulators, O accumulators and Q fragments fit the
    /// register file; Q's fragments stay in registers only up to 128 (at
    /// 256 they alone would take 64 registers per thread).
    pub fn new(spec: &VariantSpec) -> Fa2Config {
        let d = spec.head_size;
        let ab = match spec.dtype {
            DType::BF16 => Ty::BF16,
            _ => Ty::F16,
        };
        let chunks = d / 8;
        let pitch_chunks = if chunks % 2 == 1 { chunks } else { chunks + 1 };
        // Measured on an H100 (tests/gpu/ptx_harness.py, bf16, 2026-11-27;
        // runs vary by about 5%):
        // - 128 query rows per CTA: each K/V tile fetched from L2 serves
        //   twice the rows of a 64-row CTA (64 rows: 265-300 TFLOP/s at
        //   d=128, 128 rows: 330-345).
        // - 4 warps of two 16-row tiles rather than 8 warps of one: every K
        //   and V fragment read from shared memory feeds two products, and
        //   ~250 registers x 128 threads let two CTAs share an SM, so one
        //   CTA's softmax overlaps the other's products (8 warps: one CTA
        //   per SM, 326 TFLOP/s; 4 x 2: 343 at d=128, 311 at d=64).
        // - Q's fragments are re-read from shared memory; kept in
        //   registers they spill at two tiles per warp.
        // - 64-key blocks up to d=80, 32 above (64 spills 64 bytes at 128).
        // - Above 128 two tiles per warp no longer fit: 8 warps of one tile,
        //   64 keys (237 registers at d=256, 294-311 TFLOP/s against 272
        //   for 4 warps and 32 keys).
        let (warps, m_tiles, block_n) = match d {
            0..=80 => (4, 2, 64),
            81..=128 => (4, 2, 32),
            _ => (8, 1, 64),
        };
        let q_in_regs = false;
        Fa2Config {
            d,
            ab,
            causal: spec.causal,
            warps,
            m_tiles,
            block_m: 16 * warps * m_tiles,
            block_n,
            q_in_regs,
            pitch: pitch_chunks * 16,
        }
    }

    /// The same kernel with other tiles (for tuning): `warps` warps of
    /// `m_tiles` 16-row tiles, `block_n` keys per block.
    pub fn with_tiles(
        mut self,
        warps: usize,
        m_tiles: usize,
        block_n: usize,
        q_in_regs: bool,
    ) -> Self {
        self.warps = warps;
        self.m_tiles = m_tiles;
        self.block_m = 16 * warps * m_tiles;
        self.block_n = block_n;
        self.q_in_regs = q_in_regs;
        self
    }

    /// Threads per CTA.
    pub fn threads(&self) -> usize {
        self.warps * 32
    }

    /// Dynamic shared memory: the Q tile and one K and one V tile.
    pub fn smem_bytes(&self) -> usize {
        (self.block_m + 2 * self.block_n) * self.pitch
    }

    fn packed(&self) -> Ty {
        if self.ab == Ty::BF16 {
            Ty::BF16x2
        } else {
            Ty::F16x2
        }
    }
}

/// Generates the tensor-core kernel of a 16-bit variant.
pub fn generate(spec: &VariantSpec, target: Target) -> GpuKernel {
    generate_with(spec, Fa2Config::new(spec), target)
}

/// Generates the tensor-core kernel of a 16-bit variant with the tiles of
/// `cfg`.
pub fn generate_with(spec: &VariantSpec, cfg: Fa2Config, target: Target) -> GpuKernel {
    let entry = spec.kernel_name();
    let k = Emitter::new(&entry, cfg).emit();
    GpuKernel {
        ptx: Module::new(target).kernel(k).to_string(),
        entry,
        target,
        block_m: cfg.block_m as u32,
        threads: cfg.threads() as u32,
        smem_bytes: cfg.smem_bytes() as u32,
        mask_smem_bytes: 0,
        tensor_maps: None,
    }
}

/// One thread's position in a tensor's rows, for tile loads.
struct Stream {
    /// Source address of this thread's first chunk.
    src: Reg,
    /// Global row of this thread's first chunk.
    grow: Reg,
    /// Shared address of this thread's first chunk.
    dst: Reg,
    /// Bytes between passes.
    pass_step: Reg,
    /// Bytes between key blocks.
    block_step: Reg,
}

/// Per-thread values that the tile loader needs for one tile shape.
struct Loader {
    /// Whether this thread has a chunk to copy.
    active: Reg,
    /// This thread's first row within the tile.
    row: Reg,
    /// Byte offset of this thread's chunk within a shared row.
    chunk_bytes: Reg,
    /// Rows covered per pass.
    rows_per_pass: usize,
}

struct Emitter {
    k: Kernel,
    cfg: Fa2Config,
}

impl Emitter {
    fn new(name: &str, cfg: Fa2Config) -> Emitter {
        Emitter {
            k: Kernel::new(name),
            cfg,
        }
    }

    fn u(x: usize) -> Operand {
        Operand::U(x as u64)
    }

    /// Per-thread chunk assignment: `D/8` 16-byte chunks per row, threads
    /// laid out row-major over them.
    fn loader(&mut self, tid: Reg) -> Loader {
        let chunks = self.cfg.d / 8;
        let rows_per_pass = self.cfg.threads() / chunks;
        let k = &mut self.k;
        let active = k.setp(Cmp::Lt, Ty::U32, tid, Self::u(rows_per_pass * chunks));
        let row = k.bin(BinOp::Div, Ty::U32, tid, Self::u(chunks));
        let chunk = k.bin(BinOp::Rem, Ty::U32, tid, Self::u(chunks));
        let chunk_bytes = k.bin(BinOp::Shl, Ty::U32, chunk, Operand::U(4));
        Loader {
            active,
            row,
            chunk_bytes,
            rows_per_pass,
        }
    }

    /// A running pointer into one tensor's rows for this thread: created at
    /// global row `row0`, advanced by [`Emitter::advance`].
    fn stream(&mut self, ld: &Loader, smem: Reg, base: Reg, stride: Reg, row0: Reg) -> Stream {
        let pitch = self.cfg.pitch;
        let k = &mut self.k;
        let grow = k.bin(BinOp::Add, Ty::U32, row0, ld.row);
        let row64 = k.cvt(None, Ty::U64, Ty::U32, grow);
        let chunk64 = k.cvt(None, Ty::U64, Ty::U32, ld.chunk_bytes);
        let src = k.mad(Ty::U64, row64, stride, base);
        let src = k.bin(BinOp::Add, Ty::U64, src, chunk64);
        let dst = k.mad(Ty::U32, ld.row, Self::u(pitch), smem);
        let dst = k.bin(BinOp::Add, Ty::U32, dst, ld.chunk_bytes);
        let pass_step = k.bin(BinOp::Mul, Ty::U64, stride, Self::u(ld.rows_per_pass));
        let block_step = k.bin(BinOp::Mul, Ty::U64, stride, Self::u(self.cfg.block_n));
        Stream {
            src,
            grow,
            dst,
            pass_step,
            block_step,
        }
    }

    /// Moves a stream on by one key block.
    fn advance(&mut self, s: &Stream) {
        let k = &mut self.k;
        k.bin_to(BinOp::Add, Ty::U64, s.src, s.src, s.block_step);
        k.bin_to(
            BinOp::Add,
            Ty::U32,
            s.grow,
            s.grow,
            Self::u(self.cfg.block_n),
        );
    }

    /// Issues `cp.async` copies of the stream's next `rows` rows into its
    /// shared tile. Rows at or past `seq` are zero-filled without reading
    /// memory (a source size of 0); nothing is issued where `enable` is
    /// false.
    fn load_tile(&mut self, ld: &Loader, s: &Stream, rows: usize, seq: Reg, enable: Option<Reg>) {
        let pitch = self.cfg.pitch;
        let k = &mut self.k;
        let passes = rows.div_ceil(ld.rows_per_pass);
        let mut src = s.src;
        for pass in 0..passes {
            let local = pass * ld.rows_per_pass;
            let mut go = ld.active;
            if local + ld.rows_per_pass > rows {
                let fits = k.setp(Cmp::Lt, Ty::U32, ld.row, Self::u(rows - local));
                let both = k.reg(Ty::Pred);
                k.bin_to(BinOp::And, Ty::Pred, both, go, fits);
                go = both;
            }
            if let Some(e) = enable {
                let both = k.reg(Ty::Pred);
                k.bin_to(BinOp::And, Ty::Pred, both, go, e);
                go = both;
            }
            if pass > 0 {
                src = k.bin(BinOp::Add, Ty::U64, src, s.pass_step);
            }
            let grow = k.bin(BinOp::Add, Ty::U32, s.grow, Self::u(local));
            let valid = k.setp(Cmp::Lt, Ty::U32, grow, seq);
            let size = k.selp(Ty::U32, Operand::U(16), Operand::U(0), valid);
            k.guard(
                go,
                false,
                Instr::CpAsync16 {
                    dst: Addr::at(s.dst, (local * pitch) as i64),
                    src: src.into(),
                    src_size: size.into(),
                },
            );
        }
    }

    fn ldmatrix(&mut self, n: usize, trans: bool, base: Reg, offset: usize) -> Vec<Reg> {
        let dst = self.k.regs(Ty::B32, n);
        self.k.push(Instr::Ldmatrix {
            trans,
            dst: dst.clone(),
            addr: Addr::at(base, offset as i64),
        });
        dst
    }

    fn mma(&mut self, shape: MmaShape, acc: &[Reg], a: &[Reg], b: &[Reg]) {
        self.mma_into(shape, acc, a, b, acc);
    }

    /// `acc = a·b + c`.
    fn mma_into(&mut self, shape: MmaShape, acc: &[Reg], a: &[Reg], b: &[Reg], c: &[Reg]) {
        self.k.push(Instr::Mma {
            shape,
            ab: self.cfg.ab,
            d: [acc[0], acc[1], acc[2], acc[3]],
            a: a.to_vec(),
            b: b.to_vec(),
            c: [c[0], c[1], c[2], c[3]],
        });
    }

    /// Q's A fragments of m-tile `mt` for k-step `kk` (16 columns), or the
    /// 8-column tail.
    fn q_fragment(&mut self, q_lane: Reg, mt: usize, kk: usize, tail: bool) -> Vec<Reg> {
        let row = mt * 16 * self.cfg.pitch;
        if tail {
            self.ldmatrix(2, false, q_lane, row + (self.cfg.d - 8) * 2)
        } else {
            self.ldmatrix(4, false, q_lane, row + kk * 32)
        }
    }

    fn emit(mut self) -> Kernel {
        let cfg = self.cfg;
        let (d, bm, bn, pitch, mts) = (cfg.d, cfg.block_m, cfg.block_n, cfg.pitch, cfg.m_tiles);
        let k16_steps = d / 16;
        let has_tail = d % 16 == 8;
        let n_tiles_s = bn / 8;
        let n_tiles_o = d / 8;

        let params = declare_params(&mut self.k);
        self.k.launch_bounds(cfg.threads() as u32, None);
        self.k.dynamic_shared(128);
        self.k.comment(format!(
            "tensor-core attention: d={d} causal={} {}, {} warps x {mts} m-tiles, \
             block {bm}x{bn}, pitch {pitch} B",
            cfg.causal,
            cfg.ab.name(),
            cfg.warps,
        ));

        // ---- parameters ----
        let k = &mut self.k;
        let a = load_args(k, &params);
        let (q_ptr, k_ptr, v_ptr, o_ptr, m_ptr) = (a.q, a.k, a.v, a.out, a.mask);
        let (qs, ks, vs, os) = (a.q_strides, a.k_strides, a.v_strides, a.out_strides);
        let [msb, msh, msq] = a.mask_strides;
        let (lse_ptr, lse_strides) = (a.lse, a.lse_strides);
        let (group, scale_log2) = (a.group, a.scale_log2);

        // ---- thread and block coordinates, the sequences ----
        let (tid, qblock, head, batch) = cta_coords(k, cfg.causal);
        // Rows and keys are local to the batch entry's sequences from here.
        let q_seq = sequence_of(k, &a, batch, SeqSide::Queries);
        let k_seq = sequence_of(k, &a, batch, SeqSide::Keys);
        let (seq_q, seq_k) = (q_seq.len, k_seq.len);
        let lane = k.bin(BinOp::And, Ty::U32, tid, Operand::U(31));
        let warp = k.bin(BinOp::Shr, Ty::U32, tid, Operand::U(5));
        let g = k.bin(BinOp::Shr, Ty::U32, lane, Operand::U(2));
        let tq = k.bin(BinOp::And, Ty::U32, lane, Operand::U(3));
        let q0 = k.bin(BinOp::Mul, Ty::U32, qblock, Self::u(bm));
        exit_past_end(k, q0, seq_q);
        let kv_head = kv_head(k, head, group);
        // First row of this warp within the CTA.
        let warp_row = k.bin(BinOp::Mul, Ty::U32, warp, Self::u(16 * mts));

        // Byte address of element [batch, start, head, 0] of each tensor
        // (local row 0 of its sequence), and its token stride in bytes.
        let (q_head, q_stride) = tensor_head(k, q_ptr, qs, batch, head, 2);
        let q_base = at_token(k, q_head, q_seq.start, q_stride);
        let (k_head, k_stride) = tensor_head(k, k_ptr, ks, batch, kv_head, 2);
        let k_base = at_token(k, k_head, k_seq.start, k_stride);
        let (v_head, v_stride) = tensor_head(k, v_ptr, vs, batch, kv_head, 2);
        let v_base = at_token(k, v_head, k_seq.start, v_stride);
        // The output's rows move on to the sequence in the epilogue.
        let (o_base, o_stride) = tensor_head(k, o_ptr, os, batch, head, 2);

        // Shared tiles.
        let sq = k.mov(Ty::U32, Operand::Symbol("smem".into()));
        let sk = k.bin(BinOp::Add, Ty::U32, sq, Self::u(bm * pitch));
        let sv = k.bin(BinOp::Add, Ty::U32, sk, Self::u(bn * pitch));

        // Per-lane ldmatrix row addresses (see the module docs for layouts).
        let lane16 = k.bin(BinOp::And, Ty::U32, lane, Operand::U(15));
        let hi16 = k.bin(BinOp::Shr, Ty::U32, lane, Operand::U(4));
        let lane8 = k.bin(BinOp::And, Ty::U32, lane, Operand::U(7));
        let bit3 = k.bin(BinOp::Shr, Ty::U32, lane, Operand::U(3));
        let bit3 = k.bin(BinOp::And, Ty::U32, bit3, Operand::U(1));
        // Q: row warp_row + lane % 16 (+ 16 per m-tile), column chunk lane / 16.
        let q_row = k.bin(BinOp::Add, Ty::U32, warp_row, lane16);
        let q_lane = k.mad(Ty::U32, q_row, Self::u(pitch), sq);
        let q_lane = k.mad(Ty::U32, hi16, Operand::U(16), q_lane);
        // K for Q·Kᵀ: key 8·(lane / 16) + lane % 8, column chunk (lane / 8) % 2.
        let k_row = k.mad(Ty::U32, hi16, Operand::U(8), lane8);
        let k_lane = k.mad(Ty::U32, k_row, Self::u(pitch), sk);
        let k_lane = k.mad(Ty::U32, bit3, Operand::U(16), k_lane);
        // K for the k8 tail: key = lane.
        let k_tail_lane = k.mad(Ty::U32, lane, Self::u(pitch), sk);
        // V for P·V (transposed): key 8·((lane / 8) % 2) + lane % 8, column
        // chunk lane / 16.
        let v_row = k.mad(Ty::U32, bit3, Operand::U(8), lane8);
        let v_lane = k.mad(Ty::U32, v_row, Self::u(pitch), sv);
        let v_lane = k.mad(Ty::U32, hi16, Operand::U(16), v_lane);

        // This thread's rows in the scores are g and g + 8 of each m-tile:
        // row0 + AccFragment::row_offset(r) for r = 2·mt + half. They are
        // recomputed where needed rather than held: registers are the
        // limit here.
        let row0 = k.bin(BinOp::Add, Ty::U32, warp_row, g);
        let row0 = k.bin(BinOp::Add, Ty::U32, row0, q0);

        // Number of key blocks: causal CTAs stop at their last row.
        let n_blocks = key_blocks(k, q0, bm, bn, seq_k, cfg.causal);

        // The mask (f32 bias) of this (batch, head), if a mask was passed.
        let (has_mask, mask_head) = mask_of_head(k, m_ptr, a.mask_batches, batch, head, msb, msh);

        // ---- prologue: Q and K(0) ----
        let ld = self.loader(tid);
        let q_stream = self.stream(&ld, sq, q_base, q_stride, q0);
        self.load_tile(&ld, &q_stream, bm, seq_q, None);
        let zero = self.k.mov(Ty::U32, Operand::U(0));
        let k_stream = self.stream(&ld, sk, k_base, k_stride, zero);
        let v_stream = self.stream(&ld, sv, v_base, v_stride, zero);
        self.load_tile(&ld, &k_stream, bn, seq_k, None);
        self.k.push(Instr::CpAsyncCommit);
        self.k.push(Instr::CpAsyncWait(0));
        self.k.push(Instr::BarSync(0));

        let k_steps = k16_steps + usize::from(has_tail);
        // q_regs[mt][kk], when Q stays in registers.
        let q_regs: Vec<Vec<Vec<Reg>>> = if cfg.q_in_regs {
            (0..mts)
                .map(|mt| {
                    (0..k_steps)
                        .map(|kk| self.q_fragment(q_lane, mt, kk, kk == k16_steps))
                        .collect()
                })
                .collect()
        } else {
            Vec::new()
        };

        // Running state: max and sum per row, O accumulators per m-tile.
        let k = &mut self.k;
        let neg_inf = Operand::F32(f32::NEG_INFINITY);
        let m_run: Vec<Reg> = (0..2 * mts)
            .map(|_| k.mov(Ty::F32, neg_inf.clone()))
            .collect();
        let l_run: Vec<Reg> = (0..2 * mts)
            .map(|_| k.mov(Ty::F32, Operand::F32(0.0)))
            .collect();
        let o_acc: Vec<Vec<Vec<Reg>>> = (0..mts)
            .map(|_| {
                (0..n_tiles_o)
                    .map(|_| (0..4).map(|_| k.mov(Ty::F32, Operand::F32(0.0))).collect())
                    .collect()
            })
            .collect();
        let s_acc: Vec<Vec<Vec<Reg>>> = (0..mts)
            .map(|_| (0..n_tiles_s).map(|_| k.regs(Ty::F32, 4)).collect())
            .collect();
        // The same registers as fragments ([`AccFragment`]), per m-tile.
        let s_regs: Vec<Vec<Reg>> = s_acc.iter().map(|tiles| tiles.concat()).collect();
        let o_regs: Vec<Vec<Reg>> = o_acc.iter().map(|tiles| tiles.concat()).collect();
        let (s_frag, o_frag) = (AccFragment::new(&s_regs), AccFragment::new(&o_regs));
        let n = k.mov(Ty::U32, Operand::U(0));
        let j0 = k.mov(Ty::U32, Operand::U(0));
        let tq2 = k.bin(BinOp::Shl, Ty::U32, tq, Operand::U(1));

        let loop_top = k.label("key_block");
        let loop_end = k.label("epilogue");
        let first = k.setp(Cmp::Ge, Ty::U32, n, n_blocks);
        k.branch_if(first, false, &loop_end);
        k.push(Instr::Label(loop_top.clone()));

        // 1. K(n) is waited for; past this barrier every warp is done with
        //    V(n - 1), so V(n) starts loading.
        self.k.push(Instr::CpAsyncWait(0));
        self.k.push(Instr::BarSync(0));
        self.load_tile(&ld, &v_stream, bn, seq_k, None);
        self.k.push(Instr::CpAsyncCommit);

        // 2. S = Q·Kᵀ: each K fragment serves every m-tile; the first k-step
        //    accumulates onto zeros instead of clearing S.
        let zeros: Vec<Reg> = (0..4)
            .map(|_| self.k.mov(Ty::F32, Operand::F32(0.0)))
            .collect();
        for kk in 0..k_steps {
            let tail = kk == k16_steps;
            let a: Vec<Vec<Reg>> = (0..mts)
                .map(|mt| match q_regs.get(mt) {
                    Some(q) => q[kk].clone(),
                    None => self.q_fragment(q_lane, mt, kk, tail),
                })
                .collect();
            if tail {
                // One B register per n8 tile: four tiles per x4 load.
                for quad in 0..n_tiles_s.div_ceil(4) {
                    let tiles = (n_tiles_s - quad * 4).min(4);
                    let width = if tiles > 2 {
                        4
                    } else {
                        tiles.next_power_of_two()
                    };
                    let b =
                        self.ldmatrix(width, false, k_tail_lane, quad * 32 * pitch + (d - 8) * 2);
                    for (mt, a) in a.iter().enumerate() {
                        for t in 0..tiles {
                            let acc = s_acc[mt][quad * 4 + t].clone();
                            let c = if kk == 0 { &zeros } else { &acc };
                            self.mma_into(MmaShape::M16N8K8, &acc, a, &b[t..t + 1], c);
                        }
                    }
                }
            } else {
                for pair in 0..n_tiles_s / 2 {
                    let b = self.ldmatrix(4, false, k_lane, pair * 16 * pitch + kk * 32);
                    for (mt, a) in a.iter().enumerate() {
                        let acc0 = s_acc[mt][2 * pair].clone();
                        let acc1 = s_acc[mt][2 * pair + 1].clone();
                        let (c0, c1) = if kk == 0 {
                            (&zeros, &zeros)
                        } else {
                            (&acc0, &acc1)
                        };
                        self.mma_into(MmaShape::M16N8K16, &acc0, a, &b[0..2], c0);
                        self.mma_into(MmaShape::M16N8K16, &acc1, a, &b[2..4], c1);
                    }
                }
            }
        }

        // 3. V(n) is waited for; past this barrier every warp is done with
        //    K(n), so K(n + 1) starts loading, under the softmax and P·V.
        self.k.push(Instr::CpAsyncWait(0));
        self.k.push(Instr::BarSync(0));
        self.advance(&k_stream);
        self.advance(&v_stream);
        let n1 = self.k.bin(BinOp::Add, Ty::U32, n, Operand::U(1));
        let more = self.k.setp(Cmp::Lt, Ty::U32, n1, n_blocks);
        self.load_tile(&ld, &k_stream, bn, seq_k, Some(more));
        self.k.push(Instr::CpAsyncCommit);

        // 4. Scores to the log2 domain, masking where needed, online softmax.
        let k = &mut self.k;
        scale(k, s_frag.elems().map(|(_, _, s)| s), scale_log2);
        // Does this block need element-wise masking?
        let causal_q0 = cfg.causal.then_some(q0);
        let need = block_needs_mask(k, j0, bn, seq_k, has_mask, None, causal_q0);
        let skip_mask = k.label("unmasked");
        k.branch_if(need, true, &skip_mask);
        let fm = FragmentMask {
            row0,
            tq2,
            seq_q: a.seq_q,
            seq_k,
            has_mask,
            mask: m_ptr,
            mask_head,
            mask_stride_q: msq,
            kind: a.mask_kind,
            pad: a.mask_pad,
            causal: cfg.causal,
        };
        mask_fragment(k, &s_frag, &fm, j0);
        k.push(Instr::Label(skip_mask));

        // Row maxima over the block, across the quad; rescale factors.
        let mut shift = Vec::new();
        let mut alpha = Vec::new();
        for (r, &m_old) in m_run.iter().enumerate() {
            let m = reduce_chain(k, neg_inf.clone(), &s_frag.row(r), BinOp::Max);
            let m = quad_reduce(k, m, BinOp::Max);
            let (sh, a) = update_max(k, m_old, m);
            shift.push(sh);
            alpha.push(a);
        }
        let block_sum = exp2_with_row_sums(k, &s_frag, &shift);
        for ((&l, &a), &b) in l_run.iter().zip(&alpha).zip(&block_sum) {
            update_sum(k, l, a, b);
        }
        scale_rows(k, &o_frag, &alpha);
        // P as A fragments: k-step kk covers S tiles 2kk and 2kk + 1.
        let packed = cfg.packed();
        let p_frags: Vec<Vec<Vec<Reg>>> = s_acc
            .iter()
            .map(|tiles| {
                (0..n_tiles_s / 2)
                    .map(|kk| {
                        let dst = k.regs(Ty::B32, 4);
                        pack_a_fragment(k, packed, &tiles[2 * kk], &tiles[2 * kk + 1], &dst);
                        dst
                    })
                    .collect()
            })
            .collect();

        // 5. O += P·V(n): each V fragment serves every m-tile.
        for kk in 0..n_tiles_s / 2 {
            let a_k: Vec<Vec<Reg>> = p_frags.iter().map(|p| p[kk].clone()).collect();
            for pair in 0..n_tiles_o / 2 {
                let b = self.ldmatrix(4, true, v_lane, kk * 16 * pitch + pair * 32);
                for (acc, a) in o_acc.iter().zip(&a_k) {
                    self.mma(MmaShape::M16N8K16, &acc[2 * pair].clone(), a, &b[0..2]);
                    self.mma(MmaShape::M16N8K16, &acc[2 * pair + 1].clone(), a, &b[2..4]);
                }
            }
            if n_tiles_o % 2 == 1 {
                let last = n_tiles_o - 1;
                let b = self.ldmatrix(2, true, v_lane, kk * 16 * pitch + last * 16);
                for (acc, a) in o_acc.iter().zip(&a_k) {
                    self.mma(MmaShape::M16N8K16, &acc[last].clone(), a, &b);
                }
            }
        }
        let k = &mut self.k;
        k.bin_to(BinOp::Add, Ty::U32, n, n, Operand::U(1));
        k.bin_to(BinOp::Add, Ty::U32, j0, j0, Self::u(bn));
        let again = k.setp(Cmp::Lt, Ty::U32, n, n_blocks);
        k.branch_if(again, false, &loop_top);

        // ---- epilogue: O / sum, rows that saw no key are 0; the lse ----
        k.push(Instr::Label(loop_end));
        k.push(Instr::CpAsyncWait(0));
        let (head, batch) = cta_head_batch(k);
        // The query sequence read again: no register holds it across the
        // loop.
        let q_seq = sequence_of(k, &a, batch, SeqSide::Queries);
        let out = OutputRows {
            row0,
            tq,
            seq_q: a.seq_q,
            base: o_base,
            stride: o_stride,
        }
        .in_sequence(k, q_seq);
        let b64 = k.cvt(None, Ty::U64, Ty::U32, batch);
        let h64 = k.cvt(None, Ty::U64, Ty::U32, head);
        let writer = quad_writer(k, tq);
        let lse = lse_rows(k, lse_ptr, lse_strides, b64, h64, q_seq.start, Some(writer));
        store_output(k, &o_frag, &m_run, &l_run, &out, &lse, packed);
        self.k.push(Instr::Ret);
        self.k
    }
}

#[cfg(test)]
mod tests;

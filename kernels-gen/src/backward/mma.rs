//! The tensor-core backward main kernel for 16-bit element types, in the
//! manner of FlashAttention-2 on sm_80: `mma.sync` m16n8k16 products,
//! `ldmatrix` from padded shared memory and `cp.async` loads.
//!
//! # Structure
//!
//! A CTA holds `block_n` keys of one (batch, K/V head): their K and V rows
//! stay in shared memory and their `dK`, `dV` accumulators in registers.
//! Warp `w` owns the 16 keys of key tile `w % (block_n / 16)`; above head
//! size 128 two warps share a key tile, each owning half of the head
//! dimension's columns of `dK`, `dV` (and of `dQ`), both computing the
//! tile's scores. The CTA walks every (query block of `block_m` rows that
//! sees its keys, query head of the group), query blocks outermost and, when
//! causal, from the last down, so that every CTA of a (batch, K/V head)
//! reaches a given block at the same step. Per step, with `Q`, `dO`,
//! `lse_log2` and `delta` of the block in shared memory (`Q` and `dO` in one
//! of two buffers, the next step's loading into the other):
//!
//! 1. `Sᵀ = K·Qᵀ` (16 keys × `block_m` queries per warp), then `Pᵀ =
//!    exp2(Sᵀ·scale_log2 + bias − lse_log2)` with the mask, keys past `Sk`
//!    and causal keys hidden (only on blocks that need it);
//! 2. `dPᵀ = V·dOᵀ` and `dSᵀ = Pᵀ ∘ (dPᵀ − delta)`;
//! 3. `dV += Pᵀ·dO`, `dK += dSᵀ·Q`: the accumulator layout of `Pᵀ` and
//!    `dSᵀ` is exactly an A fragment, `dO` and `Q` come by `ldmatrix.trans`;
//! 4. `dSᵀ` goes to shared memory, and past a barrier `dQ = dS·K` (an A
//!    fragment by `ldmatrix.trans` of `dSᵀ`) is added to `dq_accum` in
//!    key-block order (the counters of the launch contract).
//!
//! Every product's fragments are loaded one product ahead of its `mma`s.
//! The end writes `dK · scale` and `dV` in the input dtype.
//!
//! With a mask, each step first copies the mask's `block_m × block_n`
//! elements (any [`crate::attention::mask::MaskKind`], one copy of the
//! loads per kind behind uniform branches) as `f32` biases in the log2
//! domain into a shared tile, with coalesced loads while few registers are
//! live; step 1 adds them from there.
//!
//! Sequences ([`crate::attention::seqs`]): positions are local to the batch
//! entry's sequences (`Sq`, `Sk` above read as their lengths), tensors are
//! addressed at token `start + local`, the scratch buffers at local rows.
//! The lengths and starts live in shared memory across the loop (as
//! parameters they cost no registers; computed, they would). A CTA whose
//! first key is past the keys exits at once; one that no query block
//! reaches visits nothing and writes zeros. Either way the contributors of
//! a query block stay a prefix of the key blocks: no counter waits for a
//! CTA that exited.

use super::BACKWARD_PARAMS;
use crate::attention::mask::{load_bias, per_kind};
use crate::attention::seqs::{sequence, Side};
use crate::attention::softmax::pack_a_fragment;
use crate::contract::{declare_table, head_offset, tensor_head, GpuKernel, Params};
use crate::ptx::{
    Addr, BinOp, Cmp, Instr, Kernel, MmaShape, Module, Operand, Reg, Special, StateSpace, Target,
    Ty, UnOp,
};
use crate::{DType, VariantSpec};

const LOG2E: f32 = std::f32::consts::LOG2_E;

/// Passes per iteration of the loop that loads a step's mask tile.
const MASK_UNROLL: usize = 8;

/// The shape of one variant's backward main kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmaBackwardConfig {
    /// Head size.
    pub d: usize,
    /// `BF16` or `F16`.
    pub ab: Ty,
    /// Top-left causal.
    pub causal: bool,
    /// Keys per CTA.
    pub block_n: usize,
    /// Query rows per step (and per `dq` semaphore).
    pub block_m: usize,
    /// Warps sharing one 16-key tile (each owning a share of the columns).
    pub col_parts: usize,
    /// Bytes between consecutive rows of a `[rows, D]` shared tile.
    pub pitch: usize,
    /// Bytes between consecutive rows of the `dSᵀ` tile.
    pub ds_pitch: usize,
    /// Add to `dq_accum` in key-block order (the semaphore); without it
    /// the additions race, and `dq`'s last bits vary run to run.
    pub deterministic: bool,
}

impl MmaBackwardConfig {
    /// The configuration of a 16-bit variant.
    pub fn new(spec: &VariantSpec) -> MmaBackwardConfig {
        let d = spec.head_size;
        let ab = match spec.dtype {
            DType::BF16 => Ty::BF16,
            _ => Ty::F16,
        };
        let odd_chunks = |bytes: usize| {
            let c = bytes / 16;
            (if c % 2 == 1 { c } else { c + 1 }) * 16
        };
        let block_m = 64;
        // Eight warps either way: 128 keys of one warp each up to head size
        // 128 (each Q and dO tile loaded serves 128 keys, and a query
        // block's dq takes half as many hand-overs), 64 keys of two warps
        // each above (dK and dV of a whole 16-key tile no longer fit one
        // warp's registers).
        let (block_n, col_parts) = if d > 128 { (64, 2) } else { (128, 1) };
        MmaBackwardConfig {
            d,
            ab,
            causal: spec.causal,
            block_n,
            block_m,
            col_parts,
            pitch: odd_chunks(d * 2),
            ds_pitch: odd_chunks(block_m * 2),
            deterministic: true,
        }
    }

    /// Warps per CTA.
    pub fn warps(&self) -> usize {
        self.block_n / 16 * self.col_parts
    }

    /// Threads per CTA.
    pub fn threads(&self) -> usize {
        self.warps() * 32
    }

    /// Byte offsets of the shared tiles: K, V, Q, dO (two buffers of Q
    /// then dO, [`MmaBackwardConfig::buffer_bytes`] apart), dSᵀ, lse,
    /// delta, the sequence's `u32` query rows, keys, first query token,
    /// first key token, query blocks and the CTA's steps (32 bytes), the
    /// step's mask bias (`f32 [block_m][block_n + 4]`),
    /// and the total.
    fn smem(&self) -> [usize; 10] {
        let (bn, bm, p) = (self.block_n, self.block_m, self.pitch);
        let k = 0;
        let v = k + bn * p;
        let q = v + bn * p;
        let dout = q + bm * p;
        let ds = q + 2 * self.buffer_bytes();
        let lse = ds + bn * self.ds_pitch;
        let delta = lse + bm * 4;
        // 32 bytes of slack: a warp's last column pair may read one 16-byte
        // chunk past the head dimension of the last row (never used).
        let seqs = delta + bm * 4;
        let bias = seqs + 32;
        let end = bias + bm * (bn + 4) * 4 + 32;
        [k, v, q, dout, ds, lse, delta, seqs, bias, end]
    }

    /// Bytes of one buffer of Q and dO tiles.
    fn buffer_bytes(&self) -> usize {
        2 * self.block_m * self.pitch
    }

    /// Dynamic shared memory per CTA without a mask, in bytes: everything
    /// before the mask's bias tile (which is last, and only touched when a
    /// mask is passed).
    pub fn smem_bytes(&self) -> usize {
        self.smem()[8]
    }

    /// The bytes a launch with a mask adds: the bias tile and its slack.
    pub fn mask_smem_bytes(&self) -> usize {
        self.smem()[9] - self.smem()[8]
    }

    /// n8 tiles of the head dimension.
    fn d_tiles(&self) -> usize {
        self.d / 8
    }

    /// n8 tiles of `dK` and `dV` each warp owns (the last may not exist
    /// for the last part).
    fn part_tiles(&self) -> usize {
        self.d_tiles().div_ceil(self.col_parts)
    }

    /// Warps sharing one 16-row tile of `dQ`.
    fn dq_parts(&self) -> usize {
        self.warps() / (self.block_m / 16)
    }

    /// n8 tiles of `dQ` each warp owns (the last may not exist for the
    /// last part).
    fn dq_tiles(&self) -> usize {
        self.d_tiles().div_ceil(self.dq_parts())
    }

    fn packed(&self) -> Ty {
        if self.ab == Ty::BF16 {
            Ty::BF16x2
        } else {
            Ty::F16x2
        }
    }
}

/// Generates the backward main kernel of a 16-bit variant, and its keys
/// per CTA.
pub(super) fn main_kernel(spec: &VariantSpec, target: Target) -> (GpuKernel, u32) {
    main_kernel_with(spec, MmaBackwardConfig::new(spec), target)
}

/// [`main_kernel`] with the configuration `cfg` (for tuning).
pub fn main_kernel_with(
    spec: &VariantSpec,
    cfg: MmaBackwardConfig,
    target: Target,
) -> (GpuKernel, u32) {
    let entry = super::entry(spec, "main");
    let k = main_body(spec, cfg);
    let kernel = GpuKernel {
        ptx: Module::new(target).kernel(k).to_string(),
        entry,
        target,
        block_m: cfg.block_m as u32,
        threads: cfg.threads() as u32,
        smem_bytes: cfg.smem_bytes() as u32,
        mask_smem_bytes: cfg.mask_smem_bytes() as u32,
        tensor_maps: None,
    };
    (kernel, cfg.block_n as u32)
}

/// The instructions of [`main_kernel_with`] (the interpreter's tests run
/// them).
pub(super) fn main_body(spec: &VariantSpec, cfg: MmaBackwardConfig) -> Kernel {
    Emitter {
        k: Kernel::new(super::entry(spec, "main")),
        cfg,
    }
    .emit()
}

/// Reads `u32` slot `i` of the sequence bounds the CTA keeps in shared
/// memory at byte `sm_seqs` (0 the rows, 1 the keys, 2 the first query's
/// token, 3 the first key's, 4 the query blocks, 5 the steps).
fn seq_slot(k: &mut Kernel, smem: Reg, sm_seqs: usize, i: usize) -> Reg {
    let dst = k.reg(Ty::U32);
    k.push(Instr::Ld {
        space: StateSpace::Shared,
        ty: Ty::U32,
        dst: vec![dst],
        addr: Addr::at(smem, (sm_seqs + 4 * i) as i64),
    });
    dst
}

fn u(x: usize) -> Operand {
    Operand::U(x as u64)
}

/// Per-thread chunk assignment for `cp.async` tile loads: `D/8` 16-byte
/// chunks per row, threads laid out row-major over them.
struct Loader {
    active: Reg,
    row: Reg,
    chunk_bytes: Reg,
    rows_per_pass: usize,
}

/// Lane row addresses of the four `ldmatrix` patterns over a tile.
#[derive(Clone, Copy)]
struct Lanes {
    /// A fragment, row-major tile: row `lane % 16`, chunk `lane / 16`.
    a: Reg,
    /// A fragment from a transposed tile: row `lane % 8 + 8·(lane / 16)`,
    /// chunk `(lane / 8) % 2`.
    a_tr: Reg,
    /// B fragments of two n8 tiles, `[n][k]` tile: row `8·(lane / 16) +
    /// lane % 8`, chunk `(lane / 8) % 2`.
    b: Reg,
    /// B fragments, `[k][n]` tile (transposed load): row `8·((lane / 8) %
    /// 2) + lane % 8`, chunk `lane / 16`.
    b_tr: Reg,
    /// The k8 tail's B fragments: row `lane`.
    b_tail: Reg,
}

struct Emitter {
    k: Kernel,
    cfg: MmaBackwardConfig,
}

/// A step's (head, query block) and what it reads.
struct Step {
    head: Reg,
    i0: Reg,
    qblock: Reg,
    /// `batch · Hq + head`, 64-bit.
    bh: Reg,
}

impl Emitter {
    fn loader(&mut self, tid: Reg) -> Loader {
        let chunks = self.cfg.d / 8;
        let rows_per_pass = self.cfg.threads() / chunks;
        let k = &mut self.k;
        let active = k.setp(Cmp::Lt, Ty::U32, tid, u(rows_per_pass * chunks));
        let row = k.bin(BinOp::Div, Ty::U32, tid, u(chunks));
        let chunk = k.bin(BinOp::Rem, Ty::U32, tid, u(chunks));
        let chunk_bytes = k.bin(BinOp::Shl, Ty::U32, chunk, Operand::U(4));
        Loader {
            active,
            row,
            chunk_bytes,
            rows_per_pass,
        }
    }

    /// `cp.async` copies of rows `row0 .. row0 + rows` of a tensor (byte
    /// base `base`, row stride `stride`) into the shared tile at `smem`;
    /// rows at or past `seq` are zero-filled without reading memory.
    #[allow(clippy::too_many_arguments)]
    fn load_rows(
        &mut self,
        ld: &Loader,
        smem: Reg,
        base: Reg,
        stride: Reg,
        row0: Reg,
        rows: usize,
        seq: Reg,
    ) {
        let pitch = self.cfg.pitch;
        let k = &mut self.k;
        let chunk64 = k.cvt(None, Ty::U64, Ty::U32, ld.chunk_bytes);
        let base = k.bin(BinOp::Add, Ty::U64, base, chunk64);
        let dst0 = k.mad(Ty::U32, ld.row, u(pitch), smem);
        let dst0 = k.bin(BinOp::Add, Ty::U32, dst0, ld.chunk_bytes);
        for pass in 0..rows.div_ceil(ld.rows_per_pass) {
            let local = pass * ld.rows_per_pass;
            let mut go = ld.active;
            if local + ld.rows_per_pass > rows {
                let fits = k.setp(Cmp::Lt, Ty::U32, ld.row, u(rows - local));
                let both = k.reg(Ty::Pred);
                k.bin_to(BinOp::And, Ty::Pred, both, go, fits);
                go = both;
            }
            let grow = k.bin(BinOp::Add, Ty::U32, row0, ld.row);
            let grow = k.bin(BinOp::Add, Ty::U32, grow, u(local));
            let valid = k.setp(Cmp::Lt, Ty::U32, grow, seq);
            let size = k.selp(Ty::U32, Operand::U(16), Operand::U(0), valid);
            // Rows past `seq` read nothing: their address is the base.
            let g64 = k.cvt(None, Ty::U64, Ty::U32, grow);
            let src = k.mad(Ty::U64, g64, stride, base);
            k.selp_to(Ty::U64, src, src, base, valid);
            k.guard(
                go,
                false,
                Instr::CpAsync16 {
                    dst: Addr::at(dst0, (local * pitch) as i64),
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

    fn mma(&mut self, acc: &[Reg], a: &[Reg], b: &[Reg]) {
        self.mma_into(MmaShape::M16N8K16, acc, a, b, acc);
    }

    /// The lane addresses of the `ldmatrix` patterns over the shared tile
    /// at `base` with rows `pitch` bytes apart.
    fn lanes(&mut self, lane: Reg, base: Reg, pitch: usize) -> Lanes {
        let k = &mut self.k;
        let l16 = k.bin(BinOp::And, Ty::U32, lane, Operand::U(15));
        let l8 = k.bin(BinOp::And, Ty::U32, lane, Operand::U(7));
        let hi16 = k.bin(BinOp::Shr, Ty::U32, lane, Operand::U(4));
        let bit3 = k.bin(BinOp::Shr, Ty::U32, lane, Operand::U(3));
        let bit3 = k.bin(BinOp::And, Ty::U32, bit3, Operand::U(1));
        let at = |k: &mut Kernel, row: Reg, chunk: Reg| {
            let a = k.mad(Ty::U32, row, u(pitch), base);
            k.mad(Ty::U32, chunk, Operand::U(16), a)
        };
        let a = at(k, l16, hi16);
        let row = k.mad(Ty::U32, hi16, Operand::U(8), l8);
        let a_tr = at(k, row, bit3);
        let b = at(k, row, bit3);
        let row = k.mad(Ty::U32, bit3, Operand::U(8), l8);
        let b_tr = at(k, row, hi16);
        let b_tail = k.mad(Ty::U32, lane, u(pitch), base);
        Lanes {
            a,
            a_tr,
            b,
            b_tr,
            b_tail,
        }
    }

    /// `acc[16 × block_m] = A·Bᵀ` over the head dimension: A the 16 rows at
    /// `a_row` of one `[rows, D]` tile, B the `block_m` rows of another.
    fn scores(&mut self, acc: &[Vec<Reg>], a: &Lanes, a_row: Reg, b: &Lanes, b_off: usize) {
        let cfg = self.cfg;
        let (d, p) = (cfg.d, cfg.pitch);
        let n_tiles = cfg.block_m / 8;
        let zeros: Vec<Reg> = (0..4)
            .map(|_| self.k.mov(Ty::F32, Operand::F32(0.0)))
            .collect();
        let a_lane = self.k.mad(Ty::U32, a_row, u(p), a.a);
        // Software-pipelined by one (k-step, column pair): the fragments of
        // the next product are loaded before this one's `mma`s issue.
        let jobs: Vec<(usize, usize)> = (0..d / 16)
            .flat_map(|kk| (0..n_tiles / 2).map(move |pair| (kk, pair)))
            .collect();
        let load = |s: &mut Self, (kk, pair): (usize, usize), af: Option<Vec<Reg>>| {
            let af = af.unwrap_or_else(|| s.ldmatrix(4, false, a_lane, kk * 32));
            let bf = s.ldmatrix(4, false, b.b, b_off + pair * 16 * p + kk * 32);
            (af, bf)
        };
        let mut next = jobs.first().map(|&job| load(self, job, None));
        for (i, &(kk, pair)) in jobs.iter().enumerate() {
            let (af, bf) = next.take().expect("fragments loaded one job ahead");
            if let Some(&job) = jobs.get(i + 1) {
                let same_k = (job.0 == kk).then(|| af.clone());
                next = Some(load(self, job, same_k));
            }
            let (c0, c1) = if kk == 0 {
                (zeros.clone(), zeros.clone())
            } else {
                (acc[2 * pair].clone(), acc[2 * pair + 1].clone())
            };
            self.mma_into(MmaShape::M16N8K16, &acc[2 * pair], &af, &bf[0..2], &c0);
            self.mma_into(MmaShape::M16N8K16, &acc[2 * pair + 1], &af, &bf[2..4], &c1);
        }
        if d % 16 == 8 {
            let first = d < 16;
            let af = self.ldmatrix(2, false, a_lane, (d - 8) * 2);
            for quad in 0..n_tiles / 4 {
                let bf = self.ldmatrix(4, false, b.b_tail, b_off + quad * 32 * p + (d - 8) * 2);
                for t in 0..4 {
                    let acc_t = acc[quad * 4 + t].clone();
                    let c = if first { zeros.clone() } else { acc_t.clone() };
                    self.mma_into(MmaShape::M16N8K8, &acc_t, &af, &bf[t..t + 1], &c);
                }
            }
        }
    }

    /// `acc += A·B` where A (16 × k) is given as A fragments per k16 step
    /// and B (k × this warp's columns) is read by `ldmatrix.trans` from the
    /// `[k][D]` tile whose lanes are `b` (already offset to the warp's
    /// first column), k16 step `kk` at row `k_row0(kk)`.
    fn products(&mut self, acc: &[Vec<Reg>], a: &[Reg], b_tr: Reg, k_row: usize, off: usize) {
        let p = self.cfg.pitch;
        let tiles = acc.len();
        // One column pair ahead: the next B fragments load under this
        // pair's `mma`s.
        let load =
            |s: &mut Self, pair: usize| s.ldmatrix(4, true, b_tr, off + k_row * p + pair * 32);
        let mut next = (tiles >= 2).then(|| load(self, 0));
        for pair in 0..tiles / 2 {
            let bf = next.take().expect("fragments loaded one pair ahead");
            if pair + 1 < tiles / 2 {
                next = Some(load(self, pair + 1));
            }
            self.mma(&acc[2 * pair], a, &bf[0..2]);
            self.mma(&acc[2 * pair + 1], a, &bf[2..4]);
        }
        if tiles % 2 == 1 {
            let last = tiles - 1;
            let bf = self.ldmatrix(2, true, b_tr, off + k_row * p + last * 16);
            self.mma(&acc[last], a, &bf);
        }
    }

    fn zeros(&mut self, tiles: usize) -> Vec<Vec<Reg>> {
        (0..tiles)
            .map(|_| {
                (0..4)
                    .map(|_| self.k.mov(Ty::F32, Operand::F32(0.0)))
                    .collect()
            })
            .collect()
    }

    /// The mask's bias of the step `st` (rows `i0 ..`, keys `j0 ..`), times
    /// `log2(e)`, into the shared tile at `s_bias` (`[block_m][block_n +
    /// 4]`, 0 for rows and keys outside the sequence and keys before
    /// `mask_pad`), then a barrier: coalesced loads of every element kind
    /// (one copy each behind uniform branches), before the scores, while
    /// few registers are live.
    #[allow(clippy::too_many_arguments)]
    fn mask_tile(
        &mut self,
        params: &Params,
        tid: Reg,
        j0: Reg,
        batch64: Reg,
        st: &Step,
        s_bias: Reg,
        sm_seqs: usize,
        smem: Reg,
    ) {
        let cfg = self.cfg;
        let (bm, bn) = (cfg.block_m, cfg.block_n);
        let rows_per_pass = cfg.threads() / bn;
        let bp = (bn + 4) * 4;
        let k = &mut self.k;
        let kind = params.get(k, "mask_kind");
        let [msb, msh, msq] = params.strides(k, "mask");
        let mask_ptr = params.get(k, "mask");
        let pad = params.get(k, "mask_pad");
        let [seq_q, seq_k] = [0, 1].map(|i| seq_slot(k, smem, sm_seqs, i));
        // Thread: key j0 + tid % block_n, rows tid / block_n + pass ·
        // rows_per_pass.
        let jj = k.bin(BinOp::And, Ty::U32, tid, u(bn - 1));
        let ii = k.bin(BinOp::Shr, Ty::U32, tid, u(bn.trailing_zeros() as usize));
        let key = k.bin(BinOp::Add, Ty::U32, j0, jj);
        // Key j reads column j - mask_pad; keys before the pad attend.
        let key_ok = k.setp(Cmp::Lt, Ty::U32, key, seq_k);
        let past_pad = k.setp(Cmp::Ge, Ty::U32, key, pad);
        k.bin_to(BinOp::And, Ty::Pred, key_ok, key_ok, past_pad);
        let h64 = k.cvt(None, Ty::U64, Ty::U32, st.head);
        let col = head_offset(k, batch64, h64, msb, msh);
        let key64 = k.cvt(None, Ty::U64, Ty::U32, key);
        let pad64 = k.cvt(None, Ty::U64, Ty::U32, pad);
        let col = k.bin(BinOp::Add, Ty::U64, col, key64);
        let col = k.bin(BinOp::Sub, Ty::U64, col, pad64);
        let row0 = k.bin(BinOp::Add, Ty::U32, st.i0, ii);
        let dst = k.mad(Ty::U32, ii, u(bp), s_bias);
        let dst = k.mad(Ty::U32, jj, Operand::U(4), dst);
        // A run-time loop of MASK_UNROLL passes an iteration: the loads in
        // flight take few registers.
        let passes = bm / rows_per_pass;
        let unroll = MASK_UNROLL.min(passes);
        per_kind(k, kind, |k, mk| {
            let row = k.mov(Ty::U32, row0);
            let at = k.mov(Ty::U32, dst);
            let end = k.bin(BinOp::Add, Ty::U32, row0, u(passes * rows_per_pass));
            let top = k.label("bwd_mask_rows");
            k.push(Instr::Label(top.clone()));
            for pass in 0..unroll {
                let r = k.bin(BinOp::Add, Ty::U32, row, u(pass * rows_per_pass));
                let ok = k.setp(Cmp::Lt, Ty::U32, r, seq_q);
                k.bin_to(BinOp::And, Ty::Pred, ok, ok, key_ok);
                let row64 = k.cvt(None, Ty::U64, Ty::U32, r);
                let off = k.mad(Ty::U64, row64, msq, col);
                let addr = k.mad(Ty::U64, off, Operand::U(mk.bytes()), mask_ptr);
                let bias = load_bias(k, mk, ok, Addr::at(addr, 0));
                k.bin_to(BinOp::Mul, Ty::F32, bias, bias, Operand::F32(LOG2E));
                k.push(Instr::St {
                    space: StateSpace::Shared,
                    ty: Ty::F32,
                    addr: Addr::at(at, (pass * rows_per_pass * bp) as i64),
                    src: vec![bias],
                });
            }
            k.bin_to(BinOp::Add, Ty::U32, row, row, u(unroll * rows_per_pass));
            k.bin_to(BinOp::Add, Ty::U32, at, at, u(unroll * rows_per_pass * bp));
            let more = k.setp(Cmp::Lt, Ty::U32, row, end);
            k.branch_if(more, false, &top);
        });
        k.push(Instr::BarSync(0));
    }

    fn shared_f32(&mut self, addr: Reg, offset: usize) -> Reg {
        let dst = self.k.reg(Ty::F32);
        self.k.push(Instr::Ld {
            space: StateSpace::Shared,
            ty: Ty::F32,
            dst: vec![dst],
            addr: Addr::at(addr, offset as i64),
        });
        dst
    }

    fn emit(mut self) -> Kernel {
        let cfg = self.cfg;
        let (d, bm, bn) = (cfg.d, cfg.block_m, cfg.block_n);
        let [sm_k, sm_v, sm_q, sm_do, sm_ds, sm_lse, sm_delta, sm_seqs, sm_bias, _] = cfg.smem();
        let m_tiles = bm / 8;
        let part_tiles = cfg.part_tiles();
        let packed = cfg.packed();

        let params = declare_table(&mut self.k, BACKWARD_PARAMS);
        self.k.launch_bounds(cfg.threads() as u32, None);
        self.k.dynamic_shared(128);
        self.k.comment(format!(
            "tensor-core attention backward: d={d} causal={} {}, {} warps, \
             {bn} keys x {bm} query rows, pitch {} B",
            cfg.causal,
            cfg.ab.name(),
            cfg.warps(),
            cfg.pitch
        ));
        let prm = |s: &mut Self, name: &str| params.get(&mut s.k, name);
        let k_ptr = prm(&mut self, "k");
        let v_ptr = prm(&mut self, "v");
        let mask_ptr = prm(&mut self, "mask");
        let sides = ["q", "k"].map(|x| Side {
            starts: prm(&mut self, &format!("{x}_start")),
            ends: prm(&mut self, &format!("{x}_end")),
            tokens: prm(&mut self, &format!("tokens_{x}")),
            bound: prm(&mut self, &format!("seq_{x}")),
        });
        let heads_q = prm(&mut self, "heads_q");
        let group = prm(&mut self, "group");
        let scale_log2 = prm(&mut self, "scale_log2");
        let scale = prm(&mut self, "scale");
        let ks = params.strides(&mut self.k, "k");
        let vs = params.strides(&mut self.k, "v");

        // ---- coordinates ----
        let k = &mut self.k;
        let tid = k.mov(Ty::U32, Operand::Special(Special::TidX));
        let kblock = k.mov(Ty::U32, Operand::Special(Special::CtaIdX));
        let kv_head = k.mov(Ty::U32, Operand::Special(Special::CtaIdY));
        let batch = k.mov(Ty::U32, Operand::Special(Special::CtaIdZ));
        // The batch entry's sequences: from here on `seq_q` and `seq_k` are
        // their lengths, and positions are local to them. A CTA whose keys
        // are all past the sequence's exits: a query block's contributors
        // are still a prefix of the key blocks, so no counter waits for it.
        let [sq, sk] = sides.map(|side| sequence(k, side, batch));
        let (seq_q, seq_k, q_start) = (sq.len, sk.len, sq.start);
        let j0 = k.bin(BinOp::Mul, Ty::U32, kblock, u(bn));
        let past = k.setp(Cmp::Ge, Ty::U32, j0, seq_k);
        k.guard(past, false, Instr::Ret);
        let lane = k.bin(BinOp::And, Ty::U32, tid, Operand::U(31));
        let warp = k.bin(BinOp::Shr, Ty::U32, tid, Operand::U(5));
        let g = k.bin(BinOp::Shr, Ty::U32, lane, Operand::U(2));
        let t = k.bin(BinOp::And, Ty::U32, lane, Operand::U(3));
        let t2 = k.bin(BinOp::Shl, Ty::U32, t, Operand::U(1));
        let key_tiles = bn / 16;
        let key_tile = k.bin(BinOp::Rem, Ty::U32, warp, u(key_tiles));
        let part = k.bin(BinOp::Div, Ty::U32, warp, u(key_tiles));
        let key_row = k.bin(BinOp::Shl, Ty::U32, key_tile, Operand::U(4));
        // This warp's first owned column of dK, dV (and dQ).
        let col0 = k.bin(BinOp::Mul, Ty::U32, part, u(part_tiles * 8));
        // Whether the warp's last owned n8 tile exists.
        let last_col = k.bin(BinOp::Add, Ty::U32, col0, u(part_tiles * 8 - 8));
        let last_tile_ok = k.setp(Cmp::Lt, Ty::U32, last_col, u(d));

        let (k_base, k_stride) = tensor_head(k, k_ptr, ks, batch, kv_head, 2);
        let (v_base, v_stride) = tensor_head(k, v_ptr, vs, batch, kv_head, 2);
        // Key 0 of the sequence.
        let ks64 = k.cvt(None, Ty::U64, Ty::U32, sk.start);
        let k_base = k.mad(Ty::U64, ks64, k_stride, k_base);
        let v_base = k.mad(Ty::U64, ks64, v_stride, v_base);
        let smem = k.mov(Ty::U32, Operand::Symbol("smem".into()));
        let at = |k: &mut Kernel, off: usize| k.bin(BinOp::Add, Ty::U32, smem, u(off));
        let s_k = at(k, sm_k);
        let s_v = at(k, sm_v);
        let s_q = at(k, sm_q);
        let s_do = at(k, sm_do);
        let s_ds = at(k, sm_ds);
        let s_lse = at(k, sm_lse);
        let s_delta = at(k, sm_delta);
        let s_bias = at(k, sm_bias);
        // The sequence's rows, keys and first tokens, in shared memory
        // for the loop: registers held across it would push the
        // accumulators out (the bounds are no longer parameters).
        let lead = k.setp(Cmp::Eq, Ty::U32, tid, Operand::U(0));
        // Query blocks of the sequence.
        let nqb = k.bin(BinOp::Add, Ty::U32, seq_q, u(bm - 1));
        let nqb = k.bin(BinOp::Div, Ty::U32, nqb, u(bm));
        // Steps: (query head of the group, query block), query blocks from
        // the first that sees the CTA's keys.
        let i_start = if cfg.causal {
            let i = k.bin(BinOp::Div, Ty::U32, j0, u(bm));
            k.bin(BinOp::Min, Ty::U32, i, nqb)
        } else {
            k.mov(Ty::U32, Operand::U(0))
        };
        let n_i = k.bin(BinOp::Sub, Ty::U32, nqb, i_start);
        let steps = k.bin(BinOp::Mul, Ty::U32, n_i, group);
        for (i, v) in [seq_q, seq_k, q_start, sk.start, nqb, steps]
            .into_iter()
            .enumerate()
        {
            k.guard(
                lead,
                false,
                Instr::St {
                    space: StateSpace::Shared,
                    ty: Ty::U32,
                    addr: Addr::at(smem, (sm_seqs + 4 * i) as i64),
                    src: vec![v],
                },
            );
        }
        k.push(Instr::BarSync(0));
        // Reads one of them: 0 the rows, 1 the keys, 2 the first query's
        // token, 3 the first key's, 4 the query blocks, 5 the steps.
        let seq_of = move |k: &mut Kernel, i: usize| seq_slot(k, smem, sm_seqs, i);

        let head0 = k.bin(BinOp::Mul, Ty::U32, kv_head, group);
        let batch64 = k.cvt(None, Ty::U64, Ty::U32, batch);
        let has_mask = k.setp(Cmp::Ne, Ty::U64, mask_ptr, Operand::U(0));
        // Every step masks element-wise where the CTA's keys reach past the
        // sequence's or there is a mask.
        let block_end = k.bin(BinOp::Add, Ty::U32, j0, u(bn));
        let ragged = k.setp(Cmp::Gt, Ty::U32, block_end, seq_k);
        k.bin_to(BinOp::Or, Ty::Pred, ragged, ragged, has_mask);

        // ---- K and V of the CTA ----
        let ld = self.loader(tid);
        self.load_rows(&ld, s_k, k_base, k_stride, j0, bn, seq_k);
        self.load_rows(&ld, s_v, v_base, v_stride, j0, bn, seq_k);
        self.k.push(Instr::CpAsyncCommit);

        let step_of = |s: &mut Self, step: Reg| {
            let k = &mut s.k;
            // Query blocks outermost, heads of the group innermost, and
            // causal CTAs from the last query block down: every CTA of the
            // (batch, K/V head) reaches a given (head, query block) at the
            // same step, so the hand-overs of `sem` come in lockstep
            // (causal CTAs going up from their diagonal would each wait
            // for the previous one's third step).
            let ii = k.bin(BinOp::Div, Ty::U32, step, group);
            let gi = k.bin(BinOp::Rem, Ty::U32, step, group);
            let head = k.bin(BinOp::Add, Ty::U32, head0, gi);
            let qblock = if s.cfg.causal {
                let nqb = seq_of(k, 4);
                let last = k.bin(BinOp::Sub, Ty::U32, nqb, Operand::U(1));
                k.bin(BinOp::Sub, Ty::U32, last, ii)
            } else {
                ii
            };
            let i0 = k.bin(BinOp::Mul, Ty::U32, qblock, u(bm));
            let bh = k.mad(Ty::U32, batch, heads_q, head);
            let bh = k.cvt(None, Ty::U64, Ty::U32, bh);
            Step {
                head,
                i0,
                qblock,
                bh,
            }
        };
        // Issues the loads of a step: Q and dO by cp.async, lse_log2 and
        // delta into registers (threads below block_m).
        let row_reader = self.k.setp(Cmp::Lt, Ty::U32, tid, u(bm));
        let issue_tiles = |s: &mut Self, st: &Step, boff: usize| {
            let k = &mut s.k;
            // Parameters are loaded where they are used: held across the
            // loop, they would take registers the accumulators need.
            let (q_ptr, qs) = (params.get(k, "q"), params.strides(k, "q"));
            let (do_ptr, dos) = (params.get(k, "dout"), params.strides(k, "dout"));
            let (q_base, q_stride) = tensor_head(k, q_ptr, qs, batch, st.head, 2);
            let (do_base, do_stride) = tensor_head(k, do_ptr, dos, batch, st.head, 2);
            // Row 0 of the sequence.
            let q_start = seq_of(k, 2);
            let qs64 = k.cvt(None, Ty::U64, Ty::U32, q_start);
            let q_base = k.mad(Ty::U64, qs64, q_stride, q_base);
            let do_base = k.mad(Ty::U64, qs64, do_stride, do_base);
            let dst_q = k.bin(BinOp::Add, Ty::U32, s_q, u(boff));
            let dst_do = k.bin(BinOp::Add, Ty::U32, s_do, u(boff));
            let seq_q = seq_of(k, 0);
            s.load_rows(&ld, dst_q, q_base, q_stride, st.i0, bm, seq_q);
            s.load_rows(&ld, dst_do, do_base, do_stride, st.i0, bm, seq_q);
            s.k.push(Instr::CpAsyncCommit);
        };
        let issue_rows = |s: &mut Self, st: &Step| -> (Reg, Reg) {
            let k = &mut s.k;
            let row = k.bin(BinOp::Add, Ty::U32, st.i0, tid);
            let seq_q = seq_of(k, 0);
            let ok = k.setp(Cmp::Lt, Ty::U32, row, seq_q);
            k.bin_to(BinOp::And, Ty::Pred, ok, ok, row_reader);
            // The scratch rows: Sq (the bound) per (batch, head).
            let bound = params.get(k, "seq_q");
            let sq64 = k.cvt(None, Ty::U64, Ty::U32, bound);
            let row64 = k.cvt(None, Ty::U64, Ty::U32, row);
            let dense = k.mad(Ty::U64, st.bh, sq64, row64);
            let dense4 = k.bin(BinOp::Shl, Ty::U64, dense, Operand::U(2));
            let lse = k.mov(Ty::F32, Operand::F32(f32::INFINITY));
            let delta = k.mov(Ty::F32, Operand::F32(0.0));
            for (dst, name) in [(lse, "lse_log2"), (delta, "delta")] {
                let ptr = params.get(k, name);
                let addr = k.bin(BinOp::Add, Ty::U64, ptr, dense4);
                k.guard(
                    ok,
                    false,
                    Instr::Ld {
                        space: StateSpace::Global,
                        ty: Ty::F32,
                        dst: vec![dst],
                        addr: Addr::at(addr, 0),
                    },
                );
            }
            (lse, delta)
        };

        // Accumulators.
        let dk_acc = self.zeros(part_tiles);
        let dv_acc = self.zeros(part_tiles);
        let s_acc: Vec<Vec<Reg>> = (0..m_tiles).map(|_| self.k.regs(Ty::F32, 4)).collect();
        let dp_acc: Vec<Vec<Reg>> = (0..m_tiles).map(|_| self.k.regs(Ty::F32, 4)).collect();

        // Lane addresses.
        let lk = self.lanes(lane, s_k, cfg.pitch);
        let lv = self.lanes(lane, s_v, cfg.pitch);
        let lq = self.lanes(lane, s_q, cfg.pitch);
        let ldo = self.lanes(lane, s_do, cfg.pitch);
        let lds = self.lanes(lane, s_ds, cfg.ds_pitch);
        let k = &mut self.k;
        let col_bytes = k.bin(BinOp::Shl, Ty::U32, col0, Operand::U(1));
        let q_tr = k.bin(BinOp::Add, Ty::U32, lq.b_tr, col_bytes);
        let do_tr = k.bin(BinOp::Add, Ty::U32, ldo.b_tr, col_bytes);

        let step = k.mov(Ty::U32, Operand::U(0));
        let done = k.label("bwd_end");
        let top = k.label("bwd_step");
        let none = k.setp(Cmp::Ge, Ty::U32, step, steps);
        k.branch_if(none, false, &done);
        let first = step_of(&mut self, step);
        issue_tiles(&mut self, &first, 0);
        let (lse_next, delta_next) = issue_rows(&mut self, &first);
        let top_odd = self.k.label("bwd_step_odd");
        // Two copies of the step, for even and odd steps: each reads one
        // buffer of Q and dO at immediate offsets and fills the other.
        for par in 0..2 {
            let boff = par * cfg.buffer_bytes();
            let next_boff = (1 - par) * cfg.buffer_bytes();
            let k = &mut self.k;
            k.push(Instr::Label(if par == 0 {
                top.clone()
            } else {
                top_odd.clone()
            }));
            let cur = step_of(&mut self, step);
            // ---- 0. the step's tiles have landed ----
            let k = &mut self.k;
            let row_lse = k.mad(Ty::U32, tid, Operand::U(4), s_lse);
            let row_delta = k.mad(Ty::U32, tid, Operand::U(4), s_delta);
            for (addr, v) in [(row_lse, lse_next), (row_delta, delta_next)] {
                k.guard(
                    row_reader,
                    false,
                    Instr::St {
                        space: StateSpace::Shared,
                        ty: Ty::F32,
                        addr: Addr::at(addr, 0),
                        src: vec![v],
                    },
                );
            }
            k.push(Instr::CpAsyncWait(0));
            k.push(Instr::BarSync(0));

            // The next step's loads, into the other buffer: past the barrier
            // every warp is done with it.
            k.bin_to(BinOp::Add, Ty::U32, step, step, Operand::U(1));
            let steps = seq_of(k, 5);
            let more = k.setp(Cmp::Lt, Ty::U32, step, steps);
            let no_next = k.label("bwd_no_next");
            k.branch_if(more, true, &no_next);
            let next = step_of(&mut self, step);
            issue_tiles(&mut self, &next, next_boff);
            self.k.push(Instr::Label(no_next));
            // The mask's tile for this step, into shared memory (every warp
            // is past its reads of the last step's).
            let no_mask = self.k.label("bwd_no_mask");
            self.k.branch_if(has_mask, true, &no_mask);
            self.mask_tile(&params, tid, j0, batch64, &cur, s_bias, sm_seqs, smem);
            self.k.push(Instr::Label(no_mask));

            // ---- 1. Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ ----
            self.scores(&s_acc, &lk, key_row, &lq, boff);

            // ---- 2. Pᵀ and dSᵀ ----
            // Thread element (r, n-tile nt, e): key j0 + key_row + g + 8r,
            // query i0 + 8nt + 2t + e.
            let k = &mut self.k;
            for acc in &s_acc {
                for &x in acc {
                    k.bin_to(BinOp::Mul, Ty::F32, x, x, scale_log2);
                }
            }
            let key_lo = k.bin(BinOp::Add, Ty::U32, j0, key_row);
            let key_lo = k.bin(BinOp::Add, Ty::U32, key_lo, g);
            let keys = [key_lo, k.bin(BinOp::Add, Ty::U32, key_lo, Operand::U(8))];
            // Does this block need element-wise masking?
            let need = if cfg.causal {
                let last_key = k.bin(BinOp::Add, Ty::U32, j0, u(bn - 1));
                let diag = k.setp(Cmp::Gt, Ty::U32, last_key, cur.i0);
                k.bin_to(BinOp::Or, Ty::Pred, diag, diag, ragged);
                diag
            } else {
                ragged
            };
            let skip = k.label("bwd_unmasked");
            k.branch_if(need, true, &skip);
            {
                let seq_k = seq_of(k, 1);
                let qcol0 = k.bin(BinOp::Add, Ty::U32, cur.i0, t2);
                // The mask's bias (log2 domain), from the step's tile in
                // shared memory.
                let no_bias = k.label("bwd_no_bias");
                k.branch_if(has_mask, true, &no_bias);
                let bp = (bn + 4) * 4;
                let at = k.mad(Ty::U32, t2, u(bp), s_bias);
                let key_lo = k.bin(BinOp::Add, Ty::U32, key_row, g);
                let at = k.mad(Ty::U32, key_lo, Operand::U(4), at);
                for (nt, acc) in s_acc.iter().enumerate() {
                    for e in 0..2 {
                        for r in 0..2 {
                            let bias = k.reg(Ty::F32);
                            k.push(Instr::Ld {
                                space: StateSpace::Shared,
                                ty: Ty::F32,
                                dst: vec![bias],
                                addr: Addr::at(at, ((8 * nt + e) * bp + 32 * r) as i64),
                            });
                            let x = acc[2 * r + e];
                            k.bin_to(BinOp::Add, Ty::F32, x, x, bias);
                        }
                    }
                }
                k.push(Instr::Label(no_bias));
                for (nt, acc) in s_acc.iter().enumerate() {
                    for e in 0..2 {
                        let q = k.bin(BinOp::Add, Ty::U32, qcol0, u(8 * nt + e));
                        for r in 0..2 {
                            let hide = k.setp(Cmp::Ge, Ty::U32, keys[r], seq_k);
                            if cfg.causal {
                                let after = k.setp(Cmp::Gt, Ty::U32, keys[r], q);
                                k.bin_to(BinOp::Or, Ty::Pred, hide, hide, after);
                            }
                            let x = acc[2 * r + e];
                            k.selp_to(Ty::F32, x, Operand::F32(f32::NEG_INFINITY), x, hide);
                        }
                    }
                }
            }
            k.push(Instr::Label(skip));
            // P = exp2(s - lse_log2[q]), before dP is formed: the mask's
            // temporaries and dP are never live together.
            let lane_col = k.bin(BinOp::Shl, Ty::U32, t2, Operand::U(2));
            let lse_at = k.bin(BinOp::Add, Ty::U32, s_lse, lane_col);
            for (nt, tile) in s_acc.iter().enumerate() {
                for e in 0..2 {
                    let lse = self.shared_f32(lse_at, (8 * nt + e) * 4);
                    let k = &mut self.k;
                    for r in 0..2 {
                        let x = tile[2 * r + e];
                        k.bin_to(BinOp::Sub, Ty::F32, x, x, lse);
                        k.un_to(UnOp::Ex2, Ty::F32, x, x);
                    }
                }
            }
            // dPᵀ = V·dOᵀ; dS = P (dP - delta[q]).
            self.scores(&dp_acc, &lv, key_row, &ldo, boff);
            let k = &mut self.k;
            let lane_col = k.bin(BinOp::Shl, Ty::U32, t2, Operand::U(2));
            let delta_at = k.bin(BinOp::Add, Ty::U32, s_delta, lane_col);
            for nt in 0..m_tiles {
                for e in 0..2 {
                    let delta = self.shared_f32(delta_at, (8 * nt + e) * 4);
                    let k = &mut self.k;
                    for r in 0..2 {
                        let i = 2 * r + e;
                        let (p, dp) = (s_acc[nt][i], dp_acc[nt][i]);
                        k.bin_to(BinOp::Sub, Ty::F32, dp, dp, delta);
                        k.bin_to(BinOp::Mul, Ty::F32, dp, dp, p);
                    }
                }
            }

            // ---- 3. dV += Pᵀ·dO, dK += dSᵀ·Q; dSᵀ to shared memory ----
            let ds_writer = self.k.setp(Cmp::Eq, Ty::U32, part, Operand::U(0));
            let ds_row = self.k.bin(BinOp::Add, Ty::U32, key_row, g);
            let ds_lane = self.k.mad(Ty::U32, ds_row, u(cfg.ds_pitch), s_ds);
            let ds_lane = self.k.mad(Ty::U32, t2, Operand::U(2), ds_lane);
            for kk in 0..bm / 16 {
                let k = &mut self.k;
                let pa = k.regs(Ty::B32, 4);
                pack_a_fragment(k, packed, &s_acc[2 * kk], &s_acc[2 * kk + 1], &pa);
                self.products(&dv_acc, &pa, do_tr, kk * 16, boff);
                let k = &mut self.k;
                let dsa = k.regs(Ty::B32, 4);
                pack_a_fragment(k, packed, &dp_acc[2 * kk], &dp_acc[2 * kk + 1], &dsa);
                // a0: (key g, query 16kk + 2t), a1: key g + 8, a2: query + 8,
                // a3: both.
                for (i, &w) in dsa.iter().enumerate() {
                    let off = (i % 2) * 8 * cfg.ds_pitch + (16 * kk + 8 * (i / 2)) * 2;
                    k.guard(
                        ds_writer,
                        false,
                        Instr::St {
                            space: StateSpace::Shared,
                            ty: Ty::B32,
                            addr: Addr::at(ds_lane, off as i64),
                            src: vec![w],
                        },
                    );
                }
                self.products(&dk_acc, &dsa, q_tr, kk * 16, boff);
            }
            self.k.push(Instr::BarSync(0));
            // The next step's lse and delta, under dQ (every warp is past its
            // reads of this step's).
            let no_rows = self.k.label("bwd_no_rows");
            self.k.branch_if(more, true, &no_rows);
            let next = step_of(&mut self, step);
            let (lse_n, delta_n) = issue_rows(&mut self, &next);
            let k = &mut self.k;
            k.mov_to(Ty::F32, lse_next, lse_n);
            k.mov_to(Ty::F32, delta_next, delta_n);
            k.push(Instr::Label(no_rows));

            // ---- 4. dQ = dS·K ----
            // The leader reads this query block's counter now; the products
            // hide the read, and in the steady state the turn has come.
            let k = &mut self.k;
            // sem holds ceil(Sq / block_m) counters (the bound Sq) per
            // (batch, head).
            let bound = params.get(k, "seq_q");
            let nqb_all = k.bin(BinOp::Add, Ty::U32, bound, u(bm - 1));
            let nqb_all = k.bin(BinOp::Div, Ty::U32, nqb_all, u(bm));
            let nqb64 = k.cvt(None, Ty::U64, Ty::U32, nqb_all);
            let qb64 = k.cvt(None, Ty::U64, Ty::U32, cur.qblock);
            let sem_i = k.mad(Ty::U64, cur.bh, nqb64, qb64);
            let sem_ptr = params.get(k, "sem");
            let sem_addr = k.mad(Ty::U64, sem_i, Operand::U(4), sem_ptr);
            let leader = k.setp(Cmp::Eq, Ty::U32, tid, Operand::U(0));
            let early = k.mov(Ty::U32, Operand::U(u32::MAX as u64));
            if cfg.deterministic {
                k.guard(
                    leader,
                    false,
                    Instr::LdRelaxed {
                        dst: early,
                        addr: Addr::at(sem_addr, 0),
                    },
                );
            }
            // Warp w: query rows 16·(w % (block_m / 16)), its columns' share.
            let q_tiles = bm / 16;
            let dq_tiles = cfg.dq_tiles();
            let k = &mut self.k;
            let mt = k.bin(BinOp::Rem, Ty::U32, warp, u(q_tiles));
            let q_row = k.bin(BinOp::Shl, Ty::U32, mt, Operand::U(4));
            let qpart = k.bin(BinOp::Div, Ty::U32, warp, u(q_tiles));
            let qcol0 = k.bin(BinOp::Mul, Ty::U32, qpart, u(dq_tiles * 8));
            let qcol_bytes = k.bin(BinOp::Shl, Ty::U32, qcol0, Operand::U(1));
            let k_tr_q = k.bin(BinOp::Add, Ty::U32, lk.b_tr, qcol_bytes);
            let q_last = k.bin(BinOp::Add, Ty::U32, qcol0, u(dq_tiles * 8 - 8));
            let q_last_ok = k.setp(Cmp::Lt, Ty::U32, q_last, u(d));
            let ds_a = k.bin(BinOp::Shl, Ty::U32, q_row, Operand::U(1));
            let ds_a = k.bin(BinOp::Add, Ty::U32, lds.a_tr, ds_a);
            let dq_acc = self.zeros(dq_tiles);
            for kk in 0..bn / 16 {
                let a = self.ldmatrix(4, true, ds_a, kk * 16 * cfg.ds_pitch);
                self.products(&dq_acc, &a, k_tr_q, kk * 16, 0);
            }

            // The semaphore: wait for key block `kblock`'s turn on this query
            // block, add, hand over to the next key block.
            let k = &mut self.k;
            if cfg.deterministic {
                let spun = k.label("bwd_turn");
                let spin = k.label("bwd_spin");
                // Divergent: only the leader goes on (a plain `bra`).
                k.guard(
                    leader,
                    true,
                    Instr::Bra {
                        target: spun.clone(),
                        uni: false,
                    },
                );
                // The early read saw the turn: a fence makes it an acquire.
                let not_yet = k.setp(Cmp::Ne, Ty::U32, early, kblock);
                k.branch_if(not_yet, false, &spin);
                k.push(Instr::FenceGpu);
                k.push(Instr::Bra {
                    target: spun.clone(),
                    uni: false,
                });
                k.push(Instr::Label(spin.clone()));
                let seen = k.reg(Ty::U32);
                k.push(Instr::LdAcquire {
                    dst: seen,
                    addr: Addr::at(sem_addr, 0),
                });
                let wait = k.setp(Cmp::Ne, Ty::U32, seen, kblock);
                k.branch_if(wait, false, &spin);
                k.push(Instr::Label(spun));
                k.push(Instr::BarSync(0));
            }
            // dq_accum[(bh · Sq + q) · D + c] += dQ.
            let bound = params.get(k, "seq_q");
            let sq64 = k.cvt(None, Ty::U64, Ty::U32, bound);
            let rows_base = k.bin(BinOp::Mul, Ty::U64, cur.bh, sq64);
            let seq_q = seq_of(k, 0);
            for r in 0..2 {
                let q = k.bin(BinOp::Add, Ty::U32, cur.i0, q_row);
                let q = k.bin(BinOp::Add, Ty::U32, q, g);
                let q = k.bin(BinOp::Add, Ty::U32, q, u(8 * r));
                let q_in = k.setp(Cmp::Lt, Ty::U32, q, seq_q);
                let q64 = k.cvt(None, Ty::U64, Ty::U32, q);
                let row = k.bin(BinOp::Add, Ty::U64, rows_base, q64);
                let row = k.bin(BinOp::Mul, Ty::U64, row, u(d));
                let c = k.bin(BinOp::Add, Ty::U32, qcol0, t2);
                let c64 = k.cvt(None, Ty::U64, Ty::U32, c);
                let e = k.bin(BinOp::Add, Ty::U64, row, c64);
                let accum_ptr = params.get(k, "dq_accum");
                let addr = k.mad(Ty::U64, e, Operand::U(4), accum_ptr);
                for (nt, acc) in dq_acc.iter().enumerate() {
                    let ok = if nt + 1 == dq_tiles && (d / 8) % cfg.dq_parts() != 0 {
                        let both = k.reg(Ty::Pred);
                        k.bin_to(BinOp::And, Ty::Pred, both, q_in, q_last_ok);
                        both
                    } else {
                        q_in
                    };
                    for e in 0..2 {
                        k.guard(
                            ok,
                            false,
                            Instr::RedAddF32 {
                                addr: Addr::at(addr, ((8 * nt + e) * 4) as i64),
                                src: acc[2 * r + e],
                            },
                        );
                    }
                }
            }
            // Every thread's additions, then the leader's release store: the
            // barrier orders the CTA's additions before it, and a release is
            // cumulative (it covers what the leader observed through the
            // barrier), as CUTLASS's semaphores rely on.
            if cfg.deterministic {
                k.push(Instr::BarSync(0));
                let next_turn = k.bin(BinOp::Add, Ty::U32, kblock, Operand::U(1));
                k.guard(
                    leader,
                    false,
                    Instr::StRelease {
                        addr: Addr::at(sem_addr, 0),
                        src: next_turn.into(),
                    },
                );
            }
            if par == 0 {
                k.branch_if(more, true, &done);
            } else {
                k.branch_if(more, false, &top);
            }
        }
        let k = &mut self.k;
        k.push(Instr::Label(done));

        // ---- the end: dK · scale and dV, in the input dtype ----
        let (dk_ptr, dks) = (params.get(k, "dk"), params.strides(k, "dk"));
        let (dv_ptr, dvs) = (params.get(k, "dv"), params.strides(k, "dv"));
        let (dk_base, dk_stride) = tensor_head(k, dk_ptr, dks, batch, kv_head, 2);
        let (dv_base, dv_stride) = tensor_head(k, dv_ptr, dvs, batch, kv_head, 2);
        // The sequence's first key.
        let k_start = seq_of(k, 3);
        let seq_k = seq_of(k, 1);
        let ks64 = k.cvt(None, Ty::U64, Ty::U32, k_start);
        let dk_base = k.mad(Ty::U64, ks64, dk_stride, dk_base);
        let dv_base = k.mad(Ty::U64, ks64, dv_stride, dv_base);
        let cbytes = k.bin(BinOp::Add, Ty::U32, col0, t2);
        let cbytes = k.bin(BinOp::Shl, Ty::U32, cbytes, Operand::U(1));
        let cbytes = k.cvt(None, Ty::U64, Ty::U32, cbytes);
        for r in 0..2 {
            let key = keys_at(k, j0, key_row, g, r);
            let key_in = k.setp(Cmp::Lt, Ty::U32, key, seq_k);
            let key64 = k.cvt(None, Ty::U64, Ty::U32, key);
            for (acc, base, stride, factor) in [
                (&dk_acc, dk_base, dk_stride, Some(scale)),
                (&dv_acc, dv_base, dv_stride, None),
            ] {
                let row = k.mad(Ty::U64, key64, stride, base);
                let row = k.bin(BinOp::Add, Ty::U64, row, cbytes);
                for (nt, tile) in acc.iter().enumerate() {
                    let ok = if nt + 1 == part_tiles && (d / 8) % cfg.col_parts != 0 {
                        let both = k.reg(Ty::Pred);
                        k.bin_to(BinOp::And, Ty::Pred, both, key_in, last_tile_ok);
                        both
                    } else {
                        key_in
                    };
                    let (lo, hi) = (tile[2 * r], tile[2 * r + 1]);
                    let (lo, hi) = match factor {
                        Some(f) => (
                            k.bin(BinOp::Mul, Ty::F32, lo, f),
                            k.bin(BinOp::Mul, Ty::F32, hi, f),
                        ),
                        None => (lo, hi),
                    };
                    let w = k.reg(Ty::B32);
                    k.push(Instr::CvtPack {
                        ty: packed,
                        dst: w,
                        hi,
                        lo,
                    });
                    k.guard(
                        ok,
                        false,
                        Instr::St {
                            space: StateSpace::Global,
                            ty: Ty::B32,
                            addr: Addr::at(row, (nt * 16) as i64),
                            src: vec![w],
                        },
                    );
                }
            }
        }
        k.push(Instr::CpAsyncWait(0));
        k.push(Instr::Ret);
        self.k
    }
}

/// Key `j0 + key_row + g + 8r`: row `r` of a thread's accumulator.
fn keys_at(k: &mut Kernel, j0: Reg, key_row: Reg, g: Reg, r: usize) -> Reg {
    let key = k.bin(BinOp::Add, Ty::U32, j0, key_row);
    let key = k.bin(BinOp::Add, Ty::U32, key, g);
    k.bin(BinOp::Add, Ty::U32, key, u(8 * r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fit_and_rows_are_odd_chunks() {
        for d in (8..=256).step_by(8) {
            let spec = VariantSpec::new(d, false, DType::BF16).unwrap();
            let c = MmaBackwardConfig::new(&spec);
            assert_eq!((c.pitch / 16) % 2, 1, "d={d}");
            assert_eq!((c.ds_pitch / 16) % 2, 1);
            let masked = c.smem_bytes() + c.mask_smem_bytes();
            assert!(masked <= 227 * 1024, "d={d}: {masked}");
            // Without a mask, the sizes A100s (163 KB per block) and
            // sm_86/89 parts (99 KB) ran before masks were staged in shared
            // memory: the bias tile costs only masked launches.
            if d <= 200 {
                assert!(c.smem_bytes() <= 163 * 1024, "d={d}: {}", c.smem_bytes());
            }
            if d <= 72 {
                assert!(c.smem_bytes() <= 99 * 1024, "d={d}: {}", c.smem_bytes());
            }
            assert_eq!(c.warps(), 8);
        }
    }

    #[test]
    fn uses_tensor_cores_and_the_semaphore() {
        let spec = VariantSpec::new(128, true, DType::BF16).unwrap();
        let (k, block_n) = main_kernel(&spec, Target::Sm80);
        assert_eq!(block_n, 128);
        for needle in [
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
            "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
            "cp.async.cg.shared.global",
            "ld.acquire.gpu.global.u32",
            "red.global.add.f32",
            "fence.acq_rel.gpu;",
            "st.release.gpu.global.u32",
            "ex2.approx",
        ] {
            assert!(k.ptx.contains(needle), "{needle}");
        }
    }
}

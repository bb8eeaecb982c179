//! The kernel's prologue, before the roles part: parameters, thread and
//! tile coordinates, tensor addresses, the shared-memory layout (Q, then
//! the K/V stages, then the mbarriers), the `wgmma` descriptors and the
//! consumers' registers.

use super::emitter::{desc_bits, Core, Emitter};
use super::schedule::{Tile, TileScheduler};
use crate::attention::mask::{key_blocks, mask_of_head};
use crate::attention::store::{exit_past_end, OutputRows};
use crate::attention::{sequence_of, SeqSide};
use crate::contract::{declare_params, declare_tensor_maps, load_args, tensor_head, Args};
use crate::ptx::{BinOp, Cmp, Operand, Param, Reg, Ty};

/// What the prologue leaves for the parts after it.
pub(super) struct Prologue {
    /// The tensor maps' parameters (Q, K, V).
    pub(super) maps: Vec<Param>,
    /// The thread index.
    pub(super) tid: Reg,
    /// The CTA's tile.
    pub(super) tile: Tile,
    /// The tile's first query row, local to its sequence.
    pub(super) q0: Reg,
    /// The query sequence's first token.
    pub(super) q_start: Reg,
    /// The key sequence's first token.
    pub(super) k_start: Reg,
    /// The batch strides of `q`, `k` and `v` (0: a packed tensor, whose
    /// tensor map has one batch entry).
    pub(super) batch_strides: [Reg; 3],
    /// The K/V head.
    pub(super) kv_head: Reg,
    /// The warpgroup of this thread (0: the producer).
    pub(super) wg: Reg,
    /// Q's shared tile (1024-byte aligned).
    pub(super) sq: Reg,
    /// Stage 0's K tile.
    pub(super) sk0: Reg,
    /// The descriptor of stage 0's K tile.
    pub(super) k_desc0: Reg,
    /// The descriptor of stage 0's V tile.
    pub(super) v_desc0: Reg,
    /// The tile's key blocks.
    pub(super) n_blocks: Reg,
    /// Where the consumer's output rows go, in the whole batch entry: the
    /// epilogue moves them on to the query sequence.
    pub(super) out: OutputRows,
    /// The contract's arguments, for the epilogue (`lse`, the query
    /// sequence).
    pub(super) args: Args,
    /// The consumer's products' and softmax's registers.
    pub(super) core: Core,
}

impl Emitter {
    /// Declares the parameters and emits everything both roles compute.
    pub(super) fn prologue(&mut self, sched: TileScheduler) -> Prologue {
        let cfg = self.cfg;
        let (d, bn, bm) = (cfg.head_size(), cfg.block_n(), cfg.block_m());
        let dp = cfg.d_pad();
        let params = declare_params(&mut self.k);
        let maps = declare_tensor_maps(&mut self.k);
        self.k.launch_bounds(cfg.threads() as u32, Some(1));
        self.k.dynamic_shared(1024);
        self.k.comment(format!(
            "wgmma attention: d={d} causal={} {}, a TMA producer warpgroup and {} consumer \
             warpgroups, block {bm}x{bn}, {} K/V stages, Q.K(n+1)^T issued with P.V(n), \
             lazy rescale {}",
            cfg.causal(),
            cfg.element().name(),
            cfg.wgs(),
            cfg.stages(),
            cfg.lazy_rescale(),
        ));

        // ---- parameters, thread and tile coordinates ----
        let k = &mut self.k;
        let a = load_args(k, &params);
        let [msb, msh, msq] = a.mask_strides;
        let (tid, tile) = sched.first_tile(k, cfg.causal());
        let lane = k.bin(BinOp::And, Ty::U32, tid, Operand::U(31));
        let warp = k.bin(BinOp::Shr, Ty::U32, tid, Operand::U(5));
        let wg = k.bin(BinOp::Shr, Ty::U32, tid, Operand::U(7));
        let g = k.bin(BinOp::Shr, Ty::U32, lane, Operand::U(2));
        let tq = k.bin(BinOp::And, Ty::U32, lane, Operand::U(3));
        let (q0, kv_head) = sched.rows(k, &tile, bm, a.group);
        // Rows and keys are local to the batch entry's sequences from here;
        // a tile past its sequence's end leaves before the barriers exist.
        let q_seq = sequence_of(k, &a, tile.batch, SeqSide::Queries);
        let k_seq = sequence_of(k, &a, tile.batch, SeqSide::Keys);
        exit_past_end(k, q0, q_seq.len);

        // Q, K and V are read through their tensor maps; only the output
        // (16-bit elements) is addressed from its pointer and strides (the
        // epilogue moves it on to the query sequence).
        let (o_base, o_stride) = tensor_head(k, a.out, a.out_strides, tile.batch, tile.head, 2);

        // Shared tiles, from a 1024-byte aligned base: Q, then the stages
        // of (K, V).
        let raw = k.mov(Ty::U32, Operand::Symbol("smem".into()));
        let sbase = k.bin(BinOp::Add, Ty::U32, raw, Operand::U(1023));
        let sq = k.bin(BinOp::And, Ty::U32, sbase, Operand::U(!1023u32 as u64));
        let sk0 = k.bin(BinOp::Add, Ty::U32, sq, Self::u(bm * dp * 2));
        // The consumer warpgroup of this thread (the producer is 0).
        let cwg = k.bin(BinOp::Sub, Ty::U32, wg, Operand::U(1));

        // ---- descriptors ----
        let k_bits = desc_bits(16, 1024);
        let v_bits = desc_bits(bn * 128, 1024);
        let wg_q = self.k.mad(Ty::U32, cwg, Self::u(64 * 128), sq);
        let q_desc = self.desc(wg_q, k_bits);
        let k_desc0 = self.desc(sk0, k_bits);
        // V follows K in each stage.
        let sv0 = self.k.bin(BinOp::Add, Ty::U32, sk0, Self::u(cfg.kv_tile()));
        let v_desc0 = self.desc(sv0, v_bits);
        let k = &mut self.k;

        // This thread's score rows: row0 and row0 + 8.
        let warp_in_wg = k.bin(BinOp::And, Ty::U32, warp, Operand::U(3));
        let row0 = k.mad(Ty::U32, cwg, Operand::U(64), q0);
        let row0 = k.mad(Ty::U32, warp_in_wg, Operand::U(16), row0);
        let row0 = k.bin(BinOp::Add, Ty::U32, row0, g);
        let n_blocks = key_blocks(k, q0, bm, bn, k_seq.len, cfg.causal());
        let (has_mask, mask_head) =
            mask_of_head(k, a.mask, a.mask_batches, tile.batch, tile.head, msb, msh);
        let zero = k.mov(Ty::U32, Operand::U(0));
        let p_true = k.setp(Cmp::Eq, Ty::U32, zero, Operand::U(0));
        let p_false = k.setp(Cmp::Ne, Ty::U32, zero, Operand::U(0));
        let neg_inf = Operand::F32(f32::NEG_INFINITY);
        let out = OutputRows {
            row0,
            tq,
            seq_q: a.seq_q,
            base: o_base,
            stride: o_stride,
        };
        let core = Core {
            s_acc: k.regs(Ty::F32, bn / 2),
            o_acc: (0..d / 2)
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
            negative_scale: k.setp(Cmp::Lt, Ty::F32, a.scale_log2, Operand::F32(0.0)),
            p_true,
            p_false,
            scale_log2: a.scale_log2,
            seq_q: a.seq_q,
            seq_k: k_seq.len,
            has_mask,
            mask_head,
            m_ptr: a.mask,
            msq,
            mask_kind: a.mask_kind,
            mask_pad: a.mask_pad,
            row0,
            tq2: k.bin(BinOp::Shl, Ty::U32, tq, Operand::U(1)),
            q0,
        };
        Prologue {
            maps,
            tid,
            tile,
            q0,
            q_start: q_seq.start,
            k_start: k_seq.start,
            batch_strides: [a.q_strides[0], a.k_strides[0], a.v_strides[0]],
            kv_head,
            wg,
            sq,
            sk0,
            k_desc0,
            v_desc0,
            n_blocks,
            out,
            args: a,
            core,
        }
    }
}

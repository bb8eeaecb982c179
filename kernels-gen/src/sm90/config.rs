//! The shape of a Hopper kernel: tiles, warpgroups, stages and the
//! structure options, with the shared-memory budget they take.

use crate::ptx::Ty;
use crate::{DType, VariantSpec};

/// Registers per thread of the producer warpgroup when warp-specialised;
/// the consumers share the rest of the 64 K register file
/// ([`Sm90Config::consumer_regs`]).
pub(super) const PRODUCER_REGS: u32 = 24;

/// The most dynamic shared memory a CTA may use on compute capability 9.0.
pub(super) const SMEM_LIMIT: usize = 232_448;

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
    /// With TMA: one thread per consumer warpgroup gives a stage back (the
    /// empty barriers count warpgroups; a `wgmma` group completes for the
    /// whole warpgroup), instead of every consumer thread.
    pub leader_release: bool,
}

impl Sm90Config {
    /// The configuration of a variant, or `None` where this kernel cannot
    /// apply (32-bit elements, head sizes not a multiple of 16 or above
    /// 256). [`super::generate`] further keeps to [`super::HEAD_SIZES`].
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
            leader_release: false,
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
    pub(super) fn kv_tile(&self) -> usize {
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
    pub(super) fn barrier_bytes(&self) -> usize {
        if self.tma {
            8 * (3 * self.stages() + 2)
        } else if self.producer {
            16 * self.stages()
        } else {
            0
        }
    }

    pub(super) fn packed(&self) -> Ty {
        if self.ab == Ty::BF16 {
            Ty::BF16x2
        } else {
            Ty::F16x2
        }
    }
}

//! What the production Hopper kernel varies: head size, element type,
//! causality, consumer warpgroups, keys per block, stages and the lazy
//! rescale; the registers and shared memory they take, checked where the
//! tuning values are set ([`Sm90Config::with_tiles`],
//! [`Sm90Config::with_stages`]) so that an illegal combination cannot be
//! built.

use std::fmt;

use crate::ptx::Ty;
use crate::{DType, VariantSpec};

/// Registers per thread of the producer warpgroup; the consumers share the
/// rest of the 64 K register file ([`Sm90Config::consumer_regs`]).
pub(super) const PRODUCER_REGS: u32 = 24;

/// The most dynamic shared memory a CTA may use on compute capability 9.0
/// (227 KB).
pub const SMEM_LIMIT: usize = 232_448;

/// The K/V stages the pipeline supports: at least two (the consumers wait
/// for block `n + 1` before giving block `n`'s stage back), at most three
/// ([`Sm90Config::stages`]).
const STAGES: std::ops::RangeInclusive<usize> = 2..=3;

/// The shape of one variant's sm_90a kernel: a producer warpgroup loading
/// with TMA and `wgs` consumer warpgroups of 64 query rows each, block
/// `n + 1`'s `Q·Kᵀ` issued with block `n`'s `P·V`.
///
/// Built by [`Sm90Config::new`] from a variant with the measured defaults;
/// it holds its variant ([`Sm90Config::spec`]), so the kernel it describes
/// is named and shaped by the same one. The tuning values change only
/// through the checked [`Sm90Config::with_tiles`],
/// [`Sm90Config::with_stages`] and [`Sm90Config::with_lazy_rescale`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sm90Config {
    spec: VariantSpec,
    ab: Ty,
    wgs: usize,
    block_n: usize,
    stages: usize,
    lazy_rescale: bool,
}

/// The bytes of the mbarriers of `stages` K/V stages: K-full, V-full and
/// empty per stage, then Q-full.
fn barrier_bytes(stages: usize) -> usize {
    8 * (3 * stages + 1)
}

/// Why a tuning of [`Sm90Config`] cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// Consumer warpgroups other than 2 or 3 (240 or 160 registers each).
    Warpgroups(usize),
    /// Keys per block not a multiple of 16 in `16..=256`: P's register
    /// fragments cover 16 keys, and `wgmma`'s N and a TMA box stop at 256.
    BlockN(usize),
    /// K/V stages other than 2 or 3.
    Stages(usize),
    /// S, P and O take more of a consumer thread's registers than leaves
    /// room for the rest ([`Sm90Config::consumer_regs`]).
    Registers {
        /// Accumulator and fragment registers per consumer thread.
        needed: usize,
        /// Registers per consumer thread.
        available: u32,
    },
    /// Q and the stages take more than [`SMEM_LIMIT`].
    SharedMemory {
        /// Dynamic shared memory the tiles need.
        bytes: usize,
        /// [`SMEM_LIMIT`].
        limit: usize,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ConfigError::Warpgroups(w) => {
                write!(f, "{w} consumer warpgroups: the kernel takes 2 or 3")
            }
            ConfigError::BlockN(n) => write!(
                f,
                "{n} keys per block: must be a multiple of 16 from 16 to 256"
            ),
            ConfigError::Stages(s) => write!(f, "{s} K/V stages: the pipeline takes 2 or 3"),
            ConfigError::Registers { needed, available } => write!(
                f,
                "S, P and O need {needed} registers per consumer thread, more than \
                 4/5 of the {available} it has (ptxas would spill or serialise wgmma)"
            ),
            ConfigError::SharedMemory { bytes, limit } => write!(
                f,
                "Q and the K/V stages need {bytes} bytes of shared memory, more than \
                 the {limit} a CTA may use"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Sm90Config {
    /// The configuration of a variant, or `None` where this kernel cannot
    /// apply (32-bit elements, head sizes not a multiple of 16 or above
    /// 256). [`super::generate`] further keeps to [`super::HEAD_SIZES`].
    ///
    /// Consumers and keys per block by head size (measured on an H100,
    /// `docs/hopper.md`): three consumers (160 registers) and 128-key
    /// blocks up to d=64, three and 96 keys at 80 to 112, two (240
    /// registers) and 128 keys at 128, 112 keys up to 192, 80 above; K/V
    /// stages as many as fit (2 or 3); the output rescaled lazily where not
    /// causal.
    pub fn new(spec: &VariantSpec) -> Option<Sm90Config> {
        let ab = match spec.dtype {
            DType::BF16 => Ty::BF16,
            DType::F16 => Ty::F16,
            DType::F32 => return None,
        };
        let d = spec.head_size;
        if !d.is_multiple_of(16) || d > 256 {
            return None;
        }
        // Three consumers (160 registers each) where S, P and O fit them:
        // 11-17% faster than two at d=64, 80 and 96, 4-7% at 48 and 112.
        // 128-key blocks at d=128: 160- and 176-key ones serialise `wgmma`
        // (ptxas C7512), 144-key ones ran 25% slower.
        let (wgs, block_n) = match d {
            0..=64 => (3, 128),
            65..=112 => (3, 96),
            113..=128 => (2, 128),
            129..=192 => (2, 112),
            _ => (2, 80),
        };
        let cfg = Sm90Config {
            spec: *spec,
            ab,
            wgs,
            block_n,
            stages: 0,
            // Measured on an H100: +2-5% without a mask of causality, a
            // loss with one (`docs/hopper.md`).
            lazy_rescale: !spec.causal,
        };
        Some(cfg.with_tiles(wgs, block_n).expect("the defaults fit"))
    }

    /// The same with `wgs` consumer warpgroups and `block_n` keys per
    /// block, and as many K/V stages as fit (two or three: the loop needs
    /// two, a third lets the producer run a block further ahead; the
    /// default since TMA, not timed against two where three fit). Errs
    /// where the combination
    /// cannot be built: warpgroups other than 2 or 3, `block_n` not a
    /// multiple of 16 up to 256, S, P and O beyond the consumers'
    /// registers, or two stages beyond [`SMEM_LIMIT`].
    pub fn with_tiles(self, wgs: usize, block_n: usize) -> Result<Sm90Config, ConfigError> {
        if !(2..=3).contains(&wgs) {
            return Err(ConfigError::Warpgroups(wgs));
        }
        if block_n == 0 || !block_n.is_multiple_of(16) || block_n > 256 {
            return Err(ConfigError::BlockN(block_n));
        }
        let tiled = Sm90Config {
            wgs,
            block_n,
            ..self
        };
        // As many stages as fit; two where none does (which errs).
        let stages = STAGES
            .rev()
            .find(|&s| tiled.smem_bytes_with(s) <= SMEM_LIMIT)
            .unwrap_or(*STAGES.start());
        tiled.with_stages(stages)
    }

    /// The same with `stages` K/V stages. Errs on other than 2 or 3
    /// stages, on tiles beyond the consumers' registers, or where Q and the
    /// stages exceed [`SMEM_LIMIT`].
    pub fn with_stages(self, stages: usize) -> Result<Sm90Config, ConfigError> {
        if !STAGES.contains(&stages) {
            return Err(ConfigError::Stages(stages));
        }
        let cfg = Sm90Config { stages, ..self };
        // S, P and O beside the addresses and the softmax's temporaries.
        // ptxas 13.5 (-arch=sm_90a): 128 of 160 registers assemble clean
        // (d=64 at 128 keys, d=112 at 96), 136 of 160 spill 64 bytes and
        // serialise `wgmma` (C7512; d=128 at 96 keys); 172 and 176 of 240
        // are clean (d=128 at 144 keys, d=64 at 192), 196 and 224 spill
        // (d=128 at 176 keys, d=64 at 256). 4/5 of the registers lies
        // between. The edge is not a count alone: 188 of 240 are clean at
        // d=256 (80 keys) while 184 spill at d=128 (160 keys), which this
        // check lets through; the ptxas test catches such a default.
        let needed = cfg.block_n / 2 + cfg.block_n / 4 + cfg.head_size() / 2;
        let available = cfg.consumer_regs();
        if 5 * needed > 4 * available as usize {
            return Err(ConfigError::Registers { needed, available });
        }
        let bytes = cfg.smem_bytes();
        if bytes > SMEM_LIMIT {
            return Err(ConfigError::SharedMemory {
                bytes,
                limit: SMEM_LIMIT,
            });
        }
        Ok(cfg)
    }

    /// The same with the lazy rescale of the output on or off (skip
    /// `O *= alpha` in a warp whose 16 rows all kept their maximum).
    pub fn with_lazy_rescale(self, on: bool) -> Sm90Config {
        Sm90Config {
            lazy_rescale: on,
            ..self
        }
    }

    /// The variant the kernel is generated for.
    pub fn spec(&self) -> &VariantSpec {
        &self.spec
    }

    /// Head size.
    pub fn head_size(&self) -> usize {
        self.spec.head_size
    }

    /// `BF16` or `F16`.
    pub fn element(&self) -> Ty {
        self.ab
    }

    /// Top-left causal.
    pub fn causal(&self) -> bool {
        self.spec.causal
    }

    /// Consumer warpgroups per CTA, 64 query rows each.
    pub fn wgs(&self) -> usize {
        self.wgs
    }

    /// Keys per block.
    pub fn block_n(&self) -> usize {
        self.block_n
    }

    /// K/V stages in shared memory.
    pub fn stages(&self) -> usize {
        self.stages
    }

    /// Skip `O *= alpha` in a warp whose 16 rows all kept their maximum
    /// (every `alpha` is 1), decided by a warp vote: the common case once
    /// the first blocks have set the row maxima.
    pub fn lazy_rescale(&self) -> bool {
        self.lazy_rescale
    }

    /// The width of the shared-memory tiles: `d` rounded up to whole
    /// 64-column swizzle panels (columns past `d` are never read).
    pub fn d_pad(&self) -> usize {
        self.head_size().next_multiple_of(64)
    }

    /// Query rows per CTA.
    pub fn block_m(&self) -> usize {
        64 * self.wgs
    }

    /// Threads per CTA: the producer warpgroup and the consumers.
    pub fn threads(&self) -> usize {
        128 * (self.wgs + 1)
    }

    /// Bytes of one K or V tile.
    pub(super) fn kv_tile(&self) -> usize {
        self.block_n * self.d_pad() * 2
    }

    /// Registers per consumer thread: what the producer leaves of the
    /// register file, in steps of 8, at most 240 (two consumers: 240,
    /// three: 160).
    pub fn consumer_regs(&self) -> u32 {
        let left = 65536 - 128 * PRODUCER_REGS as usize;
        ((left / (128 * self.wgs)) / 8 * 8).min(240) as u32
    }

    /// Dynamic shared memory: 1 KB of alignment slack, Q, a K and a V tile
    /// per stage, and the mbarriers.
    pub fn smem_bytes(&self) -> usize {
        self.smem_bytes_with(self.stages)
    }

    /// [`Sm90Config::smem_bytes`] with `stages` K/V stages.
    fn smem_bytes_with(&self, stages: usize) -> usize {
        1024 + self.block_m() * self.d_pad() * 2
            + 2 * stages * self.kv_tile()
            + barrier_bytes(stages)
    }

    /// The packed pair type of the element type.
    pub(super) fn packed(&self) -> Ty {
        if self.ab == Ty::BF16 {
            Ty::BF16x2
        } else {
            Ty::F16x2
        }
    }
}

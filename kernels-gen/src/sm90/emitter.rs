//! The state every part of the kernel writes into: the kernel being
//! emitted with its configuration, and the registers the consumers'
//! products, softmax and epilogue share.

use super::config::Sm90Config;
use crate::ptx::{Kernel, Operand, Reg};

/// The kernel under construction and its configuration; each part of the
/// kernel (`prologue`, `barriers`, `mainloop`, `producer`, `products`,
/// `softmax`, `epilogue`) adds its methods.
pub(super) struct Emitter {
    /// The kernel's body so far.
    pub(super) k: Kernel,
    /// Its configuration.
    pub(super) cfg: Sm90Config,
}

impl Emitter {
    /// An empty kernel named `name`.
    pub(super) fn new(name: &str, cfg: Sm90Config) -> Emitter {
        Emitter {
            k: Kernel::new(name),
            cfg,
        }
    }

    /// An unsigned immediate.
    pub(super) fn u(x: usize) -> Operand {
        Operand::U(x as u64)
    }
}

/// The descriptor bits other than the start address: 128-byte swizzle and
/// the two byte offsets.
pub(super) fn desc_bits(lbo: usize, sbo: usize) -> u64 {
    (((lbo >> 4) as u64) << 16) | (((sbo >> 4) as u64) << 32) | (1u64 << 62)
}

/// The registers of a consumer's products and softmax.
pub(super) struct Core {
    /// Scores, then weights: `block_n / 2` accumulators, slice-major.
    pub(super) s_acc: Vec<Reg>,
    /// The output accumulators: `d / 2`.
    pub(super) o_acc: Vec<Reg>,
    /// The weights as register A fragments, one per 16 keys.
    pub(super) p: Vec<[Reg; 4]>,
    /// The running maximum of each of the thread's two rows.
    pub(super) m_run: [Reg; 2],
    /// The running sum of each of the thread's two rows (its part of it).
    pub(super) l_run: [Reg; 2],
    /// The descriptor of the consumer warpgroup's rows of Q.
    pub(super) q_desc: Reg,
    /// `scale_log2 < 0`: every block takes the masking path.
    pub(super) negative_scale: Reg,
    /// A predicate that is always true.
    pub(super) p_true: Reg,
    /// A predicate that is always false.
    pub(super) p_false: Reg,
    /// `softmax_scale · log2(e)`.
    pub(super) scale_log2: Reg,
    /// `Sq`, the rows a mask holds ([`crate::attention::mask::FragmentMask`]).
    pub(super) seq_q: Reg,
    /// The key sequence's keys (`Sk` without sequence bounds).
    pub(super) seq_k: Reg,
    /// Whether a mask tensor was passed.
    pub(super) has_mask: Reg,
    /// The element offset of the mask's (batch, head).
    pub(super) mask_head: Reg,
    /// The mask's device pointer.
    pub(super) m_ptr: Reg,
    /// The mask's query-row stride.
    pub(super) msq: Reg,
    /// The mask's element kind (the contract's `mask_kind`).
    pub(super) mask_kind: Reg,
    /// The mask's front padding (the contract's `mask_pad`).
    pub(super) mask_pad: Reg,
    /// This thread's first score row (the other is 8 below), local to the
    /// sequence.
    pub(super) row0: Reg,
    /// `2 · (lane % 4)`: this thread's first key in each n8 slice.
    pub(super) tq2: Reg,
    /// The CTA's first query row.
    pub(super) q0: Reg,
}

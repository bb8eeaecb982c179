//! Per-call metadata, as FastVideo's `attn_metadata`.

use crate::mask::AttnMask;
use crate::varlen::VarLen;

/// What a forward call receives beside `q`, `k` and `v`.
///
/// ```
/// use sdpa_runtime::{AttentionMetadata, AttnMask};
/// let keep = vec![true; 2 * 16];
/// let meta = AttentionMetadata::new(7).with_mask(AttnMask::new(&keep, &[2, 16]).unwrap());
/// assert_eq!(meta.current_timestep, 7);
/// ```
#[derive(Clone, Debug, Default)]
pub struct AttentionMetadata<'a> {
    /// The diffusion timestep this call belongs to (informational).
    pub current_timestep: i64,
    /// An optional attention mask; see [`AttnMask`] for the accepted forms.
    pub attn_mask: Option<AttnMask<'a>>,
    /// An optional variable-length batch (packed tensors and their
    /// `cu_seqlens`); see [`VarLen`]. Not together with `attn_mask`.
    pub varlen: Option<VarLen<'a>>,
}

impl<'a> AttentionMetadata<'a> {
    /// Metadata for `current_timestep`, without a mask.
    pub fn new(current_timestep: i64) -> Self {
        AttentionMetadata {
            current_timestep,
            attn_mask: None,
            varlen: None,
        }
    }

    /// Adds an attention mask.
    pub fn with_mask(mut self, mask: AttnMask<'a>) -> Self {
        self.attn_mask = Some(mask);
        self
    }

    /// Makes the call a variable-length batch: `q`, `k` and `v` (and the
    /// outputs) packed as `[1, T, H, D]`, sequences given by `varlen`.
    pub fn with_varlen(mut self, varlen: VarLen<'a>) -> Self {
        self.varlen = Some(varlen);
        self
    }
}

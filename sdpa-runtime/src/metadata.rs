//! Per-call metadata, as FastVideo's `attn_metadata`.

use crate::mask::AttnMask;

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
}

impl<'a> AttentionMetadata<'a> {
    /// Metadata for `current_timestep`, without a mask.
    pub fn new(current_timestep: i64) -> Self {
        AttentionMetadata {
            current_timestep,
            attn_mask: None,
        }
    }

    /// Adds an attention mask.
    pub fn with_mask(mut self, mask: AttnMask<'a>) -> Self {
        self.attn_mask = Some(mask);
        self
    }
}

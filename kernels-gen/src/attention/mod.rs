//! The attention rules every GPU emitter shares, written once: the mask
//! bias and the hiding of keys that do not exist for a row ([`mask`]), the
//! online-softmax row update and the reductions across a fragment row
//! ([`softmax`]), and the scaled 16-bit output stores ([`store`]).
//!
//! The pieces work on the score accumulators through [`AccFragment`]: which
//! query rows and key columns a thread's accumulator registers hold.

pub mod layout;
pub mod mask;
pub mod softmax;
pub mod store;

pub use layout::AccFragment;

//! Sequence-parallel attention across ranks, as FastVideo's
//! `DistributedAttention` (DeepSpeed-Ulysses).
//!
//! Video models outgrow one GPU: the token sequence is split across `P`
//! ranks, and around each attention call an all-to-all trades sequence for
//! heads, so each rank attends over the whole sequence for `H/P` heads, then
//! trades back. The wire is a [`Communicator`]:
//!
//! - [`NcclCommunicator`] (feature `nccl`, on by default): CUDA devices
//!   over NCCL, either one process driving several GPUs
//!   ([`NcclCommunicator::for_devices`], a thread per rank) or one process
//!   per GPU ([`NcclCommunicator::for_rank`] with an [`NcclId`] passed by
//!   the launcher).
//! - [`ThreadCommunicator`]: ranks that are threads of one process,
//!   exchanging host buffers; the whole layer runs without a GPU.
//!
//! [`DistributedAttention`] is the layer: build it from a backend, the
//! layer's global [`AttentionParams`](crate::AttentionParams) and this
//! rank's communicator; call [`forward`](DistributedAttention::forward) on
//! every rank.

// Without the `nccl` feature the links to the NCCL communicator above
// have no target; the text still says what the feature adds.
#![cfg_attr(not(feature = "nccl"), allow(rustdoc::broken_intra_doc_links))]

mod communicator;
mod copy;
mod layer;
#[cfg(feature = "nccl")]
mod nccl;
mod threads;

pub use communicator::{CommBuffer, Communicator, Transfer};
pub use layer::{DistributedAttention, DistributedOutput, Replicated, SequenceParallel};
#[cfg(feature = "nccl")]
pub use nccl::{nccl_available, NcclCommunicator, NcclId};
pub use threads::{ThreadCommunicator, DEFAULT_TIMEOUT};

//! What a sequence-parallel layer needs from the wire: ranks, buffers where
//! the ranks' memory lives, and grouped point-to-point exchanges.

use cudarc::driver::CudaSlice;

use crate::error::Result;
use crate::layout::Layout;
use crate::select::Residence;
use crate::storage::{CudaRef, CudaRefMut};
use crate::tensor::{Tensor, TensorView, TensorViewMut};
use crate::Element;

/// One block of a buffer sent to, or received from, one peer.
///
/// `offset` and `len` count elements of the buffer it refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// The rank at the other end.
    pub peer: usize,
    /// The first element of the block.
    pub offset: usize,
    /// The number of elements.
    pub len: usize,
}

/// A communicator's working buffer: host memory for an in-process group of
/// threads, device memory (on the communicator's stream) for NCCL.
#[derive(Debug)]
pub enum CommBuffer<T> {
    /// Host memory.
    Host(Vec<T>),
    /// CUDA device memory.
    Cuda(CudaSlice<T>),
}

impl<T> CommBuffer<T> {
    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            CommBuffer::Host(v) => v.len(),
            CommBuffer::Cuda(s) => s.len(),
        }
    }

    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Element> CommBuffer<T> {
    /// A tensor view of the buffer with `layout`.
    pub fn view(&self, layout: Layout) -> Result<TensorView<'_>> {
        match self {
            CommBuffer::Host(v) => TensorView::new(T::host(v), layout),
            CommBuffer::Cuda(s) => TensorView::new_cuda(T::cuda(CudaRef::Slice(s)), layout),
        }
    }

    /// A writable tensor view of the buffer with `layout`.
    pub fn view_mut(&mut self, layout: Layout) -> Result<TensorViewMut<'_>> {
        match self {
            CommBuffer::Host(v) => TensorViewMut::new(T::host_mut(v), layout),
            CommBuffer::Cuda(s) => {
                TensorViewMut::new_cuda(T::cuda_mut(CudaRefMut::from(s)), layout)
            }
        }
    }

    /// The buffer as a contiguous tensor of `shape`; it must hold the
    /// shape's elements (a device buffer may hold one more for an empty
    /// shape).
    pub fn into_tensor(self, shape: [usize; 4]) -> Result<Tensor> {
        match self {
            CommBuffer::Host(v) => Tensor::from_vec(v, shape),
            CommBuffer::Cuda(s) => {
                let n: usize = shape.iter().product();
                if s.len() < n {
                    return Err(crate::SdpaError::Shape(format!(
                        "a buffer of {} elements cannot hold shape {shape:?}",
                        s.len()
                    )));
                }
                Ok(Tensor::from_cuda_owned(T::cuda_owned(s), shape))
            }
        }
    }
}

/// A group of ranks that exchange blocks of elements, one object per rank.
///
/// Every rank of a group must make the same sequence of calls with matching
/// transfers (what rank `a` sends to `b` is what `b` receives from `a`, in
/// the same order and of the same length), as with NCCL's collectives: a
/// rank that skips a call leaves its peers waiting.
///
/// Implemented by [`ThreadCommunicator`](super::ThreadCommunicator) (threads
/// of one process exchanging host buffers) and
/// [`NcclCommunicator`](super::NcclCommunicator) (CUDA devices over NCCL).
pub trait Communicator: Send + Sync {
    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Where this rank's tensors and buffers live.
    fn residence(&self) -> Residence;

    /// A buffer of `len` elements where this rank's memory lives. Its
    /// contents are unspecified: the layer writes every element before it
    /// reads or sends it.
    fn alloc<T: Element>(&self, len: usize) -> Result<CommBuffer<T>>;

    /// One grouped exchange: every block of `sends` leaves from `send`, every
    /// block of `recvs` arrives in `recv`. Blocks to or from this rank itself
    /// are copied locally. Blocks between one pair of ranks are matched in
    /// the order they are listed.
    fn exchange<T: Element>(
        &self,
        send: &CommBuffer<T>,
        sends: &[Transfer],
        recv: &mut CommBuffer<T>,
        recvs: &[Transfer],
    ) -> Result<()>;
}

/// Checks that every transfer lies inside a buffer of `len` elements and
/// names a rank of the group.
pub(crate) fn check_transfers(
    what: &str,
    transfers: &[Transfer],
    len: usize,
    world_size: usize,
) -> Result<()> {
    for t in transfers {
        if t.peer >= world_size {
            return Err(crate::SdpaError::Communication(format!(
                "a {what} block names rank {} of a group of {world_size}; peers are 0..{world_size}",
                t.peer
            )));
        }
        let end = t.offset.checked_add(t.len);
        if end.is_none_or(|end| end > len) {
            return Err(crate::SdpaError::Communication(format!(
                "a {what} block of {} elements at offset {} runs past its buffer of {len} elements",
                t.len, t.offset
            )));
        }
    }
    Ok(())
}

//! [`NcclCommunicator`]: ranks that are CUDA devices, exchanging device
//! buffers through NCCL's grouped send and receive.
//!
//! Needs the `nccl` feature (on by default). NCCL is opened at run time
//! (cudarc's dynamic loading) under the name
//! `libnccl.so`; the `nvidia-nccl-cu12`/`-cu13` wheels ship it as
//! `libnccl.so.2`, so point a `libnccl.so` link at that file from a folder on
//! `LD_LIBRARY_PATH`. [`nccl_available`] says whether it was found.

use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::CudaStream;
use cudarc::nccl::{group_end, group_start, Comm, Id};

use super::communicator::{check_transfers, CommBuffer, Communicator, Transfer};
use crate::error::{Result, SdpaError};
use crate::select::Residence;
use crate::Element;

/// Whether the NCCL library can be opened.
pub fn nccl_available() -> bool {
    crate::cuda_libs::nccl_present()
}

fn require_nccl() -> Result<()> {
    if nccl_available() {
        Ok(())
    } else {
        Err(SdpaError::BackendUnavailable {
            backend: "nccl",
            reason: "libnccl.so was not found on the loader path; install NCCL (or the \
                     nvidia-nccl-cu12/cu13 wheel) and put a `libnccl.so` link to its \
                     libnccl.so.2 in a folder on LD_LIBRARY_PATH"
                .into(),
        })
    }
}

fn nccl_error(doing: &str, e: cudarc::nccl::result::NcclError) -> SdpaError {
    SdpaError::Communication(format!("NCCL: {doing}: {e:?}"))
}

fn byte_view_error() -> SdpaError {
    SdpaError::Communication("internal: a block could not be viewed as bytes".into())
}

/// The unique id that ties the ranks of one NCCL group together: made once
/// (by rank 0, say), then passed to every rank by the launcher as 128 bytes.
#[derive(Clone, Copy, Debug)]
pub struct NcclId(Id);

impl NcclId {
    /// A new id (this opens NCCL, but needs no device).
    pub fn new() -> Result<NcclId> {
        require_nccl()?;
        Id::new()
            .map(NcclId)
            .map_err(|e| nccl_error("making a unique id", e))
    }

    /// The id's bytes, to hand to the other ranks.
    pub fn to_bytes(&self) -> [u8; 128] {
        self.0.internal().map(|c| c as u8)
    }

    /// The id made by another rank, from its bytes.
    pub fn from_bytes(bytes: [u8; 128]) -> NcclId {
        NcclId(Id::uninit(bytes.map(|b| b as std::ffi::c_char)))
    }
}

/// An NCCL communicator handle, moved between threads but used by one at a
/// time (the mutex in [`NcclCommunicator`]).
struct CommHandle(Comm);

// SAFETY: an NCCL communicator may be used from any host thread as long as
// calls on it do not overlap; `NcclCommunicator` keeps it behind a mutex.
unsafe impl Send for CommHandle {}

/// One rank of an NCCL group: one CUDA device, its stream, and the
/// communicator.
///
/// The layer's buffers and kernels go on [`stream`](Self::stream); put the
/// inputs there too (or on a stream of the same device, which cudarc orders
/// against it).
pub struct NcclCommunicator {
    comm: Mutex<CommHandle>,
    stream: Arc<CudaStream>,
    rank: usize,
    world_size: usize,
}

impl std::fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("ordinal", &self.stream.context().ordinal())
            .finish()
    }
}

impl NcclCommunicator {
    /// One process driving several GPUs: a group with one rank per ordinal,
    /// rank `i` on device `ordinals[i]`. Drive each rank from its own
    /// thread (a forward call waits for its peers).
    pub fn for_devices(ordinals: &[usize]) -> Result<Vec<NcclCommunicator>> {
        require_nccl()?;
        if ordinals.is_empty() {
            return Err(SdpaError::Communication(
                "a group needs at least one device; pass one ordinal or more".into(),
            ));
        }
        let streams = ordinals
            .iter()
            .map(|&o| {
                let ctx = crate::cuda::context(o)?;
                ctx.new_stream()
                    .map_err(|e| SdpaError::cuda(format!("making a stream on device {o}"), e))
            })
            .collect::<Result<Vec<_>>>()?;
        let comms = Comm::from_devices(streams.clone())
            .map_err(|e| nccl_error("initialising the group (ncclCommInitAll)", e))?;
        let world_size = comms.len();
        Ok(comms
            .into_iter()
            .zip(streams)
            .enumerate()
            .map(|(rank, (comm, stream))| NcclCommunicator {
                comm: Mutex::new(CommHandle(comm)),
                stream,
                rank,
                world_size,
            })
            .collect())
    }

    /// One process per GPU: this process's rank on device `ordinal`, in a
    /// group of `world_size` ranks sharing `id`. Blocks until every rank has
    /// joined.
    pub fn for_rank(
        ordinal: usize,
        rank: usize,
        world_size: usize,
        id: &NcclId,
    ) -> Result<NcclCommunicator> {
        require_nccl()?;
        if rank >= world_size {
            return Err(SdpaError::Communication(format!(
                "rank {rank} is outside a group of {world_size}; ranks are 0..{world_size}"
            )));
        }
        let ctx = crate::cuda::context(ordinal)?;
        let stream = ctx
            .new_stream()
            .map_err(|e| SdpaError::cuda(format!("making a stream on device {ordinal}"), e))?;
        let comm = Comm::from_rank(stream.clone(), rank, world_size, id.0)
            .map_err(|e| nccl_error("joining the group (ncclCommInitRank)", e))?;
        Ok(NcclCommunicator {
            comm: Mutex::new(CommHandle(comm)),
            stream,
            rank,
            world_size,
        })
    }

    /// The stream this rank's exchanges, copies and kernels run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

fn in_host_memory(what: &str) -> SdpaError {
    SdpaError::Residence(format!(
        "NcclCommunicator exchanges device buffers but the {what} buffer is in host memory; \
         use ThreadCommunicator for host memory"
    ))
}

fn device<'a, T>(buf: &'a CommBuffer<T>, what: &str) -> Result<&'a cudarc::driver::CudaSlice<T>> {
    match buf {
        CommBuffer::Cuda(s) => Ok(s),
        CommBuffer::Host(_) => Err(in_host_memory(what)),
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn residence(&self) -> Residence {
        Residence::Cuda {
            ordinal: self.stream.context().ordinal(),
        }
    }

    fn alloc<T: Element>(&self, len: usize) -> Result<CommBuffer<T>> {
        self.stream
            .alloc_zeros::<T>(len.max(1))
            .map(CommBuffer::Cuda)
            .map_err(|e| SdpaError::cuda(format!("allocating {len} elements"), e))
    }

    fn exchange<T: Element>(
        &self,
        send: &CommBuffer<T>,
        sends: &[Transfer],
        recv: &mut CommBuffer<T>,
        recvs: &[Transfer],
    ) -> Result<()> {
        let src = device(send, "send")?;
        let CommBuffer::Cuda(dst) = recv else {
            return Err(in_host_memory("receive"));
        };
        check_transfers("send", sends, src.len(), self.world_size)?;
        check_transfers("receive", recvs, dst.len(), self.world_size)?;
        let bytes = std::mem::size_of::<T>();
        let comm = self.comm.lock().unwrap_or_else(PoisonError::into_inner);
        let mut to_self = sends.iter().filter(|t| t.peer == self.rank);
        let mut first_error = None;
        group_start().map_err(|e| nccl_error("ncclGroupStart", e))?;
        for t in sends.iter().filter(|t| t.peer != self.rank && t.len > 0) {
            let block = src.slice(t.offset..t.offset + t.len);
            // SAFETY: a view of the same bytes as u8; every element type here
            // is plain old data.
            match unsafe { block.transmute::<u8>(t.len * bytes) } {
                Some(block) => {
                    if let Err(e) = comm.0.send(&block, t.peer as i32) {
                        first_error.get_or_insert(nccl_error("ncclSend", e));
                    }
                }
                None => {
                    first_error.get_or_insert(byte_view_error());
                }
            }
        }
        for t in recvs.iter().filter(|t| t.peer != self.rank && t.len > 0) {
            let mut block = dst.slice_mut(t.offset..t.offset + t.len);
            // SAFETY: as above.
            match unsafe { block.transmute_mut::<u8>(t.len * bytes) } {
                Some(mut block) => {
                    if let Err(e) = comm.0.recv(&mut block, t.peer as i32) {
                        first_error.get_or_insert(nccl_error("ncclRecv", e));
                    }
                }
                None => {
                    first_error.get_or_insert(byte_view_error());
                }
            }
        }
        let ended = group_end().map_err(|e| nccl_error("ncclGroupEnd", e));
        if let Some(e) = first_error {
            return Err(e);
        }
        ended?;
        for t in recvs.iter().filter(|t| t.peer == self.rank) {
            let s = to_self.next().ok_or_else(|| {
                SdpaError::Communication(format!(
                    "rank {} receives a block from itself that it does not send",
                    self.rank
                ))
            })?;
            if s.len != t.len {
                return Err(SdpaError::Communication(format!(
                    "rank {} sends itself {} elements but receives {}",
                    self.rank, s.len, t.len
                )));
            }
            let from = src.slice(s.offset..s.offset + s.len);
            let mut to = dst.slice_mut(t.offset..t.offset + t.len);
            self.stream
                .memcpy_dtod(&from, &mut to)
                .map_err(|e| SdpaError::cuda("copying a rank's own block", e))?;
        }
        Ok(())
    }
}

//! [`ThreadCommunicator`]: ranks that are threads of one process, exchanging
//! host buffers. It runs the whole sequence-parallel layer without a GPU, so
//! CI tests every rank count.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use super::communicator::{check_transfers, CommBuffer, Communicator, Transfer};
use crate::error::{Result, SdpaError};
use crate::select::Residence;
use crate::Element;

/// How long a rank waits for its peers at an exchange before it reports
/// them missing, unless [`ThreadCommunicator::group_with_timeout`] says
/// otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// One rank of an in-process group: the ranks are threads, blocks travel
/// through shared mailboxes in host memory.
///
/// ```
/// use sdpa_runtime::distributed::{Communicator, ThreadCommunicator};
/// let ranks = ThreadCommunicator::group(2).unwrap();
/// assert_eq!(ranks[1].rank(), 1);
/// assert_eq!(ranks[1].world_size(), 2);
/// ```
#[derive(Clone, Debug)]
pub struct ThreadCommunicator {
    rank: usize,
    shared: Arc<Shared>,
}

type Message = Box<dyn Any + Send>;

#[derive(Debug)]
struct Shared {
    world_size: usize,
    /// `mailboxes[src * world_size + dst]`: blocks in flight from `src` to `dst`.
    mailboxes: Vec<Mutex<VecDeque<Message>>>,
    barrier: TimedBarrier,
}

impl ThreadCommunicator {
    /// The `world_size` ranks of a new group, in rank order; hand one to
    /// each thread.
    pub fn group(world_size: usize) -> Result<Vec<ThreadCommunicator>> {
        Self::group_with_timeout(world_size, DEFAULT_TIMEOUT)
    }

    /// As [`group`](Self::group), with how long a rank waits for its peers
    /// at an exchange before it returns an error.
    pub fn group_with_timeout(
        world_size: usize,
        timeout: Duration,
    ) -> Result<Vec<ThreadCommunicator>> {
        if world_size == 0 {
            return Err(SdpaError::Communication(
                "a group needs at least one rank; pass world_size >= 1".into(),
            ));
        }
        let shared = Arc::new(Shared {
            world_size,
            mailboxes: (0..world_size * world_size)
                .map(|_| Mutex::new(VecDeque::new()))
                .collect(),
            barrier: TimedBarrier::new(world_size, timeout),
        });
        Ok((0..world_size)
            .map(|rank| ThreadCommunicator {
                rank,
                shared: shared.clone(),
            })
            .collect())
    }

    fn mailbox(&self, src: usize, dst: usize) -> &Mutex<VecDeque<Message>> {
        &self.shared.mailboxes[src * self.shared.world_size + dst]
    }
}

fn on_device(what: &str) -> SdpaError {
    SdpaError::Residence(format!(
        "ThreadCommunicator exchanges host buffers but the {what} buffer is on a CUDA device; \
         use NcclCommunicator for device memory"
    ))
}

fn host<'a, T>(buf: &'a CommBuffer<T>, what: &str) -> Result<&'a [T]> {
    match buf {
        CommBuffer::Host(v) => Ok(v),
        CommBuffer::Cuda(_) => Err(on_device(what)),
    }
}

impl Communicator for ThreadCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world_size
    }

    fn residence(&self) -> Residence {
        Residence::Host
    }

    /// Filled with NaN, so that an element the layer fails to write shows
    /// in its output.
    fn alloc<T: Element>(&self, len: usize) -> Result<CommBuffer<T>> {
        Ok(CommBuffer::Host(vec![T::from_f32(f32::NAN); len]))
    }

    fn exchange<T: Element>(
        &self,
        send: &CommBuffer<T>,
        sends: &[Transfer],
        recv: &mut CommBuffer<T>,
        recvs: &[Transfer],
    ) -> Result<()> {
        let world = self.shared.world_size;
        let src = host(send, "send")?;
        let CommBuffer::Host(dst) = recv else {
            return Err(on_device("receive"));
        };
        check_transfers("send", sends, src.len(), world)?;
        check_transfers("receive", recvs, dst.len(), world)?;
        let mut to_self = VecDeque::new();
        for t in sends {
            let block = src[t.offset..t.offset + t.len].to_vec();
            if t.peer == self.rank {
                to_self.push_back(block);
            } else {
                self.mailbox(self.rank, t.peer)
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push_back(Box::new(block));
            }
        }
        self.shared.barrier.wait(self.rank)?;
        for t in recvs {
            let block: Vec<T> = if t.peer == self.rank {
                to_self
                    .pop_front()
                    .ok_or_else(|| unmatched(self.rank, t.peer))?
            } else {
                let message = self
                    .mailbox(t.peer, self.rank)
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop_front()
                    .ok_or_else(|| unmatched(self.rank, t.peer))?;
                *message.downcast::<Vec<T>>().map_err(|_| {
                    SdpaError::Communication(format!(
                        "rank {} sent rank {} a block of another element type; every rank must \
                         make the same calls",
                        t.peer, self.rank
                    ))
                })?
            };
            if block.len() != t.len {
                return Err(SdpaError::Communication(format!(
                    "rank {} expected {} elements from rank {} and got {}; every rank must make \
                     the same calls with the same shapes",
                    self.rank,
                    t.len,
                    t.peer,
                    block.len()
                )));
            }
            dst[t.offset..t.offset + t.len].copy_from_slice(&block);
        }
        Ok(())
    }
}

fn unmatched(rank: usize, peer: usize) -> SdpaError {
    SdpaError::Communication(format!(
        "rank {rank} expected a block from rank {peer} that was never sent; every rank must make \
         the same calls with the same shapes"
    ))
}

/// A reusable barrier whose waits give up after a timeout, so a rank that
/// never arrives turns into an error instead of a hang.
#[derive(Debug)]
struct TimedBarrier {
    parties: usize,
    timeout: Duration,
    state: Mutex<BarrierState>,
    cvar: Condvar,
}

#[derive(Debug, Default)]
struct BarrierState {
    arrived: usize,
    generation: u64,
    broken: bool,
}

impl TimedBarrier {
    fn new(parties: usize, timeout: Duration) -> Self {
        TimedBarrier {
            parties,
            timeout,
            state: Mutex::new(BarrierState::default()),
            cvar: Condvar::new(),
        }
    }

    fn wait(&self, rank: usize) -> Result<()> {
        let broken = || {
            SdpaError::Communication(format!(
                "rank {rank}: an earlier exchange of this group timed out; build a new group"
            ))
        };
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.broken {
            return Err(broken());
        }
        state.arrived += 1;
        if state.arrived == self.parties {
            state.arrived = 0;
            state.generation += 1;
            self.cvar.notify_all();
            return Ok(());
        }
        let generation = state.generation;
        let (mut state, timeout) = self
            .cvar
            .wait_timeout_while(state, self.timeout, |s| {
                s.generation == generation && !s.broken
            })
            .unwrap_or_else(PoisonError::into_inner);
        if state.generation != generation {
            return Ok(());
        }
        if timeout.timed_out() {
            state.broken = true;
            self.cvar.notify_all();
            return Err(SdpaError::Communication(format!(
                "rank {rank} waited {:?} for {} of its {} peers at an exchange; every rank must \
                 call forward with the same shapes",
                self.timeout,
                self.parties - state.arrived,
                self.parties - 1
            )));
        }
        Err(broken())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_swap_blocks_and_keep_their_own() {
        let world = 3;
        let ranks = ThreadCommunicator::group(world).unwrap();
        std::thread::scope(|scope| {
            for comm in &ranks {
                scope.spawn(move || {
                    let me = comm.rank();
                    // Block p of the send buffer goes to rank p.
                    let send: Vec<f32> = (0..world * 2).map(|i| (me * 100 + i) as f32).collect();
                    let sends: Vec<_> = (0..world)
                        .map(|p| Transfer {
                            peer: p,
                            offset: 2 * p,
                            len: 2,
                        })
                        .collect();
                    let mut recv = comm.alloc::<f32>(world * 2).unwrap();
                    comm.exchange(&CommBuffer::Host(send), &sends, &mut recv, &sends)
                        .unwrap();
                    let CommBuffer::Host(got) = recv else {
                        unreachable!()
                    };
                    for p in 0..world {
                        let want = [(p * 100 + 2 * me) as f32, (p * 100 + 2 * me + 1) as f32];
                        assert_eq!(got[2 * p..2 * p + 2], want, "rank {me} from {p}");
                    }
                });
            }
        });
    }

    #[test]
    fn a_missing_rank_is_an_error_not_a_hang() {
        let ranks = ThreadCommunicator::group_with_timeout(2, Duration::from_millis(50)).unwrap();
        let send = CommBuffer::Host(vec![1.0f32; 2]);
        let mut recv = ranks[0].alloc::<f32>(2).unwrap();
        let t = [Transfer {
            peer: 1,
            offset: 0,
            len: 2,
        }];
        let err = ranks[0].exchange(&send, &t, &mut recv, &t).unwrap_err();
        assert!(err.to_string().contains("waited"), "{err}");
        let err = ranks[1].exchange(&send, &t, &mut recv, &t).unwrap_err();
        assert!(err.to_string().contains("timed out"), "{err}");
    }

    #[test]
    fn blocks_outside_the_buffer_are_refused() {
        let ranks = ThreadCommunicator::group(1).unwrap();
        let send = CommBuffer::Host(vec![1.0f32; 2]);
        let mut recv = ranks[0].alloc::<f32>(2).unwrap();
        let bad = [Transfer {
            peer: 0,
            offset: 1,
            len: 2,
        }];
        let ok = [Transfer {
            peer: 0,
            offset: 0,
            len: 2,
        }];
        let err = ranks[0].exchange(&send, &bad, &mut recv, &ok).unwrap_err();
        assert!(err.to_string().contains("runs past"), "{err}");
        let err = ranks[0]
            .exchange(&send, &[Transfer { peer: 3, ..ok[0] }], &mut recv, &ok)
            .unwrap_err();
        assert!(err.to_string().contains("rank 3"), "{err}");
    }
}

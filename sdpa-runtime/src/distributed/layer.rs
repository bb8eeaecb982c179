//! [`DistributedAttention`]: FastVideo's Ulysses sequence parallelism over
//! any [`Communicator`].
//!
//! Each rank holds `[B, S/P, H, D]`. An all-to-all trades sequence for
//! heads, so every rank holds the whole sequence for `H/P` heads; local
//! attention runs there; a second all-to-all trades back. Replicated tokens
//! (held whole by every rank, such as text tokens) are appended to the
//! sequence for the rank's heads, and their outputs are gathered over heads.

use super::communicator::{CommBuffer, Communicator, Transfer};
use super::copy::{copy_rows, zero, Rows, Src};
use crate::backend::{AttentionBackend, AttentionImpl, SdpaImpl};
use crate::error::{Result, SdpaError};
use crate::layout::Layout;
use crate::metadata::AttentionMetadata;
use crate::params::AttentionParams;
use crate::storage::dispatch::dispatch;
use crate::storage::Storage;
use crate::tensor::{Tensor, TensorView};
use crate::Element;

/// Tokens every rank holds in full, `[B, R, H, D]` for `q` and
/// `[B, R_kv, H_kv, D]` for `k` and `v`: FastVideo's `replicated_q/k/v`.
#[derive(Clone, Copy, Debug)]
pub struct Replicated<'a> {
    /// Replicated queries.
    pub q: TensorView<'a>,
    /// Replicated keys.
    pub k: TensorView<'a>,
    /// Replicated values.
    pub v: TensorView<'a>,
}

/// What a sequence-parallel call takes beside `q`, `k`, `v` and the
/// metadata.
#[derive(Clone, Copy, Debug, Default)]
pub struct SequenceParallel<'a> {
    /// The global sequence's length before it was padded to `P · S_local`:
    /// positions from here on are padding, dropped before attention (as
    /// queries and as keys) and returned as zeros. It trims the key/value
    /// sequence too when that has the query's padded length.
    pub original_seq_len: Option<usize>,
    /// Tokens every rank holds in full, appended after the sequence.
    pub replicated: Option<Replicated<'a>>,
}

/// What [`DistributedAttention::forward`] returns, where the communicator's
/// memory lives (on its stream for NCCL).
#[derive(Debug)]
pub struct DistributedOutput {
    /// This rank's slice of the output, `[B, S/P, H, D]`.
    pub output: Tensor,
    /// The replicated tokens' output, `[B, R, H, D]`, the same on every
    /// rank; present when replicated tokens were passed.
    pub replicated: Option<Tensor>,
}

/// One rank of a sequence-parallel attention layer, as FastVideo's
/// `DistributedAttention`.
///
/// Built from a backend and the layer's global parameters (all heads); the
/// local layer runs `H/P` query heads and `H_kv/P` key/value heads. Every
/// rank calls [`forward`](Self::forward) with the same shapes.
///
/// ```
/// use sdpa_runtime::distributed::{DistributedAttention, SequenceParallel, ThreadCommunicator};
/// use sdpa_runtime::prelude::*;
///
/// #[sdpa_variants(head_sizes = [32], causal = [false], dtypes = [f32])]
/// struct Attn;
///
/// # fn main() -> Result<(), SdpaError> {
/// let (b, s_local, h, d) = (1, 8, 4, 32);
/// let ranks = ThreadCommunicator::group(2)?;
/// std::thread::scope(|scope| {
///     for comm in ranks {
///         scope.spawn(move || -> Result<(), SdpaError> {
///             let layer = DistributedAttention::new(&Attn, AttentionParams::new(h, d), comm)?;
///             let x = vec![0.25f32; b * s_local * h * d];
///             let x = TensorView::from_slice(&x, [b, s_local, h, d])?;
///             let meta = AttentionMetadata::default();
///             let out = layer.forward(&x, &x, &x, &SequenceParallel::default(), &meta)?;
///             assert_eq!(out.output.shape(), [b, s_local, h, d]);
///             Ok(())
///         });
///     }
/// });
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DistributedAttention<C> {
    local: SdpaImpl,
    comm: C,
    num_heads: usize,
    num_kv_heads: usize,
    head_size: usize,
}

impl<C: Communicator> DistributedAttention<C> {
    /// A layer over `comm` with the global `params`; `num_heads` and
    /// `num_kv_heads` must be multiples of the world size.
    pub fn new(
        backend: &(impl AttentionBackend + ?Sized),
        params: AttentionParams,
        comm: C,
    ) -> Result<Self> {
        let p = comm.world_size();
        let (h, hkv) = (params.num_heads, params.kv_heads());
        for (name, n) in [("num_heads", h), ("num_kv_heads", hkv)] {
            if n == 0 || !n.is_multiple_of(p) {
                return Err(SdpaError::Param(format!(
                    "{name} = {n} does not split over {p} ranks; sequence parallelism gives each \
                     rank {name} / world_size heads, so use a world size that divides {n}"
                )));
            }
        }
        let mut local_params = params.clone();
        local_params.num_heads = h / p;
        local_params.num_kv_heads = Some(hkv / p);
        let local = backend.build_impl(local_params)?;
        Ok(DistributedAttention {
            local,
            comm,
            num_heads: h,
            num_kv_heads: hkv,
            head_size: params.head_size,
        })
    }

    /// The communicator this layer exchanges through.
    pub fn communicator(&self) -> &C {
        &self.comm
    }

    /// The layer that runs on each rank's heads.
    pub fn local(&self) -> &SdpaImpl {
        &self.local
    }

    /// Attention over the whole sequence for this rank's slice of it.
    ///
    /// `q` is `[B, S/P, H, D]`, `k` and `v` `[B, S_kv/P, H_kv, D]`, in the
    /// communicator's memory (host for [`ThreadCommunicator`], the rank's
    /// device for NCCL).
    ///
    /// A mask in the metadata must be shared by all heads (`[B, Sk]`,
    /// `[B, Sq, Sk]` or `[B, 1, Sq, Sk]`) and cover the sequence each rank
    /// attends over: the global sequence, trimmed to `original_seq_len`,
    /// followed by the replicated tokens (queries and keys alike).
    ///
    /// [`ThreadCommunicator`]: super::ThreadCommunicator
    pub fn forward(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        sp: &SequenceParallel<'_>,
        metadata: &AttentionMetadata<'_>,
    ) -> Result<DistributedOutput> {
        if metadata.varlen.is_some() {
            return Err(SdpaError::Unsupported(
                "DistributedAttention does not take variable-length batches (cu_seqlens); pass \
                 [B, S, H, D] tensors, with a key-padding mask for padded sequences"
                    .into(),
            ));
        }
        if let Some(mask) = &metadata.attn_mask {
            let shape = mask.shape();
            if shape.len() == 4 && shape[1] != 1 {
                return Err(SdpaError::Mask(format!(
                    "DistributedAttention takes masks shared by all heads, and this one has \
                     {} heads (shape {shape:?}); pass [B, Sk], [B, Sq, Sk] or [B, 1, Sq, Sk]",
                    shape[1]
                )));
            }
        }
        dispatch!(q.dtype(), T => self.forward_typed::<T>(q, k, v, sp, metadata))
    }

    fn forward_typed<T: Element>(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        sp: &SequenceParallel<'_>,
        metadata: &AttentionMetadata<'_>,
    ) -> Result<DistributedOutput> {
        let p = self.comm.world_size();
        let (h, hkv, d) = (self.num_heads, self.num_kv_heads, self.head_size);
        let [b, sl, _, _] = q.layout().shape();
        let skl = k.layout().seq();
        self.check("q", q, [b, sl, h, d])?;
        self.check("k", k, [b, skl, hkv, d])?;
        self.check("v", v, [b, skl, hkv, d])?;
        let (sq, skv) = (p * sl, p * skl);
        let (eq, ekv) = match sp.original_seq_len {
            None => (sq, skv),
            Some(n) if n <= sq => (n, if skl == sl { n } else { skv }),
            Some(n) => {
                return Err(SdpaError::Shape(format!(
                    "original_seq_len = {n} exceeds the global sequence of {p} ranks × {sl} = \
                     {sq}; pass the length before padding"
                )))
            }
        };
        let (rq, rkv) = match &sp.replicated {
            None => (0, 0),
            Some(r) => {
                let (rq, rkv) = (r.q.layout().seq(), r.k.layout().seq());
                self.check("replicated q", &r.q, [b, rq, h, d])?;
                self.check("replicated k", &r.k, [b, rkv, hkv, d])?;
                self.check("replicated v", &r.v, [b, rkv, hkv, d])?;
                (rq, rkv)
            }
        };
        let (hq_p, hkv_p) = (h / p, hkv / p);

        // Sequence → heads, leaving room after the sequence for replicated
        // tokens.
        let mut qh = self.seq_to_heads::<T>(q, hq_p, sq + rq)?;
        let mut kh = self.seq_to_heads::<T>(k, hkv_p, skv + rkv)?;
        let mut vh = self.seq_to_heads::<T>(v, hkv_p, skv + rkv)?;
        if let Some(r) = &sp.replicated {
            self.append_heads::<T>(&r.q, &mut qh, hq_p, sq + rq, eq)?;
            self.append_heads::<T>(&r.k, &mut kh, hkv_p, skv + rkv, ekv)?;
            self.append_heads::<T>(&r.v, &mut vh, hkv_p, skv + rkv, ekv)?;
        }

        // Local attention over [B, eq + R, H/P, D] views of the buffers.
        let (lq, lkv) = (eq + rq, ekv + rkv);
        let q_layout = padded_layout(b, lq, sq + rq, hq_p, d)?;
        let kv_layout = padded_layout(b, lkv, skv + rkv, hkv_p, d)?;
        let mut att = self.comm.alloc::<T>(b * (sq + rq) * hq_p * d)?;
        {
            let qv = qh.view(q_layout)?;
            let kv = kh.view(kv_layout)?;
            let vv = vh.view(kv_layout)?;
            let mut ov = att.view_mut(q_layout)?;
            self.local.forward_into(&qv, &kv, &vv, metadata, &mut ov)?;
        }
        drop((qh, kh, vh));

        // Replicated rows out, padding rows zeroed, then heads → sequence.
        let row = hq_p * d;
        let replicated_local = if sp.replicated.is_some() {
            let mut rep = self.comm.alloc::<T>(b * rq * row)?;
            for bi in 0..b {
                let from = Rows {
                    offset: (bi * (sq + rq) + eq) * row,
                    pitch: row,
                };
                let to = Rows {
                    offset: bi * rq * row,
                    pitch: row,
                };
                copy_rows(Src::of(&att), from, &mut rep, to, row, rq)?;
            }
            Some(rep)
        } else {
            None
        };
        for bi in 0..b {
            zero(
                &mut att,
                (bi * (sq + rq) + eq) * row,
                (sq - eq.min(sq)) * row,
            )?;
        }
        let output = self.heads_to_seq::<T>(&att, b, sl, sq + rq, hq_p, d)?;
        drop(att);
        let replicated = match replicated_local {
            Some(rep) => Some(self.gather_heads::<T>(&rep, b, rq, hq_p, d)?),
            None => None,
        };
        Ok(DistributedOutput { output, replicated })
    }

    /// Checks one input's shape, dtype and residence.
    fn check(&self, name: &str, t: &TensorView<'_>, want: [usize; 4]) -> Result<()> {
        let got = t.layout().shape();
        if got != want {
            return Err(SdpaError::Shape(format!(
                "{name} has shape {got:?} but this rank expects {want:?} ([batch, seq, heads, \
                 head_size] with all {} heads of the layer)",
                want[2]
            )));
        }
        let here = self.comm.residence();
        if t.residence() != here {
            return Err(SdpaError::Residence(format!(
                "{name} lives in {:?} but this rank's communicator works in {here:?}; move it \
                 there first",
                t.residence()
            )));
        }
        Ok(())
    }

    /// All-to-all from `[B, S/P, H, D]` to `[B, S, H/P, D]`, the result in a
    /// buffer whose batch stride holds `seq_cap` rows.
    fn seq_to_heads<T: Element>(
        &self,
        x: &TensorView<'_>,
        heads_p: usize,
        seq_cap: usize,
    ) -> Result<CommBuffer<T>> {
        let p = self.comm.world_size();
        let [b, sl, _, d] = x.layout().shape();
        let row = heads_p * d;
        let block = sl * row;
        let mut send = self.comm.alloc::<T>(p * b * block)?;
        for dest in 0..p {
            for bi in 0..b {
                let to = Rows {
                    offset: (dest * b + bi) * block,
                    pitch: row,
                };
                copy_heads(x, bi, dest * heads_p, heads_p, &mut send, to)?;
            }
        }
        let mut recv = self.comm.alloc::<T>(b * seq_cap * row)?;
        let mut sends = Vec::with_capacity(p * b);
        let mut recvs = Vec::with_capacity(p * b);
        for peer in 0..p {
            for bi in 0..b {
                sends.push(Transfer {
                    peer,
                    offset: (peer * b + bi) * block,
                    len: block,
                });
                recvs.push(Transfer {
                    peer,
                    offset: (bi * seq_cap + peer * sl) * row,
                    len: block,
                });
            }
        }
        self.comm.exchange(&send, &sends, &mut recv, &recvs)?;
        Ok(recv)
    }

    /// Copies this rank's heads of a replicated `[B, R, H, D]` tensor into
    /// rows `at..at + R` of a `[B, seq_cap, H/P, D]` buffer.
    fn append_heads<T: Element>(
        &self,
        x: &TensorView<'_>,
        buf: &mut CommBuffer<T>,
        heads_p: usize,
        seq_cap: usize,
        at: usize,
    ) -> Result<()> {
        let [b, _, _, d] = x.layout().shape();
        let row = heads_p * d;
        for bi in 0..b {
            let to = Rows {
                offset: (bi * seq_cap + at) * row,
                pitch: row,
            };
            copy_heads(x, bi, self.comm.rank() * heads_p, heads_p, buf, to)?;
        }
        Ok(())
    }

    /// All-to-all from the first `S` rows of a `[B, seq_cap, H/P, D]` buffer
    /// to this rank's `[B, S/P, H, D]`.
    fn heads_to_seq<T: Element>(
        &self,
        att: &CommBuffer<T>,
        b: usize,
        sl: usize,
        seq_cap: usize,
        heads_p: usize,
        d: usize,
    ) -> Result<Tensor> {
        let p = self.comm.world_size();
        let row = heads_p * d;
        let block = sl * row;
        let mut recv = self.comm.alloc::<T>(p * b * block)?;
        let mut sends = Vec::with_capacity(p * b);
        let mut recvs = Vec::with_capacity(p * b);
        for peer in 0..p {
            for bi in 0..b {
                sends.push(Transfer {
                    peer,
                    offset: (bi * seq_cap + peer * sl) * row,
                    len: block,
                });
                recvs.push(Transfer {
                    peer,
                    offset: (peer * b + bi) * block,
                    len: block,
                });
            }
        }
        self.comm.exchange(att, &sends, &mut recv, &recvs)?;
        let h = p * heads_p;
        let mut out = self.comm.alloc::<T>(b * sl * h * d)?;
        for src in 0..p {
            for bi in 0..b {
                let from = Rows {
                    offset: (src * b + bi) * block,
                    pitch: row,
                };
                let to = Rows {
                    offset: bi * sl * h * d + src * row,
                    pitch: h * d,
                };
                copy_rows(Src::of(&recv), from, &mut out, to, row, sl)?;
            }
        }
        out.into_tensor([b, sl, h, d])
    }

    /// All-gather over heads of the replicated tokens' `[B, R, H/P, D]`
    /// outputs into `[B, R, H, D]`.
    fn gather_heads<T: Element>(
        &self,
        rep: &CommBuffer<T>,
        b: usize,
        r: usize,
        heads_p: usize,
        d: usize,
    ) -> Result<Tensor> {
        let p = self.comm.world_size();
        let row = heads_p * d;
        let block = b * r * row;
        let mut all = self.comm.alloc::<T>(p * block)?;
        let sends: Vec<_> = (0..p)
            .map(|peer| Transfer {
                peer,
                offset: 0,
                len: block,
            })
            .collect();
        let recvs: Vec<_> = (0..p)
            .map(|peer| Transfer {
                peer,
                offset: peer * block,
                len: block,
            })
            .collect();
        self.comm.exchange(rep, &sends, &mut all, &recvs)?;
        let h = p * heads_p;
        let mut out = self.comm.alloc::<T>(b * r * h * d)?;
        for src in 0..p {
            for bi in 0..b {
                let from = Rows {
                    offset: src * block + bi * r * row,
                    pitch: row,
                };
                let to = Rows {
                    offset: bi * r * h * d + src * row,
                    pitch: h * d,
                };
                copy_rows(Src::of(&all), from, &mut out, to, row, r)?;
            }
        }
        out.into_tensor([b, r, h, d])
    }
}

/// The source of a view's memory, typed.
fn src_of<'a, T: Element>(x: &TensorView<'a>) -> Result<Src<'a, T>> {
    let wrong = || SdpaError::DtypeMismatch {
        tensor: "an input",
        expected: T::DTYPE,
        found: x.dtype(),
    };
    match x.storage() {
        Storage::Host(d) => T::downcast(d).map(Src::Host).ok_or_else(wrong),
        Storage::Cuda(d) => T::downcast_cuda(d).map(Src::Cuda).ok_or_else(wrong),
    }
}

/// Copies heads `h0..h0 + n` of batch `bi` of `x` (all its rows) into `buf`
/// as rows of `n · D` elements from `to`.
fn copy_heads<T: Element>(
    x: &TensorView<'_>,
    bi: usize,
    h0: usize,
    n: usize,
    buf: &mut CommBuffer<T>,
    to: Rows,
) -> Result<()> {
    let src = src_of::<T>(x)?;
    let layout = x.layout();
    let [_, s, _, d] = layout.shape();
    let [_, s_stride, h_stride, _] = layout.strides();
    if h_stride == d || n == 1 {
        let from = Rows {
            offset: layout.offset(bi, 0, h0),
            pitch: s_stride,
        };
        return copy_rows(src, from, buf, to, n * d, s);
    }
    for j in 0..n {
        let from = Rows {
            offset: layout.offset(bi, 0, h0 + j),
            pitch: s_stride,
        };
        let to = Rows {
            offset: to.offset + j * d,
            pitch: to.pitch,
        };
        copy_rows(src, from, buf, to, d, s)?;
    }
    Ok(())
}

/// `[B, len, H, D]` rows of a buffer whose batches are `cap` rows apart.
fn padded_layout(b: usize, len: usize, cap: usize, h: usize, d: usize) -> Result<Layout> {
    Layout::strided([b, len, h, d], [cap * h * d, h * d, d, 1])
}

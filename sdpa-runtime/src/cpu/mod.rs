//! The CPU kernels: tiled attention with an online softmax, generic over the
//! head size, the causal flag and the element type, with an AVX-512 path, an
//! AVX2+FMA path and a portable path chosen at run time.
//!
//! The `#[sdpa_variants]` macro instantiates [`attention`] once per declared
//! variant, so every loop over the head dimension has a constant trip count.
//! The path is detected once ([`detected_isa`]); `SDPA_CPU_ISA` or
//! [`with_isa`] pick another (tests run every path).
//!
//! Every batch entry is one sequence of queries and one of keys
//! ([`Problem::q_seqs`], [`Problem::k_seqs`]): batch `b` of `[B, S, H, D]`
//! tensors, the tokens `cu_seqlens` give it in a packed `[1, T, H, D]`
//! batch, or batch `b` seeing only the run of keys a key-padding mask
//! leaves it (then only the run's key blocks are visited and the mask is
//! not read). Rules hold in each sequence's local positions.
//!
//! Work is split into tasks of one (sequence, query head, block of
//! [`task_rows`] queries, at most [`max_task_rows`]), the longest
//! sequences first, and spread over rayon's thread pool, whose threads
//! persist between calls. Each task widens the keys and values to `f32` a
//! block of [`block_k`] keys at a time, once for all its query rows, and
//! keeps a running maximum, a running sum and an `f32` accumulator per query
//! row: memory grows with the tiles (a per-thread workspace of a few hundred
//! KiB, kept between calls), never with `Sq·Sk`. With causal masking, key
//! blocks above the diagonal are never loaded.
//!
//! The kernel body lives in one generic function (see `kernel.rs` for its
//! data layout and `simd.rs` for why it is written against a small SIMD trait
//! of our own).

mod backward;
#[cfg(target_arch = "x86_64")]
mod bf16dot;
mod isa;
mod kernel;
mod seqs;
mod simd;

use std::cell::RefCell;

use rayon::prelude::*;

use crate::element::Element;
use crate::error::{Result, SdpaError};
use crate::grad::{BackwardInputs, Gradients};
use crate::problem::Problem;
use crate::tensor::TensorViewMut;
use crate::varlen::SeqBounds;

pub use backward::{BK as BACKWARD_BLOCK_K, BQ as BACKWARD_BLOCK_Q};
pub use isa::{active_isa, detected_isa, with_isa, Isa, CPU_ISA_ENV};
pub use kernel::{block_k, block_q, max_task_rows, task_rows, L1D_BYTES, L2_BYTES, PANEL};

use kernel::{Ctx, F32Products, Line, Src};

/// Computes attention for `p` into `out` on the CPU.
///
/// `D` must equal the problem's head size, `CAUSAL` selects top-left causal
/// masking and `T` is the element type of every tensor. The macro emits one
/// instantiation per declared variant; calling it directly is fine too.
/// Runs on [`active_isa`].
pub fn attention<const D: usize, const CAUSAL: bool, T: Element>(
    p: &Problem<'_>,
    out: &mut TensorViewMut<'_>,
) -> Result<()> {
    attention_lse::<D, CAUSAL, T>(p, out, None)
}

/// [`attention`], also writing the row log-sum-exp into `lse` when it is
/// given: a `[B, Hq, Sq, 1]` `f32` view (any strides; `[1, Hq, Tq, 1]`
/// for a packed batch, row `t` query token `t`) whose element `(b, h, i)`
/// becomes the natural log of the softmax denominator of query row `i` of
/// head `h` over the scaled, masked scores, or `-inf` for a row that sees
/// no key. The variant table holds this instantiation; with
/// `None` it is the plain forward (one untaken branch per output row).
pub fn attention_lse<const D: usize, const CAUSAL: bool, T: Element>(
    p: &Problem<'_>,
    out: &mut TensorViewMut<'_>,
    lse: Option<&mut TensorViewMut<'_>>,
) -> Result<()> {
    p.check_output(out)?;
    if let Some(l) = &lse {
        p.check_lse(l)?;
    }
    if p.head_size != D {
        return Err(SdpaError::Shape(format!(
            "the CPU kernel for head size {D} was called with head size {}",
            p.head_size
        )));
    }
    if D == 0 || !D.is_multiple_of(8) {
        return Err(SdpaError::Shape(format!(
            "the CPU kernels take head sizes that are multiples of 8, not {D}"
        )));
    }
    let not_host = |what: &str| SdpaError::BackendUnavailable {
        backend: "cpu",
        reason: format!("{what} is not in host memory of dtype {}", T::DTYPE),
    };
    let q = p.q.host_slice::<T>().ok_or_else(|| not_host("q"))?;
    let k = p.k.host_slice::<T>().ok_or_else(|| not_host("k"))?;
    let v = p.v.host_slice::<T>().ok_or_else(|| not_host("v"))?;
    let out_layout = *out.layout();
    let o = out
        .host_slice_mut::<T>()
        .ok_or_else(|| not_host("the output"))?;

    let lse = match lse {
        Some(l) => {
            let layout = *l.layout();
            let data = l
                .host_slice_mut::<f32>()
                .ok_or_else(|| not_host("the lse buffer"))?;
            Some(kernel::Dst {
                ptr: data.as_mut_ptr(),
                layout,
            })
        }
        None => None,
    };

    let bq = kernel::task_rows(
        D,
        p.seq_q,
        p.batch * p.heads_q,
        rayon::current_num_threads(),
    );
    let entries = seqs::entries(p)?;
    let table = seqs::Tasks::new(&entries, p.heads_q, bq);
    let tasks = table.len();
    if tasks == 0 || D == 0 {
        return Ok(());
    }
    let ctx = Ctx {
        dtype: T::DTYPE,
        q: Src {
            ptr: q.as_ptr().cast(),
            layout: *p.q.layout(),
        },
        k: Src {
            ptr: k.as_ptr().cast(),
            layout: *p.k.layout(),
        },
        v: Src {
            ptr: v.as_ptr().cast(),
            layout: *p.v.layout(),
        },
        out: o.as_mut_ptr().cast(),
        out_layout,
        lse,
        // Key-padding runs stand for the mask: only the keys of each run
        // are visited, and the mask is 0 on them.
        mask: if matches!(p.k_seqs, SeqBounds::Runs(_)) {
            None
        } else {
            p.mask
        },
        scale: p.scale,
        causal: CAUSAL,
        group: p.group_size(),
        bq,
        tasks: &table,
    };
    let isa = active_isa();
    tracing::debug!(
        isa = isa.name(),
        tasks,
        bq,
        bk = block_k(D),
        "cpu attention"
    );
    dispatch::<D>(isa, &ctx, tasks);
    Ok(())
}

/// The gradients of attention for `p` on the CPU: `dq`, `dk` and `dv` of
/// the loss whose gradient with respect to the forward's output `x.out` is
/// `x.dout`, given the forward's row log-sum-exp `x.lse`.
///
/// `D`, `CAUSAL` and `T` as in [`attention`]. The probabilities are
/// recomputed from `q`, `k` and `lse` tile by tile, once (see
/// `backward.rs`): memory grows with the tiles, with `Sq` and with a few
/// `f32` copies of `dq` (one per chunk of keys), never with `Sq·Sk`. Key and
/// value gradients sum over each key/value head's query heads; rows that
/// see no key (`lse = -inf`) contribute nothing, and keys no row sees (of
/// an empty sequence, outside a key-padding run) get zero gradients.
/// Packed batches and key-padding runs as in [`attention`]. Deterministic: every
/// element is written by one task, every sum has a fixed order, so two
/// calls give the same bits whatever the thread count. Runs on
/// [`active_isa`].
pub fn backward<const D: usize, const CAUSAL: bool, T: Element>(
    p: &Problem<'_>,
    x: &BackwardInputs<'_>,
    g: &mut Gradients<'_>,
) -> Result<()> {
    p.check_backward(x, g)?;
    if p.head_size != D || D == 0 || !D.is_multiple_of(8) {
        return Err(SdpaError::Shape(format!(
            "the CPU backward kernel for head size {D} was called with head size {}; \
             the CPU kernels take head sizes that are multiples of 8",
            p.head_size
        )));
    }
    let not_host = |what: &str| SdpaError::BackendUnavailable {
        backend: "cpu",
        reason: format!("{what} is not in host memory of dtype {}", T::DTYPE),
    };
    fn host<'a, T: Element>(t: &crate::TensorView<'a>, what: &str) -> Result<&'a [T]> {
        t.host_slice::<T>()
            .ok_or_else(|| SdpaError::BackendUnavailable {
                backend: "cpu",
                reason: format!("{what} is not in host memory of dtype {}", T::DTYPE),
            })
    }
    let slice = host::<T>;
    let src = |t: &crate::TensorView<'_>, data: &[T]| Src {
        ptr: data.as_ptr().cast(),
        layout: *t.layout(),
    };
    let (out_s, dout_s) = (slice(&x.out, "out")?, slice(&x.dout, "dout")?);
    let q = src(&p.q, slice(&p.q, "q")?);
    let k = src(&p.k, slice(&p.k, "k")?);
    let v = src(&p.v, slice(&p.v, "v")?);
    let dout = src(&x.dout, dout_s);
    let (out_layout, dout_layout) = (*x.out.layout(), *x.dout.layout());
    let lse_in = x
        .lse
        .host_slice::<f32>()
        .ok_or_else(|| SdpaError::BackendUnavailable {
            backend: "cpu",
            reason: "lse is not in host memory of dtype f32".into(),
        })?;
    let dst = |t: &mut TensorViewMut<'_>, what: &str| -> Result<backward::DstT> {
        let layout = *t.layout();
        let data = t.host_slice_mut::<T>().ok_or_else(|| not_host(what))?;
        Ok(backward::DstT {
            ptr: data.as_mut_ptr().cast(),
            layout,
        })
    };
    let (dq, dk, dv) = (
        dst(&mut g.dq, "dq")?,
        dst(&mut g.dk, "dk")?,
        dst(&mut g.dv, "dv")?,
    );

    // The log-sum-exp gathered, and Δ = rowsum(dO∘O), one f32 per query
    // token of each (tensor batch, head).
    let entries = seqs::entries(p)?;
    let (hq, sq) = (p.heads_q, p.tokens_q);
    let q_batches = p.q.layout().shape()[0];
    let rows = q_batches * hq * sq;
    let mut lse = vec![0.0f32; rows];
    let mut delta = vec![0.0f32; rows];
    let lse_layout = *x.lse.layout();
    lse.par_chunks_mut(sq.max(1))
        .zip(delta.par_chunks_mut(sq.max(1)))
        .enumerate()
        .for_each(|(bh, (l, dl))| {
            let (b, h) = (bh / hq, bh % hq);
            for i in 0..l.len() {
                l[i] = lse_in[lse_layout.offset(b, h, i)];
                let o = &out_s[out_layout.offset(b, i, h)..][..D];
                let g = &dout_s[dout_layout.offset(b, i, h)..][..D];
                dl[i] = o.iter().zip(g).map(|(a, c)| a.to_f32() * c.to_f32()).sum();
            }
        });
    let isa = active_isa();
    let stats_ctx = backward::BwdCtx {
        dtype: T::DTYPE,
        q,
        k,
        v,
        dout,
        lse: &[],
        lnl: &[],
        delta: &[],
        dq,
        dk,
        dv,
        dq_acc: std::ptr::null_mut(),
        chunks: backward::key_chunks(p.batch, p.heads_kv, p.seq_k),
        // Key-padding runs stand for the mask (see `attention_lse`).
        mask: if matches!(p.k_seqs, SeqBounds::Runs(_)) {
            None
        } else {
            p.mask
        },
        scale: p.scale,
        causal: CAUSAL,
        seqs: &entries,
        q_batches,
        heads_q: hq,
        heads_kv: p.heads_kv,
        tokens_q: sq,
    };
    // Rows whose lse is too large for f32 to hold `ln l` in it (a large
    // finite additive mask on every key): their `m` and `ln l` recomputed,
    // so that `P = e^((x − m) − ln l)`; every other row keeps `m = lse`,
    // `ln l = 0`.
    let mut lnl = vec![0.0f32; rows];
    if lse.iter().any(|&x| backward::needs_stats(x)) {
        lse.par_chunks_mut(sq.max(1))
            .zip(lnl.par_chunks_mut(sq.max(1)))
            .enumerate()
            .for_each(|(bh, (m, l))| {
                let (tb, h) = (bh / hq, bh % hq);
                let mine = if p.is_packed() {
                    &entries[..]
                } else {
                    &entries[tb..tb + 1]
                };
                for seq in mine {
                    let rows = seq.q0..seq.q0 + seq.nq;
                    let (m, l) = (&mut m[rows.clone()], &mut l[rows]);
                    if m.iter().any(|&x| backward::needs_stats(x)) {
                        stats_dispatch::<D>(isa, &stats_ctx, (seq, h), m, l);
                    }
                }
            });
    }
    // The f32 partials of dQ, one per chunk of keys, 64-byte aligned.
    let acc_floats = stats_ctx.dq_acc_floats(D);
    let mut dq_acc: Vec<f32> = Vec::new();
    dq_acc.try_reserve_exact(acc_floats + 16).map_err(|_| {
        SdpaError::Shape(format!(
            "the CPU backward could not allocate {acc_floats} floats for the partial sums \
             of dq; pass fewer queries or heads per call"
        ))
    })?;
    dq_acc.resize(acc_floats + 16, 0.0);
    let skip = dq_acc.as_ptr().align_offset(64).min(16);
    let ctx = backward::BwdCtx {
        lse: &lse,
        lnl: &lnl,
        delta: &delta,
        dq_acc: dq_acc[skip..].as_mut_ptr(),
        ..stats_ctx
    };
    tracing::debug!(
        isa = isa.name(),
        kv_tasks = ctx.kv_tasks(),
        q_tasks = ctx.q_tasks(),
        "cpu attention backward"
    );
    backward_dispatch::<D>(isa, &ctx);
    Ok(())
}

thread_local! {
    /// The backward's per-thread workspace, kept between calls.
    static BWD_WORKSPACE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's backward workspace, of at least `floats`
/// floats.
fn with_bwd_workspace<F: FnOnce(&mut [f32])>(floats: usize, f: F) {
    BWD_WORKSPACE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut ws) => {
            if ws.len() < floats {
                ws.resize(floats, 0.0);
            }
            f(&mut ws[..])
        }
        // Not reachable (tasks make no nested calls), but never panic.
        Err(_) => f(&mut vec![0.0; floats]),
    })
}

/// Runs `task(workspace, t)` for every `t < tasks` on rayon's pool, each
/// with a workspace of at least `floats` floats.
fn run_bwd_tasks<F>(tasks: usize, floats: usize, task: F)
where
    F: Fn(&mut [f32], usize) + Sync,
{
    let one = |t: usize| with_bwd_workspace(floats, |ws| task(ws, t));
    if tasks <= 1 || rayon::current_num_threads() == 1 {
        (0..tasks).for_each(one);
    } else {
        (0..tasks).into_par_iter().for_each(one);
    }
}

/// Runs [`backward::row_stats`] for the rows of (entry, h) `sh` on `isa`,
/// or the best path below it that the CPU has: the path the passes then
/// run on, so the scores are formed by the same instructions.
fn stats_dispatch<const D: usize>(
    isa: Isa,
    ctx: &backward::BwdCtx<'_>,
    sh: (&seqs::Seq, usize),
    m: &mut [f32],
    lnl: &mut [f32],
) {
    let floats = backward::workspace_floats(D);
    with_bwd_workspace(floats, |ws| {
        #[cfg(target_arch = "x86_64")]
        {
            use simd::{Avx2, Avx512};
            if isa == Isa::Avx512 {
                if let Some(s) = Avx512::detect() {
                    // SAFETY: `s` proves the features; the workspace has
                    // `floats` floats; `m` and `lnl` are the rows of `sh`.
                    return unsafe { x86::avx512_stats::<D>(s, ctx, ws, sh, m, lnl) };
                }
            }
            if isa != Isa::Portable {
                if let Some(s) = Avx2::detect() {
                    // SAFETY: as above, for AVX2.
                    return unsafe { x86::avx2_stats::<D>(s, ctx, ws, sh, m, lnl) };
                }
            }
        }
        let _ = isa;
        // SAFETY: as above.
        unsafe { backward::row_stats::<simd::Portable, D, 2>(simd::Portable, ctx, ws, sh, m, lnl) }
    });
}

/// Runs both passes of the backward (dK/dV, then dQ) on `isa`, or the best
/// path below it that the CPU has.
fn backward_dispatch<const D: usize>(isa: Isa, ctx: &backward::BwdCtx<'_>) {
    let floats = backward::workspace_floats(D);
    let (kv, q) = (ctx.kv_tasks(), ctx.q_tasks());
    #[cfg(target_arch = "x86_64")]
    {
        use simd::{Avx2, Avx512};
        if isa == Isa::Avx512 {
            if let Some(s) = Avx512::detect() {
                // SAFETY: `s` proves the features the entry points enable;
                // the workspace has `floats` floats; each task runs once.
                run_bwd_tasks(kv, floats, |ws, t| unsafe {
                    x86::avx512_bwd::<D, true>(s, ctx, ws, t)
                });
                // SAFETY: as above.
                run_bwd_tasks(q, floats, |ws, t| unsafe {
                    x86::avx512_bwd::<D, false>(s, ctx, ws, t)
                });
                return;
            }
        }
        if isa != Isa::Portable {
            if let Some(s) = Avx2::detect() {
                // SAFETY: as above, for AVX2.
                run_bwd_tasks(kv, floats, |ws, t| unsafe {
                    x86::avx2_bwd::<D, true>(s, ctx, ws, t)
                });
                // SAFETY: as above.
                run_bwd_tasks(q, floats, |ws, t| unsafe {
                    x86::avx2_bwd::<D, false>(s, ctx, ws, t)
                });
                return;
            }
        }
    }
    let _ = isa;
    // SAFETY: the workspace has `floats` floats; each task runs once.
    run_bwd_tasks(kv, floats, |ws, t| unsafe {
        backward::kv_task::<simd::Portable, D, 2, 2>(simd::Portable, ctx, ws, t)
    });
    // SAFETY: as above.
    run_bwd_tasks(q, floats, |ws, t| unsafe {
        backward::q_task::<simd::Portable, D>(simd::Portable, ctx, ws, t)
    });
}

/// Runs every task of `ctx` on `isa` (or the best path below it that the CPU
/// has, which `active_isa` already guarantees).
fn dispatch<const D: usize>(isa: Isa, ctx: &Ctx<'_>, tasks: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use simd::{Avx2, Avx512};
        if isa == Isa::Avx512 {
            if let Some(s) = Avx512::detect() {
                let lines = kernel::workspace_lines(D, 16, AVX512_R);
                if ctx.dtype == crate::DType::BF16 && s.has_bf16() {
                    // SAFETY: `s.has_bf16()` proves the extra feature of
                    // `x86::avx512_bf16_task`; otherwise as below.
                    return run_tasks(ctx, tasks, lines, |ws, t| unsafe {
                        x86::avx512_bf16_task::<D>(s, ctx, ws, t)
                    });
                }
                // SAFETY: `s` proves the features `x86::avx512_task` enables;
                // the workspace has `lines` lines; each task runs once.
                return run_tasks(ctx, tasks, lines, |ws, t| unsafe {
                    x86::avx512_task::<D>(s, ctx, ws, t)
                });
            }
        }
        if isa != Isa::Portable {
            if let Some(s) = Avx2::detect() {
                let lines = kernel::workspace_lines(D, 8, AVX2_R);
                // SAFETY: as above, for AVX2.
                return run_tasks(ctx, tasks, lines, |ws, t| unsafe {
                    x86::avx2_task::<D>(s, ctx, ws, t)
                });
            }
        }
    }
    let _ = isa;
    let lines = kernel::workspace_lines(D, 8, PORTABLE_R);
    // SAFETY: the workspace has `lines` lines; each task runs once.
    run_tasks(ctx, tasks, lines, |ws, t| unsafe {
        kernel::run_task::<simd::Portable, F32Products, D, 4, 1, PORTABLE_R, 2>(
            simd::Portable,
            ctx,
            ws,
            t,
        )
    });
}

/// Output-tile rows of each path (see `kernel::pv_tile`).
#[cfg(target_arch = "x86_64")]
const AVX512_R: usize = 8;
#[cfg(target_arch = "x86_64")]
const AVX2_R: usize = 4;
const PORTABLE_R: usize = 4;

thread_local! {
    /// The workspace of the tasks that run on this thread, kept between
    /// calls so that small problems pay no allocation.
    static WORKSPACE: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// Runs `task(workspace, t)` for every `t < tasks` on rayon's pool, each
/// with a workspace of at least `lines` lines.
fn run_tasks<F>(ctx: &Ctx<'_>, tasks: usize, lines: usize, task: F)
where
    F: Fn(&mut [Line], usize) + Sync,
{
    let _ = ctx;
    let one = |t: usize| {
        WORKSPACE.with(|cell| match cell.try_borrow_mut() {
            Ok(mut ws) => {
                if ws.len() < lines {
                    ws.resize(lines, Line([0.0; 16]));
                }
                task(&mut ws[..], t)
            }
            // Not reachable (tasks make no nested calls), but never panic.
            Err(_) => task(&mut vec![Line([0.0; 16]); lines], t),
        })
    };
    if tasks == 1 || rayon::current_num_threads() == 1 {
        (0..tasks).for_each(one);
    } else {
        (0..tasks).into_par_iter().for_each(one);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The `#[target_feature]` entry points: the generic kernel body is
    //! inlined into each, so that its intrinsics compile for that path.

    use super::backward::{self, BwdCtx};
    use super::bf16dot::Bf16Dot;
    use super::kernel::{self, Ctx, F32Products, Line};
    use super::seqs::Seq;
    use super::simd::{Avx2, Avx512};
    use super::{AVX2_R, AVX512_R};

    /// One task on AVX-512: 12 keys × 32 queries per score tile (24 `zmm`
    /// accumulators), 8 rows × up to 3 vectors per output tile (24 again;
    /// 8 rows rather than 4 halve how often a value block is re-read).
    ///
    /// # Safety
    /// As `kernel::run_task`; `s` proves the features.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn avx512_task<const D: usize>(
        s: Avx512,
        ctx: &Ctx<'_>,
        ws: &mut [Line],
        task: usize,
    ) {
        // SAFETY: the caller's contract.
        unsafe { kernel::run_task::<Avx512, F32Products, D, 12, 2, AVX512_R, 3>(s, ctx, ws, task) }
    }

    /// One task with `bf16` inputs on AVX-512 BF16: the tiles of
    /// [`avx512_task`], each step a `vdpbf16ps` over a pair of elements.
    ///
    /// # Safety
    /// As `kernel::run_task`; `s` proves the AVX-512 features and
    /// `s.has_bf16()` is true; `ctx.dtype` is `bf16`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
    pub(super) unsafe fn avx512_bf16_task<const D: usize>(
        s: Avx512,
        ctx: &Ctx<'_>,
        ws: &mut [Line],
        task: usize,
    ) {
        // SAFETY: the caller's contract.
        unsafe { kernel::run_task::<Avx512, Bf16Dot, D, 12, 2, AVX512_R, 3>(s, ctx, ws, task) }
    }

    /// One task on AVX2: 6 keys × 16 queries per score tile (12 `ymm`
    /// accumulators), 4 rows × up to 2 vectors per output tile (4 × 3
    /// needs all 16 registers, and LLVM then spills an accumulator inside
    /// the FMA chain: half the speed).
    ///
    /// # Safety
    /// As `kernel::run_task`; `s` proves the features.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn avx2_task<const D: usize>(
        s: Avx2,
        ctx: &Ctx<'_>,
        ws: &mut [Line],
        task: usize,
    ) {
        // SAFETY: the caller's contract.
        unsafe { kernel::run_task::<Avx2, F32Products, D, 6, 2, AVX2_R, 2>(s, ctx, ws, task) }
    }

    /// One backward task on AVX-512 (16 lanes; micro-tiles of 4 rows × 4
    /// vectors, 16 `zmm` accumulators): of the first pass when `KV`, else
    /// of the dQ pass.
    ///
    /// # Safety
    /// As `backward::kv_task`; `s` proves the features.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn avx512_bwd<const D: usize, const KV: bool>(
        s: Avx512,
        ctx: &BwdCtx<'_>,
        ws: &mut [f32],
        task: usize,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            if KV {
                backward::kv_task::<Avx512, D, 4, 4>(s, ctx, ws, task)
            } else {
                backward::q_task::<Avx512, D>(s, ctx, ws, task)
            }
        }
    }

    /// [`backward::row_stats`] on AVX-512, with the score steps of
    /// [`avx512_bwd`].
    ///
    /// # Safety
    /// As `backward::row_stats`; `s` proves the features.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn avx512_stats<const D: usize>(
        s: Avx512,
        ctx: &BwdCtx<'_>,
        ws: &mut [f32],
        sh: (&Seq, usize),
        m: &mut [f32],
        lnl: &mut [f32],
    ) {
        // SAFETY: the caller's contract.
        unsafe { backward::row_stats::<Avx512, D, 4>(s, ctx, ws, sh, m, lnl) }
    }

    /// [`backward::row_stats`] on AVX2, with the score steps of
    /// [`avx2_bwd`].
    ///
    /// # Safety
    /// As `backward::row_stats`; `s` proves the features.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn avx2_stats<const D: usize>(
        s: Avx2,
        ctx: &BwdCtx<'_>,
        ws: &mut [f32],
        sh: (&Seq, usize),
        m: &mut [f32],
        lnl: &mut [f32],
    ) {
        // SAFETY: the caller's contract.
        unsafe { backward::row_stats::<Avx2, D, 2>(s, ctx, ws, sh, m, lnl) }
    }

    /// One backward task on AVX2 (8 lanes; micro-tiles of 4 rows × 2
    /// vectors: 8 accumulators, 2 operand vectors and a broadcast in the
    /// 16 `ymm` registers).
    ///
    /// # Safety
    /// As `backward::kv_task`; `s` proves the features.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn avx2_bwd<const D: usize, const KV: bool>(
        s: Avx2,
        ctx: &BwdCtx<'_>,
        ws: &mut [f32],
        task: usize,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            if KV {
                backward::kv_task::<Avx2, D, 2, 2>(s, ctx, ws, task)
            } else {
                backward::q_task::<Avx2, D>(s, ctx, ws, task)
            }
        }
    }
}

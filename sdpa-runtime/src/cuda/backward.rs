//! The backward pass on the GPU: the three kernels of a variant's
//! [`GpuBackward`], launched in order on one stream with one argument list.
//!
//! The launch contract is `kernels_gen::backward`'s (its module docs): the
//! arguments follow [`BACKWARD_PARAMS`], built here by name ([`arguments`]);
//! the preprocess and the `dq` conversion run one CTA per `block_m` query
//! rows of a (batch, query head), grid `(ceil(Sq / block_m), Hq, B)`; the
//! main kernel one CTA per `block_n` keys of a (batch, K/V head), grid
//! `(ceil(Sk / block_n), Hkv, B)` ([`grids`]). The scratch buffers
//! (`dq_accum`, `lse_log2`, `delta`, `sem`) are allocated for each call on
//! its stream, zeroed, and freed in stream order after the kernels.
//!
//! Sequence bounds and the mask are the forward's (`seqs::prepare`): packed
//! batches pass their `cu_seqlens`, key-padding masks their runs (then
//! `dk` and `dv` are zeroed first, since the kernels write the rows of
//! each sequence's keys only), other masks are read in place.
//!
//! Device tensors run on the device where they live, on the stream of `dq`;
//! host tensors are packed, copied to device 0, run there and copied back
//! into the caller's views, as the forward does (`staged` in the parent
//! module). A problem with no query row, no key or no batch writes its zero
//! gradients without launching anything, as the CPU backward does: `dk`
//! and `dv` are zero when nothing reads the keys (`Sq = 0`), `dq` is zero
//! when there is no key (`Sk = 0`).

use std::sync::Arc;

use cudarc::driver::{
    CudaSlice, CudaStream, CudaViewMut, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use kernels_gen::backward::BACKWARD_PARAMS;
use kernels_gen::contract::ParamKind;

use super::launch::{self, check_rows_aligned, Arg, Value};
use super::seqs::{self, BoundPtrs};
use super::{device, mask, module_cache, pack, upload_slice};
use crate::element::Element;
use crate::error::{Result, SdpaError};
use crate::grad::{BackwardInputs, Gradients};
use crate::layout::Layout;
use crate::problem::Problem;
use crate::storage::dispatch::dispatch;
use crate::storage::{CudaDataMut, Storage, StorageMut};
use crate::tensor::{TensorView, TensorViewMut};
use crate::variant::{GpuBackward, GpuKernel, Variant};

/// The most CTAs in the y and z dimensions of a grid.
const MAX_GRID_YZ: usize = 65_535;
/// The most CTAs in the x dimension of a grid.
const MAX_GRID_X: usize = (1 << 31) - 1;

/// Runs `variant`'s GPU backward for `p`: on the device where the tensors
/// live (on `dq`'s stream, without waiting), or through device 0 for host
/// tensors (waiting for the result). `x` and `g` must have been checked
/// against `p` (`Problem::check_backward`), as `backend.rs` does.
pub(crate) fn run(
    variant: &Variant,
    p: &Problem<'_>,
    x: &BackwardInputs<'_>,
    g: &mut Gradients<'_>,
) -> Result<()> {
    // The caller (`backend.rs`) has checked the buffers against `p`; the
    // device launch checks the views it launches on again (`launch`).
    let kernels = variant.gpu_backward()?;
    let causal = variant.spec().causal;
    refuse_rows_hidden_by_large_finite(p, causal)?;
    let k = Backward { kernels, causal };
    match (p.q.storage(), g.dq.storage()) {
        (Storage::Cuda(_), StorageMut::Cuda(dq)) => {
            let stream = dq.stream().clone();
            check_device(variant, kernels, &stream)?;
            on_device(k, &stream, p, x, g)
        }
        (Storage::Host(_), StorageMut::Host(_)) => {
            let device = device::device(0)?;
            check_device(variant, kernels, &device.stream)?;
            dispatch!(p.dtype(), T => staged::<T>(k, &device.stream, p, x, g))
        }
        _ => Err(SdpaError::Residence(format!(
            "q lives in {} and dq in {}; pass every tensor of the backward in one place",
            p.q.residence(),
            g.dq.residence()
        ))),
    }
}

/// The most negative finite mask value a row may be hidden by entirely on
/// the GPU: below it, the row's log-sum-exp (`f32`, as large as the bias)
/// no longer carries the probabilities' scale (its rounding alone is more
/// than 1% of them), and the kernels, which recompute the probabilities
/// from it, would be wrong. The CPU backward recomputes such rows.
const LARGEST_HIDING_BIAS: f32 = -65536.0;

/// A variant's backward kernels and its causal flag.
#[derive(Clone, Copy, Debug)]
struct Backward<'v> {
    kernels: &'v GpuBackward,
    causal: bool,
}

/// Refuses a mask that hides some row from every key it sees with a finite
/// value below [`LARGEST_HIDING_BIAS`] (`-1e9`, `f32::MIN`: the Hugging Face
/// convention for padded keys, on a row with no key left).
///
/// Host masks are read where they are. A float mask in device memory is
/// copied to the host for this check, waiting for the device: the one
/// device-to-host copy of the backward's masks (the forward reads device
/// masks in place and never copies them). `bool` and integer masks hide
/// with `-inf` only and need no check.
fn refuse_rows_hidden_by_large_finite(p: &Problem<'_>, causal: bool) -> Result<()> {
    let Some(mask) = &p.mask else { return Ok(()) };
    let copy = mask::float_to_host(mask)?;
    let host_mask = match &copy {
        Some(c) => mask.with_host_data(c.data()),
        None if mask.residence().is_cuda() => return Ok(()),
        None => *mask,
    };
    match host_mask.row_hidden_by_finite(LARGEST_HIDING_BIAS, causal) {
        None => Ok(()),
        Some([b, h, i]) => Err(SdpaError::Mask(format!(
            "the mask hides row (batch {b}, head {h}, query {i}) from every key with finite              values below {LARGEST_HIDING_BIAS}; the GPU backward cannot recompute that row's              probabilities from its log-sum-exp: hide keys with -inf (or a bool mask), or run              the backward on the CPU backend"
        ))),
    }
}

/// Checks that the device of `stream` runs the backward kernels.
fn check_device(variant: &Variant, kernels: &GpuBackward, stream: &CudaStream) -> Result<()> {
    let ctx = stream.context();
    let capability = ctx.compute_capability().map_err(|e| {
        SdpaError::cuda(
            format_args!("reading device {}'s compute capability", ctx.ordinal()),
            e,
        )
    })?;
    if kernels.runs_on(capability) {
        return Ok(());
    }
    let (major, minor) = capability;
    Err(SdpaError::BackendUnavailable {
        backend: "cuda",
        reason: format!(
            "the backward kernels of variant {} target {}, which device {} (compute \
             capability {major}.{minor}) does not run; run the backward on the CPU backend",
            variant.spec(),
            kernels.main().target().name(),
            ctx.ordinal()
        ),
    })
}

/// Whether `p` has nothing to compute: no batch, no query row or no key.
/// Its gradients are then all zeros (those that have elements).
fn is_empty(p: &Problem<'_>) -> bool {
    p.batch == 0 || p.seq_q == 0 || p.heads_q == 0 || p.seq_k == 0 || p.head_size == 0
}

/// The backward for device tensors, queued on `stream`.
fn on_device(
    kernels: Backward<'_>,
    stream: &Arc<CudaStream>,
    p: &Problem<'_>,
    x: &BackwardInputs<'_>,
    g: &mut Gradients<'_>,
) -> Result<()> {
    if is_empty(p) {
        for (name, t) in [("dq", &mut g.dq), ("dk", &mut g.dk), ("dv", &mut g.dv)] {
            zero_device(name, t, stream)?;
        }
        return Ok(());
    }
    launch(kernels, stream, p, x, g)
}

/// Copies the host tensors of the backward to device 0, packed contiguously
/// (so that any host strides meet the kernels' 16-byte row alignment),
/// runs there and scatters the gradients into `g`, waiting for them.
fn staged<T: Element>(
    kernels: Backward<'_>,
    stream: &Arc<CudaStream>,
    p: &Problem<'_>,
    x: &BackwardInputs<'_>,
    g: &mut Gradients<'_>,
) -> Result<()> {
    if is_empty(p) {
        for (name, t) in [("dq", &mut g.dq), ("dk", &mut g.dk), ("dv", &mut g.dv)] {
            zero_host::<T>(name, t)?;
        }
        return Ok(());
    }
    let not_host = |what: &str, dtype: crate::DType| {
        SdpaError::Residence(format!("{what} is not host memory of dtype {dtype}"))
    };
    fn upload<E: Element>(
        stream: &Arc<CudaStream>,
        name: &str,
        t: &TensorView<'_>,
    ) -> Result<CudaSlice<E>> {
        let host = t.host_slice::<E>().ok_or_else(|| {
            SdpaError::Residence(format!("{name} is not host memory of dtype {}", E::DTYPE))
        })?;
        upload_slice(stream, &pack(host, t.layout()), name)
    }
    let q = upload::<T>(stream, "q", &p.q)?;
    let k = upload::<T>(stream, "k", &p.k)?;
    let v = upload::<T>(stream, "v", &p.v)?;
    let out = upload::<T>(stream, "out", &x.out)?;
    let dout = upload::<T>(stream, "dout", &x.dout)?;
    let lse = upload::<f32>(stream, "lse", &x.lse)?;
    let alloc = |name: &str, n: usize| -> Result<CudaSlice<T>> {
        stream.alloc_zeros::<T>(n.max(1)).map_err(|e| {
            SdpaError::cuda(
                format_args!(
                    "allocating {name} ({} bytes) on device {}",
                    n * std::mem::size_of::<T>(),
                    stream.context().ordinal()
                ),
                e,
            )
        })
    };
    let (q_shape, kv_shape) = (p.out_shape(), p.k.layout().shape());
    let mut dq = alloc("dq", g.dq.layout().numel())?;
    let mut dk = alloc("dk", g.dk.layout().numel())?;
    let mut dv = alloc("dv", g.dv.layout().numel())?;
    {
        fn view<'s, E: Element>(s: &'s CudaSlice<E>, shape: [usize; 4]) -> Result<TensorView<'s>> {
            TensorView::new_cuda(E::cuda(s.into()), Layout::contiguous(shape))
        }
        let device_problem = Problem {
            q: view(&q, q_shape)?,
            k: view(&k, kv_shape)?,
            v: view(&v, kv_shape)?,
            ..p.clone()
        };
        let device_inputs = BackwardInputs {
            out: view(&out, q_shape)?,
            dout: view(&dout, q_shape)?,
            lse: view(&lse, p.lse_shape())?,
        };
        let mut device_grads = Gradients {
            dq: TensorViewMut::from_cuda(&mut dq, q_shape)?,
            dk: TensorViewMut::from_cuda(&mut dk, kv_shape)?,
            dv: TensorViewMut::from_cuda(&mut dv, kv_shape)?,
        };
        launch(
            kernels,
            stream,
            &device_problem,
            &device_inputs,
            &mut device_grads,
        )?;
    }
    // The copies wait for the kernels: a fault of theirs surfaces here.
    let entries = kernels.kernels.kernels().map(|k| k.entry()).join(", ");
    for (name, device, view) in [
        ("dq", &dq, &mut g.dq),
        ("dk", &dk, &mut g.dk),
        ("dv", &dv, &mut g.dv),
    ] {
        let n = view.layout().numel();
        let fail = |e| {
            SdpaError::cuda(
                format_args!("running the backward kernels ({entries}) and copying {name} back"),
                e,
            )
        };
        let result = stream.clone_dtoh(&device.slice(..n)).map_err(fail)?;
        stream.synchronize().map_err(fail)?;
        let layout = *view.layout();
        let host = view
            .host_slice_mut::<T>()
            .ok_or_else(|| not_host(name, T::DTYPE))?;
        scatter(host, &layout, &result);
    }
    Ok(())
}

/// Writes the row-major `[B, S, H, D]` elements `packed` into the view
/// `layout` of `host` (the inverse of `pack`).
fn scatter<T: Copy>(host: &mut [T], layout: &Layout, packed: &[T]) {
    let [b, s, h, d] = layout.shape();
    let mut rows = packed.chunks_exact(d.max(1));
    for bi in 0..b {
        for si in 0..s {
            for hi in 0..h {
                let o = layout.offset(bi, si, hi);
                if let Some(row) = rows.next() {
                    host[o..o + d].copy_from_slice(row);
                }
            }
        }
    }
}

/// The element ranges `(offset, len)` a view covers, as few as its strides
/// allow: one for a dense view, one per token where a token's heads are
/// contiguous, else one per row.
fn runs(layout: &Layout) -> Result<Vec<(usize, usize)>> {
    let n = layout.numel();
    if n == 0 {
        return Ok(Vec::new());
    }
    if layout.required_len()? == n {
        // Non-overlapping (every writable view is) and as long as its
        // elements: the view is exactly `0..n`.
        return Ok(vec![(0, n)]);
    }
    let [b, s, h, d] = layout.shape();
    let heads_contiguous = h == 1 || layout.strides()[2] == d;
    let mut out = Vec::new();
    for bi in 0..b {
        for si in 0..s {
            if heads_contiguous {
                out.push((layout.offset(bi, si, 0), h * d));
            } else {
                out.extend((0..h).map(|hi| (layout.offset(bi, si, hi), d)));
            }
        }
    }
    Ok(out)
}

/// Writes zeros into every element of the host view `t`.
fn zero_host<T: Element>(name: &str, t: &mut TensorViewMut<'_>) -> Result<()> {
    let layout = *t.layout();
    let host = t.host_slice_mut::<T>().ok_or_else(|| {
        SdpaError::Residence(format!("{name} is not host memory of dtype {}", T::DTYPE))
    })?;
    for (o, n) in runs(&layout)? {
        host[o..o + n].fill(T::from_f32(0.0));
    }
    Ok(())
}

/// Queues zeros into every element of the device view `t` on `stream`
/// (memsets, no kernel).
fn zero_device(name: &str, t: &mut TensorViewMut<'_>, stream: &Arc<CudaStream>) -> Result<()> {
    let layout = *t.layout();
    let StorageMut::Cuda(data) = t.storage_mut() else {
        return Err(SdpaError::Residence(format!(
            "{name} is not device memory; pass every tensor of the backward in one place"
        )));
    };
    fn zero<T: DeviceRepr + ValidAsZeroBits>(
        view: &mut CudaViewMut<'_, T>,
        runs: &[(usize, usize)],
        stream: &Arc<CudaStream>,
        name: &str,
    ) -> Result<()> {
        for &(o, n) in runs {
            stream
                .memset_zeros(&mut view.slice_mut(o..o + n))
                .map_err(|e| SdpaError::cuda(format_args!("zeroing {name}"), e))?;
        }
        Ok(())
    }
    let runs = runs(&layout)?;
    dispatch!(data, CudaDataMut(d) => zero(&mut d.0, &runs, stream, name))
}

/// `a · b · ...`, or an error naming `what` when it overflows.
fn product(what: &str, factors: &[usize]) -> Result<usize> {
    factors
        .iter()
        .try_fold(1usize, |a, &n| a.checked_mul(n))
        .ok_or_else(|| {
            SdpaError::Shape(format!(
                "the backward's {what} would hold more elements than the address space; \
                 split the call"
            ))
        })
}

/// Device addresses of the backward's buffers (0 for an absent mask).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Pointers {
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    dout: u64,
    lse: u64,
    mask: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    dq_accum: u64,
    lse_log2: u64,
    delta: u64,
    sem: u64,
    bounds: BoundPtrs,
}

/// How the kernels read the mask: element strides (batch, head, query),
/// kind code and front padding (zeros without a mask).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct MaskArgs {
    strides: [usize; 3],
    kind: u32,
    pad: usize,
}

/// Everything the backward's arguments are made of: the checked problem,
/// the layouts of the backward's own tensors, the mask's strides and the
/// device addresses.
#[derive(Clone, Copy, Debug)]
struct Call<'c> {
    p: &'c Problem<'c>,
    out: Layout,
    dout: Layout,
    lse: Layout,
    dq: Layout,
    dk: Layout,
    dv: Layout,
    mask: MaskArgs,
    ptrs: Pointers,
}

/// The value of the backward contract's parameter `name` for this call,
/// with what it stands for in error messages; `None` for a name the
/// runtime does not know. The only place that maps the backward's names to
/// values.
fn value(name: &str, c: &Call<'_>) -> Option<(Value, &'static str)> {
    use Value::{Address, Float, Size};
    let p = c.p;
    if let Some((tensor, dim)) = name.split_once("_stride_") {
        let strides = match tensor {
            "q" => p.q.layout().strides(),
            "k" => p.k.layout().strides(),
            "v" => p.v.layout().strides(),
            "out" => c.out.strides(),
            "dout" => c.dout.strides(),
            "dq" => c.dq.strides(),
            "dk" => c.dk.strides(),
            "dv" => c.dv.strides(),
            // `[B, Hq, Sq, 1]`: batch, head, query.
            "lse" => c.lse.strides(),
            "mask" => {
                let [b, h, q] = c.mask.strides;
                [b, h, q, 1]
            }
            _ => return None,
        };
        let packed_batch = tensor != "mask" && dim == "b" && p.is_packed();
        let i = match (tensor, dim) {
            ("lse" | "mask", "b") => 0,
            ("lse" | "mask", "h") => 1,
            ("lse" | "mask", "q") => 2,
            ("lse" | "mask", _) => return None,
            (_, "b") => 0,
            (_, "s") => 1,
            (_, "h") => 2,
            _ => return None,
        };
        // Packed tensors: every sequence is addressed from batch entry 0.
        let stride = if packed_batch { 0 } else { strides[i] };
        return Some((Size(stride), "a stride"));
    }
    let ptrs = &c.ptrs;
    Some(match name {
        "q" => (Address(ptrs.q), "q's address"),
        "k" => (Address(ptrs.k), "k's address"),
        "v" => (Address(ptrs.v), "v's address"),
        "out" => (Address(ptrs.out), "the output's address"),
        "dout" => (Address(ptrs.dout), "dout's address"),
        "lse" => (Address(ptrs.lse), "the lse's address"),
        "mask" => (Address(ptrs.mask), "the mask's address"),
        "dq" => (Address(ptrs.dq), "dq's address"),
        "dk" => (Address(ptrs.dk), "dk's address"),
        "dv" => (Address(ptrs.dv), "dv's address"),
        "dq_accum" => (Address(ptrs.dq_accum), "dq_accum's address"),
        "lse_log2" => (Address(ptrs.lse_log2), "lse_log2's address"),
        "delta" => (Address(ptrs.delta), "delta's address"),
        "sem" => (Address(ptrs.sem), "sem's address"),
        "q_start" => (Address(ptrs.bounds.q_start), "q_start's address"),
        "q_end" => (Address(ptrs.bounds.q_end), "q_end's address"),
        "k_start" => (Address(ptrs.bounds.k_start), "k_start's address"),
        "k_end" => (Address(ptrs.bounds.k_end), "k_end's address"),
        "seq_q" => (Size(p.seq_q), "Sq"),
        "seq_k" => (Size(p.seq_k), "Sk"),
        "tokens_q" => (Size(p.tokens_q), "q's token count"),
        "tokens_k" => (Size(p.tokens_k), "k's token count"),
        "mask_kind" => (Size(c.mask.kind as usize), "the mask's element kind"),
        "mask_pad" => (Size(c.mask.pad), "the mask's front padding"),
        "heads_q" => (Size(p.heads_q), "Hq"),
        "group" => (Size(p.group_size()), "Hq / Hkv"),
        "scale_log2" => (
            Float(p.scale * std::f32::consts::LOG2_E),
            "the scale times log2(e)",
        ),
        "scale" => (Float(p.scale), "the softmax scale"),
        _ => return None,
    })
}

/// The arguments of the backward contract, named, in launch order: the
/// parameters of [`BACKWARD_PARAMS`], each given its value by name.
fn arguments(c: &Call<'_>) -> Result<Vec<(&'static str, Arg)>> {
    arguments_of(BACKWARD_PARAMS.iter(), c)
}

/// The arguments for the backward contract's parameters `params`
/// ([`launch::by_name`] with [`value`]).
fn arguments_of<'t>(
    params: impl IntoIterator<Item = &'t (&'static str, ParamKind)>,
    c: &Call<'_>,
) -> Result<Vec<(&'static str, Arg)>> {
    launch::by_name("the backward launch contract", params, |name| {
        value(name, c)
    })
}

/// One grid dimension, or an error when it exceeds the driver's limit.
fn fits(what: &str, n: usize, max: usize) -> Result<u32> {
    if n <= max {
        Ok(n as u32)
    } else {
        Err(SdpaError::Shape(format!(
            "{what} is {n}; the CUDA backward kernels take at most {max}; split the call"
        )))
    }
}

/// `ceil(n / per)` for a kernel's positive tile size `per`.
fn blocks(kernel: &GpuKernel, n: usize, per: u32, what: &str) -> Result<usize> {
    if per == 0 || kernel.threads() == 0 {
        return Err(SdpaError::Cuda(format!(
            "backward kernel {} declares {what} = {per} and threads = {}; both must be positive",
            kernel.entry(),
            kernel.threads()
        )));
    }
    Ok(n.div_ceil(per as usize))
}

/// The grids of the preprocess, main and conversion kernels:
/// `(ceil(Sq / block_m), Hq, B)`, `(ceil(Sk / block_n), Hkv, B)` and
/// `(ceil(Sq / block_m), Hq, B)`, or an error when the problem does not
/// fit a grid.
fn grids(p: &Problem<'_>, b: &GpuBackward) -> Result<[(u32, u32, u32); 3]> {
    let rows = |k: &GpuKernel| -> Result<(u32, u32, u32)> {
        Ok((
            fits(
                "the number of query blocks",
                blocks(k, p.seq_q, k.block_m(), "block_m")?,
                MAX_GRID_X,
            )?,
            fits("the number of query heads", p.heads_q, MAX_GRID_YZ)?,
            fits("the batch size", p.batch, MAX_GRID_YZ)?,
        ))
    };
    let main = (
        fits(
            "the number of key blocks",
            blocks(b.main(), p.seq_k, b.block_n(), "block_n")?,
            MAX_GRID_X,
        )?,
        fits("the number of key/value heads", p.heads_kv, MAX_GRID_YZ)?,
        fits("the batch size", p.batch, MAX_GRID_YZ)?,
    );
    Ok([rows(b.preprocess())?, main, rows(b.convert())?])
}

/// The lengths of the scratch buffers: `dq_accum` (`[B, Hq, Sq, D]`),
/// `lse_log2` and `delta` (`[B, Hq, Sq]` each) and `sem` (`[B, Hq,
/// ceil(Sq / main.block_m)]`).
fn scratch_lens(p: &Problem<'_>, b: &GpuBackward) -> Result<[usize; 3]> {
    let rows = product("row statistics", &[p.batch, p.heads_q, p.seq_q])?;
    let accum = product("dq sums", &[rows, p.head_size])?;
    let dq_blocks = blocks(b.main(), p.seq_q, b.main().block_m(), "block_m")?;
    let sem = product("dq block counters", &[p.batch, p.heads_q, dq_blocks])?;
    Ok([accum, rows, sem])
}

/// Launches the three backward kernels on `stream` for the checked,
/// non-empty problem `p` whose tensors all live in device memory of
/// `stream`'s context. Returns once the launches are queued.
fn launch(
    backward: Backward<'_>,
    stream: &Arc<CudaStream>,
    p: &Problem<'_>,
    x: &BackwardInputs<'_>,
    g: &mut Gradients<'_>,
) -> Result<()> {
    let kernels = backward.kernels;
    p.check_backward(x, g)?;
    if is_empty(p) {
        return Err(SdpaError::Shape(format!(
            "a backward of shape {:?} with {} keys has nothing to compute; nothing is \
             launched for it",
            p.out_shape(),
            p.seq_k
        )));
    }
    let ctx = stream.context();
    let not_here = |what: &str| {
        SdpaError::Residence(format!(
            "{what} is not device memory of CUDA device {}'s context, where the backward runs; \
             pass every tensor of the backward on one device",
            ctx.ordinal()
        ))
    };
    let inputs = [
        ("q", &p.q),
        ("k", &p.k),
        ("v", &p.v),
        ("out", &x.out),
        ("dout", &x.dout),
        ("lse", &x.lse),
    ];
    let mut input_data = Vec::with_capacity(inputs.len());
    for (name, t) in inputs {
        let data = t.cuda_data().ok_or_else(|| not_here(name))?;
        if data.stream().context() != ctx {
            return Err(not_here(name));
        }
        input_data.push(data);
    }
    let (dq_layout, dk_layout, dv_layout) = (*g.dq.layout(), *g.dk.layout(), *g.dv.layout());
    for (name, t) in [("dq", &g.dq), ("dk", &g.dk), ("dv", &g.dv)] {
        match t.storage() {
            StorageMut::Cuda(d) if d.stream().context() == ctx => {}
            _ => return Err(not_here(name)),
        }
    }
    let reads = seqs::prepare(p, backward.causal, seqs::Reader::Backward, stream)?;
    if reads.hides_keys_by_runs() {
        // The kernels write the `dk`, `dv` rows of each sequence's keys
        // only: the keys outside the runs get their zeros here, first.
        zero_device("dk", &mut g.dk, stream)?;
        zero_device("dv", &mut g.dv, stream)?;
    }
    let (StorageMut::Cuda(dq_data), StorageMut::Cuda(dk_data), StorageMut::Cuda(dv_data)) =
        (g.dq.storage_mut(), g.dk.storage_mut(), g.dv.storage_mut())
    else {
        return Err(not_here("dq, dk or dv"));
    };

    let [accum_len, rows, sem_len] = scratch_lens(p, kernels)?;
    let alloc_err = |name: &str, n: usize, e| {
        SdpaError::cuda(
            format_args!(
                "allocating the backward's {name} ({} bytes) on device {}",
                n * 4,
                ctx.ordinal()
            ),
            e,
        )
    };
    let f32_zeros = |name: &str, n: usize| -> Result<CudaSlice<f32>> {
        stream
            .alloc_zeros::<f32>(n.max(1))
            .map_err(|e| alloc_err(name, n, e))
    };
    let mut dq_accum = f32_zeros("dq_accum", accum_len)?;
    let mut lse_log2 = f32_zeros("lse_log2", rows)?;
    let mut delta = f32_zeros("delta", rows)?;
    let mut sem = stream
        .alloc_zeros::<u32>(sem_len.max(1))
        .map_err(|e| alloc_err("sem", sem_len, e))?;

    // The guards record each buffer's use on `stream` when dropped, after
    // the launches, so that frees and other streams wait for the kernels.
    let (q, _q) = input_data[0].device_ptr(stream);
    let (k, _k) = input_data[1].device_ptr(stream);
    let (v, _v) = input_data[2].device_ptr(stream);
    let (out, _out) = input_data[3].device_ptr(stream);
    let (dout, _dout) = input_data[4].device_ptr(stream);
    let (lse, _lse) = input_data[5].device_ptr(stream);
    let (mask_ptr, _mask) = reads.mask_ptr(stream)?;
    let (bounds, _bounds) = reads.bound_ptrs(stream)?;
    let (dq, _dq) = dq_data.device_ptr_mut(stream);
    let (dk, _dk) = dk_data.device_ptr_mut(stream);
    let (dv, _dv) = dv_data.device_ptr_mut(stream);
    let (dq_accum_ptr, _dq_accum) = dq_accum.device_ptr_mut(stream);
    let (lse_log2_ptr, _lse_log2) = lse_log2.device_ptr_mut(stream);
    let (delta_ptr, _delta) = delta.device_ptr_mut(stream);
    let (sem_ptr, _sem) = sem.device_ptr_mut(stream);

    let elem = p.dtype().size_bytes();
    check_rows_aligned("q", q, p.q.layout(), elem)?;
    check_rows_aligned("k", k, p.k.layout(), elem)?;
    check_rows_aligned("v", v, p.v.layout(), elem)?;
    check_rows_aligned("out", out, x.out.layout(), elem)?;
    check_rows_aligned("dout", dout, x.dout.layout(), elem)?;
    check_rows_aligned("dq", dq, &dq_layout, elem)?;
    check_rows_aligned("dk", dk, &dk_layout, elem)?;
    check_rows_aligned("dv", dv, &dv_layout, elem)?;
    if lse % 4 != 0 {
        return Err(SdpaError::Lse(format!(
            "the lse is at device address {lse:#x}, not 4-byte aligned; pass an f32 buffer"
        )));
    }

    let call = Call {
        p,
        out: *x.out.layout(),
        dout: *x.dout.layout(),
        lse: *x.lse.layout(),
        dq: dq_layout,
        dk: dk_layout,
        dv: dv_layout,
        mask: reads
            .mask
            .as_ref()
            .map_or(MaskArgs::default(), |m| MaskArgs {
                strides: m.strides,
                kind: m.kind.code(),
                pad: m.pad,
            }),
        ptrs: Pointers {
            q,
            k,
            v,
            out,
            dout,
            lse,
            mask: mask_ptr,
            dq,
            dk,
            dv,
            dq_accum: dq_accum_ptr,
            lse_log2: lse_log2_ptr,
            delta: delta_ptr,
            sem: sem_ptr,
            bounds,
        },
    };
    let args = arguments(&call)?;
    let grids = grids(p, kernels)?;
    let launches = kernels.kernels();
    let functions = launches
        .iter()
        .map(|k| module_cache::function(ctx, k))
        .collect::<Result<Vec<_>>>()?;
    let masked = call.ptrs.mask != 0;
    if masked {
        for kernel in launches {
            module_cache::check_masked_smem(ctx, kernel)?;
        }
    }
    for ((kernel, function), grid) in launches.iter().zip(&functions).zip(grids) {
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (kernel.threads(), 1, 1),
            shared_mem_bytes: kernel.smem_bytes_for(masked),
        };
        let mut builder = stream.launch_builder(function);
        for (_, arg) in &args {
            match arg {
                Arg::U64(x) => builder.arg(x),
                Arg::U32(x) => builder.arg(x),
                Arg::F32(x) => builder.arg(x),
            };
        }
        // SAFETY: each of the three launches is sound because
        // - the arguments are those of the backward launch contract, in its
        //   order and with its types (`arguments` walks
        //   `kernels_gen::backward::BACKWARD_PARAMS`, the table all three
        //   kernels declare, giving each name its value in the declared
        //   kind, and fails on a name or kind it does not know), and
        //   `function` is the entry point generated for this variant's
        //   backward, so it reads them as laid out here; `args` outlives
        //   the launch call; no kernel takes tensor maps;
        // - every pointer is the address of device memory of `stream`'s
        //   context (checked above for every input and gradient; the mask
        //   and the scratch buffers were allocated on `stream`) that stays
        //   allocated while the kernels run: the views borrow the caller's
        //   buffers for the whole call, the scratch buffers and the mask
        //   live until the end of this function and cudarc frees them in
        //   stream order (after the kernels queued on `stream`), and the
        //   guards `_q` ... `_sem` record the kernels' use on `stream` when
        //   dropped after the last launch, so that frees and other streams
        //   wait for them;
        // - the kernels touch only elements `[b, t, h, 0..D]` inside each
        //   `[B, S, H, D]` tensor's shape (`q`, `out`, `dout`, `dq` of
        //   q's shape; `k`, `v`, `dk`, `dv` of k's: `Problem::new` and
        //   `check_backward` above) and elements `[b, h, t]` of the lse
        //   (`Problem::lse_shape`, `check_lse_input`), at offsets formed
        //   from the strides passed here: `b < B` for `[B, S, H, D]`
        //   tensors, batch stride 0 for packed ones (every sequence lives
        //   in batch entry 0); the token `t = start + i` of a sequence's
        //   local row or key `i`, where the kernels clamp `start` to
        //   `[0, tokens]`, the end to `[start, tokens]` and the length to
        //   `Sq` (`Sk`) whatever the bound arrays hold
        //   (`kernels_gen::attention::seqs`), with `tokens_q`, `tokens_k`
        //   the tensors' own dimension 1, so `t` is a token of the tensor;
        //   each view's buffer holds `Layout::required_len` elements for
        //   its shape and strides (checked when the view was made, with
        //   overflow checks), so every access is in bounds; the head
        //   dimension has stride 1 (`Layout::strided`); offsets are 64-bit
        //   in the kernels and no sum of them overflows since
        //   `required_len` did not; every row of the `[B, S, H, D]` tensors
        //   starts on a 16-byte boundary (`check_rows_aligned` above), as
        //   the kernels' vector accesses need, and the lse is 4-byte
        //   aligned;
        // - the bound arrays, where passed, are `i32` device memory of
        //   `stream`'s context (`Reads::bound_ptrs` checks device
        //   `cu_seqlens`; the others were copied on `stream`) holding at
        //   least `B + 1` entries for `cu_seqlens` (`varlen::check` counted
        //   them) or `2 B` for key runs, alive past the kernels and guarded
        //   by `_bounds`;
        // - the scratch buffers are dense and as long as the contract says
        //   (`scratch_lens`: `dq_accum` `B·Hq·Sq·D`, `lse_log2` and `delta`
        //   `B·Hq·Sq`, `sem` `B·Hq·ceil(Sq / main.block_m)`, computed with
        //   overflow checks), and `dq_accum` and `sem` are zeroed by
        //   `alloc_zeros` on `stream` before the launches;
        // - `dq`, `dk` and `dv` are writable, borrowed mutably, each
        //   non-overlapping (checked by `TensorViewMut`) and distinct
        //   borrows, so no input aliases them and no two of them share an
        //   element; the kernels write each of their elements from one
        //   thread (the `dq` sums go through `dq_accum`, ordered by `sem`);
        // - the mask, when present, holds exactly the elements of its
        //   resolved shape `[B', H', Sq', L]` (`AttnMask::new`/`from_cuda`
        //   check the length) of the kind `mask_kind` says, in device
        //   memory of `stream`'s context (the caller's, checked by
        //   `DeviceMask::device_ptr`, or copied on this stream), strides 0
        //   on broadcast dimensions and `mask_pad = Sk - L`, so row
        //   `(b, h, i)`, `b < B, h < Hq, i < Sq`, reads keys `j` in
        //   `[mask_pad, Sk)` at `row + j - mask_pad`, in bounds; it is only
        //   passed without sequence bounds, so `b`, `i`, `j` are the
        //   tensors' own; a null pointer means no mask;
        // - the grids are the contract's (`grids`: `(ceil(Sq / block_m),
        //   Hq, B)` for the row kernels, `(ceil(Sk / block_n), Hkv, B)` for
        //   the main one, within the driver's limits), none empty since the
        //   problem is not, and the kernels guard rows and keys past their
        //   sequence (at most `Sq`, `Sk`: the scratch buffers' local
        //   rows); `threads` is each kernel's own, and the dynamic shared
        //   memory is its `smem_bytes_for(masked)`: a kernel's mask tile
        //   lies last and is touched only with a mask, a masked launch's
        //   size was checked against the device (`check_masked_smem`), and
        //   each function's limit was raised to its masked size (or its
        //   unmasked one where the device allows no more) when loaded;
        // - the three launches are queued in order on one stream, so each
        //   kernel sees everything the previous one wrote (the main kernel
        //   reads `lse_log2` and `delta`, the conversion reads the complete
        //   `dq_accum`).
        unsafe { builder.launch(cfg) }.map_err(|e| {
            SdpaError::cuda(
                format_args!(
                    "launching {} with grid {grid:?}, {} threads, {} bytes of shared memory",
                    kernel.entry(),
                    kernel.threads(),
                    kernel.smem_bytes_for(masked)
                ),
                e,
            )
        })?;
    }
    Ok(())
}

/// Device tensors of zeros for the gradients of `p`: `dq` shaped as `q`,
/// `dk` and `dv` as `k`, on `q`'s stream.
pub(crate) fn alloc_gradients(
    p: &Problem<'_>,
) -> Result<(crate::Tensor, crate::Tensor, crate::Tensor)> {
    let Some(q) = p.q.cuda_data() else {
        return Err(SdpaError::Residence("q is not device memory".into()));
    };
    let alloc = |shape: [usize; 4]| -> Result<crate::Tensor> {
        let data = crate::storage::CudaOwned::zeros(q.stream(), p.dtype(), shape.iter().product())?;
        Ok(crate::Tensor::from_cuda_owned(data, shape))
    };
    let kv = p.k.layout().shape();
    Ok((alloc(p.out_shape())?, alloc(kv)?, alloc(kv)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernels_gen::ptx::Target;

    fn problem<'a>(
        q: &'a [f32],
        kv: &'a [f32],
        q_shape: [usize; 4],
        kv_shape: [usize; 4],
    ) -> Problem<'a> {
        let q = TensorView::from_slice(q, q_shape).unwrap();
        let kv = TensorView::from_slice(kv, kv_shape).unwrap();
        Problem::new(q, kv, kv, None, 0.125).unwrap()
    }

    const PRE: GpuKernel = GpuKernel::new("", "pre", Target::Sm80, 8, 256, 0);
    const MAIN: GpuKernel = GpuKernel::new("", "main", Target::Sm80, 64, 128, 0);
    const CONVERT: GpuKernel = GpuKernel::new("", "dq", Target::Sm80, 16, 256, 0);
    const BACKWARD: GpuBackward = GpuBackward::new(PRE, MAIN, 128, CONVERT);

    /// A call of `p` with distinct layouts and addresses, so that each
    /// value shows where it came from.
    fn call<'c>(p: &'c Problem<'c>) -> Call<'c> {
        let [b, sq, hq, d] = p.out_shape();
        let kv = p.k.layout().shape();
        let gapped = |shape: [usize; 4], row: usize| {
            let [_, s, h, _] = shape;
            Layout::strided(shape, [s * h * row + 1, h * row, row, 1]).unwrap()
        };
        Call {
            p,
            out: gapped([b, sq, hq, d], d + 8),
            dout: gapped([b, sq, hq, d], d + 16),
            lse: Layout::strided([b, hq, sq, 1], [hq * (sq + 3), sq + 3, 1, 1]).unwrap(),
            dq: gapped([b, sq, hq, d], d + 24),
            dk: gapped(kv, d + 32),
            dv: gapped(kv, d + 40),
            mask: MaskArgs {
                strides: [7, 0, 5],
                kind: 2,
                pad: 3,
            },
            ptrs: Pointers {
                q: 1,
                k: 2,
                v: 3,
                out: 4,
                dout: 5,
                lse: 6,
                mask: 7,
                dq: 8,
                dk: 9,
                dv: 10,
                dq_accum: 11,
                lse_log2: 12,
                delta: 13,
                sem: 14,
                bounds: BoundPtrs {
                    q_start: 15,
                    q_end: 16,
                    k_start: 17,
                    k_end: 18,
                    mask_batches: 0,
                },
            },
        }
    }

    #[test]
    fn every_contract_name_has_a_value_in_its_kind() {
        let (q, kv) = (vec![0.0; 2 * 5 * 4 * 8], vec![0.0; 2 * 7 * 2 * 8]);
        let p = problem(&q, &kv, [2, 5, 4, 8], [2, 7, 2, 8]);
        let c = call(&p);
        for (name, _) in BACKWARD_PARAMS {
            assert!(value(name, &c).is_some(), "{name} has no value");
        }
        let args = arguments(&c).unwrap();
        let names: Vec<&str> = args.iter().map(|(n, _)| *n).collect();
        let table: Vec<&str> = BACKWARD_PARAMS.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, table);
        let arg = |name: &str| args.iter().find(|(n, _)| *n == name).unwrap().1;
        for (n, name) in [
            "q", "k", "v", "out", "dout", "lse", "mask", "dq", "dk", "dv", "dq_accum", "lse_log2",
            "delta", "sem", "q_start", "q_end", "k_start", "k_end",
        ]
        .into_iter()
        .enumerate()
        {
            assert_eq!(arg(name), Arg::U64(n as u64 + 1), "{name}");
        }
        // [B, S, H, D] strides: batch, token, head, each from its own view.
        assert_eq!(arg("q_stride_s"), Arg::U64(4 * 8));
        assert_eq!(arg("k_stride_h"), Arg::U64(8));
        assert_eq!(arg("out_stride_h"), Arg::U64(16));
        assert_eq!(arg("dout_stride_h"), Arg::U64(24));
        assert_eq!(arg("dq_stride_h"), Arg::U64(32));
        assert_eq!(arg("dq_stride_b"), Arg::U64(5 * 4 * 32 + 1));
        assert_eq!(arg("dk_stride_s"), Arg::U64(2 * 40));
        assert_eq!(arg("dv_stride_h"), Arg::U64(48));
        // The lse and the mask: batch, head, query.
        assert_eq!(arg("lse_stride_b"), Arg::U64(4 * 8));
        assert_eq!(arg("lse_stride_h"), Arg::U64(8));
        assert_eq!(arg("lse_stride_q"), Arg::U64(1));
        assert_eq!(arg("mask_stride_b"), Arg::U64(7));
        assert_eq!(arg("mask_stride_h"), Arg::U64(0));
        assert_eq!(arg("mask_stride_q"), Arg::U64(5));
        // Sizes and scales.
        assert_eq!(arg("seq_q"), Arg::U32(5));
        assert_eq!(arg("seq_k"), Arg::U32(7));
        assert_eq!(arg("heads_q"), Arg::U32(4));
        assert_eq!(arg("group"), Arg::U32(2));
        assert_eq!(arg("tokens_q"), Arg::U32(5));
        assert_eq!(arg("tokens_k"), Arg::U32(7));
        assert_eq!(arg("mask_kind"), Arg::U32(2));
        assert_eq!(arg("mask_pad"), Arg::U32(3));
        assert_eq!(arg("scale"), Arg::F32(0.125));
        assert_eq!(
            arg("scale_log2"),
            Arg::F32(0.125 * std::f32::consts::LOG2_E)
        );
    }

    #[test]
    fn packed_batches_take_zero_batch_strides_and_their_token_counts() {
        let (q, kv) = (vec![0.0; 7 * 4 * 8], vec![0.0; 8 * 2 * 8]);
        let qv = TensorView::from_slice(&q, [1, 7, 4, 8]).unwrap();
        let kvv = TensorView::from_slice(&kv, [1, 8, 2, 8]).unwrap();
        let (cu_q, cu_k) = ([0, 3, 3, 7], [0, 2, 7, 8]);
        let vl = crate::VarLen::new(&cu_q, &cu_k);
        let p = Problem::with_varlen(qv, kvv, kvv, None, Some(&vl), 0.125).unwrap();
        let c = call(&p);
        let args = arguments(&c).unwrap();
        let arg = |name: &str| args.iter().find(|(n, _)| *n == name).unwrap().1;
        for t in ["q", "k", "v", "out", "dout", "dq", "dk", "dv", "lse"] {
            assert_eq!(arg(&format!("{t}_stride_b")), Arg::U64(0), "{t}");
        }
        assert_eq!(arg("dq_stride_s"), Arg::U64(4 * 32));
        assert_eq!((arg("seq_q"), arg("seq_k")), (Arg::U32(4), Arg::U32(5)));
        assert_eq!(
            (arg("tokens_q"), arg("tokens_k")),
            (Arg::U32(7), Arg::U32(8))
        );
        // Scratch: B sequences of at most Sq rows.
        let [accum, rows, _] = scratch_lens(&p, &BACKWARD).unwrap();
        assert_eq!((accum, rows), (3 * 4 * 4 * 8, 3 * 4 * 4));
        let [pre, main, _] = grids(&p, &BACKWARD).unwrap();
        assert_eq!((pre, main), ((1, 4, 3), (1, 2, 3)));
    }

    #[test]
    fn unknown_names_and_kinds_are_errors() {
        let (q, kv) = (vec![0.0; 8], vec![0.0; 8]);
        let p = problem(&q, &kv, [1, 1, 1, 8], [1, 1, 1, 8]);
        let c = call(&p);
        let args = |params: &[(&'static str, ParamKind)]| {
            arguments_of(params, &c).map_err(|e| e.to_string())
        };
        for bogus in ["bogus", "lse_stride_s", "q_stride_q", "bias_stride_b"] {
            let err = args(&[("q", ParamKind::Ptr), (bogus, ParamKind::U64)]).unwrap_err();
            assert!(err.contains(&format!("parameter \"{bogus}\"")), "{err}");
        }
        let err = args(&[("seq_q", ParamKind::Ptr)]).unwrap_err();
        assert!(err.contains("declares seq_q as Ptr"), "{err}");
        let err = args(&[("scale", ParamKind::U32)]).unwrap_err();
        assert!(err.contains("declares scale as U32"), "{err}");
        let p = Problem {
            seq_k: 1 << 32,
            ..p.clone()
        };
        let c = Call { p: &p, ..c };
        let err = arguments(&c).unwrap_err().to_string();
        assert!(err.contains("Sk = 4294967296 is more than"), "{err}");
    }

    #[test]
    fn the_grids_cover_query_rows_and_key_blocks() {
        let (q, kv) = (vec![0.0; 3 * 65 * 4 * 8], vec![0.0; 3 * 130 * 2 * 8]);
        let p = problem(&q, &kv, [3, 65, 4, 8], [3, 130, 2, 8]);
        let [pre, main, convert] = grids(&p, &BACKWARD).unwrap();
        assert_eq!(pre, (9, 4, 3));
        assert_eq!(main, (2, 2, 3));
        assert_eq!(convert, (5, 4, 3));
        // dq_accum [B, Hq, Sq, D], lse_log2 and delta [B, Hq, Sq], sem
        // [B, Hq, ceil(Sq / main.block_m)].
        assert_eq!(
            scratch_lens(&p, &BACKWARD).unwrap(),
            [3 * 4 * 65 * 8, 3 * 4 * 65, 3 * 4 * 2]
        );
        let broken = GpuBackward::new(PRE, MAIN, 0, CONVERT);
        let err = grids(&p, &broken).unwrap_err().to_string();
        assert!(err.contains("block_n = 0"), "{err}");
        let broken = GpuBackward::new(
            PRE,
            GpuKernel::new("", "m", Target::Sm80, 0, 128, 0),
            64,
            CONVERT,
        );
        assert!(scratch_lens(&p, &broken).is_err());
    }

    #[test]
    fn grids_past_the_drivers_limits_are_errors() {
        let (q, kv) = (vec![0.0; 70_000 * 8], vec![0.0; 8]);
        let p = problem(&q, &kv, [1, 1, 70_000, 8], [1, 1, 1, 8]);
        let err = grids(&p, &BACKWARD).unwrap_err().to_string();
        assert!(err.contains("query heads is 70000"), "{err}");
        let (q, kv) = (vec![0.0; 8], vec![0.0; 8]);
        let p = problem(&q, &kv, [1, 1, 1, 8], [1, 1, 1, 8]);
        let p = Problem { batch: 65_536, ..p };
        let err = grids(&p, &BACKWARD).unwrap_err().to_string();
        assert!(err.contains("batch size is 65536"), "{err}");
    }

    #[test]
    fn runs_cover_a_view_with_as_few_ranges_as_its_strides_allow() {
        let dense = Layout::contiguous([2, 3, 4, 8]);
        assert_eq!(runs(&dense).unwrap(), [(0, 2 * 3 * 4 * 8)]);
        assert!(runs(&Layout::contiguous([2, 0, 4, 8])).unwrap().is_empty());
        // Heads contiguous, tokens gapped: one range per token.
        let gapped = Layout::strided([1, 3, 2, 8], [100, 20, 8, 1]).unwrap();
        assert_eq!(runs(&gapped).unwrap(), [(0, 16), (20, 16), (40, 16)]);
        // Dense whatever the order of its dimensions: one range.
        let head_major = Layout::strided([1, 2, 2, 8], [32, 8, 16, 1]).unwrap();
        assert_eq!(runs(&head_major).unwrap(), [(0, 32)]);
        // Head-major with gaps: one range per row.
        let head_major = Layout::strided([1, 2, 2, 8], [48, 8, 24, 1]).unwrap();
        assert_eq!(
            runs(&head_major).unwrap(),
            [(0, 8), (24, 8), (8, 8), (32, 8)]
        );
        // Zeroing a host view writes its elements and nothing else.
        let mut buf = vec![f32::NAN; 100];
        let mut t = TensorViewMut::with_strides(&mut buf, [1, 3, 2, 8], [100, 20, 8, 1]).unwrap();
        zero_host::<f32>("dq", &mut t).unwrap();
        for (n, x) in buf.iter().enumerate() {
            assert_eq!(*x == 0.0, n % 20 < 16 && n < 56, "{n}");
        }
    }

    #[test]
    fn scatter_inverts_pack() {
        let layout = Layout::strided([2, 2, 2, 2], [20, 8, 3, 1]).unwrap();
        let host: Vec<f32> = (0..40).map(|x| x as f32).collect();
        let packed = pack(&host, &layout);
        let mut back = vec![-1.0f32; 40];
        scatter(&mut back, &layout, &packed);
        assert_eq!(pack(&back, &layout), packed);
        let written = back.iter().filter(|x| **x >= 0.0).count();
        assert_eq!(written, layout.numel());
    }
}

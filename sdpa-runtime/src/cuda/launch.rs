//! The launch of an attention kernel: the one `unsafe` of the CUDA backend
//! on the hot path.
//!
//! [`attention`] derives the device pointers from the checked views of a
//! [`Problem`] (and of the row log-sum-exp, where the caller asks for it),
//! lays out the arguments in the order of the launch contract
//! ([`kernels_gen::contract::PARAMS`], then [`kernels_gen::contract::SCALE_PARAM`]),
//! computes the grid and launches on the given stream. A kernel that takes
//! tensor maps gets them last ([`kernels_gen::contract::TENSOR_MAP_PARAMS`]),
//! encoded for this call; where they cannot be ([`choose`]), the next of the
//! variant's kernels that the device runs is tried instead.

use std::fmt;

use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};
use kernels_gen::contract::{ParamKind, PARAMS, SCALE_PARAM, TENSOR_MAP_PARAMS};

use super::module_cache;
use super::seqs::{BoundPtrs, Reads};
use super::tensor_map::{self, TensorMap, Tiled, Undescribable};
use crate::error::{Result, SdpaError};
use crate::layout::Layout;
use crate::problem::Problem;
use crate::storage::StorageMut;
use crate::tensor::TensorViewMut;
use crate::variant::{GpuKernel, Variant, PORTABLE_CAPABILITY};

/// The most CTAs in the y and z dimensions of a grid.
const MAX_GRID_YZ: usize = 65_535;
/// The most CTAs in the x dimension of a grid.
const MAX_GRID_X: usize = (1 << 31) - 1;

/// One kernel argument.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Arg {
    /// A device pointer, element stride or count.
    U64(u64),
    /// A count.
    U32(u32),
    /// A float.
    F32(f32),
}

/// Device addresses of the call's buffers (0 for an absent mask, for an
/// lse the caller did not ask for, and for absent sequence bounds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Pointers {
    pub(crate) q: u64,
    pub(crate) k: u64,
    pub(crate) v: u64,
    pub(crate) out: u64,
    pub(crate) mask: u64,
    pub(crate) lse: u64,
    pub(crate) bounds: BoundPtrs,
}

/// The layout of the call's per-row buffers: the element strides (batch,
/// head, query) of the mask and of the row log-sum-exp (zeros for one that
/// is absent), and the mask's element kind code and front padding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RowStrides {
    pub(crate) mask: [usize; 3],
    pub(crate) lse: [usize; 3],
    pub(crate) mask_kind: u32,
    pub(crate) mask_pad: usize,
}

/// A tensor's batch stride as the kernels take it: 0 for packed tensors
/// (every sequence is addressed from batch entry 0 by its tokens).
pub(crate) fn batch_stride(p: &Problem<'_>, stride: usize) -> usize {
    if p.is_packed() {
        0
    } else {
        stride
    }
}

/// A value the launch knows for a contract parameter, before it takes the
/// parameter's type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Value {
    /// A device address.
    Address(u64),
    /// An element stride or a count.
    Size(usize),
    /// A float.
    Float(f32),
}

/// The value of the contract parameter `name` for this call, with what it
/// stands for in error messages; `None` for a name the runtime does not
/// know. The only place that maps the contract's names to values.
fn value(
    name: &str,
    p: &Problem<'_>,
    out: &Layout,
    rows: &RowStrides,
    ptrs: &Pointers,
) -> Option<(Value, &'static str)> {
    use Value::{Address, Float, Size};
    let [qb, qs, qh, _] = p.q.layout().strides();
    let [kb, ks, kh, _] = p.k.layout().strides();
    let [vb, vs, vh, _] = p.v.layout().strides();
    let [ob, os, oh, _] = out.strides();
    let [mb, mh, mq] = rows.mask;
    let [lb, lh, lq] = rows.lse;
    let [qb, kb, vb, ob, lb] = [qb, kb, vb, ob, lb].map(|s| batch_stride(p, s));
    let stride = |n| (Size(n), "a stride");
    Some(match name {
        "q" => (Address(ptrs.q), "q's address"),
        "k" => (Address(ptrs.k), "k's address"),
        "v" => (Address(ptrs.v), "v's address"),
        "out" => (Address(ptrs.out), "the output's address"),
        "mask" => (Address(ptrs.mask), "the mask's address"),
        "lse" => (Address(ptrs.lse), "the lse's address"),
        "q_stride_b" => stride(qb),
        "q_stride_s" => stride(qs),
        "q_stride_h" => stride(qh),
        "k_stride_b" => stride(kb),
        "k_stride_s" => stride(ks),
        "k_stride_h" => stride(kh),
        "v_stride_b" => stride(vb),
        "v_stride_s" => stride(vs),
        "v_stride_h" => stride(vh),
        "out_stride_b" => stride(ob),
        "out_stride_s" => stride(os),
        "out_stride_h" => stride(oh),
        "mask_stride_b" => stride(mb),
        "mask_stride_h" => stride(mh),
        "mask_stride_q" => stride(mq),
        "lse_stride_b" => stride(lb),
        "lse_stride_h" => stride(lh),
        "lse_stride_q" => stride(lq),
        "q_start" => (Address(ptrs.bounds.q_start), "q_start's address"),
        "q_end" => (Address(ptrs.bounds.q_end), "q_end's address"),
        "k_start" => (Address(ptrs.bounds.k_start), "k_start's address"),
        "k_end" => (Address(ptrs.bounds.k_end), "k_end's address"),
        "mask_batches" => (
            Address(ptrs.bounds.mask_batches),
            "the masked entries' address",
        ),
        "seq_q" => (Size(p.seq_q), "Sq"),
        "seq_k" => (Size(p.seq_k), "Sk"),
        "tokens_q" => (Size(p.tokens_q), "q's token count"),
        "tokens_k" => (Size(p.tokens_k), "k's token count"),
        "mask_kind" => (Size(rows.mask_kind as usize), "the mask's element kind"),
        "mask_pad" => (Size(rows.mask_pad), "the mask's front padding"),
        "group" => (Size(p.group_size()), "Hq / Hkv"),
        "scale_log2" => (
            Float(p.scale * std::f32::consts::LOG2_E),
            "the scale times log2(e)",
        ),
        _ => return None,
    })
}

/// The arguments of the contract, named, in launch order: the parameters of
/// [`PARAMS`], then [`SCALE_PARAM`], each given its value by name
/// ([`arguments_of`]).
pub(crate) fn arguments(
    p: &Problem<'_>,
    out: &Layout,
    rows: &RowStrides,
    ptrs: &Pointers,
) -> Result<Vec<(&'static str, Arg)>> {
    arguments_of(PARAMS.iter().chain([&SCALE_PARAM]), p, out, rows, ptrs)
}

/// The arguments for the forward contract's parameters `params`
/// ([`by_name`] with [`value`]).
fn arguments_of<'c>(
    params: impl IntoIterator<Item = &'c (&'static str, ParamKind)>,
    p: &Problem<'_>,
    out: &Layout,
    rows: &RowStrides,
    ptrs: &Pointers,
) -> Result<Vec<(&'static str, Arg)>> {
    by_name("the launch contract", params, |name| {
        value(name, p, out, rows, ptrs)
    })
}

/// The arguments for the parameters `params` of `contract`, in their
/// order, each the value `value_of` gives its name, in the parameter's
/// kind: the one place a contract's table becomes launch arguments. A name
/// without a value, a kind its value does not have or a count too large
/// for it is an error.
pub(crate) fn by_name<'c>(
    contract: &str,
    params: impl IntoIterator<Item = &'c (&'static str, ParamKind)>,
    value_of: impl Fn(&str) -> Option<(Value, &'static str)>,
) -> Result<Vec<(&'static str, Arg)>> {
    params
        .into_iter()
        .map(|&(name, kind)| {
            let (value, what) = value_of(name).ok_or_else(|| {
                SdpaError::Cuda(format!(
                    "{contract} has a parameter {name:?} that this runtime does not know; \
                     the runtime and kernels-gen come from different versions"
                ))
            })?;
            let arg = match (kind, value) {
                (ParamKind::Ptr, Value::Address(a)) => Arg::U64(a),
                (ParamKind::U64, Value::Size(n)) => Arg::U64(n as u64),
                (ParamKind::U32, Value::Size(n)) => Arg::U32(u32::try_from(n).map_err(|_| {
                    SdpaError::Shape(format!(
                        "{what} = {n} is more than the CUDA kernels take ({})",
                        u32::MAX
                    ))
                })?),
                (ParamKind::F32, Value::Float(x)) => Arg::F32(x),
                _ => {
                    return Err(SdpaError::Cuda(format!(
                        "{contract} declares {name} as {kind:?}, but the runtime holds {what} \
                         there; the runtime and kernels-gen come from different versions"
                    )))
                }
            };
            Ok((name, arg))
        })
        .collect()
}

/// The tensor map the contract's tensor-map parameter `name` takes, from
/// the maps of `q`, `k` and `v`.
fn map_param<'m>(name: &str, maps: &'m [TensorMap; 3]) -> Result<&'m TensorMap> {
    let [q, k, v] = maps;
    match name {
        "tmap_q" => Ok(q),
        "tmap_k" => Ok(k),
        "tmap_v" => Ok(v),
        _ => Err(SdpaError::Cuda(format!(
            "the launch contract has a tensor-map parameter {name:?} that this runtime does \
             not know; the runtime and kernels-gen come from different versions"
        ))),
    }
}

/// The environment variable that picks the GPU kernel family: `auto` (the
/// default: the first of the variant's kernels that the device runs, e.g.
/// the Hopper kernel on compute capability 9.0 where the variant has one)
/// or `sm80` (the kernels a device of capability 8.0 runs: the portable
/// kernel everywhere).
pub const KERNEL_ENV: &str = "SDPA_CUDA_KERNEL";

/// Whether the environment asks for the portable kernels only
/// ([`KERNEL_ENV`]).
pub(crate) fn portable_only() -> Result<bool> {
    portable_only_in(std::env::var(KERNEL_ENV).ok().as_deref())
}

/// Whether `value`, [`KERNEL_ENV`]'s value where it is set (and valid
/// Unicode), asks for the portable kernels only.
fn portable_only_in(value: Option<&str>) -> Result<bool> {
    match value {
        None | Some("" | "auto") => Ok(false),
        Some("sm80") => Ok(true),
        Some(v) => Err(SdpaError::Param(format!(
            "{KERNEL_ENV}={v:?} is not a kernel family; use auto or sm80"
        ))),
    }
}

/// The device a call runs on, as the kernel's choice sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Capability {
    /// The device's own compute capability, `(major, minor)`.
    pub(crate) device: (i32, i32),
    /// Whether [`KERNEL_ENV`]`=sm80` forces the portable kernels.
    pub(crate) portable_only: bool,
}

impl Capability {
    /// The capability the kernels are chosen for: the device's, or 8.0
    /// where the portable kernels are forced.
    fn choosing(self) -> (i32, i32) {
        if self.portable_only {
            PORTABLE_CAPABILITY
        } else {
            self.device
        }
    }
}

/// For error messages: the device's own capability, and whether the
/// environment forced the portable kernels.
impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (major, minor) = self.device;
        write!(f, "compute capability {major}.{minor}")?;
        if self.portable_only {
            write!(
                f,
                " with {KERNEL_ENV}=sm80, which asks for the portable kernels only"
            )?;
        }
        Ok(())
    }
}

/// The kernels a call may run: the kernels of a variant that the device
/// runs, in the variant's order of preference ([`Variant::gpu_kernels_for`],
/// the one place that rule is written).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Kernels<'v> {
    /// The variant.
    variant: &'v Variant,
    /// The device the kernels must run on.
    capability: Capability,
}

impl<'v> Kernels<'v> {
    /// The kernels of `variant` that the device runs, or an error saying
    /// why it runs none.
    pub(crate) fn new(variant: &'v Variant, capability: Capability) -> Result<Kernels<'v>> {
        let kernels = Kernels {
            variant,
            capability,
        };
        match kernels.preferred() {
            Some(_) => Ok(kernels),
            None => Err(kernels.no_kernel()),
        }
    }
    /// Whether the variant is causal.
    pub(crate) fn causal(self) -> bool {
        self.variant.spec().causal
    }
    /// The kernels the device runs, best first.
    pub(crate) fn candidates(self) -> impl Iterator<Item = &'static GpuKernel> {
        self.variant.gpu_kernels_for(self.capability.choosing())
    }
    /// The kernel the device prefers ([`Variant::gpu_kernel_for`]).
    pub(crate) fn preferred(self) -> Option<&'static GpuKernel> {
        self.variant.gpu_kernel_for(self.capability.choosing())
    }
    /// The error for a variant with no GPU kernel that the device runs.
    fn no_kernel(self) -> SdpaError {
        let targets: Vec<&str> = self
            .variant
            .gpu_kernels()
            .iter()
            .map(|k| k.target().name())
            .collect();
        // Where the environment forced the portable kernels, the kernel the
        // device would run without it.
        let unforced = match self.capability.portable_only {
            true => self.variant.gpu_kernel_for(self.capability.device),
            false => None,
        };
        SdpaError::BackendUnavailable {
            backend: "cuda",
            reason: if targets.is_empty() {
                format!(
                    "variant {} was built without a GPU kernel",
                    self.variant.spec()
                )
            } else {
                format!(
                    "variant {} has no GPU kernel for {} (its kernels target {}){}",
                    self.variant.spec(),
                    self.capability,
                    targets.join(", "),
                    unforced.map_or(String::new(), |k| format!(
                        "; without {KERNEL_ENV} the device runs its {} kernel",
                        k.target().name()
                    ))
                )
            },
        }
    }
}

/// The kernel a call launches, and the tensor maps it takes.
#[derive(Debug)]
pub(crate) struct Chosen {
    /// The kernel.
    pub(crate) kernel: &'static GpuKernel,
    /// The maps of `q`, `k` and `v`, where the kernel takes them.
    pub(crate) maps: Option<[TensorMap; 3]>,
}

/// The kernel to launch for `p`, whose `q`, `k` and `v` live at
/// `addresses`: the first of `kernels` that can run the call, with its
/// tensor maps made by `encode` where it takes them ([`Tiled::encode`] on a
/// device). A kernel that takes maps cannot run the call where a tensor has
/// no map (strides TMA cannot describe, or the driver refused): the next
/// kernel is tried, with a debug line saying why.
pub(crate) fn choose(
    kernels: Kernels<'_>,
    p: &Problem<'_>,
    addresses: [u64; 3],
    encode: impl Fn(&Tiled) -> Result<TensorMap, Undescribable>,
) -> Result<Chosen> {
    let mut refused: Option<(&GpuKernel, &str, Undescribable)> = None;
    for kernel in kernels.candidates() {
        if let Some((previous, tensor, why)) = &refused {
            tracing::debug!(
                kernel = previous.entry(),
                fallback = kernel.entry(),
                tensor,
                reason = %why,
                "no tensor map describes {tensor}; running the next kernel"
            );
        }
        let Some(boxes) = kernel.tensor_maps() else {
            return Ok(Chosen { kernel, maps: None });
        };
        match tensor_map::for_inputs(boxes, p, addresses, &encode) {
            Ok(maps) => {
                return Ok(Chosen {
                    kernel,
                    maps: Some(maps),
                })
            }
            Err((tensor, why)) => refused = Some((kernel, tensor, why)),
        }
    }
    Err(match refused {
        Some((kernel, tensor, why)) => {
            SdpaError::BackendUnavailable {
                backend: "cuda",
                reason: format!(
                "{} needs a tensor map of {tensor}, and {why}; the variant has no other kernel \
                 for {}{} to run instead",
                kernel.entry(),
                kernels.capability,
                // The capability's clause on the environment ends here.
                if kernels.capability.portable_only { "," } else { "" }
            ),
            }
        }
        None => kernels.no_kernel(),
    })
}

/// The kernels move 16-byte vectors: every row `[b, s, h, ..]` of a tensor
/// must start on a 16-byte boundary. Checked before launch, because a
/// misaligned access is a sticky fault that ruins the context.
pub(crate) fn check_rows_aligned(name: &str, ptr: u64, layout: &Layout, elem: usize) -> Result<()> {
    let shape = layout.shape();
    let strides = layout.strides();
    let misaligned_stride =
        (0..3).find(|&i| shape[i] > 1 && !(strides[i] * elem).is_multiple_of(16));
    if ptr.is_multiple_of(16) && misaligned_stride.is_none() {
        return Ok(());
    }
    Err(SdpaError::Shape(format!(
        "{name} has strides {strides:?} (elements of {elem} bytes) at device address {ptr:#x}; \
         the CUDA kernels read 16-byte rows, so the buffer must be 16-byte aligned and the \
         batch, token and head strides multiples of {} elements; make the tensor contiguous \
         (or pad its rows) first",
        16 / elem
    )))
}

/// The grid of the contract, `(ceil(Sq / block_m), Hq, B)`, or an error
/// when the problem does not fit a grid.
pub(crate) fn grid(p: &Problem<'_>, kernel: &GpuKernel) -> Result<(u32, u32, u32)> {
    if kernel.block_m() == 0 || kernel.threads() == 0 {
        return Err(SdpaError::Cuda(format!(
            "kernel {} declares block_m = {} and threads = {}; both must be positive",
            kernel.entry(),
            kernel.block_m(),
            kernel.threads()
        )));
    }
    let blocks = p.seq_q.div_ceil(kernel.block_m() as usize);
    let fits = |what: &str, n: usize, max: usize| {
        if n <= max {
            Ok(n as u32)
        } else {
            Err(SdpaError::Shape(format!(
                "{what} is {n}; the CUDA kernels take at most {max}; split the call"
            )))
        }
    };
    Ok((
        fits("the number of query blocks", blocks, MAX_GRID_X)?,
        fits("the number of query heads", p.heads_q, MAX_GRID_YZ)?,
        fits("the batch size", p.batch, MAX_GRID_YZ)?,
    ))
}

/// Launches a GPU kernel of `p`'s variant ([`choose`]n from `kernels`,
/// JIT-loaded on first use) on `stream` for the checked problem `p`,
/// writing `out`, and the row log-sum-exp into `lse` where it is given.
///
/// `p`'s tensors, `out` and `lse` must be device memory of `stream`'s
/// context; `lse` is `f32`, `[B, Hq, Sq, 1]` ([`Problem::check_lse`]), at
/// any strides; `reads` holds `p`'s sequence bounds and mask, prepared on
/// `stream` ([`super::seqs::prepare`]). Returns the
/// kernel once its launch is queued (the stream orders it with what comes
/// next). An empty output has nothing to compute: callers return before
/// launching, and this refuses one with an error.
pub(crate) fn attention(
    kernels: Kernels<'_>,
    stream: &CudaStream,
    p: &Problem<'_>,
    out: &mut TensorViewMut<'_>,
    reads: &Reads<'_>,
    lse: Option<&mut TensorViewMut<'_>>,
) -> Result<&'static GpuKernel> {
    p.check_output(out)?;
    if let Some(lse) = lse.as_deref() {
        p.check_lse(lse)?;
    }
    if out.layout().numel() == 0 {
        return Err(SdpaError::Shape(format!(
            "an output of shape {:?} has no element to compute; nothing is launched for it",
            out.layout().shape()
        )));
    }
    let out_layout = *out.layout();
    let not_here = |what: &str| {
        SdpaError::Residence(format!(
            "{what} is not device memory of CUDA device {}'s context, where the kernel runs; \
             pass q, k, v, out (and lse) on one device",
            stream.context().ordinal()
        ))
    };
    let inputs = [("q", &p.q), ("k", &p.k), ("v", &p.v)].map(|(name, t)| (name, t.cuda_data()));
    let mut input_data = Vec::with_capacity(3);
    for (name, data) in inputs {
        let data = data.ok_or_else(|| not_here(name))?;
        if data.stream().context() != stream.context() {
            return Err(not_here(name));
        }
        input_data.push(data);
    }
    let StorageMut::Cuda(out_data) = out.storage_mut() else {
        return Err(not_here("out"));
    };
    if out_data.stream().context() != stream.context() {
        return Err(not_here("out"));
    }
    let lse_layout = lse.as_deref().map(|l| *l.layout());
    let lse_data = match lse.map(|l| l.storage_mut()) {
        None => None,
        Some(StorageMut::Cuda(data)) if data.stream().context() == stream.context() => Some(data),
        Some(_) => return Err(not_here("the lse buffer")),
    };

    let (q, _q) = input_data[0].device_ptr(stream);
    let (k, _k) = input_data[1].device_ptr(stream);
    let (v, _v) = input_data[2].device_ptr(stream);
    let (mask_ptr, _mask) = reads.mask_ptr(stream)?;
    let (bounds, _bounds) = reads.bound_ptrs(stream)?;
    let (out_ptr, _out) = out_data.device_ptr_mut(stream);
    let (lse_ptr, _lse) = match lse_data {
        Some(data) => {
            let (ptr, guard) = data.device_ptr_mut(stream);
            (ptr, Some(guard))
        }
        None => (0, None),
    };
    let elem = p.dtype().size_bytes();
    check_rows_aligned("q", q, p.q.layout(), elem)?;
    check_rows_aligned("k", k, p.k.layout(), elem)?;
    check_rows_aligned("v", v, p.v.layout(), elem)?;
    check_rows_aligned("out", out_ptr, &out_layout, elem)?;
    let ptrs = Pointers {
        q,
        k,
        v,
        out: out_ptr,
        mask: mask_ptr,
        lse: lse_ptr,
        bounds,
    };
    let mask = reads.mask.as_ref();
    let rows = RowStrides {
        mask: mask.map_or([0; 3], |m| m.strides),
        lse: lse_layout.map_or([0; 3], |l| {
            let [b, h, q, _] = l.strides();
            [b, h, q]
        }),
        mask_kind: mask.map_or(0, |m| m.kind.code()),
        mask_pad: mask.map_or(0, |m| m.pad),
    };
    let args = arguments(p, &out_layout, &rows, &ptrs)?;
    let Chosen { kernel, maps } = choose(kernels, p, [q, k, v], Tiled::encode)?;
    let grid = grid(p, kernel)?;
    let function = module_cache::function(stream.context(), kernel)?;
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: (kernel.threads(), 1, 1),
        shared_mem_bytes: kernel.smem_bytes(),
    };
    let mut builder = stream.launch_builder(&function);
    for (_, arg) in &args {
        match arg {
            Arg::U64(x) => builder.arg(x),
            Arg::U32(x) => builder.arg(x),
            Arg::F32(x) => builder.arg(x),
        };
    }
    if let Some(maps) = &maps {
        for name in TENSOR_MAP_PARAMS {
            builder.arg(map_param(name, maps)?);
        }
    }
    // SAFETY: the launch is sound because
    // - the arguments are those of the launch contract, in its order and with
    //   its types (`arguments` walks `kernels_gen::contract::PARAMS` and
    //   `SCALE_PARAM`, giving each name its value in the declared kind, and
    //   fails on a name or kind it does not know), and `function` is the
    //   entry point generated for this variant, so it reads them as laid out
    //   here; `args` outlives the launch call;
    // - a kernel that declares tensor maps (`GpuKernel::tensor_maps`, set by
    //   the macro from the generator's kernel) gets exactly three after
    //   them, in the order of `TENSOR_MAP_PARAMS`, each the map its name
    //   names (`map_param`) (`choose` returns maps only for such a kernel,
    //   and a kernel without maps gets none): 128-byte, 64-byte aligned
    //   values that `maps` holds past the launch call. Each covers exactly
    //   its tensor's `[B, S, H, D]` elements at the address passed above,
    //   with the view's own strides (`tensor_map::describe`, which replaces
    //   only the strides of dimensions of one entry, never multiplied by a
    //   coordinate other than 0); the TMA unit reads no element outside
    //   those dimensions (out-of-bounds box entries are filled with zeros,
    //   not read), so its reads are in bounds as the kernel's own are below;
    // - every pointer is the address of device memory of `stream`'s context
    //   (checked above) that stays allocated while the kernel runs: the
    //   views borrow it for the whole call, and the guards `_q` ... `_out`
    //   record the kernel's use on `stream` when dropped after the launch,
    //   so that cudarc's frees and other streams wait for it;
    // - the kernel touches only elements `[b, t, h, 0..D]` inside each
    //   tensor's shape, at offsets formed from the strides passed here:
    //   `b < B` for `[B, S, H, D]` tensors (grid z is B), batch stride 0 for
    //   packed ones (`batch_stride`: every sequence lives in batch entry 0);
    //   the token `t = start + i` of a sequence's local row or key `i`,
    //   where the kernels clamp `start` to `[0, tokens]`, the end to
    //   `[start, tokens]` and the length to `Sq` (`Sk`) whatever the bound
    //   arrays hold (`kernels_gen::attention::seqs`), and `tokens_q`,
    //   `tokens_k` are the tensors' own dimension 1 (`Problem::new`), so
    //   `t` is a token of the tensor; each view's buffer holds
    //   `Layout::required_len` elements for its shape and strides (checked
    //   when the view was made, with overflow checks), so every access is
    //   in bounds; the head dimension has stride 1 (checked by
    //   `Layout::strided`); offsets are 64-bit in the kernel and no sum of
    //   them overflows since `required_len` did not;
    // - the bound arrays, where passed, are `i32` device memory of
    //   `stream`'s context (checked by `Reads::bound_ptrs`) holding at least
    //   `B + 1` entries for `cu_seqlens` (`start` reads `[b]`, `end`
    //   `[b + 1]`, `b < B`: `varlen::check` counted them) or `2 B` for
    //   key runs (`start` the first `B`, `end` the next `B`), kept alive
    //   past the kernel (the caller's borrow, or `reads` with stream-ordered
    //   frees) and guarded by `_bounds`;
    // - q, k and v agree in shape with each other and with the layer, and
    //   `out` has q's shape and dtype (`Problem::new`, `check_output`
    //   above); `out` is writable, borrowed mutably, non-overlapping
    //   (checked by `TensorViewMut`), so no two threads write one element
    //   and no input aliases it;
    // - the mask, when present, holds exactly the elements of its resolved
    //   shape `[B', H', Sq', L]` (`AttnMask::new`/`from_cuda` check the
    //   length) of the kind `mask_kind` says (`MaskKind` of its data), in
    //   device memory of `stream`'s context (the caller's, checked by
    //   `DeviceMask::device_ptr`, or copied on this stream), with strides 0
    //   on broadcast dimensions and `mask_pad = Sk - L`; row `(b, h, i)`,
    //   `b < B, h < Hq, i < Sq`, reads keys `j` in `[mask_pad, Sk)` at
    //   `row + j - mask_pad < B'·H'·Sq'·L`: in bounds; a mask is only passed
    //   without sequence bounds (`Problem::with_varlen` refuses a mask with
    //   a packed batch, `seqs::prepare` drops it for key runs), so `b`, `i`
    //   and `j` are the tensors' own; a null pointer means no mask;
    // - the lse, when given, is f32 of `Problem::lse_shape` (`[B, Hq, Sq,
    //   1]`, or `[1, Hq, Tq, 1]` packed, with batch stride 0: `check_lse`
    //   above), device memory of `stream`'s context (checked above) guarded
    //   by `_lse` like the others, whose view holds `Layout::required_len`
    //   elements for its strides; the kernel writes 4 bytes at element
    //   `b · stride_b + h · stride_h + t · stride_q` for the tokens `t` of
    //   the rows above only, in bounds, one thread per row; the view is
    //   borrowed mutably and non-overlapping, and it cannot alias `out` or
    //   an input (distinct borrows); when absent its pointer is null and
    //   the kernel writes nothing through it;
    // - the grid is `(ceil(Sq / block_m), Hq, B)` within the driver's limits
    //   (checked by `grid`), and the kernel guards local rows past its
    //   sequence (at most `Sq`); `threads` and `smem_bytes` are the
    //   kernel's own, and the function's shared-memory limit was raised to
    //   `smem_bytes` when it was loaded.
    unsafe { builder.launch(cfg) }.map_err(|e| {
        SdpaError::cuda(
            format_args!(
                "launching {} with grid {grid:?}, {} threads, {} bytes of shared memory",
                kernel.entry(),
                kernel.threads(),
                kernel.smem_bytes()
            ),
            e,
        )
    })?;
    Ok(kernel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::TensorView;
    use crate::{DType, VariantSpec};
    use half::bf16;
    use kernels_gen::ptx::Target;

    fn problem<'a>(
        q: &'a [f32],
        kv: &'a [f32],
        shape_q: [usize; 4],
        shape_kv: [usize; 4],
    ) -> Problem<'a> {
        let q = TensorView::from_slice(q, shape_q).unwrap();
        let kv = TensorView::from_slice(kv, shape_kv).unwrap();
        Problem::new(q, kv, kv, None, 0.125).unwrap()
    }

    #[test]
    fn arguments_follow_the_contract() {
        let (q, kv) = (vec![0.0; 2 * 5 * 4 * 8], vec![0.0; 2 * 7 * 2 * 8]);
        let p = problem(&q, &kv, [2, 5, 4, 8], [2, 7, 2, 8]);
        let out = Layout::contiguous([2, 5, 4, 8]);
        let ptrs = Pointers {
            q: 1,
            k: 2,
            v: 3,
            out: 4,
            mask: 0,
            lse: 5,
            bounds: BoundPtrs::default(),
        };
        let rows = RowStrides {
            mask: [9, 0, 7],
            lse: [4 * 13, 13, 2],
            mask_kind: 3,
            mask_pad: 6,
        };
        let args = arguments(&p, &out, &rows, &ptrs).unwrap();
        let names: Vec<&str> = args.iter().map(|(n, _)| *n).collect();
        let expected: Vec<&str> = PARAMS
            .iter()
            .chain([&SCALE_PARAM])
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(names, expected);
        for ((name, arg), (_, kind)) in args.iter().zip(PARAMS.iter().chain([&SCALE_PARAM])) {
            let ok = matches!(
                (arg, kind),
                (Arg::U64(_), ParamKind::Ptr | ParamKind::U64)
                    | (Arg::U32(_), ParamKind::U32)
                    | (Arg::F32(_), ParamKind::F32)
            );
            assert!(ok, "{name}: {arg:?} is not a {kind:?}");
        }
        let value = |name: &str| args.iter().find(|(n, _)| *n == name).unwrap().1;
        assert_eq!(value("q_stride_b"), Arg::U64(5 * 4 * 8));
        assert_eq!(value("k_stride_s"), Arg::U64(2 * 8));
        assert_eq!(value("mask_stride_b"), Arg::U64(9));
        assert_eq!(value("mask_stride_q"), Arg::U64(7));
        assert_eq!(value("seq_q"), Arg::U32(5));
        assert_eq!(value("seq_k"), Arg::U32(7));
        assert_eq!(value("tokens_q"), Arg::U32(5));
        assert_eq!(value("tokens_k"), Arg::U32(7));
        assert_eq!(value("mask_kind"), Arg::U32(3));
        assert_eq!(value("mask_pad"), Arg::U32(6));
        assert_eq!(value("q_start"), Arg::U64(0));
        assert_eq!(value("group"), Arg::U32(2));
        assert_eq!(
            value("scale_log2"),
            Arg::F32(0.125 * std::f32::consts::LOG2_E)
        );
        assert_eq!(value("out"), Arg::U64(4));
        assert_eq!(value("lse"), Arg::U64(5));
        assert_eq!(value("lse_stride_b"), Arg::U64(4 * 13));
        assert_eq!(value("lse_stride_h"), Arg::U64(13));
        assert_eq!(value("lse_stride_q"), Arg::U64(2));
        // The lse follows the mask, its strides the mask's.
        let at = |name: &str| names.iter().position(|n| *n == name).unwrap();
        assert_eq!(at("lse"), at("mask") + 1);
        assert_eq!(at("lse_stride_b"), at("mask_stride_q") + 1);
        // No lse asked for: a null pointer.
        let none = arguments(&p, &out, &RowStrides::default(), &Pointers::default()).unwrap();
        let lse = none.iter().find(|(n, _)| *n == "lse").unwrap().1;
        assert_eq!(lse, Arg::U64(0));
    }

    #[test]
    fn packed_batches_pass_bounds_tokens_and_zero_batch_strides() {
        // Sequences of 3, 0 and 4 queries over 2, 5 and 1 keys.
        let (q, kv) = (vec![0.0; 7 * 4 * 8], vec![0.0; 8 * 2 * 8]);
        let qv = TensorView::from_slice(&q, [1, 7, 4, 8]).unwrap();
        let kvv = TensorView::from_slice(&kv, [1, 8, 2, 8]).unwrap();
        let (cu_q, cu_k) = ([0, 3, 3, 7], [0, 2, 7, 8]);
        let vl = crate::VarLen::new(&cu_q, &cu_k);
        let p = Problem::with_varlen(qv, kvv, kvv, None, Some(&vl), 0.125).unwrap();
        assert_eq!((p.batch, p.seq_q, p.seq_k), (3, 4, 5));
        let out = Layout::contiguous([1, 7, 4, 8]);
        let ptrs = Pointers {
            bounds: BoundPtrs {
                q_start: 100,
                q_end: 104,
                k_start: 200,
                k_end: 204,
                mask_batches: 0,
            },
            ..Pointers::default()
        };
        let rows = RowStrides {
            lse: [4 * 7, 7, 1],
            ..RowStrides::default()
        };
        let args = arguments(&p, &out, &rows, &ptrs).unwrap();
        let value = |name: &str| args.iter().find(|(n, _)| *n == name).unwrap().1;
        for name in [
            "q_stride_b",
            "k_stride_b",
            "v_stride_b",
            "out_stride_b",
            "lse_stride_b",
        ] {
            assert_eq!(value(name), Arg::U64(0), "{name}");
        }
        assert_eq!(value("q_stride_s"), Arg::U64(4 * 8));
        assert_eq!(value("lse_stride_h"), Arg::U64(7));
        assert_eq!(value("seq_q"), Arg::U32(4));
        assert_eq!(value("seq_k"), Arg::U32(5));
        assert_eq!(value("tokens_q"), Arg::U32(7));
        assert_eq!(value("tokens_k"), Arg::U32(8));
        assert_eq!(value("q_start"), Arg::U64(100));
        assert_eq!(value("q_end"), Arg::U64(104));
        assert_eq!(value("k_start"), Arg::U64(200));
        assert_eq!(value("k_end"), Arg::U64(204));
        // The grid: the longest sequence's query blocks, one z per sequence.
        let kernel = GpuKernel::new("", "k", Target::Sm80, 2, 128, 0);
        assert_eq!(grid(&p, &kernel).unwrap(), (2, 4, 3));
    }

    #[test]
    fn every_contract_name_has_a_value_and_unknown_ones_are_errors() {
        let (q, kv) = (vec![0.0; 8], vec![0.0; 8]);
        let p = problem(&q, &kv, [1, 1, 1, 8], [1, 1, 1, 8]);
        let out = Layout::contiguous([1, 1, 1, 8]);
        let ptrs = Pointers::default();
        let rows = RowStrides::default();
        let known = |name| value(name, &p, &out, &rows, &ptrs).is_some();
        for (name, _) in PARAMS.iter().chain([&SCALE_PARAM]) {
            assert!(known(name), "{name}");
        }
        let maps = [1, 2, 3].map(TensorMap::tagged);
        let tags = TENSOR_MAP_PARAMS.map(|name| map_param(name, &maps).unwrap().tag());
        assert_eq!(tags, [1, 2, 3]);
        assert!(map_param("tmap_out", &maps).is_err());

        let args = |params: &[(&'static str, ParamKind)]| {
            arguments_of(params, &p, &out, &rows, &ptrs).map_err(|e| e.to_string())
        };
        let err = args(&[("q", ParamKind::Ptr), ("bogus", ParamKind::U64)]).unwrap_err();
        assert!(err.contains("parameter \"bogus\""), "{err}");
        let err = args(&[("seq_q", ParamKind::Ptr)]).unwrap_err();
        assert!(err.contains("declares seq_q as Ptr"), "{err}");
        assert_eq!(
            args(&[("group", ParamKind::U32), ("seq_k", ParamKind::U64)]).unwrap(),
            [("group", Arg::U32(1)), ("seq_k", Arg::U64(1))]
        );
    }

    #[test]
    fn counts_too_large_for_u32_are_refused() {
        let q = vec![0.0f32; 8];
        let q = TensorView::from_slice(&q, [1, 1, 1, 8]).unwrap();
        let p = Problem::new(q, q, q, None, 1.0).unwrap();
        let p = Problem {
            seq_k: 1 << 32,
            ..p
        };
        let err = arguments(
            &p,
            &Layout::contiguous([1, 1, 1, 8]),
            &RowStrides::default(),
            &Pointers::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("Sk = 4294967296 is more than"), "{err}");
    }

    const PORTABLE: GpuKernel = GpuKernel::new("", "sm80", Target::Sm80, 64, 128, 0);
    const MAPPED: GpuKernel =
        GpuKernel::new("", "sm90", Target::Sm90a, 128, 384, 0).with_tensor_maps(128, 96);
    static MAPPED_AND_PORTABLE: [GpuKernel; 2] = [MAPPED, PORTABLE];
    static MAPPED_ALONE: [GpuKernel; 1] = [MAPPED];
    static PORTABLE_ALONE: [GpuKernel; 1] = [PORTABLE];

    fn cpu(
        _: &Problem<'_>,
        _: &mut TensorViewMut<'_>,
        _: Option<&mut TensorViewMut<'_>>,
    ) -> Result<()> {
        Ok(())
    }
    const SPEC: VariantSpec = VariantSpec {
        head_size: 64,
        causal: false,
        dtype: DType::BF16,
    };
    /// A Hopper kernel with the portable one to fall back on.
    static WITH_FALLBACK: Variant = Variant::new(SPEC, cpu).with_gpu_kernels(&MAPPED_AND_PORTABLE);
    /// A Hopper kernel alone.
    static HOPPER_ONLY: Variant = Variant::new(SPEC, cpu).with_gpu_kernels(&MAPPED_ALONE);
    /// The portable kernel alone.
    static PORTABLE_ONLY: Variant = Variant::new(SPEC, cpu).with_gpu_kernels(&PORTABLE_ALONE);
    /// No GPU kernel.
    static CPU_ONLY: Variant = Variant::new(SPEC, cpu);

    /// A device of compute capability `device`, choosing its own kernels.
    fn device(device: (i32, i32)) -> Capability {
        Capability {
            device,
            portable_only: false,
        }
    }
    /// A device of compute capability `device`, with `SDPA_CUDA_KERNEL=sm80`.
    fn forced(device: (i32, i32)) -> Capability {
        Capability {
            device,
            portable_only: true,
        }
    }
    /// The kernels of `variant` for a device of `capability`.
    fn kernels(variant: &'static Variant, capability: (i32, i32)) -> Kernels<'static> {
        Kernels::new(variant, device(capability)).unwrap()
    }

    /// Stands in for the driver: a map tagged with the tensor's address
    /// and box rows.
    fn tag(t: &Tiled) -> Result<TensorMap, Undescribable> {
        Ok(TensorMap::tagged(t.address + u64::from(t.box_dim[1])))
    }

    fn bf16_problem<'a>(q: &'a [bf16], k: TensorView<'a>) -> Problem<'a> {
        let q = TensorView::from_slice(q, [1, 8, 4, 64]).unwrap();
        Problem::new(q, k, k, None, 0.125).unwrap()
    }

    #[test]
    fn tensor_maps_come_last_for_q_k_and_v() {
        // The launch pushes the maps after `arguments`, in `choose`'s order.
        let tensors = TENSOR_MAP_PARAMS.map(|name| name.strip_prefix("tmap_"));
        assert_eq!(tensors, [Some("q"), Some("k"), Some("v")]);
        let data = vec![bf16::ZERO; 8 * 4 * 64];
        let k = TensorView::from_slice(&data[..8 * 2 * 64], [1, 8, 2, 64]).unwrap();
        let p = bf16_problem(&data, k);
        let both = kernels(&WITH_FALLBACK, (9, 0));
        let chosen = choose(both, &p, [0x1000, 0x2000, 0x3000], tag).unwrap();
        assert_eq!(chosen.kernel.entry(), "sm90");
        let tags = chosen.maps.unwrap().map(|m| m.tag());
        assert_eq!(tags, [0x1000 + 128, 0x2000 + 96, 0x3000 + 96]);
        // A kernel without maps gets none, and nothing is encoded.
        let plain = kernels(&PORTABLE_ONLY, (9, 0));
        let never = |_: &Tiled| -> Result<TensorMap, Undescribable> { unreachable!() };
        let chosen = choose(plain, &p, [0; 3], never).unwrap();
        assert!(chosen.maps.is_none());
    }

    #[test]
    fn strides_tma_cannot_describe_run_the_portable_kernel() {
        let data = vec![bf16::ZERO; 8 * 4 * 64];
        let both = kernels(&WITH_FALLBACK, (9, 0));
        // k and v rows 68 elements (136 bytes) apart: no map describes them.
        let k = TensorView::with_strides(&data, [1, 8, 1, 64], [8 * 68, 68, 68, 1]).unwrap();
        let q = vec![bf16::ZERO; 8 * 64];
        let q = TensorView::from_slice(&q, [1, 8, 1, 64]).unwrap();
        let p = Problem::new(q, k, k, None, 0.125).unwrap();
        let chosen = choose(both, &p, [0; 3], tag).unwrap();
        assert_eq!(chosen.kernel.entry(), "sm80");
        assert!(chosen.maps.is_none());
        assert_eq!(
            tensor_map::for_inputs(MAPPED.tensor_maps().unwrap(), &p, [0; 3], tag).err(),
            Some((
                "k",
                Undescribable::StrideUnaligned {
                    dim: "token",
                    bytes: 136
                }
            ))
        );
        // Without a portable kernel to run, the call fails and says why.
        let alone = kernels(&HOPPER_ONLY, (9, 0));
        let err = choose(alone, &p, [0; 3], tag).unwrap_err().to_string();
        assert!(
            err.contains("sm90 needs a tensor map of k, and its token stride is 136 bytes"),
            "{err}"
        );
    }

    #[test]
    fn a_map_the_driver_refuses_runs_the_portable_kernel() {
        let data = vec![bf16::ZERO; 8 * 4 * 64];
        let k = TensorView::from_slice(&data, [1, 8, 4, 64]).unwrap();
        let p = bf16_problem(&data, k);
        let both = kernels(&WITH_FALLBACK, (9, 0));
        let old = |_: &Tiled| Err(Undescribable::OldDriver(11_080));
        let chosen = choose(both, &p, [0; 3], old).unwrap();
        assert_eq!(chosen.kernel.entry(), "sm80");
        // So does an f32 call (no f32 tensor maps).
        let (q, kv) = (vec![0.0; 8 * 64], vec![0.0; 8 * 64]);
        let p = problem(&q, &kv, [1, 8, 1, 64], [1, 8, 1, 64]);
        assert_eq!(
            choose(both, &p, [0; 3], tag).unwrap().kernel.entry(),
            "sm80"
        );
    }

    #[test]
    fn only_kernels_the_device_runs_are_tried() {
        let data = vec![bf16::ZERO; 8 * 4 * 64];
        let k = TensorView::from_slice(&data, [1, 8, 4, 64]).unwrap();
        let p = bf16_problem(&data, k);
        // Not Hopper: the sm_90a kernel is skipped, and nothing is encoded.
        let ampere = kernels(&WITH_FALLBACK, (8, 6));
        let never = |_: &Tiled| -> Result<TensorMap, Undescribable> { unreachable!() };
        assert_eq!(ampere.preferred().map(|k| k.entry()), Some("sm80"));
        assert_eq!(
            choose(ampere, &p, [0; 3], never).unwrap().kernel.entry(),
            "sm80"
        );
        // Nothing this device runs: a typed error, when the kernels are
        // looked for, and from `choose` should it be handed none.
        let err = Kernels::new(&HOPPER_ONLY, device((8, 0)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no GPU kernel for compute capability 8.0"),
            "{err}"
        );
        let none = Kernels {
            variant: &HOPPER_ONLY,
            capability: device((8, 0)),
        };
        assert!(none.preferred().is_none());
        let err = choose(none, &p, [0; 3], tag).unwrap_err().to_string();
        assert!(
            err.contains("no GPU kernel for compute capability 8.0"),
            "{err}"
        );
    }

    #[test]
    fn no_kernel_names_the_variant_and_its_targets() {
        let err = Kernels::new(&HOPPER_ONLY, device((8, 6))).unwrap_err();
        assert!(matches!(
            err,
            SdpaError::BackendUnavailable {
                backend: "cuda",
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            SdpaError::BackendUnavailable {
                backend: "cuda",
                reason: format!(
                    "variant {SPEC} has no GPU kernel for compute capability 8.6 (its kernels \
                     target sm_90a)"
                ),
            }
            .to_string()
        );
        let err = Kernels::new(&CPU_ONLY, device((9, 0)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("variant {SPEC} was built without a GPU kernel")),
            "{err}"
        );
    }

    #[test]
    fn sm80_from_the_environment_runs_the_portable_kernel_and_says_so() {
        assert!(!portable_only_in(None).unwrap());
        assert!(!portable_only_in(Some("")).unwrap());
        assert!(!portable_only_in(Some("auto")).unwrap());
        assert!(portable_only_in(Some("sm80")).unwrap());
        let err = portable_only_in(Some("sm90")).unwrap_err().to_string();
        assert!(
            err.contains("SDPA_CUDA_KERNEL=\"sm90\" is not a kernel family; use auto or sm80"),
            "{err}"
        );
        // A Hopper device told to run the portable kernel runs it.
        let hopper = Kernels::new(&WITH_FALLBACK, forced((9, 0))).unwrap();
        assert_eq!(hopper.preferred().map(|k| k.entry()), Some("sm80"));
        assert_eq!(
            hopper.candidates().map(|k| k.entry()).collect::<Vec<_>>(),
            ["sm80"]
        );
        // Without one, the error gives the device's own capability, says
        // that the environment forced the portable kernels, and what runs
        // without it.
        let err = Kernels::new(&HOPPER_ONLY, forced((9, 0)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "variant {SPEC} has no GPU kernel for compute capability 9.0 with \
                 SDPA_CUDA_KERNEL=sm80, which asks for the portable kernels only (its kernels \
                 target sm_90a); without SDPA_CUDA_KERNEL the device runs its sm_90a kernel"
            )),
            "{err}"
        );
        assert!(!err.contains("8.0"), "{err}");
        // On a device that runs none of them anyway, no such advice.
        let err = Kernels::new(&HOPPER_ONLY, forced((8, 6)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "variant {SPEC} has no GPU kernel for compute capability 8.6 with \
                 SDPA_CUDA_KERNEL=sm80, which asks for the portable kernels only (its kernels \
                 target sm_90a)"
            )),
            "{err}"
        );
        assert!(!err.contains("without SDPA_CUDA_KERNEL"), "{err}");
    }

    #[test]
    fn a_refused_map_names_the_devices_own_capability() {
        // k and v rows 68 elements (136 bytes) apart: no map describes them.
        let data = vec![bf16::ZERO; 8 * 68];
        let k = TensorView::with_strides(&data, [1, 8, 1, 64], [8 * 68, 68, 68, 1]).unwrap();
        let q = vec![bf16::ZERO; 8 * 64];
        let q = TensorView::from_slice(&q, [1, 8, 1, 64]).unwrap();
        let p = Problem::new(q, k, k, None, 0.125).unwrap();
        let err = choose(kernels(&HOPPER_ONLY, (9, 0)), &p, [0; 3], tag)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "sm90 needs a tensor map of k, and its token stride is 136 bytes; a tensor map \
                 needs a multiple of 16; the variant has no other kernel for compute \
                 capability 9.0 to run instead"
            ),
            "{err}"
        );
        // A portable kernel that takes maps, forced on a Hopper device: the
        // message gives 9.0 and the environment, not 8.0.
        const MAPPED_PORTABLE: GpuKernel =
            GpuKernel::new("", "mapped80", Target::Sm80, 64, 128, 0).with_tensor_maps(64, 64);
        static MAPPED_PORTABLE_ALONE: [GpuKernel; 1] = [MAPPED_PORTABLE];
        static MAPPED_PORTABLE_ONLY: Variant =
            Variant::new(SPEC, cpu).with_gpu_kernels(&MAPPED_PORTABLE_ALONE);
        let portable = Kernels::new(&MAPPED_PORTABLE_ONLY, forced((9, 0))).unwrap();
        let err = choose(portable, &p, [0; 3], tag).unwrap_err().to_string();
        assert!(
            err.contains(
                "mapped80 needs a tensor map of k, and its token stride is 136 bytes; a tensor \
                 map needs a multiple of 16; the variant has no other kernel for compute capability 9.0 with \
                 SDPA_CUDA_KERNEL=sm80, which asks for the portable kernels only, to run instead"
            ),
            "{err}"
        );
    }

    #[test]
    fn the_grid_covers_query_blocks_heads_and_batch() {
        let (q, kv) = (vec![0.0; 3 * 65 * 4 * 8], vec![0.0; 3 * 7 * 4 * 8]);
        let p = problem(&q, &kv, [3, 65, 4, 8], [3, 7, 4, 8]);
        let kernel = GpuKernel::new("", "k", Target::Sm80, 64, 128, 0);
        assert_eq!(grid(&p, &kernel).unwrap(), (2, 4, 3));
        let broken = GpuKernel::new("", "k", Target::Sm80, 0, 128, 0);
        assert!(grid(&p, &broken).is_err());
    }

    #[test]
    fn too_many_heads_for_a_grid_is_an_error() {
        let (q, kv) = (vec![0.0; 70_000 * 8], vec![0.0; 70_000 * 8]);
        let p = problem(&q, &kv, [1, 1, 70_000, 8], [1, 1, 70_000, 8]);
        let kernel = GpuKernel::new("", "k", Target::Sm80, 64, 128, 0);
        let err = grid(&p, &kernel).unwrap_err().to_string();
        assert!(err.contains("query heads is 70000"), "{err}");
    }
}

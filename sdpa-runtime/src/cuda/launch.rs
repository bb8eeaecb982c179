//! The launch of an attention kernel: the one `unsafe` of the CUDA backend
//! on the hot path.
//!
//! [`attention`] derives the device pointers from the checked views of a
//! [`Problem`], lays out the arguments in the order of the launch contract
//! ([`kernels_gen::contract::PARAMS`], then [`kernels_gen::contract::SCALE_PARAM`]),
//! computes the grid and launches on the given stream. A kernel that takes
//! tensor maps gets them last ([`kernels_gen::contract::TENSOR_MAP_PARAMS`]),
//! encoded for this call; where they cannot be ([`choose`]), the variant's
//! portable kernel runs instead.

use cudarc::driver::{
    CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg, SyncOnDrop,
};

use super::mask::DeviceMask;
use super::module_cache;
use super::tensor_map::{self, TensorMap, Tiled, Undescribable};
use crate::error::{Result, SdpaError};
use crate::problem::Problem;
use crate::tensor::{CudaData, CudaDataMut, CudaRef, Layout, StorageMut, TensorViewMut};
use crate::variant::GpuKernel;

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

/// Device addresses of the call's buffers (0 for an absent mask).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Pointers {
    pub(crate) q: u64,
    pub(crate) k: u64,
    pub(crate) v: u64,
    pub(crate) out: u64,
    pub(crate) mask: u64,
}

/// The arguments of the contract, named, in launch order.
pub(crate) fn arguments(
    p: &Problem<'_>,
    out: &Layout,
    mask_strides: [usize; 3],
    ptrs: &Pointers,
) -> Result<Vec<(&'static str, Arg)>> {
    let count = |what: &str, n: usize| {
        u32::try_from(n).map_err(|_| {
            SdpaError::Shape(format!(
                "{what} = {n} is more than the CUDA kernels take ({})",
                u32::MAX
            ))
        })
    };
    let u64 = |n: usize| Arg::U64(n as u64);
    let [qb, qs, qh, _] = p.q.layout().strides();
    let [kb, ks, kh, _] = p.k.layout().strides();
    let [vb, vs, vh, _] = p.v.layout().strides();
    let [ob, os, oh, _] = out.strides();
    let [mb, mh, mq] = mask_strides;
    Ok(vec![
        ("q", Arg::U64(ptrs.q)),
        ("k", Arg::U64(ptrs.k)),
        ("v", Arg::U64(ptrs.v)),
        ("out", Arg::U64(ptrs.out)),
        ("mask", Arg::U64(ptrs.mask)),
        ("q_stride_b", u64(qb)),
        ("q_stride_s", u64(qs)),
        ("q_stride_h", u64(qh)),
        ("k_stride_b", u64(kb)),
        ("k_stride_s", u64(ks)),
        ("k_stride_h", u64(kh)),
        ("v_stride_b", u64(vb)),
        ("v_stride_s", u64(vs)),
        ("v_stride_h", u64(vh)),
        ("out_stride_b", u64(ob)),
        ("out_stride_s", u64(os)),
        ("out_stride_h", u64(oh)),
        ("mask_stride_b", u64(mb)),
        ("mask_stride_h", u64(mh)),
        ("mask_stride_q", u64(mq)),
        ("seq_q", Arg::U32(count("Sq", p.seq_q)?)),
        ("seq_k", Arg::U32(count("Sk", p.seq_k)?)),
        ("group", Arg::U32(count("Hq / Hkv", p.group_size())?)),
        ("scale_log2", Arg::F32(p.scale * std::f32::consts::LOG2_E)),
    ])
}

/// The kernels a call may run: the one picked for the device, and the
/// variant's portable kernel, which runs instead where the picked one's
/// tensor maps cannot describe the call's tensors.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Kernels<'v> {
    /// The kernel picked for the device.
    pub(crate) picked: &'v GpuKernel,
    /// The variant's portable (sm_80) kernel, if it has one.
    pub(crate) portable: Option<&'v GpuKernel>,
}

/// The kernel a call launches, and the tensor maps it takes.
#[derive(Debug)]
pub(crate) struct Chosen<'v> {
    /// The kernel.
    pub(crate) kernel: &'v GpuKernel,
    /// The maps of `q`, `k` and `v`, where the kernel takes them.
    pub(crate) maps: Option<[TensorMap; 3]>,
}

/// The kernel to launch for `p`, whose `q`, `k` and `v` live at
/// `addresses`: the picked one, with its tensor maps made by `encode` where
/// it takes them ([`Tiled::encode`] on a device). Where a tensor has no map
/// (strides TMA cannot describe, or the driver refused), the portable
/// kernel, with a debug line saying why.
pub(crate) fn choose<'v>(
    kernels: Kernels<'v>,
    p: &Problem<'_>,
    addresses: [u64; 3],
    encode: impl Fn(&Tiled) -> Result<TensorMap, Undescribable>,
) -> Result<Chosen<'v>> {
    let picked = kernels.picked;
    let Some(boxes) = picked.tensor_maps() else {
        return Ok(Chosen {
            kernel: picked,
            maps: None,
        });
    };
    let (tensor, why) = match tensor_map::for_inputs(boxes, p, addresses, encode) {
        Ok(maps) => {
            return Ok(Chosen {
                kernel: picked,
                maps: Some(maps),
            })
        }
        Err(refusal) => refusal,
    };
    match kernels.portable.filter(|k| k.tensor_maps().is_none()) {
        Some(portable) => {
            tracing::debug!(
                kernel = picked.entry(),
                fallback = portable.entry(),
                tensor,
                reason = %why,
                "no tensor map describes {tensor}; running the portable kernel"
            );
            Ok(Chosen {
                kernel: portable,
                maps: None,
            })
        }
        None => Err(SdpaError::BackendUnavailable {
            backend: "cuda",
            reason: format!(
                "{} needs a tensor map of {tensor}, and {why}; the variant has no portable \
                 kernel to run instead",
                picked.entry()
            ),
        }),
    }
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

fn read_ptr<'s, T>(r: &'s CudaRef<'_, T>, stream: &'s CudaStream) -> (u64, SyncOnDrop<'s>) {
    match r {
        CudaRef::Slice(s) => s.device_ptr(stream),
        CudaRef::View(v) => v.device_ptr(stream),
    }
}

/// The address of `data` for reading on `stream`, and the guard that
/// records the read once dropped after the launch.
fn input_ptr<'s>(data: &'s CudaData<'_>, stream: &'s CudaStream) -> (u64, SyncOnDrop<'s>) {
    match data {
        CudaData::F32(r) => read_ptr(r, stream),
        CudaData::F16(r) => read_ptr(r, stream),
        CudaData::BF16(r) => read_ptr(r, stream),
    }
}

/// The address of `data` for writing on `stream`, and its guard.
fn output_ptr<'s>(data: &'s mut CudaDataMut<'_>, stream: &'s CudaStream) -> (u64, SyncOnDrop<'s>) {
    match data {
        CudaDataMut::F32(r) => r.0.device_ptr_mut(stream),
        CudaDataMut::F16(r) => r.0.device_ptr_mut(stream),
        CudaDataMut::BF16(r) => r.0.device_ptr_mut(stream),
    }
}

/// Launches a GPU kernel of `p`'s variant ([`choose`]n from `kernels`,
/// JIT-loaded on first use) on `stream` for the checked problem `p`,
/// writing `out`.
///
/// `p`'s tensors and `out` must be device memory of `stream`'s context;
/// `mask` is `p`'s mask, uploaded on `stream`. Returns once the launch is
/// queued; the stream orders it with what comes next.
pub(crate) fn attention(
    kernels: Kernels<'_>,
    stream: &CudaStream,
    p: &Problem<'_>,
    out: &mut TensorViewMut<'_>,
    mask: Option<&DeviceMask>,
) -> Result<()> {
    p.check_output(out)?;
    if out.layout().numel() == 0 {
        return Ok(());
    }
    let out_layout = *out.layout();
    let not_here = |what: &str| {
        SdpaError::Residence(format!(
            "{what} is not device memory of CUDA device {}'s context, where the kernel runs; \
             pass q, k, v and out on one device",
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
    let mask_bias = mask.and_then(|m| m.bias.as_ref());
    if mask_bias.is_some_and(|b| b.stream().context() != stream.context()) {
        return Err(not_here("the mask"));
    }

    let (q, _q) = input_ptr(&input_data[0], stream);
    let (k, _k) = input_ptr(&input_data[1], stream);
    let (v, _v) = input_ptr(&input_data[2], stream);
    let (mask_ptr, _mask) = match mask_bias {
        Some(b) => {
            let (ptr, guard) = b.device_ptr(stream);
            (ptr, Some(guard))
        }
        None => (0, None),
    };
    let (out_ptr, _out) = output_ptr(out_data, stream);
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
    };
    let args = arguments(p, &out_layout, mask.map_or([0; 3], |m| m.strides), &ptrs)?;
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
    for map in maps.iter().flatten() {
        builder.arg(map);
    }
    // SAFETY: the launch is sound because
    // - the arguments are those of the launch contract, in its order and with
    //   its types (`arguments` is tested against `kernels_gen::contract::PARAMS`),
    //   and `function` is the entry point generated for this variant, so it
    //   reads them as laid out here; `args` outlives the launch call;
    // - a kernel that declares tensor maps (`GpuKernel::tensor_maps`, set by
    //   the macro from the generator's kernel) gets exactly three after
    //   them, q's, k's and v's (`choose` returns maps only for such a kernel,
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
    // - the kernel touches only elements `[b, s, h, 0..D]` inside each
    //   tensor's shape, at offsets formed from the strides passed here, and
    //   each view's buffer holds `Layout::required_len` elements for its
    //   shape and strides (checked when the view was made, with overflow
    //   checks), so every access is in bounds; the head dimension has
    //   stride 1 (checked by `Layout::strided`); offsets are 64-bit in the
    //   kernel and no sum of them overflows since `required_len` did not;
    // - q, k and v agree in shape with each other and with the layer, and
    //   `out` has q's shape and dtype (`Problem::new`, `check_output`
    //   above); `out` is writable, borrowed mutably, non-overlapping
    //   (checked by `TensorViewMut`), so no two threads write one element
    //   and no input aliases it;
    // - the mask, when present, is a dense f32 buffer of `[B', H', Sq', Sk]`
    //   elements with strides 0 on broadcast dimensions (`dense_bias`),
    //   uploaded on this stream, so rows `(b, h, i)` with `b < B, h < Hq,
    //   i < Sq` read `Sk` in-bounds entries; a null pointer means no mask;
    // - the grid is `(ceil(Sq / block_m), Hq, B)` within the driver's limits
    //   (checked by `grid`), and the kernel guards query rows `>= Sq`;
    //   `threads` and `smem_bytes` are the kernel's own, and the function's
    //   shared-memory limit was raised to `smem_bytes` when it was loaded.
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::TensorView;
    use half::bf16;
    use kernels_gen::contract::{ParamKind, PARAMS, SCALE_PARAM, TENSOR_MAP_PARAMS};

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
        };
        let args = arguments(&p, &out, [9, 0, 7], &ptrs).unwrap();
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
        assert_eq!(value("group"), Arg::U32(2));
        assert_eq!(
            value("scale_log2"),
            Arg::F32(0.125 * std::f32::consts::LOG2_E)
        );
        assert_eq!(value("out"), Arg::U64(4));
    }

    const PORTABLE: GpuKernel = GpuKernel::new("", "sm80", "sm_80", 64, 128, 0);
    const MAPPED: GpuKernel =
        GpuKernel::new("", "sm90", "sm_90a", 128, 384, 0).with_tensor_maps(128, 96);

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
        let kernels = Kernels {
            picked: &MAPPED,
            portable: Some(&PORTABLE),
        };
        let chosen = choose(kernels, &p, [0x1000, 0x2000, 0x3000], tag).unwrap();
        assert_eq!(chosen.kernel.entry(), "sm90");
        let tags = chosen.maps.unwrap().map(|m| m.tag());
        assert_eq!(tags, [0x1000 + 128, 0x2000 + 96, 0x3000 + 96]);
        // A kernel without maps gets none, and nothing is encoded.
        let plain = Kernels {
            picked: &PORTABLE,
            portable: Some(&PORTABLE),
        };
        let never = |_: &Tiled| -> Result<TensorMap, Undescribable> { unreachable!() };
        let chosen = choose(plain, &p, [0; 3], never).unwrap();
        assert!(chosen.maps.is_none());
    }

    #[test]
    fn strides_tma_cannot_describe_run_the_portable_kernel() {
        let data = vec![bf16::ZERO; 8 * 4 * 64];
        let kernels = Kernels {
            picked: &MAPPED,
            portable: Some(&PORTABLE),
        };
        // k and v rows 68 elements (136 bytes) apart: no map describes them.
        let k = TensorView::with_strides(&data, [1, 8, 1, 64], [8 * 68, 68, 68, 1]).unwrap();
        let q = vec![bf16::ZERO; 8 * 64];
        let q = TensorView::from_slice(&q, [1, 8, 1, 64]).unwrap();
        let p = Problem::new(q, k, k, None, 0.125).unwrap();
        let chosen = choose(kernels, &p, [0; 3], tag).unwrap();
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
        let alone = Kernels {
            picked: &MAPPED,
            portable: None,
        };
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
        let kernels = Kernels {
            picked: &MAPPED,
            portable: Some(&PORTABLE),
        };
        let old = |_: &Tiled| Err(Undescribable::OldDriver(11_080));
        let chosen = choose(kernels, &p, [0; 3], old).unwrap();
        assert_eq!(chosen.kernel.entry(), "sm80");
        // So does an f32 call (no f32 tensor maps).
        let (q, kv) = (vec![0.0; 8 * 64], vec![0.0; 8 * 64]);
        let p = problem(&q, &kv, [1, 8, 1, 64], [1, 8, 1, 64]);
        assert_eq!(
            choose(kernels, &p, [0; 3], tag).unwrap().kernel.entry(),
            "sm80"
        );
    }

    #[test]
    fn the_grid_covers_query_blocks_heads_and_batch() {
        let (q, kv) = (vec![0.0; 3 * 65 * 4 * 8], vec![0.0; 3 * 7 * 4 * 8]);
        let p = problem(&q, &kv, [3, 65, 4, 8], [3, 7, 4, 8]);
        let kernel = GpuKernel::new("", "k", "sm_80", 64, 128, 0);
        assert_eq!(grid(&p, &kernel).unwrap(), (2, 4, 3));
        let broken = GpuKernel::new("", "k", "sm_80", 0, 128, 0);
        assert!(grid(&p, &broken).is_err());
    }

    #[test]
    fn too_many_heads_for_a_grid_is_an_error() {
        let (q, kv) = (vec![0.0; 70_000 * 8], vec![0.0; 70_000 * 8]);
        let p = problem(&q, &kv, [1, 1, 70_000, 8], [1, 1, 70_000, 8]);
        let kernel = GpuKernel::new("", "k", "sm_80", 64, 128, 0);
        let err = grid(&p, &kernel).unwrap_err().to_string();
        assert!(err.contains("query heads is 70000"), "{err}");
    }
}

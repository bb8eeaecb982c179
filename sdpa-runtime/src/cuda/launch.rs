//! The launch of an attention kernel: the one `unsafe` of the CUDA backend
//! on the hot path.
//!
//! [`attention`] derives the device pointers from the checked views of a
//! [`Problem`], lays out the arguments in the order of the launch contract
//! ([`kernels_gen::gpu::PARAMS`], then [`kernels_gen::gpu::SCALE_PARAM`]),
//! computes the grid and launches on the given stream.

use cudarc::driver::{
    CudaFunction, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg, SyncOnDrop,
};

use super::mask::DeviceMask;
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

/// Launches `function` (the GPU kernel of `p`'s variant, described by
/// `kernel`) on `stream` for the checked problem `p`, writing `out`.
///
/// `p`'s tensors and `out` must be device memory of `stream`'s context;
/// `mask` is `p`'s mask, uploaded on `stream`. Returns once the launch is
/// queued; the stream orders it with what comes next.
pub(crate) fn attention(
    function: &CudaFunction,
    kernel: &GpuKernel,
    stream: &CudaStream,
    p: &Problem<'_>,
    out: &mut TensorViewMut<'_>,
    mask: Option<&DeviceMask>,
) -> Result<()> {
    p.check_output(out)?;
    if out.layout().numel() == 0 {
        return Ok(());
    }
    let grid = grid(p, kernel)?;
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
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: (kernel.threads(), 1, 1),
        shared_mem_bytes: kernel.smem_bytes(),
    };
    let mut builder = stream.launch_builder(function);
    for (_, arg) in &args {
        match arg {
            Arg::U64(x) => builder.arg(x),
            Arg::U32(x) => builder.arg(x),
            Arg::F32(x) => builder.arg(x),
        };
    }
    // SAFETY: the launch is sound because
    // - the arguments are those of the launch contract, in its order and with
    //   its types (`arguments` is tested against `kernels_gen::gpu::PARAMS`),
    //   and `function` is the entry point generated for this variant, so it
    //   reads them as laid out here; `args` outlives the launch call;
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
    use kernels_gen::gpu::{ParamKind, PARAMS, SCALE_PARAM};

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

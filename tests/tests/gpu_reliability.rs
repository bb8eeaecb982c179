//! Reliability of the CUDA backend on a GPU (issue 7): device memory that
//! runs out, one backend shared by threads on several streams, numerical
//! edge cases on device tensors, and ragged shapes small enough to run under
//! compute-sanitizer.
//!
//! Every test needs a CUDA driver and device; without one, each test prints
//! one line saying why it skips and returns.
//!
//! - `device_out_of_memory_is_an_error_and_the_next_call_works` fills device
//!   0 with plain `cuMemAlloc` blocks, so it holds a lock that every other
//!   test of this binary shares: no other test here runs while the device is
//!   full. Run no other GPU program on the device at the same time.
//! - `sanitize_ragged_*` run every kernel family on sizes that are not
//!   multiples of any tile; `tests/gpu/sanitize.sh` runs them under
//!   compute-sanitizer's memcheck, racecheck, initcheck and synccheck.

use std::collections::HashMap;
use std::sync::{Arc, Barrier, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use half::{bf16, f16};
use sdpa_runtime::cudarc::driver::{result, sys, CudaContext, CudaSlice, CudaStream};
use sdpa_runtime::prelude::*;
use sdpa_runtime::{cuda, probe_cuda, CudaProbe, Element, OwnedMaskData, SdpaImpl};
use sdpa_tests::cases::{
    run_seed, run_typed, say, Case, CaseInputs, GenMask, GenTensor, MaskKind, Outcome, Placement,
};
use sdpa_tests::device::upload;
use sdpa_tests::reference::rel_l2;

/// Every kernel family on ragged shapes. Tensor cores (f16, bf16): 40 and
/// 80 run 64-key blocks (40 an odd multiple of 8: one m16n8k8 product and
/// `.x2` loads), 96 runs 32-key blocks, 136 runs 8 warps of one 16-row tile
/// with more than 48 KiB of shared memory (opted in). CUDA cores (f32):
/// 128-row CTAs at 40, 64-row CTAs at 80, 96 and 136, with key tiles of 64,
/// 48, 40 and 24. On compute capability 9.0, 64, 80, 96 and 128 in bf16 and
/// f16 run the Hopper kernel (`wgmma`, 192-row CTAs; 80 and 96 on tiles
/// padded to 128 columns). Also used by the memory and edge-case tests.
#[sdpa_variants(
    head_sizes = [40, 64, 80, 96, 128, 136],
    causal = [false, true],
    dtypes = [bf16, f16, f32]
)]
struct RaggedAttention;

/// The variants of the concurrency test and of no other test here, so that
/// their JIT loads can be counted.
#[sdpa_variants(head_sizes = [32, 64, 128], causal = [false, true], dtypes = [bf16, f16, f32])]
struct SharedAttention;

/// Taken for writing by the out-of-memory test, for reading by every other
/// test: nothing else of this binary runs while device memory is full.
static DEVICE_MEMORY: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    DEVICE_MEMORY.read().unwrap_or_else(PoisonError::into_inner)
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    DEVICE_MEMORY
        .write()
        .unwrap_or_else(PoisonError::into_inner)
}

/// Device 0's default stream, or `None` after one line saying why `test`
/// skips when this machine has no CUDA driver or device.
fn gpu(test: &str) -> Option<Arc<CudaStream>> {
    match probe_cuda() {
        CudaProbe::Present { .. } => Some(
            cuda::context(0)
                .expect("device 0 is present")
                .default_stream(),
        ),
        CudaProbe::Absent(reason) => {
            say(&format!("skipping GPU test {test}: {reason}"));
            None
        }
    }
}

/// Runs `$body` with `$t` the element type of `$dtype`.
macro_rules! with_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F16 => {
                type $t = f16;
                $body
            }
            DType::BF16 => {
                type $t = bf16;
                $body
            }
        }
    };
}

/// How a device call gets its output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    /// `forward_into` a buffer with the case's output placement, poisoned
    /// with NaN.
    Into,
    /// `forward`: a fresh contiguous device tensor on q's stream.
    Fresh,
}

/// Runs `case` on device tensors through `layer`: q (and the output) on
/// `stream`, k and v on `kv_stream`, with the case's strides. Returns the
/// output buffer and its strides, for [`CaseInputs::judge`].
fn run_on_device<T: Element>(
    layer: &SdpaImpl,
    stream: &Arc<CudaStream>,
    kv_stream: &Arc<CudaStream>,
    case: &Case,
    x: &CaseInputs<T>,
    call: Call,
) -> Result<(Vec<T>, [usize; 4]), SdpaError> {
    let (b, sq, sk, hq, hkv, d) = case.dims();
    let (dq, dk, dv) = (
        upload(stream, &x.q.buf),
        upload(kv_stream, &x.k.buf),
        upload(kv_stream, &x.v.buf),
    );
    let meta = x.metadata()?;
    let qv = TensorView::from_cuda_with_strides(&dq, [b, sq, hq, d], x.q.strides)?;
    let kv = TensorView::from_cuda_with_strides(&dk, [b, sk, hkv, d], x.k.strides)?;
    let vv = TensorView::from_cuda_with_strides(&dv, [b, sk, hkv, d], x.v.strides)?;
    let out_shape = [b, sq, hq, d];
    match call {
        Call::Fresh => {
            let out = layer.forward(&qv, &kv, &vv, &meta)?;
            assert_eq!(out.residence(), qv.residence(), "{case:?}");
            let host = out.to_host()?;
            let buf = host.as_slice::<T>().expect("q's dtype").to_vec();
            Ok((buf, Placement::Contiguous.strides(out_shape).0))
        }
        Call::Into => {
            let (out_strides, out_len) = case.out_placement.strides(out_shape);
            let mut dout = upload(stream, &vec![T::from_f32(f32::NAN); out_len]);
            {
                let mut ov =
                    TensorViewMut::from_cuda_with_strides(&mut dout, out_shape, out_strides)?;
                layer.forward_into(&qv, &kv, &vv, &meta, &mut ov)?;
            }
            let buf: Vec<T> = stream.clone_dtoh(&dout).unwrap();
            stream.synchronize().unwrap();
            // The upload keeps at least one element; the view spans `out_len`.
            Ok((buf[..out_len].to_vec(), out_strides))
        }
    }
}

/// Runs `case` with inputs `x` on device tensors on `stream` and checks
/// the output against the float64 reference (and that nothing outside the
/// output view was written). Returns the outcome.
fn check_on_device<T: Element>(
    backend: &dyn AttentionBackend,
    stream: &Arc<CudaStream>,
    case: &Case,
    x: &CaseInputs<T>,
    seed: u64,
) -> Outcome {
    let layer = backend.build_impl(case.params()).unwrap();
    let (buf, strides) = run_on_device(&layer, stream, stream, case, x, Call::Into)
        .unwrap_or_else(|e| panic!("{case:?} on device tensors (seed {seed}): {e}"));
    let outcome = x.judge(case, seed, &buf, strides);
    assert!(
        outcome.rel_err <= case.tolerance(),
        "{case:?} on device tensors (seed {seed}): relative error {:.3e} > {:.0e}",
        outcome.rel_err,
        case.tolerance()
    );
    outcome
}

fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let a: Vec<f64> = a.iter().map(|&x| x as f64).collect();
    let b: Vec<f64> = b.iter().map(|&x| x as f64).collect();
    rel_l2(&a, &b)
}

/// A contiguous tensor whose element `[b, s, h, e]` is `f(b, s, h, e)`,
/// rounded to `T`.
fn tensor_from_fn<T: Element>(
    [nb, ns, nh, nd]: [usize; 4],
    f: impl Fn(usize, usize, usize, usize) -> f32,
) -> GenTensor<T> {
    let mut buf = Vec::with_capacity(nb * ns * nh * nd);
    for b in 0..nb {
        for s in 0..ns {
            for h in 0..nh {
                for e in 0..nd {
                    buf.push(T::from_f32(f(b, s, h, e)));
                }
            }
        }
    }
    GenTensor {
        values: buf.iter().map(|x| x.to_f32() as f64).collect(),
        buf,
        strides: Placement::Contiguous.strides([nb, ns, nh, nd]).0,
    }
}

/// Deterministic noise in `[-1, 1)` (splitmix64 of `i` and `salt`).
fn noise(i: usize, salt: u64) -> f32 {
    let mut z = (i as u64).wrapping_add(salt.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

// ---------------------------------------------------------------------------
// Device memory running out.

/// Device memory taken with plain `cuMemAlloc` blocks (never managed
/// memory) until the driver refuses; freed when dropped, panics included.
struct Hog {
    ctx: Arc<CudaContext>,
    blocks: Vec<sys::CUdeviceptr>,
    bytes: usize,
}

impl Hog {
    /// Takes 1 GiB blocks, then halves the block size down to `floor` bytes
    /// after each refusal: less than `floor` bytes stay free. Never asks
    /// for more than the device's total memory in all.
    fn fill(ctx: &Arc<CudaContext>, floor: usize) -> Hog {
        let total = ctx.total_mem().expect("the device's memory size");
        make_current(ctx);
        let mut hog = Hog {
            ctx: ctx.clone(),
            blocks: Vec::new(),
            bytes: 0,
        };
        let mut chunk = 1usize << 30;
        // Each turn takes a block (at most total / floor turns) or halves
        // the block size (a few turns).
        while chunk >= floor {
            if hog.bytes + chunk > total {
                chunk /= 2;
                continue;
            }
            // SAFETY: the context is current on this thread; the block is
            // never read or written, only freed once, in `drop`.
            match unsafe { result::malloc_sync(chunk) } {
                Ok(ptr) => {
                    hog.blocks.push(ptr);
                    hog.bytes += chunk;
                }
                Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => chunk /= 2,
                Err(e) => panic!("cuMemAlloc of {chunk} bytes failed: {e}"),
            }
        }
        hog
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        make_current(&self.ctx);
        for ptr in self.blocks.drain(..) {
            // SAFETY: allocated by `cuMemAlloc` in this context, which is
            // current, and freed once.
            if let Err(e) = unsafe { result::free_sync(ptr) } {
                say(&format!("freeing a block of the memory hog failed: {e}"));
            }
        }
    }
}

/// Makes `ctx` current on this thread without consuming an error that
/// `cudarc` recorded on it (as `bind_to_thread` would): the library's next
/// call must see such an error.
fn make_current(ctx: &CudaContext) {
    // SAFETY: the context is alive (held by `ctx`).
    unsafe { result::ctx::set_current(ctx.cu_ctx()) }.expect("making the context current");
}

/// Returns the memory of the stream-ordered allocator's pool to the
/// device, so that the library's allocations cannot be served from memory
/// the pool kept.
fn trim_pool(ctx: &CudaContext) {
    if !ctx.has_async_alloc() {
        return;
    }
    make_current(ctx);
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid place for the handle; the device is
    // `ctx`'s; trimming frees only memory no allocation uses.
    unsafe {
        sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device())
            .result()
            .expect("the device's memory pool");
        sys::cuMemPoolTrimTo(pool, 0)
            .result()
            .expect("trimming the memory pool");
    }
}

fn free_memory(ctx: &CudaContext) -> usize {
    ctx.mem_get_info().expect("the device's free memory").0
}

/// Asserts that `result` is a CUDA error saying the device ran out of
/// memory and mentioning `doing`.
fn assert_out_of_memory<T: std::fmt::Debug>(what: &str, result: Result<T, SdpaError>, doing: &str) {
    match result {
        Err(SdpaError::Cuda(msg)) => {
            let lower = msg.to_lowercase();
            assert!(
                lower.contains("out of memory") || lower.contains("out_of_memory"),
                "{what}: a CUDA error that does not say out of memory: {msg}"
            );
            assert!(msg.contains(doing), "{what}: expected {doing:?} in: {msg}");
            say(&format!("{what} with the device full: {msg}"));
        }
        other => panic!(
            "{what} with the device full: expected a CUDA out-of-memory error, got {other:?}"
        ),
    }
}

#[test]
fn device_out_of_memory_is_an_error_and_the_next_call_works() {
    let test = "device_out_of_memory_is_an_error_and_the_next_call_works";
    let Some(stream) = gpu(test) else { return };
    let _only_this_test = exclusive();
    let ctx = stream.context().clone();

    // 84 MB per f32 tensor (q, k, v, out: 336 MB), plus a dense f32 mask of
    // 268 MB; few FLOPs (256 tokens), so the CPU checks them quickly.
    let (b, s, h, d) = (32, 256, 32, 80);
    let shape = [b, s, h, d];
    let n = b * s * h * d;
    let floor = 8 << 20;
    assert!(n * 4 > 4 * floor);
    let q: Vec<f32> = (0..n).map(|i| noise(i, 1)).collect();
    let k: Vec<f32> = (0..n).map(|i| noise(i, 2)).collect();
    let v: Vec<f32> = (0..n).map(|i| noise(i, 3)).collect();
    let keep: Vec<u8> = (0..b * h * s * s)
        .map(|i| u8::from(i % s == 0 || noise(i, 4) > -0.4))
        .collect();
    let mask_shape = [b, h, s, s];
    let plain = AttentionMetadata::new(0);
    let masked = AttentionMetadata::new(0).with_mask(AttnMask::new(&keep, &mask_shape).unwrap());
    let (hq, hk, hv) = (
        TensorView::from_slice(&q, shape).unwrap(),
        TensorView::from_slice(&k, shape).unwrap(),
        TensorView::from_slice(&v, shape).unwrap(),
    );

    let params = AttentionParams::new(h, d);
    let cpu = RaggedAttention
        .build_impl(params.clone().backend(BackendKind::Cpu))
        .unwrap();
    let staged = RaggedAttention
        .build_impl(params.clone().backend(BackendKind::Cuda))
        .unwrap();
    let on_device = RaggedAttention.build_impl(params).unwrap();
    let expected = cpu.forward(&hq, &hk, &hv, &plain).unwrap();
    let expected = expected.as_slice::<f32>().unwrap();
    let expected_masked = cpu.forward(&hq, &hk, &hv, &masked).unwrap();
    let expected_masked = expected_masked.as_slice::<f32>().unwrap();

    let (dq, dk, dv) = (
        upload(&stream, &q),
        upload(&stream, &k),
        upload(&stream, &v),
    );
    let mut dout = stream.alloc_zeros::<f32>(n).unwrap();
    let (qv, kv, vv) = (
        TensorView::from_cuda(&dq, shape).unwrap(),
        TensorView::from_cuda(&dk, shape).unwrap(),
        TensorView::from_cuda(&dv, shape).unwrap(),
    );
    let masked_into = |dout: &mut CudaSlice<f32>| {
        let mut ov = TensorViewMut::from_cuda(dout, shape)?;
        on_device.forward_into(&qv, &kv, &vv, &masked, &mut ov)
    };
    // Before: the variant is loaded and the calls work.
    masked_into(&mut dout).unwrap();
    let before: Vec<f32> = stream.clone_dtoh(&dout).unwrap();
    let err = rel_diff(&before, expected_masked);
    assert!(
        err < 2e-5,
        "before the hog: GPU and CPU differ by {err:.3e}"
    );

    stream.synchronize().unwrap();
    ctx.synchronize().unwrap();
    trim_pool(&ctx);
    let hog = Hog::fill(&ctx, floor);
    let left = free_memory(&ctx);
    say(&format!(
        "{test}: took {} MiB of device memory in {} blocks; {} MiB left free",
        hog.bytes >> 20,
        hog.blocks.len(),
        left >> 20
    ));
    assert!(
        left < n * 4,
        "the hog left {left} bytes free, enough for a {} byte tensor: nothing would fail",
        n * 4
    );

    // Host tensors staged through device 0: the first upload fails.
    assert_out_of_memory(
        "forward of host tensors on the cuda backend",
        staged.forward(&hq, &hk, &hv, &plain),
        "to the device",
    );
    // Device tensors: the fresh output cannot be allocated.
    assert_out_of_memory(
        "forward of device tensors",
        on_device.forward(&qv, &kv, &vv, &plain),
        "allocating the output",
    );
    // Into an existing buffer: the mask's dense bias cannot be uploaded.
    assert_out_of_memory(
        "forward_into with a mask",
        masked_into(&mut dout),
        "copying the attention mask",
    );

    drop(hog);
    ctx.synchronize().unwrap();
    say(&format!(
        "{test}: the hog is freed; {} MiB free",
        free_memory(&ctx) >> 20
    ));

    // After: each call works and agrees with the CPU.
    let out = staged.forward(&hq, &hk, &hv, &plain).unwrap();
    let err = rel_diff(out.as_slice::<f32>().unwrap(), expected);
    assert!(
        err < 2e-5,
        "staged, after the hog: GPU and CPU differ by {err:.3e}"
    );
    let out = on_device.forward(&qv, &kv, &vv, &plain).unwrap();
    let err = rel_diff(&out.to_f32_vec().unwrap(), expected);
    assert!(
        err < 2e-5,
        "device, after the hog: GPU and CPU differ by {err:.3e}"
    );
    stream.memset_zeros(&mut dout).unwrap();
    masked_into(&mut dout).unwrap();
    let after: Vec<f32> = stream.clone_dtoh(&dout).unwrap();
    stream.synchronize().unwrap();
    let err = rel_diff(&after, expected_masked);
    assert!(
        err < 2e-5,
        "masked, after the hog: GPU and CPU differ by {err:.3e}"
    );
}

// ---------------------------------------------------------------------------
// One backend, eight threads, eight streams.

/// One call of the concurrency test.
struct Job {
    case: Case,
    call: Call,
    /// k and v live on the next thread's stream.
    kv_elsewhere: bool,
    seed: u64,
}

/// Thread `t`'s calls: every variant of [`SharedAttention`] once, even
/// threads from the first variant, odd threads from the middle, so that
/// four threads ask for each variant's first load at about the same time.
/// Shapes, heads, masks, layouts and the kind of call vary with `(t, j)`.
fn jobs(t: usize, seed: u64) -> Vec<Job> {
    let variants = SharedAttention.variant_table().variants();
    let n = variants.len();
    (0..n)
        .map(|j| {
            let spec = variants[(j + (t % 2) * (n / 2)) % n].spec();
            let sq = [1, 17, 64, 100, 130][(t + 2 * j) % 5];
            let sk = [1, 31, 64, 129, 200][(3 * t + j) % 5];
            let heads = [2, 4][(t + j) % 2];
            let kv_heads = if j % 3 == 0 { heads / 2 } else { heads };
            let mask = match (t + j) % 4 {
                0 => MaskKind::None,
                1 => MaskKind::KeyPadding {
                    short: if sk > 4 { 3 } else { 0 },
                    broadcast_batch: false,
                },
                2 => MaskKind::Additive4 {
                    broadcast_heads: true,
                    short: 0,
                    with_neg_inf: true,
                },
                _ => MaskKind::Bool3,
            };
            let call = if (t + j).is_multiple_of(3) {
                Call::Fresh
            } else {
                Call::Into
            };
            let inputs = if j % 2 == 0 {
                Placement::Contiguous
            } else {
                Placement::Gapped
            };
            let out = if call == Call::Into && j % 4 == 1 {
                Placement::HeadMajor
            } else {
                Placement::Contiguous
            };
            let case = Case::new(1 + (t + j) % 2, sq, sk, heads, spec.head_size)
                .kv_heads(kv_heads)
                .causal(spec.causal)
                .dtype(spec.dtype)
                .mask(mask)
                .placement(inputs, out);
            Job {
                case,
                call,
                kv_elsewhere: j % 4 == 3,
                seed: seed ^ ((t * 1000 + j) as u64),
            }
        })
        .collect()
}

/// Runs `job` on device tensors and on the CPU backend (same inputs) and
/// checks both against the float64 reference and against each other.
fn run_job<T: Element>(
    layer: &SdpaImpl,
    stream: &Arc<CudaStream>,
    kv_stream: &Arc<CudaStream>,
    job: &Job,
) {
    let (case, seed) = (&job.case, job.seed);
    let what = format!(
        "{case:?} via {:?}, k and v on {} stream (seed {seed})",
        job.call,
        if job.kv_elsewhere { "another" } else { "q's" }
    );
    let x = CaseInputs::<T>::draw(case, seed);
    let (buf, strides) = run_on_device(layer, stream, kv_stream, case, &x, job.call)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let gpu = x.judge(case, seed, &buf, strides);
    let cpu = run_typed::<T>(&SharedAttention, BackendKind::Cpu, case, seed)
        .unwrap_or_else(|e| panic!("{what} on the CPU: {e}"));
    let tolerance = case.tolerance();
    assert!(
        gpu.rel_err <= tolerance,
        "{what}: relative error {:.3e} > {tolerance:.0e}",
        gpu.rel_err
    );
    let apart = rel_l2(&gpu.out, &cpu.out);
    assert!(
        apart <= 2.0 * tolerance,
        "{what}: GPU and CPU differ by {apart:.3e} (GPU {:.3e}, CPU {:.3e} from the reference)",
        gpu.rel_err,
        cpu.rel_err
    );
}

#[test]
fn one_backend_shared_by_threads_on_several_streams() {
    let test = "one_backend_shared_by_threads_on_several_streams";
    let Some(stream) = gpu(test) else { return };
    let _shared = shared();
    let ctx = stream.context().clone();
    const THREADS: usize = 8;
    let streams: Vec<Arc<CudaStream>> = (0..THREADS)
        .map(|_| ctx.new_stream().expect("a new stream"))
        .collect();
    let seed = run_seed();
    let plans: Vec<Vec<Job>> = (0..THREADS).map(|t| jobs(t, seed)).collect();
    // One layer per (heads, kv heads, head size, causal), shared by every
    // thread that needs it.
    let mut layers: HashMap<(usize, usize, usize, bool), SdpaImpl> = HashMap::new();
    for job in plans.iter().flatten() {
        let c = &job.case;
        layers
            .entry((c.heads_q, c.heads_kv, c.head_size, c.causal))
            .or_insert_with(|| SharedAttention.build_impl(c.params()).unwrap());
    }
    let barrier = Barrier::new(THREADS);
    std::thread::scope(|scope| {
        for (t, plan) in plans.iter().enumerate() {
            let (layers, barrier, streams) = (&layers, &barrier, &streams);
            scope.spawn(move || {
                barrier.wait();
                for job in plan {
                    let c = &job.case;
                    let layer = &layers[&(c.heads_q, c.heads_kv, c.head_size, c.causal)];
                    let kv_stream = if job.kv_elsewhere {
                        &streams[(t + 1) % THREADS]
                    } else {
                        &streams[t]
                    };
                    with_dtype!(c.dtype, T => run_job::<T>(layer, &streams[t], kv_stream, job));
                }
            });
        }
    });
    for s in &streams {
        s.synchronize().unwrap();
    }

    let loads = cuda::jit_loads();
    for variant in SharedAttention.variant_table().variants() {
        let entry = variant.gpu_kernel().expect("a GPU kernel").entry();
        // The variant's kernels share the entry name, and a call whose
        // strides no tensor map describes runs the portable kernel where the
        // device prefers the Hopper one: each (entry, target) is one kernel,
        // loaded once however many threads asked for it.
        let targets: Vec<_> = loads
            .iter()
            .filter(|l| l.entry == entry && l.ordinal == 0)
            .map(|l| l.target)
            .collect();
        assert!(
            !targets.is_empty(),
            "{entry} was never JIT-loaded (seed {seed})"
        );
        for target in &targets {
            let n = targets.iter().filter(|&t| t == target).count();
            assert_eq!(
                n,
                1,
                "{entry} ({}) was JIT-loaded {n} times by {THREADS} threads (seed {seed})",
                target.name()
            );
        }
    }
    say(&format!(
        "{test}: {} calls on {THREADS} streams, {} variants, each kernel loaded once",
        plans.iter().map(Vec::len).sum::<usize>(),
        SharedAttention.variant_table().variants().len()
    ));
}

// ---------------------------------------------------------------------------
// Numerical edge cases on device tensors.

/// An additive mask `[B, H, Sq, Sk]` in the case's dtype: some rows all
/// `-inf`; with causal, one row `-inf` on every key it may see and finite
/// beyond; other rows finite with a few `-inf`, key 0 always finite.
fn hiding_mask(case: &Case) -> GenMask {
    let (b, sq, sk, h, _, _) = case.dims();
    let mut raw = Vec::with_capacity(b * h * sq * sk);
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..sq {
                for j in 0..sk {
                    let n = ((bi * h + hi) * sq + i) * sk + j;
                    let whole_row = (i + bi + hi) % 4 == 1;
                    let all_it_may_see = case.causal && i == 5 && j <= 5;
                    let some_keys = j > 0 && noise(n, 11) > 0.5;
                    let x = if whole_row || all_it_may_see || some_keys {
                        f32::NEG_INFINITY
                    } else {
                        2.0 * noise(n, 12)
                    };
                    raw.push(x);
                }
            }
        }
    }
    let data = match case.dtype {
        DType::F32 => OwnedMaskData::F32(raw),
        DType::F16 => OwnedMaskData::F16(raw.iter().map(|&x| f16::from_f32(x)).collect()),
        DType::BF16 => OwnedMaskData::BF16(raw.iter().map(|&x| bf16::from_f32(x)).collect()),
    };
    GenMask {
        data,
        shape: vec![b, h, sq, sk],
    }
}

/// The output rows `(b, i, h)` (row-major order) that see no key.
fn hidden_rows(case: &Case, mask: &GenMask) -> Vec<bool> {
    let (b, sq, sk, h, _, _) = case.dims();
    let mut hidden = Vec::with_capacity(b * sq * h);
    for bi in 0..b {
        for i in 0..sq {
            for hi in 0..h {
                hidden.push((0..sk).all(|j| {
                    (case.causal && j > i) || mask.bias_at(sk, bi, hi, i, j) == f64::NEG_INFINITY
                }));
            }
        }
    }
    hidden
}

fn check_hidden_rows_are_zero<T: Element>(
    stream: &Arc<CudaStream>,
    case: &Case,
    mask: GenMask,
    seed: u64,
) -> usize {
    let mut x = CaseInputs::<T>::draw(case, seed);
    let hidden = hidden_rows(case, &mask);
    x.mask = Some(mask);
    let outcome = check_on_device(&RaggedAttention, stream, case, &x, seed);
    let d = case.head_size;
    for (row, chunk) in outcome.out.chunks(d).enumerate() {
        if hidden[row] {
            assert!(
                chunk.iter().all(|&o| o == 0.0),
                "{case:?} (seed {seed}): row {row} sees no key and must be zeros, got {:?}",
                &chunk[..4.min(d)]
            );
        }
    }
    hidden.iter().filter(|&&x| x).count()
}

#[test]
fn neg_inf_masks_hiding_whole_rows_give_zeros_on_device() {
    let test = "neg_inf_masks_hiding_whole_rows_give_zeros_on_device";
    let Some(stream) = gpu(test) else { return };
    let _shared = shared();
    let seed = run_seed();
    for dtype in DType::ALL {
        for causal in [false, true] {
            for d in [40, 136] {
                let case = Case::new(2, 45, 70, 2, d)
                    .kv_heads(1)
                    .causal(causal)
                    .dtype(dtype)
                    .placement(Placement::Contiguous, Placement::Gapped);
                let mask = hiding_mask(&case);
                let n = with_dtype!(dtype, T => check_hidden_rows_are_zero::<T>(&stream, &case, mask, seed));
                assert!(n > 0, "{case:?}: the mask hid no row");

                // A broadcast key mask that hides every key: all zeros.
                let case = Case::new(2, 33, 70, 2, d).causal(causal).dtype(dtype);
                let all = GenMask {
                    data: OwnedMaskData::F32(vec![f32::NEG_INFINITY; 70]),
                    shape: vec![1, 70],
                };
                let n = with_dtype!(dtype, T => check_hidden_rows_are_zero::<T>(&stream, &case, all, seed));
                assert_eq!(n, 2 * 33 * 2, "{case:?}: every row must be hidden");
            }
        }
    }
}

/// Inputs whose scores are equal along every row: every key row of a
/// (batch, head) is the same vector. With `huge`, q and k are one large
/// constant, so that every score is the same large number (about 1e4 for
/// f32, 3e3 for f16 and bf16): exp of it overflows unless the row maximum
/// is taken out first.
fn equal_scores<T: Element>(case: &Case, seed: u64, huge: bool) -> CaseInputs<T> {
    let (b, sq, sk, hq, hkv, d) = case.dims();
    let salt = seed % 1000;
    let c = if case.dtype == DType::F32 { 30.0 } else { 16.0 };
    let q = tensor_from_fn::<T>([b, sq, hq, d], |bi, s, h, e| {
        if huge {
            c
        } else {
            noise(((bi * sq + s) * hq + h) * d + e, salt + 1)
        }
    });
    let k = tensor_from_fn::<T>([b, sk, hkv, d], |bi, _, h, e| {
        if huge {
            c
        } else {
            noise((bi * hkv + h) * d + e, salt + 2)
        }
    });
    let v = tensor_from_fn::<T>([b, sk, hkv, d], |bi, s, h, e| {
        noise(((bi * sk + s) * hkv + h) * d + e, salt + 3)
    });
    CaseInputs {
        q,
        k,
        v,
        mask: None,
    }
}

#[test]
fn equal_scores_give_the_mean_of_the_values_on_device() {
    let test = "equal_scores_give_the_mean_of_the_values_on_device";
    let Some(stream) = gpu(test) else { return };
    let _shared = shared();
    let seed = run_seed();
    for dtype in DType::ALL {
        for causal in [false, true] {
            for d in [40, 136] {
                for huge in [false, true] {
                    let case = Case::new(2, 50, 77, 2, d)
                        .kv_heads(1)
                        .causal(causal)
                        .dtype(dtype);
                    let outcome = with_dtype!(dtype, T => {
                        let x = equal_scores::<T>(&case, seed, huge);
                        check_on_device(&RaggedAttention, &stream, &case, &x, seed)
                    });
                    assert!(
                        outcome.out.iter().all(|o| o.is_finite()),
                        "{case:?} (huge scores: {huge}, seed {seed}): a non-finite output"
                    );
                }
            }
        }
    }
}

fn check_nan_row<T: Element>(stream: &Arc<CudaStream>, case: &Case, seed: u64) {
    let (_, sq, _, hq, _, d) = case.dims();
    let mut x = CaseInputs::<T>::draw(case, seed);
    // Row (batch 1, token 17, head 1), element 5.
    let row = (sq + 17) * hq + 1;
    let [sb, ss, sh, _] = x.q.strides;
    x.q.buf[sb + 17 * ss + sh + 5] = T::from_f32(f32::NAN);
    x.q.values[row * d + 5] = f64::NAN;
    let layer = RaggedAttention.build_impl(case.params()).unwrap();
    let (buf, strides) = run_on_device(&layer, stream, stream, case, &x, Call::Into)
        .unwrap_or_else(|e| panic!("{case:?} (seed {seed}): {e}"));
    let outcome = x.judge(case, seed, &buf, strides);
    let (mut out, mut reference) = (Vec::new(), Vec::new());
    for (r, (o, e)) in outcome
        .out
        .chunks(d)
        .zip(outcome.reference.chunks(d))
        .enumerate()
    {
        if r == row {
            assert!(
                o.iter().all(|v| v.is_nan()),
                "{case:?} (seed {seed}): the row with a NaN in q must be NaN, got {:?}",
                &o[..4]
            );
        } else {
            assert!(
                o.iter().all(|v| v.is_finite()),
                "{case:?} (seed {seed}): row {r} caught the NaN of row {row}"
            );
            out.extend_from_slice(o);
            reference.extend_from_slice(e);
        }
    }
    let err = rel_l2(&out, &reference);
    assert!(
        err <= case.tolerance(),
        "{case:?} (seed {seed}): the other rows are off by {err:.3e}"
    );
}

#[test]
fn nan_in_one_query_row_stays_in_that_row_on_device() {
    let test = "nan_in_one_query_row_stays_in_that_row_on_device";
    let Some(stream) = gpu(test) else { return };
    let _shared = shared();
    let seed = run_seed();
    for dtype in DType::ALL {
        for causal in [false, true] {
            for d in [40, 96, 136] {
                let case = Case::new(2, 40, 70, 2, d)
                    .kv_heads(1)
                    .causal(causal)
                    .dtype(dtype)
                    .placement(Placement::Gapped, Placement::Contiguous);
                with_dtype!(dtype, T => check_nan_row::<T>(&stream, &case, seed));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Ragged shapes, small enough for compute-sanitizer.

/// `(Sq, Sk)` pairs: 1, 33, 129 and 257 are multiples of no query block
/// (64, 128) and no key block or tile (24 to 64); Sq above, below and equal
/// to Sk, so that causal rows see all, some or one key.
const RAGGED: [(usize, usize); 6] = [(1, 1), (1, 257), (33, 129), (129, 33), (257, 1), (257, 257)];

/// Every head size and causal flag of [`RaggedAttention`] in `dtype` on
/// the [`RAGGED`] shapes, on device tensors, with masks and strided
/// layouts; then one call of host tensors staged through device 0.
fn ragged(dtype: DType) {
    let Some(stream) = gpu(&format!("sanitize_ragged_{dtype}")) else {
        return;
    };
    let _shared = shared();
    let seed = run_seed();
    let placements = [
        Placement::Contiguous,
        Placement::Gapped,
        Placement::HeadMajor,
    ];
    let mut n = 0;
    for (di, &d) in RaggedAttention.supported_head_sizes().iter().enumerate() {
        for causal in [false, true] {
            for (si, &(sq, sk)) in RAGGED.iter().enumerate() {
                let short = if sk > 8 { 7 } else { 0 };
                let mask = match (si + di) % 5 {
                    0 => MaskKind::None,
                    1 => MaskKind::KeyPadding {
                        short,
                        broadcast_batch: true,
                    },
                    2 => MaskKind::Additive4 {
                        broadcast_heads: false,
                        short,
                        with_neg_inf: true,
                    },
                    3 => MaskKind::HideRows,
                    _ => MaskKind::Bool3,
                };
                let case = Case::new(2, sq, sk, 2, d)
                    .kv_heads(1)
                    .causal(causal)
                    .dtype(dtype)
                    .mask(mask)
                    .placement(placements[(si + di) % 3], placements[(si + 2 * di + 1) % 3]);
                let case_seed = seed ^ (n as u64);
                with_dtype!(dtype, T => {
                    let x = CaseInputs::<T>::draw(&case, case_seed);
                    check_on_device(&RaggedAttention, &stream, &case, &x, case_seed);
                });
                n += 1;
            }
        }
    }
    // Host tensors through the staging path (packed copies on device 0).
    let case = Case::new(2, 129, 257, 2, 136)
        .kv_heads(1)
        .causal(true)
        .dtype(dtype)
        .placement(Placement::Gapped, Placement::HeadMajor)
        .mask(MaskKind::KeyPadding {
            short: 7,
            broadcast_batch: false,
        });
    let outcome =
        with_dtype!(dtype, T => run_typed::<T>(&RaggedAttention, BackendKind::Cuda, &case, seed));
    let outcome = outcome.unwrap_or_else(|e| panic!("{case:?} staged (seed {seed}): {e}"));
    assert!(
        outcome.rel_err <= case.tolerance(),
        "{case:?} staged (seed {seed}): relative error {:.3e}",
        outcome.rel_err
    );
    say(&format!(
        "sanitize_ragged_{dtype}: {} device calls and one staged call agree with the reference",
        n
    ));
}

#[test]
fn sanitize_ragged_f32() {
    ragged(DType::F32);
}

#[test]
fn sanitize_ragged_f16() {
    ragged(DType::F16);
}

#[test]
fn sanitize_ragged_bf16() {
    ragged(DType::BF16);
}

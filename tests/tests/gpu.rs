//! The CUDA backend on a GPU: tensors that live on the device, outputs
//! written into device buffers, the JIT module cache under threads.
//!
//! Every test here needs a CUDA driver and device; without one, each test
//! returns at once and the binary prints one line saying why. (The
//! conformance suite runs the GPU kernels on host tensors as well.)

use std::sync::{Arc, Barrier};

use half::{bf16, f16};
use sdpa_runtime::cudarc::driver::CudaStream;
use sdpa_runtime::prelude::*;
use sdpa_runtime::{cuda, Element, Residence};
use sdpa_tests::cases::{run_seed, say, Case, CaseInputs, MaskKind, Placement};
use sdpa_tests::consumer::{ConformanceAttention, TrainingAttention};
use sdpa_tests::device::upload;

/// A declaration of its own, so that its one variant is loaded by the cache
/// test only (no other test here runs an entry point of this name; the
/// same PTX is assembled by the ptxas check through `ConformanceAttention`).
#[sdpa_variants(head_sizes = [40], causal = [true], dtypes = [f16])]
struct CacheProbe;

/// Device 0's default stream, or `None` (after saying why, once).
fn stream() -> Option<Arc<CudaStream>> {
    sdpa_tests::device::stream("GPU tests")
}

/// Runs `case` with q, k, v and the output in device memory (with the
/// case's strides), the output written by `forward_into`, and returns the
/// relative error against the float64 reference.
fn device_case<T: Element>(stream: &Arc<CudaStream>, case: &Case, seed: u64) -> f64 {
    let (b, sq, sk, hq, hkv, d) = case.dims();
    let x = CaseInputs::<T>::draw(case, seed);
    let (dq, dk, dv) = (
        upload(stream, &x.q.buf),
        upload(stream, &x.k.buf),
        upload(stream, &x.v.buf),
    );
    let out_shape = [b, sq, hq, d];
    let (out_strides, out_len) = case.out_placement.strides(out_shape);
    let poison = vec![T::from_f32(f32::NAN); out_len];
    let mut dout = upload(stream, &poison);
    let layer = ConformanceAttention.build_impl(case.params()).unwrap();
    let meta = x.metadata().unwrap();
    {
        let qv = TensorView::from_cuda_with_strides(&dq, [b, sq, hq, d], x.q.strides).unwrap();
        let kv = TensorView::from_cuda_with_strides(&dk, [b, sk, hkv, d], x.k.strides).unwrap();
        let vv = TensorView::from_cuda_with_strides(&dv, [b, sk, hkv, d], x.v.strides).unwrap();
        assert_eq!(qv.residence(), Residence::Cuda { ordinal: 0 });
        let mut ov =
            TensorViewMut::from_cuda_with_strides(&mut dout, out_shape, out_strides).unwrap();
        layer
            .forward_into(&qv, &kv, &vv, &meta, &mut ov)
            .unwrap_or_else(|e| panic!("{case:?} (seed {seed}): {e}"));
    }
    let out_buf: Vec<T> = stream.clone_dtoh(&dout).unwrap();
    stream.synchronize().unwrap();
    // The upload keeps at least one element; judge the view's span only.
    x.judge(case, seed, &out_buf[..out_len], out_strides)
        .rel_err
}

fn check_device_case(stream: &Arc<CudaStream>, case: &Case, seed: u64) {
    let err = match case.dtype {
        DType::F32 => device_case::<f32>(stream, case, seed),
        DType::F16 => device_case::<f16>(stream, case, seed),
        DType::BF16 => device_case::<bf16>(stream, case, seed),
    };
    assert!(
        err <= case.tolerance(),
        "{case:?} on device tensors (seed {seed}): relative error {err:.3e} > {:.0e}",
        case.tolerance()
    );
}

#[test]
fn device_tensors_match_the_reference() {
    let Some(stream) = stream() else { return };
    let seed = run_seed();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for causal in [false, true] {
            for d in [8, 64, 136, 256] {
                let case = Case::new(2, 77, 130, 4, d)
                    .kv_heads(2)
                    .causal(causal)
                    .dtype(dtype);
                check_device_case(&stream, &case, seed ^ d as u64);
            }
        }
    }
}

#[test]
fn device_tensors_with_strides_and_masks() {
    let Some(stream) = stream() else { return };
    let seed = run_seed();
    let placements = [
        Placement::Contiguous,
        Placement::HeadMajor,
        Placement::Gapped,
    ];
    for input in placements {
        for output in placements {
            let case = Case::new(2, 33, 70, 4, 64)
                .kv_heads(1)
                .dtype(DType::BF16)
                .placement(input, output)
                .mask(MaskKind::KeyPadding {
                    short: 5,
                    broadcast_batch: false,
                });
            check_device_case(&stream, &case, seed);
        }
    }
    for mask in [
        MaskKind::Bool3,
        MaskKind::HideRows,
        MaskKind::Additive4 {
            broadcast_heads: true,
            short: 3,
            with_neg_inf: true,
        },
    ] {
        let case = Case::new(2, 40, 66, 2, 40).dtype(DType::F16).mask(mask);
        check_device_case(&stream, &case, seed);
    }
}

#[test]
fn forward_on_device_tensors_returns_a_device_tensor() {
    let Some(stream) = stream() else { return };
    let (b, s, h, d) = (2, 50, 4, 64);
    let host: Vec<bf16> = (0..b * s * h * d)
        .map(|i| bf16::from_f32(((i * 37 % 101) as f32 - 50.0) / 50.0))
        .collect();
    let dq = stream.clone_htod(&host).unwrap();
    let layer = ConformanceAttention
        .build_impl(AttentionParams::new(h, d).causal(true))
        .unwrap();
    let qv = TensorView::from_cuda(&dq, [b, s, h, d]).unwrap();
    let out = layer
        .forward(&qv, &qv, &qv, &AttentionMetadata::default())
        .unwrap();
    assert_eq!(out.residence(), Residence::Cuda { ordinal: 0 });
    assert!(out.cuda_slice::<bf16>().is_some());
    let on_gpu = out.to_f32_vec().unwrap();

    let cpu = ConformanceAttention
        .build_impl(
            AttentionParams::new(h, d)
                .causal(true)
                .backend(BackendKind::Cpu),
        )
        .unwrap();
    let hv = TensorView::from_slice(&host, [b, s, h, d]).unwrap();
    let on_cpu = cpu
        .forward(&hv, &hv, &hv, &AttentionMetadata::default())
        .unwrap()
        .to_f32_vec()
        .unwrap();
    let diff: f64 = on_gpu
        .iter()
        .zip(&on_cpu)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = on_cpu
        .iter()
        .map(|x| (*x as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        diff / norm < 2e-2,
        "GPU and CPU differ by {:.3e}",
        diff / norm
    );
}

#[test]
fn the_backward_on_device_tensors_gives_device_gradients() {
    let Some(stream) = stream() else { return };
    let (b, s, h, d) = (1, 16, 2, 64);
    let host = vec![bf16::from_f32(0.5); b * s * h * d];
    let dq = stream.clone_htod(&host).unwrap();
    let layer = TrainingAttention
        .build_impl(AttentionParams::new(h, d))
        .unwrap();
    let qv = TensorView::from_cuda(&dq, [b, s, h, d]).unwrap();
    let meta = AttentionMetadata::default();
    // The forward with the lse runs on the device (`tests/gpu_lse.rs`),
    // and so does the backward (`tests/gpu_backward.rs` checks its
    // gradients): fresh gradients on the device.
    let lse_host = vec![0.0f32; b * h * s];
    let lse = stream.clone_htod(&lse_host).unwrap();
    let lv = TensorView::from_cuda(&lse, [b, h, s, 1]).unwrap();
    let (dq, dk, dv) = layer.backward(&qv, &qv, &qv, &qv, &qv, &lv, &meta).unwrap();
    for g in [dq, dk, dv] {
        assert!(g.residence().is_cuda());
    }
}

#[test]
fn misaligned_device_rows_are_an_error_not_a_fault() {
    let Some(stream) = stream() else { return };
    let (b, s, h, d) = (2, 16, 2, 64);
    // A batch stride of an odd number of elements: rows of batch 1 start off
    // a 16-byte boundary.
    let strides = [s * h * d + 1, h * d, d, 1];
    let n = strides[0] + s * h * d;
    let host = vec![half::bf16::from_f32(0.5); n];
    let dq = upload(&stream, &host);
    let mut dout = upload(&stream, &host);
    let layer = ConformanceAttention
        .build_impl(AttentionParams::new(h, d))
        .unwrap();
    let q = TensorView::from_cuda_with_strides(&dq, [b, s, h, d], strides).unwrap();
    let mut out = TensorViewMut::from_cuda_with_strides(&mut dout, [b, s, h, d], strides).unwrap();
    let err = layer
        .forward_into(&q, &q, &q, &AttentionMetadata::new(0), &mut out)
        .unwrap_err();
    assert!(err.to_string().contains("16-byte"), "{err}");
    // The context is still usable: an aligned call right after works.
    let aligned = [s * h * d, h * d, d, 1];
    let q = TensorView::from_cuda_with_strides(&dq, [b, s, h, d], aligned).unwrap();
    let mut out = TensorViewMut::from_cuda_with_strides(&mut dout, [b, s, h, d], aligned).unwrap();
    layer
        .forward_into(&q, &q, &q, &AttentionMetadata::new(0), &mut out)
        .unwrap();
    stream.synchronize().unwrap();
}

#[test]
fn tensors_in_different_places_are_refused() {
    let Some(stream) = stream() else { return };
    let host = vec![0.5f32; 16 * 2 * 64];
    let dev = stream.clone_htod(&host).unwrap();
    let layer = ConformanceAttention
        .build_impl(AttentionParams::new(2, 64))
        .unwrap();
    let on_host = TensorView::from_slice(&host, [1, 16, 2, 64]).unwrap();
    let on_device = TensorView::from_cuda(&dev, [1, 16, 2, 64]).unwrap();
    let meta = AttentionMetadata::default();
    let err = layer
        .forward(&on_device, &on_host, &on_host, &meta)
        .unwrap_err();
    assert!(matches!(err, SdpaError::Residence(_)), "{err}");
    assert!(err.to_string().contains("host memory"), "{err}");

    let mut out = vec![0.0f32; host.len()];
    let mut out = TensorViewMut::from_slice(&mut out, [1, 16, 2, 64]).unwrap();
    let err = layer
        .forward_into(&on_device, &on_device, &on_device, &meta, &mut out)
        .unwrap_err();
    assert!(matches!(err, SdpaError::Residence(_)), "{err}");

    let cpu = ConformanceAttention
        .build_impl(AttentionParams::new(2, 64).backend(BackendKind::Cpu))
        .unwrap();
    let err = cpu
        .forward(&on_device, &on_device, &on_device, &meta)
        .unwrap_err();
    assert!(
        matches!(err, SdpaError::BackendUnavailable { backend: "cpu", .. }),
        "{err}"
    );
}

#[test]
fn short_device_buffers_are_refused() {
    let Some(stream) = stream() else { return };
    let dev = stream.alloc_zeros::<f32>(100).unwrap();
    let err = TensorView::from_cuda(&dev, [1, 4, 2, 64]).unwrap_err();
    assert!(err.to_string().contains("needs a buffer of 512"), "{err}");
}

#[test]
fn the_module_cache_loads_each_variant_once_under_threads() {
    let Some(stream) = stream() else { return };
    let (b, s, h, d) = (1, 40, 2, 40);
    let host = vec![f16::from_f32(0.25); b * s * h * d];
    let dq = stream.clone_htod(&host).unwrap();
    let layer = CacheProbe
        .build_impl(AttentionParams::new(h, d).causal(true))
        .unwrap();
    let threads = 8;
    let barrier = Barrier::new(threads);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let qv = TensorView::from_cuda(&dq, [b, s, h, d]).unwrap();
                barrier.wait();
                let out = layer
                    .forward(&qv, &qv, &qv, &AttentionMetadata::default())
                    .unwrap();
                out.to_host().unwrap();
            });
        }
    });
    let variant = &CacheProbe.variant_table().variants()[0];
    let entry = variant.gpu_kernel().unwrap().entry();
    let loads: Vec<_> = cuda::jit_loads()
        .into_iter()
        .filter(|l| l.entry == entry && l.ordinal == 0)
        .collect();
    // The variant's kernels share the entry name; contiguous inputs run the
    // one the device prefers, loaded once.
    assert_eq!(
        loads.len(),
        1,
        "{entry} was JIT-loaded {} times: {loads:?}",
        loads.len()
    );
    assert!(
        variant
            .gpu_kernels()
            .iter()
            .any(|k| k.entry() == entry && k.target() == loads[0].target),
        "{loads:?} is not a kernel of the variant"
    );
    for l in cuda::jit_loads() {
        say(&format!(
            "JIT {} ({}) on device {}: {:.1} ms, {} registers, {} bytes local memory",
            l.entry,
            l.target.name(),
            l.ordinal,
            l.elapsed.as_secs_f64() * 1e3,
            l.registers,
            l.local_bytes
        ));
    }
}

#[test]
fn every_device_is_described() {
    let Some(_) = stream() else { return };
    let devices = cuda::devices().unwrap();
    assert!(!devices.is_empty());
    for d in &devices {
        say(&format!(
            "device {}: {} (sm_{}{}), {} MiB, {} SMs, {} KiB shared memory per block",
            d.ordinal,
            d.name,
            d.compute_capability.0,
            d.compute_capability.1,
            d.total_memory >> 20,
            d.multiprocessors,
            d.max_shared_memory_per_block >> 10
        ));
        assert!(
            d.compute_capability.0 >= 8,
            "the kernels need sm_80 or later"
        );
    }
}

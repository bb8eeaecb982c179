//! On a device: tensor maps the driver encodes, and the generator's TMA
//! kernel run through the launch against the portable kernel. Each test
//! says why it skips on a machine without a CUDA driver, or (for the
//! kernel) without a device of compute capability 9.0.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use kernels_gen::sm90::{generate_with, Sm90Config};

use super::launch::{choose, Capability, Kernels};
use super::tensor_map::{describe, Tiled, Undescribable};
use crate::layout::Layout;
use crate::problem::Problem;
use crate::select::{probe_cuda, CudaProbe};
use crate::tensor::{TensorView, TensorViewMut};
use crate::variant::{GpuKernel, Variant};
use crate::{DType, VariantSpec};

/// Device 0's default stream, or `None` after saying why.
fn stream(test: &str) -> Option<Arc<CudaStream>> {
    match probe_cuda() {
        CudaProbe::Present { .. } => Some(super::context(0).ok()?.default_stream()),
        CudaProbe::Absent(reason) => {
            eprintln!("skipping GPU test {test}: {reason}");
            None
        }
    }
}

#[test]
fn the_driver_encodes_what_describe_derives() {
    let Some(stream) = stream("the_driver_encodes_what_describe_derives") else {
        return;
    };
    let buf: CudaSlice<bf16> = stream.alloc_zeros(1 << 20).unwrap();
    let (address, _guard) = cudarc::driver::DevicePtr::device_ptr(&buf, &stream);
    let layouts = [
        // Contiguous; transposed [B, H, S, D]; GQA; decode (one token).
        Layout::contiguous([2, 300, 4, 128]),
        Layout::strided([2, 257, 8, 80], [8 * 257 * 80, 80, 257 * 80, 1]).unwrap(),
        Layout::contiguous([1, 40, 2, 48]),
        Layout::strided([1, 1, 8, 64], [3, 5, 64, 1]).unwrap(),
        // Fewer tokens than a box holds.
        Layout::contiguous([1, 10, 1, 64]),
    ];
    for layout in layouts {
        let tiled = describe(&layout, DType::BF16, address, 128).unwrap();
        assert!(tiled.encode().is_ok(), "{layout:?}: {tiled:?}");
    }
    // A broadcast dimension (stride 0, several entries) is the driver's
    // call; driver 580 takes it (were one to refuse, the call would fall
    // back, as for any refusal).
    let broadcast = Layout::strided([2, 64, 4, 64], [0, 256, 64, 1]).unwrap();
    let tiled = describe(&broadcast, DType::BF16, address, 128).unwrap();
    assert!(tiled.encode().is_ok(), "batch stride 0: {tiled:?}");
    // What `describe` refuses, the driver refuses too.
    let unaligned = Tiled {
        strides: [136, 136 * 8, 136 * 64],
        ..describe(&Layout::contiguous([1, 8, 8, 64]), DType::BF16, address, 64).unwrap()
    };
    assert!(matches!(unaligned.encode(), Err(Undescribable::Driver(_))));
}

/// A variant whose Hopper kernel loads through tensor maps, and the same
/// variant with its portable kernel alone.
fn variants(spec: VariantSpec) -> (Variant, Variant) {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let runtime = |k: kernels_gen::GpuKernel| {
        let kernel = GpuKernel::new(
            leak(k.ptx),
            leak(k.entry),
            k.target,
            k.block_m,
            k.threads,
            k.smem_bytes,
        );
        match k.tensor_maps {
            Some(m) => kernel.with_tensor_maps(m.q_rows, m.kv_rows),
            None => kernel,
        }
    };
    // The default Hopper kernel loads through tensor maps.
    let tma = runtime(generate_with(Sm90Config::new(&spec).unwrap()));
    assert!(tma.tensor_maps().is_some());
    let portable = runtime(kernels_gen::generate(&spec, kernels_gen::ptx::Target::Sm80));
    let cpu = match (spec.head_size, spec.causal) {
        (64, false) => crate::cpu::attention_lse::<64, false, bf16>,
        (64, true) => crate::cpu::attention_lse::<64, true, bf16>,
        (128, false) => crate::cpu::attention_lse::<128, false, bf16>,
        _ => crate::cpu::attention_lse::<128, true, bf16>,
    };
    let kernels: &'static [GpuKernel] = Box::leak(Box::new([tma, portable]));
    let base = Variant::new(spec, cpu);
    (
        base.with_gpu_kernels(kernels),
        base.with_gpu_kernels(&kernels[1..]),
    )
}

/// Values in [-1, 1) from a seed.
fn values(n: usize, seed: u64) -> Vec<bf16> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bf16::from_f32((x >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

/// `[B, S, H, D]` with the given strides, its buffer filled from `seed`.
struct Input {
    shape: [usize; 4],
    strides: [usize; 4],
    buf: CudaSlice<bf16>,
}

impl Input {
    fn new(stream: &Arc<CudaStream>, shape: [usize; 4], strides: [usize; 4], seed: u64) -> Input {
        let len = Layout::strided(shape, strides)
            .unwrap()
            .required_len()
            .unwrap();
        let buf = stream.clone_htod(&values(len.max(1), seed)).unwrap();
        Input {
            shape,
            strides,
            buf,
        }
    }
    fn view(&self) -> TensorView<'_> {
        TensorView::from_cuda_with_strides(&self.buf, self.shape, self.strides).unwrap()
    }
}

/// `[B, S, H, D]` strides of `[B, H, S, D]` memory.
fn transposed([_, s, h, d]: [usize; 4]) -> [usize; 4] {
    [h * s * d, d, s * d, 1]
}

fn contiguous(shape: [usize; 4]) -> [usize; 4] {
    Layout::contiguous(shape).strides()
}

/// Contiguous, but an odd stride (7) on each dimension of one entry.
fn odd_where_one(shape: [usize; 4]) -> [usize; 4] {
    let mut strides = contiguous(shape);
    for (stride, size) in strides.iter_mut().zip(shape).take(3) {
        if size == 1 {
            *stride = 7;
        }
    }
    strides
}

/// Contiguous, with every batch on the same memory.
fn broadcast_batch(shape: [usize; 4]) -> [usize; 4] {
    let mut strides = contiguous(shape);
    strides[0] = 0;
    strides
}

/// One call: `[B, Sq, Sk, Hq, Hkv, D]`, causal, and the strides of q, k
/// and v for their shapes.
#[derive(Clone, Copy)]
struct Case {
    dims: [usize; 6],
    causal: bool,
    strides: fn([usize; 4]) -> [usize; 4],
}

impl Case {
    fn new(dims: [usize; 6], causal: bool, strides: fn([usize; 4]) -> [usize; 4]) -> Case {
        Case {
            dims,
            causal,
            strides,
        }
    }
}

#[test]
fn the_tma_kernel_matches_the_portable_kernel() {
    let Some(stream) = stream("the_tma_kernel_matches_the_portable_kernel") else {
        return;
    };
    if stream.context().compute_capability().ok() != Some((9, 0)) {
        eprintln!("skipping the TMA kernel: device 0 is not of compute capability 9.0");
        return;
    }
    let cases = [
        Case::new([2, 300, 300, 4, 4, 64], false, contiguous),
        Case::new([1, 257, 190, 8, 2, 128], false, transposed),
        Case::new([2, 1, 1000, 4, 4, 64], false, contiguous),
        Case::new([1, 200, 200, 2, 2, 128], true, transposed),
        Case::new([1, 129, 77, 6, 3, 64], true, contiguous),
        // Odd strides on dimensions of one entry (one batch, one kv head).
        Case::new([1, 70, 90, 4, 1, 64], false, odd_where_one),
        // Every batch reads the same q, k and v (batch stride 0).
        Case::new([2, 100, 150, 2, 2, 128], true, broadcast_batch),
    ];
    for (i, case) in cases.iter().enumerate() {
        let Case {
            dims: [b, sq, sk, hq, hkv, d],
            causal,
            strides,
        } = *case;
        let spec = VariantSpec::new(d, causal, DType::BF16).unwrap();
        let (tma, portable) = variants(spec);
        let seed = 10 * i as u64;
        let q = Input::new(&stream, [b, sq, hq, d], strides([b, sq, hq, d]), seed);
        let k = Input::new(&stream, [b, sk, hkv, d], strides([b, sk, hkv, d]), seed + 1);
        let v = Input::new(&stream, [b, sk, hkv, d], strides([b, sk, hkv, d]), seed + 2);
        let p = Problem::new(q.view(), k.view(), v.view(), None, 1.0 / (d as f32).sqrt()).unwrap();
        // The maps of these tensors are made: the TMA kernel runs.
        let hopper = Capability {
            device: (9, 0),
            portable_only: false,
        };
        let kernels = Kernels::new(&tma, hopper).unwrap();
        assert_eq!(kernels.preferred(), tma.gpu_kernel_sm90());
        let addresses = [&q, &k, &v].map(|t| {
            let (address, _guard) = cudarc::driver::DevicePtr::device_ptr(&t.buf, &stream);
            address
        });
        let chosen = choose(kernels, &p, addresses, Tiled::encode).unwrap();
        assert!(chosen.maps.is_some(), "case {i}");
        let n = b * sq * hq * d;
        let mut outs = Vec::new();
        let mut lses = Vec::new();
        for variant in [&tma, &portable] {
            let mut out: CudaSlice<bf16> = stream.alloc_zeros(n).unwrap();
            let mut lse: CudaSlice<f32> = stream.clone_htod(&vec![f32::NAN; b * hq * sq]).unwrap();
            {
                let mut view = TensorViewMut::from_cuda(&mut out, [b, sq, hq, d]).unwrap();
                let mut lse_view = TensorViewMut::from_cuda(&mut lse, [b, hq, sq, 1]).unwrap();
                super::run(variant, &p, &mut view, Some(&mut lse_view)).unwrap();
            }
            outs.push(stream.clone_dtoh(&out).unwrap());
            lses.push(stream.clone_dtoh(&lse).unwrap());
        }
        stream.synchronize().unwrap();
        let worst = outs[0]
            .iter()
            .zip(&outs[1])
            .map(|(a, b)| (a.to_f32() - b.to_f32()).abs())
            .fold(0.0f32, f32::max);
        eprintln!("case {i}: largest difference {worst}");
        assert!(worst < 2e-2, "case {i}: TMA and portable differ by {worst}");
        // Every row's log-sum-exp, the same from both (f32 arithmetic on
        // the same products, summed in another order).
        for (n, (a, c)) in lses[0].iter().zip(&lses[1]).enumerate() {
            assert!(
                a.is_finite() && (a - c).abs() <= 1e-4 * (1.0 + c.abs()),
                "case {i}: lse[{n}] is {a} from the TMA kernel, {c} from the portable one"
            );
        }
    }
}

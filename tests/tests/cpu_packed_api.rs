//! Packed batches (`cu_seqlens`) on the CPU backend, against the float64
//! reference run per sequence: forward, log-sum-exp and backward, every
//! CPU path, with an empty sequence, a sequence without keys, GQA and
//! causal. Move this file to `tests/tests/` once the CPU kernels read
//! sequence bounds (until then the CPU backend refuses packed batches with
//! `SdpaError::Unsupported`).

use half::{bf16, f16};
use sdpa_runtime::cpu::with_isa;
use sdpa_runtime::prelude::*;
use sdpa_runtime::{BackwardInputs, Element, Gradients, VarLen};
use sdpa_tests::cases::{cpu_paths, run_seed};
use sdpa_tests::reference::rel_l2;
use sdpa_tests::training::{
    assert_lse_close, grad_tolerance, judge_grads, read_view, Grads, LSE_TOL,
};
use sdpa_tests::varlen::{PackedCase, PackedInputs};

#[sdpa_variants(head_sizes = [64], backward = true)]
struct CpuVarlen;

fn run<T: Element>(pc: &PackedCase, with_max: bool, seed: u64) -> Result<(), String> {
    let x = PackedInputs::<T>::draw(pc, seed);
    let want = x.reference(pc);
    let case = pc.case();
    let (qs, ks, ls) = (pc.q_shape(), pc.k_shape(), pc.lse_shape());
    let (cu_q, cu_k) = (pc.cu_q(), pc.cu_k());
    let mut varlen = VarLen::new(&cu_q, &cu_k);
    if with_max {
        varlen = varlen.with_max_seqlen(pc.max_q(), pc.max_k());
    }
    let meta = AttentionMetadata::new(0).with_varlen(varlen);
    let layer = CpuVarlen
        .build_impl(case.params().backend(BackendKind::Cpu))
        .map_err(|e| e.to_string())?;
    let e = |e: SdpaError| e.to_string();
    let qv = TensorView::from_slice(&x.q.buf, qs).map_err(e)?;
    let kv = TensorView::from_slice(&x.k.buf, ks).map_err(e)?;
    let vv = TensorView::from_slice(&x.v.buf, ks).map_err(e)?;
    let nan = T::from_f32(f32::NAN);
    let n = |s: [usize; 4]| s.iter().product::<usize>();
    let mut out = vec![nan; n(qs)];
    let mut lse = vec![f32::NAN; n(ls)];
    {
        let mut ov = TensorViewMut::from_slice(&mut out, qs).map_err(e)?;
        let mut lv = TensorViewMut::from_slice(&mut lse, ls).map_err(e)?;
        layer
            .forward_with_lse_into(&qv, &kv, &vv, &meta, &mut ov, &mut lv)
            .map_err(|e| format!("forward: {e}"))?;
    }
    let strides = |[_, s, h, d]: [usize; 4]| [s * h * d, h * d, d, 1];
    let got = read_view(&out, qs, strides(qs), "out");
    let rel = rel_l2(&got, &want.out);
    if rel.is_nan() || rel > case.tolerance() {
        return Err(format!("out: relative error {rel:.3e}"));
    }
    let got_lse: Vec<f64> = lse.iter().map(|&l| l as f64).collect();
    assert_lse_close(&got_lse, &want.lse, LSE_TOL, "lse");
    let mut dq = vec![nan; n(qs)];
    let mut dk = vec![nan; n(ks)];
    let mut dv = vec![nan; n(ks)];
    {
        let inputs = BackwardInputs {
            out: TensorView::from_slice(&out, qs).map_err(e)?,
            dout: TensorView::from_slice(&x.dout.buf, qs).map_err(e)?,
            lse: TensorView::from_slice(&lse, ls).map_err(e)?,
        };
        let mut g = Gradients {
            dq: TensorViewMut::from_slice(&mut dq, qs).map_err(e)?,
            dk: TensorViewMut::from_slice(&mut dk, ks).map_err(e)?,
            dv: TensorViewMut::from_slice(&mut dv, ks).map_err(e)?,
        };
        layer
            .backward_into(&qv, &kv, &vv, &meta, &inputs, &mut g)
            .map_err(|e| format!("backward: {e}"))?;
    }
    let grads = Grads {
        dq: read_view(&dq, qs, strides(qs), "dq"),
        dk: read_view(&dk, ks, strides(ks), "dk"),
        dv: read_view(&dv, ks, strides(ks), "dv"),
    };
    judge_grads(&case, &want, &grads, grad_tolerance(pc.dtype)).map(drop)
}

#[test]
fn packed_batches_match_the_reference_per_sequence_on_every_cpu_path() {
    let seed = run_seed();
    for (n, dtype) in [DType::F32, DType::BF16, DType::F16]
        .into_iter()
        .enumerate()
    {
        for causal in [false, true] {
            let pc = PackedCase {
                lens_q: vec![5, 0, 37, 70, 6],
                lens_k: vec![9, 3, 37, 40, 0],
                heads_q: 4,
                heads_kv: 2,
                d: 64,
                causal,
                dtype,
            };
            for isa in cpu_paths(BackendKind::Cpu) {
                let isa = isa.expect("the CPU backend runs a forced path");
                let r = with_isa(isa, || match dtype {
                    DType::F32 => run::<f32>(&pc, causal, seed + n as u64),
                    DType::F16 => run::<f16>(&pc, causal, seed + n as u64),
                    DType::BF16 => run::<bf16>(&pc, causal, seed + n as u64),
                })
                .map_err(|e| e.to_string())
                .and_then(|r| r);
                if let Err(e) = r {
                    panic!("{pc:?} on {isa} (seed {seed}): {e}");
                }
            }
        }
    }
}

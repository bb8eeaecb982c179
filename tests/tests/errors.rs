//! Bad input is an error value that says what to change, never a panic and
//! never a wrong answer.

use sdpa_runtime::prelude::*;
use sdpa_runtime::{probe_cuda, BackendKind, CudaProbe, Layout};
use sdpa_tests::consumer::{NarrowAttention, WanAttention};

fn layer(params: AttentionParams) -> SdpaImpl {
    WanAttention
        .build_impl(params.backend(BackendKind::Cpu))
        .expect("valid parameters")
}

use sdpa_runtime::SdpaImpl;

fn zeros(shape: [usize; 4]) -> Vec<f32> {
    vec![0.0; shape.iter().product()]
}

#[test]
fn the_backend_describes_itself() {
    assert_eq!(WanAttention.name(), "SDPA");
    assert_eq!(WanAttention.supported_head_sizes(), &[64, 80, 128]);
    assert!(WanAttention.accept_output_buffer());
    assert_eq!(WanAttention.variant_table().variants().len(), 3 * 2 * 3);
}

#[test]
fn an_undeclared_head_size_names_the_declared_ones_and_the_attribute() {
    let err = WanAttention
        .build_impl(AttentionParams::new(8, 96))
        .unwrap_err();
    assert!(matches!(
        err,
        SdpaError::UndeclaredHeadSize { head_size: 96, .. }
    ));
    let msg = err.to_string();
    assert!(msg.contains("[64, 80, 128]"), "{msg}");
    assert!(
        msg.contains("head_sizes") && msg.contains("#[sdpa_variants"),
        "{msg}"
    );
}

#[test]
fn an_undeclared_causal_value_or_dtype_is_named() {
    let err = NarrowAttention
        .build_impl(AttentionParams::new(2, 32).causal(true))
        .unwrap_err();
    assert!(
        matches!(err, SdpaError::UndeclaredCausal { causal: true, .. }),
        "{err}"
    );

    let layer = NarrowAttention
        .build_impl(AttentionParams::new(2, 32))
        .unwrap();
    let x = vec![half::bf16::ZERO; 2 * 32 * 3];
    let t = TensorView::from_slice(&x, [1, 3, 2, 32]).unwrap();
    let err = layer
        .forward(&t, &t, &t, &AttentionMetadata::default())
        .unwrap_err();
    assert!(
        matches!(
            err,
            SdpaError::UndeclaredDtype {
                dtype: DType::BF16,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("dtypes f32"), "{err}");
}

#[test]
fn dropout_is_refused_unless_zero() {
    let err = WanAttention
        .build_impl(AttentionParams::new(4, 64).dropout_p(0.1))
        .unwrap_err();
    assert_eq!(err, SdpaError::Dropout(0.1));
    assert!(err.to_string().contains("dropout_p = 0"));
    assert!(WanAttention
        .build_impl(AttentionParams::new(4, 64).dropout_p(0.0))
        .is_ok());
}

#[test]
fn heads_must_group_evenly() {
    let err = WanAttention
        .build_impl(AttentionParams::new(6, 64).num_kv_heads(4))
        .unwrap_err();
    assert!(matches!(err, SdpaError::Param(_)), "{err}");
    assert!(err.to_string().contains("multiple of num_kv_heads"));

    // The same mismatch in the tensors themselves.
    let layer = layer(AttentionParams::new(6, 64).num_kv_heads(4).num_kv_heads(3));
    let (q, kv) = (zeros([1, 5, 6, 64]), zeros([1, 5, 4, 64]));
    let q = TensorView::from_slice(&q, [1, 5, 6, 64]).unwrap();
    let kv = TensorView::from_slice(&kv, [1, 5, 4, 64]).unwrap();
    let err = layer
        .forward(&q, &kv, &kv, &AttentionMetadata::default())
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("multiple of the number of key/value heads"),
        "{err}"
    );
}

#[test]
fn tensors_must_match_the_layer_and_each_other() {
    let l = layer(AttentionParams::new(4, 64));
    let meta = AttentionMetadata::default();
    let a = zeros([2, 8, 4, 64]);
    let q = TensorView::from_slice(&a, [2, 8, 4, 64]).unwrap();

    // k and v disagree.
    let b = zeros([2, 7, 4, 64]);
    let v = TensorView::from_slice(&b, [2, 7, 4, 64]).unwrap();
    let err = l.forward(&q, &q, &v, &meta).unwrap_err();
    assert!(
        err.to_string().contains("k and v must have the same"),
        "{err}"
    );

    // Batch differs between q and k.
    let c = zeros([1, 8, 4, 64]);
    let k = TensorView::from_slice(&c, [1, 8, 4, 64]).unwrap();
    let err = l.forward(&q, &k, &k, &meta).unwrap_err();
    assert!(err.to_string().contains("batch (dim 0)"), "{err}");

    // The layer was built for 4 heads of 64; the tensors have 2 heads of 128.
    let d = zeros([2, 8, 2, 128]);
    let t = TensorView::from_slice(&d, [2, 8, 2, 128]).unwrap();
    let err = l.forward(&t, &t, &t, &meta).unwrap_err();
    assert!(err.to_string().contains("num_heads = 4"), "{err}");

    // Mixed dtypes.
    let h = vec![half::f16::ZERO; 2 * 8 * 4 * 64];
    let k16 = TensorView::from_slice(&h, [2, 8, 4, 64]).unwrap();
    let err = l.forward(&q, &k16, &k16, &meta).unwrap_err();
    assert!(
        matches!(
            err,
            SdpaError::DtypeMismatch {
                tensor: "k",
                expected: DType::F32,
                found: DType::F16
            }
        ),
        "{err}"
    );
}

#[test]
fn views_check_their_buffers_and_strides() {
    let a = zeros([1, 4, 2, 64]);
    let err = TensorView::from_slice(&a[..100], [1, 4, 2, 64]).unwrap_err();
    assert!(
        err.to_string().contains("needs a buffer of 512 elements"),
        "{err}"
    );
    let err = TensorView::with_strides(&a, [1, 4, 2, 64], [512, 128, 64, 2]).unwrap_err();
    assert!(
        err.to_string()
            .contains("head dimension must be contiguous"),
        "{err}"
    );
    let mut o = zeros([1, 4, 2, 64]);
    let err = TensorViewMut::with_strides(&mut o, [1, 4, 2, 64], [512, 64, 64, 1]).unwrap_err();
    assert!(err.to_string().contains("overlap"), "{err}");
    assert!(Layout::strided([1, 1, 1, 8], [usize::MAX, 1, 1, 1]).is_ok());
}

#[test]
fn the_output_buffer_must_fit_the_result() {
    let l = layer(AttentionParams::new(4, 64));
    let meta = AttentionMetadata::default();
    let a = zeros([1, 8, 4, 64]);
    let q = TensorView::from_slice(&a, [1, 8, 4, 64]).unwrap();

    let mut small = zeros([1, 7, 4, 64]);
    let mut out = TensorViewMut::from_slice(&mut small, [1, 7, 4, 64]).unwrap();
    let err = l.forward_into(&q, &q, &q, &meta, &mut out).unwrap_err();
    assert!(
        err.to_string()
            .contains("the output has shape [1, 7, 4, 64]"),
        "{err}"
    );

    let mut wrong = vec![half::bf16::ZERO; 8 * 4 * 64];
    let mut out = TensorViewMut::from_slice(&mut wrong, [1, 8, 4, 64]).unwrap();
    let err = l.forward_into(&q, &q, &q, &meta, &mut out).unwrap_err();
    assert!(
        matches!(err, SdpaError::DtypeMismatch { tensor: "out", .. }),
        "{err}"
    );
}

#[test]
fn masks_of_the_wrong_shape_are_refused() {
    let l = layer(AttentionParams::new(4, 64));
    let a = zeros([2, 8, 4, 64]);
    let q = TensorView::from_slice(&a, [2, 8, 4, 64]).unwrap();
    let run = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let m = vec![true; n];
        let mask = AttnMask::new(&m, shape)?;
        l.forward(&q, &q, &q, &AttentionMetadata::new(0).with_mask(mask))
            .map(|_| ())
    };
    assert!(run(&[2, 8]).is_ok());
    assert!(run(&[2, 5]).is_ok(), "a short mask is front-padded");
    let err = run(&[2, 9]).unwrap_err();
    assert!(err.to_string().contains("not longer"), "{err}");
    let err = run(&[3, 8]).unwrap_err();
    assert!(err.to_string().contains("batch dimension is 3"), "{err}");
    let err = run(&[2, 3, 8, 8]).unwrap_err();
    assert!(err.to_string().contains("head dimension is 3"), "{err}");
    let err = run(&[2, 7, 8]).unwrap_err();
    assert!(err.to_string().contains("query dimension is 7"), "{err}");
    let err = run(&[8]).unwrap_err();
    assert!(err.to_string().contains("rank 1"), "{err}");
    let m = vec![0u8; 10];
    let err = AttnMask::new(&m, &[2, 8]).unwrap_err();
    assert!(err.to_string().contains("16 elements"), "{err}");
}

#[test]
fn a_non_finite_scale_is_refused() {
    let err = WanAttention
        .build_impl(AttentionParams::new(4, 64).softmax_scale(f32::NAN))
        .unwrap_err();
    assert!(err.to_string().contains("not finite"), "{err}");
}

#[test]
fn empty_sequences_give_empty_or_zero_output() {
    let l = layer(AttentionParams::new(2, 64));
    let meta = AttentionMetadata::default();
    // Sq = 0: an empty output.
    let q = TensorView::from_slice::<f32>(&[], [1, 0, 2, 64]).unwrap();
    let kv = zeros([1, 5, 2, 64]);
    let kv = TensorView::from_slice(&kv, [1, 5, 2, 64]).unwrap();
    let out = l.forward(&q, &kv, &kv, &meta).unwrap();
    assert_eq!(out.shape(), [1, 0, 2, 64]);
    // Sk = 0: every row sees no key, so zeros (into a poisoned buffer).
    let q = vec![1.0f32; 3 * 2 * 64];
    let q = TensorView::from_slice(&q, [1, 3, 2, 64]).unwrap();
    let kv = TensorView::from_slice::<f32>(&[], [1, 0, 2, 64]).unwrap();
    let mut buf = vec![f32::NAN; 3 * 2 * 64];
    let mut out = TensorViewMut::from_slice(&mut buf, [1, 3, 2, 64]).unwrap();
    l.forward_into(&q, &kv, &kv, &meta, &mut out).unwrap();
    assert!(buf.iter().all(|&x| x == 0.0));
}

#[test]
fn nan_in_one_query_row_stays_in_that_row() {
    let l = layer(AttentionParams::new(2, 64));
    let (sq, sk) = (40, 70);
    let mut q: Vec<f32> = (0..sq * 2 * 64)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let k: Vec<f32> = (0..sk * 2 * 64)
        .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
        .collect();
    let poisoned = (17 * 2 + 1) * 64 + 5; // row 17, head 1, element 5
    q[poisoned] = f32::NAN;
    let qv = TensorView::from_slice(&q, [1, sq, 2, 64]).unwrap();
    let kv = TensorView::from_slice(&k, [1, sk, 2, 64]).unwrap();
    let out = l
        .forward(&qv, &kv, &kv, &AttentionMetadata::default())
        .unwrap();
    let out = out.as_slice::<f32>().unwrap();
    for (row, chunk) in out.chunks(64).enumerate() {
        if row == 17 * 2 + 1 {
            assert!(chunk.iter().all(|x| x.is_nan()), "the NaN row must be NaN");
        } else {
            assert!(
                chunk.iter().all(|x| x.is_finite()),
                "row {row} caught the NaN"
            );
        }
    }
}

#[test]
fn asking_for_cuda_without_a_gpu_is_an_error_not_a_panic() {
    let l = WanAttention
        .build_impl(AttentionParams::new(2, 64).backend(BackendKind::Cuda))
        .unwrap();
    let a = zeros([1, 4, 2, 64]);
    let q = TensorView::from_slice(&a, [1, 4, 2, 64]).unwrap();
    let result = l.forward(&q, &q, &q, &AttentionMetadata::default());
    match probe_cuda() {
        CudaProbe::Absent(why) => {
            let err = result.unwrap_err();
            let SdpaError::BackendUnavailable {
                backend: "cuda",
                reason,
            } = &err
            else {
                panic!("expected the cuda backend to be unavailable, got {err:?}");
            };
            assert!(reason.contains(&why), "{err}");
            assert!(
                [
                    "no CUDA driver",
                    "no devices",
                    "failed to initialise",
                    "cannot count"
                ]
                .iter()
                .any(|s| reason.contains(s)),
                "{err}"
            );
        }
        // With a GPU the host tensors go to the device and back.
        CudaProbe::Present { .. } => assert_eq!(result.unwrap().shape(), [1, 4, 2, 64]),
    }
}

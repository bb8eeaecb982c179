//! `sdpa run` end to end: files written by PyTorch's conventions (tensors
//! `q`, `k`, `v` in `[B, S, H, D]`, `attn_mask`, metadata `causal` and
//! `scale`) give the float64 reference's answer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView as StView;
use safetensors::{Dtype, SafeTensors};
use sdpa_runtime::half::{bf16, f16};
use sdpa_runtime::{probe_cuda, CudaProbe};
use sdpa_tests::cases::{backends, run_seed};
use sdpa_tests::reference::{attention, backward, lse, rel_l2, RefInputs};

/// The `sdpa` binary: where cargo built it, or beside this test binary (as
/// `scripts/gpu-pack` lays them out on a GPU host).
fn sdpa() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_sdpa"));
    if built.exists() {
        return built;
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("sdpa")))
        .unwrap_or(built)
}

/// A tensor to write: dtype, shape, little-endian bytes.
struct Entry(Dtype, Vec<usize>, Vec<u8>);

/// Rounds `values` to `dtype`, returning the rounded values and their bytes.
fn encode(dtype: Dtype, values: &[f64]) -> (Vec<f64>, Vec<u8>) {
    let mut bytes = Vec::new();
    let mut rounded = Vec::new();
    for &x in values {
        let r = match dtype {
            Dtype::F32 => {
                bytes.extend((x as f32).to_le_bytes());
                x as f32 as f64
            }
            Dtype::F16 => {
                let h = f16::from_f64(x);
                bytes.extend(h.to_bits().to_le_bytes());
                h.to_f64()
            }
            Dtype::BF16 => {
                let h = bf16::from_f64(x);
                bytes.extend(h.to_bits().to_le_bytes());
                h.to_f64()
            }
            other => panic!("no encoder for {other:?}"),
        };
        rounded.push(r);
    }
    (rounded, bytes)
}

fn write(path: &Path, tensors: &[(&str, Entry)], meta: &[(&str, &str)]) {
    let views: Vec<(&str, StView<'_>)> = tensors
        .iter()
        .map(|(name, Entry(dt, shape, bytes))| {
            (*name, StView::new(*dt, shape.clone(), bytes).unwrap())
        })
        .collect();
    let meta: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}

fn read_out(path: &Path, dtype: Dtype) -> (Vec<usize>, Vec<f64>) {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let out = file.tensor("out").unwrap();
    assert_eq!(out.dtype(), dtype, "out keeps the input dtype");
    let data = out.data();
    let values = match dtype {
        Dtype::F32 => data
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F16 => data
            .chunks(2)
            .map(|c| f16::from_bits(u16::from_le_bytes(c.try_into().unwrap())).to_f64())
            .collect(),
        _ => data
            .chunks(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes(c.try_into().unwrap())).to_f64())
            .collect(),
    };
    (out.shape().to_vec(), values)
}

struct Spec {
    dtype: Dtype,
    b: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    causal: bool,
    scale: Option<f64>,
    /// Key padding `[B, len]` with `len <= Sk` (front-padded), as bool.
    key_padding: Option<usize>,
}

/// Runs `spec` through `sdpa run` on every backend this machine has.
fn check(spec: Spec, seed: u64) {
    for backend in backends() {
        check_on(&spec, backend.name(), seed);
    }
}

fn check_on(spec: &Spec, backend: &str, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (
        dir.path().join("case.safetensors"),
        dir.path().join("out.safetensors"),
    );
    let &Spec {
        dtype,
        b,
        sq,
        sk,
        hq,
        hkv,
        d,
        causal,
        scale,
        key_padding,
    } = spec;
    let mut draw = |n: usize| -> Vec<f64> { (0..n).map(|_| rng.random_range(-1.5..1.5)).collect() };
    let (q, qb) = encode(dtype, &draw(b * sq * hq * d));
    let (k, kb) = encode(dtype, &draw(b * sk * hkv * d));
    let (v, vb) = encode(dtype, &draw(b * sk * hkv * d));
    let mut tensors = vec![
        ("q", Entry(dtype, vec![b, sq, hq, d], qb)),
        ("k", Entry(dtype, vec![b, sk, hkv, d], kb)),
        ("v", Entry(dtype, vec![b, sk, hkv, d], vb)),
    ];
    let mut keep = Vec::new();
    if let Some(len) = key_padding {
        keep = (0..b * len).map(|n| n % len != len - 1 - n / len).collect();
        tensors.push((
            "attn_mask",
            Entry(
                Dtype::BOOL,
                vec![b, len],
                keep.iter().map(|&x| x as u8).collect(),
            ),
        ));
    }
    let causal_s = causal.to_string();
    let scale_s = scale.map(|s| s.to_string());
    let mut meta = vec![("causal", causal_s.as_str())];
    if let Some(s) = &scale_s {
        meta.push(("scale", s.as_str()));
    }
    write(&input, &tensors, &meta);

    let status = Command::new(sdpa())
        .args(["run", "--backend", backend, "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "sdpa run --backend {backend} failed (seed {seed})"
    );
    let (shape, out) = read_out(&output, dtype);
    assert_eq!(shape, vec![b, sq, hq, d]);

    let bias = |bi: usize, _h: usize, _i: usize, j: usize| {
        let len = key_padding.unwrap();
        let pad = sk - len;
        if j < pad || keep[bi * len + j - pad] {
            0.0
        } else {
            f64::NEG_INFINITY
        }
    };
    let reference = attention(&RefInputs {
        q: &q,
        k: &k,
        v: &v,
        batch: b,
        seq_q: sq,
        seq_k: sk,
        heads_q: hq,
        heads_kv: hkv,
        d,
        scale: scale.unwrap_or(1.0 / (d as f64).sqrt()),
        causal,
        f32_scores: false,
        bias: key_padding.map(|_| &bias as _),
    });
    let tol = if dtype == Dtype::F32 { 1e-5 } else { 2e-2 };
    let err = rel_l2(&out, &reference);
    assert!(
        err <= tol,
        "{dtype:?} on {backend}: relative error {err:.3e} > {tol:.0e} (seed {seed})"
    );
}

#[test]
fn a_torch_convention_file_gives_the_reference_answer() {
    let seed = run_seed();
    check(
        Spec {
            dtype: Dtype::F32,
            b: 2,
            sq: 33,
            sk: 47,
            hq: 8,
            hkv: 2,
            d: 64,
            causal: true,
            scale: None,
            key_padding: Some(40),
        },
        seed,
    );
    check(
        Spec {
            dtype: Dtype::BF16,
            b: 1,
            sq: 20,
            sk: 20,
            hq: 4,
            hkv: 4,
            d: 80,
            causal: false,
            scale: Some(0.3),
            key_padding: None,
        },
        seed,
    );
    check(
        Spec {
            dtype: Dtype::F16,
            b: 2,
            sq: 5,
            sk: 70,
            hq: 2,
            hkv: 1,
            d: 128,
            causal: false,
            scale: None,
            key_padding: Some(70),
        },
        seed,
    );
}

#[test]
fn bad_input_is_one_line_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("case.safetensors");
    let q = vec![0u8; 4 * 8 * 2 * 64];
    write(
        &input,
        &[
            ("q", Entry(Dtype::F32, vec![1, 8, 2, 64], q.clone())),
            ("k", Entry(Dtype::F32, vec![1, 8, 2, 64], q)),
        ],
        &[("causal", "false")],
    );
    let out = Command::new(sdpa())
        .args(["run", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("out.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error:") && stderr.contains('v'),
        "{stderr}"
    );

    let missing = Command::new(sdpa())
        .args([
            "run",
            "--input",
            "/nonexistent.safetensors",
            "--output",
            "/tmp/x.safetensors",
        ])
        .output()
        .unwrap();
    assert!(!missing.status.success());
}

/// A small f32 case (`q`, `k`, `v` of `[1, 8, 2, 64]`, all zeros) at
/// `input`, for the error paths that never read its values.
fn write_small_f32_case(input: &Path) {
    let q = vec![0u8; 4 * 8 * 2 * 64];
    write(
        input,
        &[
            ("q", Entry(Dtype::F32, vec![1, 8, 2, 64], q.clone())),
            ("k", Entry(Dtype::F32, vec![1, 8, 2, 64], q.clone())),
            ("v", Entry(Dtype::F32, vec![1, 8, 2, 64], q)),
        ],
        &[],
    );
}

#[test]
fn cuda_without_a_gpu_is_one_line_and_a_non_zero_exit() {
    let CudaProbe::Absent(reason) = probe_cuda() else {
        return; // with a GPU, `check` runs `--backend cuda` above
    };
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("case.safetensors");
    write_small_f32_case(&input);
    let out = Command::new(sdpa())
        .args(["run", "--backend", "cuda", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("out.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&reason), "{stderr}");
}

/// Reads tensor `name` of a safetensors file: its dtype, shape and values.
fn read_tensor(path: &Path, name: &str) -> (Dtype, Vec<usize>, Vec<f64>) {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let t = file.tensor(name).unwrap();
    let data = t.data();
    let values = match t.dtype() {
        Dtype::F32 => data
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F16 => data
            .chunks(2)
            .map(|c| f16::from_bits(u16::from_le_bytes(c.try_into().unwrap())).to_f64())
            .collect(),
        _ => data
            .chunks(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes(c.try_into().unwrap())).to_f64())
            .collect(),
    };
    (t.dtype(), t.shape().to_vec(), values)
}

#[test]
fn backward_writes_the_reference_gradients_and_lse() {
    let seed = run_seed();
    for (dtype, causal, tol) in [(Dtype::F32, true, 1e-5), (Dtype::BF16, false, 3e-2)] {
        let (b, sq, sk, hq, hkv, d) = (2, 30, 45, 4, 2, 64);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut draw =
            |n: usize| -> Vec<f64> { (0..n).map(|_| rng.random_range(-1.5..1.5)).collect() };
        let (q, qb) = encode(dtype, &draw(b * sq * hq * d));
        let (k, kb) = encode(dtype, &draw(b * sk * hkv * d));
        let (v, vb) = encode(dtype, &draw(b * sk * hkv * d));
        let (dout, db) = encode(dtype, &draw(b * sq * hq * d));
        let dir = tempfile::tempdir().unwrap();
        let (input, output) = (
            dir.path().join("case.safetensors"),
            dir.path().join("out.safetensors"),
        );
        let causal_s = causal.to_string();
        write(
            &input,
            &[
                ("q", Entry(dtype, vec![b, sq, hq, d], qb)),
                ("k", Entry(dtype, vec![b, sk, hkv, d], kb)),
                ("v", Entry(dtype, vec![b, sk, hkv, d], vb)),
                ("dout", Entry(dtype, vec![b, sq, hq, d], db)),
            ],
            &[("causal", causal_s.as_str())],
        );
        let status = Command::new(sdpa())
            .args(["run", "--backward", "--backend", "cpu", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .status()
            .unwrap();
        assert!(status.success(), "sdpa run --backward failed (seed {seed})");
        let x = RefInputs {
            q: &q,
            k: &k,
            v: &v,
            batch: b,
            seq_q: sq,
            seq_k: sk,
            heads_q: hq,
            heads_kv: hkv,
            d,
            scale: 1.0 / (d as f64).sqrt(),
            causal,
            f32_scores: false,
            bias: None,
        };
        let (dq, dk, dv) = backward(&x, &dout);
        let want = [("out", attention(&x)), ("dq", dq), ("dk", dk), ("dv", dv)];
        for (name, want) in want {
            let (got_dtype, shape, got) = read_tensor(&output, name);
            assert_eq!(got_dtype, dtype, "{name} keeps the input dtype");
            assert_eq!(
                shape.iter().product::<usize>(),
                want.len(),
                "{name}: {shape:?}"
            );
            let err = rel_l2(&got, &want);
            assert!(
                err <= tol,
                "{dtype:?} {name}: relative error {err:.3e} > {tol:.0e} (seed {seed})"
            );
        }
        let (lse_dtype, shape, got) = read_tensor(&output, "lse");
        assert_eq!((lse_dtype, shape), (Dtype::F32, vec![b, hq, sq]));
        for (g, w) in got.iter().zip(lse(&x)) {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "lse {g} vs {w} (seed {seed})"
            );
        }
    }
}

#[test]
fn backward_without_dout_is_one_line_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("case.safetensors");
    write_small_f32_case(&input);
    let out = Command::new(sdpa())
        .args(["run", "--backward", "--backend", "cpu", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("out.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("dout"), "{stderr}");
}

#[test]
fn packed_cases_give_each_sequence_its_own_reference() {
    let seed = run_seed();
    let (hq, hkv, d) = (4, 2, 64);
    let (lens_q, lens_k) = ([5usize, 0, 9, 3], [7usize, 3, 4, 0]);
    let (tq, tk): (usize, usize) = (lens_q.iter().sum(), lens_k.iter().sum());
    let cu = |lens: &[usize]| -> Vec<u8> {
        let mut acc = 0i32;
        let mut bytes = 0i32.to_le_bytes().to_vec();
        for &n in lens {
            acc += n as i32;
            bytes.extend(acc.to_le_bytes());
        }
        bytes
    };
    for backend in backends() {
        for (dtype, causal, tol) in [(Dtype::F32, true, 1e-5), (Dtype::BF16, false, 3e-2)] {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut draw =
                |n: usize| -> Vec<f64> { (0..n).map(|_| rng.random_range(-1.5..1.5)).collect() };
            let (q, qb) = encode(dtype, &draw(tq * hq * d));
            let (k, kb) = encode(dtype, &draw(tk * hkv * d));
            let (v, vb) = encode(dtype, &draw(tk * hkv * d));
            let (dout, db) = encode(dtype, &draw(tq * hq * d));
            let dir = tempfile::tempdir().unwrap();
            let (input, output) = (
                dir.path().join("case.safetensors"),
                dir.path().join("out.safetensors"),
            );
            let causal_s = causal.to_string();
            let b1 = lens_q.len() + 1;
            write(
                &input,
                &[
                    ("q", Entry(dtype, vec![tq, hq, d], qb)),
                    ("k", Entry(dtype, vec![tk, hkv, d], kb)),
                    ("v", Entry(dtype, vec![tk, hkv, d], vb)),
                    ("dout", Entry(dtype, vec![tq, hq, d], db)),
                    ("cu_seqlens_q", Entry(Dtype::I32, vec![b1], cu(&lens_q))),
                    ("cu_seqlens_k", Entry(Dtype::I32, vec![b1], cu(&lens_k))),
                ],
                &[("causal", causal_s.as_str())],
            );
            let status = Command::new(sdpa())
                .args(["run", "--backward", "--backend", backend.name(), "--input"])
                .arg(&input)
                .arg("--output")
                .arg(&output)
                .status()
                .unwrap();
            assert!(
                status.success(),
                "sdpa run --backward on a packed case (seed {seed})"
            );
            // The reference, one sequence at a time, laid out packed.
            let mut want: HashMap<&str, Vec<f64>> = HashMap::new();
            let mut want_lse = vec![f64::NAN; hq * tq];
            let (mut q0, mut k0) = (0, 0);
            for (&nq, &nk) in lens_q.iter().zip(&lens_k) {
                let (qs, ks) = (
                    q0 * hq * d..(q0 + nq) * hq * d,
                    k0 * hkv * d..(k0 + nk) * hkv * d,
                );
                let x = RefInputs {
                    q: &q[qs.clone()],
                    k: &k[ks.clone()],
                    v: &v[ks],
                    batch: 1,
                    seq_q: nq,
                    seq_k: nk,
                    heads_q: hq,
                    heads_kv: hkv,
                    d,
                    scale: 1.0 / (d as f64).sqrt(),
                    causal,
                    f32_scores: false,
                    bias: None,
                };
                let (dq, dk, dv) = backward(&x, &dout[qs]);
                for (name, part) in [("out", attention(&x)), ("dq", dq), ("dk", dk), ("dv", dv)] {
                    want.entry(name).or_default().extend(part);
                }
                for (i, l) in lse(&x).into_iter().enumerate() {
                    let (h, row) = (i / nq.max(1), i % nq.max(1));
                    want_lse[h * tq + q0 + row] = l;
                }
                (q0, k0) = (q0 + nq, k0 + nk);
            }
            for (name, shape) in [
                ("out", vec![tq, hq, d]),
                ("dq", vec![tq, hq, d]),
                ("dk", vec![tk, hkv, d]),
                ("dv", vec![tk, hkv, d]),
            ] {
                let (got_dtype, got_shape, got) = read_tensor(&output, name);
                assert_eq!((got_dtype, got_shape), (dtype, shape), "{name} is packed");
                let err = rel_l2(&got, &want[name]);
                assert!(
                    err <= tol,
                    "{backend:?} {dtype:?} {name}: relative error {err:.3e} > {tol:.0e} \
                     (seed {seed})"
                );
            }
            let (lse_dtype, shape, got) = read_tensor(&output, "lse");
            assert_eq!((lse_dtype, shape), (Dtype::F32, vec![hq, tq]));
            for (g, w) in got.iter().zip(&want_lse) {
                let same = (g == w) || (g - w).abs() <= 1e-4 * (1.0 + w.abs());
                assert!(same, "{backend:?} lse {g} vs {w} (seed {seed})");
            }
        }
    }
}

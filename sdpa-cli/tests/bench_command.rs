//! `sdpa bench --backward` end to end: it times the CPU backward and reports
//! it in the JSON with 2.5 times the forward's FLOPs.

use std::path::PathBuf;
use std::process::Command;

/// The `sdpa` binary cargo built for this test.
fn sdpa() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sdpa"))
}

fn bench(extra: &[&str], json: &std::path::Path) -> serde_json::Value {
    let out = Command::new(sdpa())
        .args([
            "bench",
            "--backend",
            "cpu",
            "--batch",
            "1",
            "--heads",
            "2",
            "--seq-q",
            "96",
            "--head-size",
            "64",
            "--dtype",
            "f32",
            "--warmup",
            "1",
            "--iters",
            "2",
            "--json",
        ])
        .arg(json)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap()
}

#[test]
fn backward_is_timed_and_counted_as_two_and_a_half_forwards() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let fwd = bench(&[], &json);
    let bwd = bench(&["--backward"], &json);
    let (fwd, bwd) = (&fwd[0], &bwd[0]);
    assert_eq!(
        (fwd["pass"].as_str(), bwd["pass"].as_str()),
        (Some("forward"), Some("backward"))
    );
    assert_eq!(bwd["shape"], fwd["shape"]);
    let rate =
        |r: &serde_json::Value| r["tflops"].as_f64().unwrap() * r["median_ms"].as_f64().unwrap();
    // tflops · ms is the FLOPs / 1e9: the backward counts 2.5 times as many.
    let ratio = rate(bwd) / rate(fwd);
    assert!((ratio - 2.5).abs() < 1e-6, "{ratio}");
}

#[test]
fn backward_with_world_sizes_is_refused() {
    let out = Command::new(sdpa())
        .args(["bench", "--backward", "--world-size", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

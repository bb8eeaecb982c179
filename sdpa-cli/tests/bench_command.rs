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

/// The FLOPs a JSON row counts, in GFLOP: `tflops · median_ms`.
fn gflop(r: &serde_json::Value) -> f64 {
    r["tflops"].as_f64().unwrap() * r["median_ms"].as_f64().unwrap()
}

#[test]
fn masks_are_timed_and_key_padding_counts_the_kept_keys() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let plain = bench(&[], &json);
    let plain = &plain[0];
    assert_eq!(plain["workload"], "-");
    for (mask, share) in [("key-padding:0.25", 0.25), ("bool", 1.0), ("additive", 1.0)] {
        let rows = bench(&["--mask", mask], &json);
        let row = &rows[0];
        assert_eq!(row["workload"], mask);
        assert_eq!(row["shape"], plain["shape"]);
        let ratio = gflop(row) / gflop(plain);
        assert!((ratio - share).abs() < 1e-6, "{mask}: {ratio}");
    }
}

#[test]
fn varlen_batches_count_each_sequence_alone() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(sdpa())
        .args([
            "bench",
            "--backend",
            "cpu",
            "--heads",
            "2",
            "--head-size",
            "64",
            "--dtype",
            "f32",
            "--varlen",
            "40,0,96",
            "--warmup",
            "1",
            "--iters",
            "2",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let row = &rows[0];
    assert_eq!(row["workload"], "varlen:40/0/96");
    let want = 4.0 * 2.0 * 64.0 * (40.0f64 * 40.0 + 96.0 * 96.0) / 1e9;
    assert!(
        (gflop(row) - want).abs() < 1e-9 * want.max(1.0),
        "{}",
        gflop(row)
    );
    // Shapes of a padded batch are refused beside --varlen.
    let out = Command::new(sdpa())
        .args(["bench", "--varlen", "4", "--batch", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

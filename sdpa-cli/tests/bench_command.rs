//! `sdpa bench` end to end: `--backward` times the CPU backward and reports
//! it in the JSON with 2.5 times the forward's FLOPs; `--plot` draws the
//! results as an SVG bar chart, with torch's beside them (`--compare`).

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

/// The `height` of every `<rect>` of an SVG, in document order.
fn rect_heights(svg: &str) -> Vec<f64> {
    svg.split("<rect")
        .skip(1)
        .map(|rect| {
            let after = rect.split("height=\"").nth(1).expect("a rect has a height");
            after[..after.find('"').unwrap()].parse().unwrap()
        })
        .collect()
}

#[test]
fn plot_draws_a_bar_per_pass_and_per_matching_torch_backend() {
    let dir = tempfile::tempdir().unwrap();
    let (json, svg, torch) = (
        dir.path().join("bench.json"),
        dir.path().join("bench.svg"),
        dir.path().join("torch.json"),
    );
    // Rows match by shape BxHqxSqxSkxD; the last one is another shape.
    std::fs::write(
        &torch,
        r#"[
          {"shape": "1x2x96x96x64", "backend": "flash", "ms": 1.0, "tflops": 0.1},
          {"shape": "1x2x96x96x64", "backend": "default", "ms": 0.5, "tflops": 0.2},
          {"shape": "1x2x96x96x128", "backend": "flash", "ms": 1.0, "tflops": 0.3}
        ]"#,
    )
    .unwrap();
    let plot = |extra: &[&str]| {
        let mut args = vec!["--plot", svg.to_str().unwrap()];
        args.extend_from_slice(extra);
        bench(&args, &json);
        std::fs::read_to_string(&svg).unwrap()
    };

    let text = plot(&["--compare", torch.to_str().unwrap()]);
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    for label in [
        "forward",
        "torch flash",
        "torch default",
        "1x2x96x96x64 f32",
    ] {
        assert!(
            text.contains(&format!("\n{label}\n</text>")),
            "no {label:?} in\n{text}"
        );
    }
    // The background, three bars (ours, torch flash, torch default), then a
    // legend swatch per series.
    let heights = rect_heights(&text);
    assert_eq!(heights.len(), 1 + 3 + 3, "{text}");
    assert!(heights[1] > 0.0);
    let ratio = heights[3] / heights[2];
    assert!((ratio - 2.0).abs() < 0.02, "torch bars {heights:?}");

    // Without --compare: one bar, the forward pass; with --backward, two.
    assert_eq!(rect_heights(&plot(&[])).len(), 1 + 1 + 1);
    assert_eq!(rect_heights(&plot(&["--backward"])).len(), 1 + 2 + 2);
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

#[test]
fn compare_needs_plot() {
    let out = Command::new(sdpa())
        .args(["bench", "--compare", "torch.json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

//! Tests of the backward kernels that need no GPU: what each kernel
//! emits, and (on request, with `SDPA_PTXAS`) that every kernel assembles
//! without spilling.

use super::*;

/// Specs across dtypes, head sizes (odd multiples of 8 included) and
/// causality.
fn sample() -> Vec<VariantSpec> {
    let mut out = Vec::new();
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for d in [8, 40, 64, 72, 80, 96, 128, 160, 256] {
            for causal in [false, true] {
                out.push(VariantSpec::new(d, causal, dtype).unwrap());
            }
        }
    }
    out
}

#[test]
fn parameter_names_are_unique() {
    for (i, (a, _)) in BACKWARD_PARAMS.iter().enumerate() {
        for (b, _) in &BACKWARD_PARAMS[i + 1..] {
            assert_ne!(a, b);
        }
    }
}

#[test]
fn every_kernel_declares_the_whole_contract_in_order() {
    for spec in sample() {
        let b = generate(&spec);
        for k in [&b.preprocess, &b.main, &b.convert] {
            let params: Vec<&str> = k
                .ptx
                .lines()
                .filter_map(|l| l.trim().strip_prefix(".param "))
                .collect();
            assert_eq!(params.len(), BACKWARD_PARAMS.len(), "{}", k.entry);
            for (line, (name, kind)) in params.iter().zip(BACKWARD_PARAMS) {
                let decl = format!("{} {}_{name}", kind.ty(), k.entry);
                assert!(line.trim_end_matches(',') == decl, "{line} vs {decl}");
            }
            assert_eq!(k.target, Target::Sm80);
        }
    }
}

#[test]
fn kernels_follow_sequences_and_read_every_mask_kind() {
    for spec in sample() {
        let b = generate(&spec);
        for k in [&b.preprocess, &b.main, &b.convert] {
            for p in ["q_start", "q_end", "tokens_q", "seq_q"] {
                let load = format!("[{}_{p}]", k.entry);
                assert!(k.ptx.contains(&load), "{}: {p} unread", k.entry);
            }
            // Rows (or a main CTA's keys) past the sequence exit before any
            // barrier.
            let ret = k.ptx.find(" ret;").expect("an early exit");
            if let Some(bar) = k.ptx.find("bar.sync") {
                assert!(ret < bar, "{}", k.entry);
            }
        }
        let main = &b.main.ptx;
        for p in ["k_start", "k_end", "tokens_k", "mask_kind", "mask_pad"] {
            assert!(main.contains(&format!("[{}_{p}]", b.main.entry)), "{p}");
        }
        // One load per element kind: f32, f16, bf16, u8, and i32 (an i64
        // reads its halves as u32).
        for ld in ["f32", "b16", "u16", "u8", "u32"] {
            let ld = format!("ld.global.nc.{ld} ");
            assert!(main.contains(&ld), "{}: no {ld}", b.main.entry);
        }
    }
}

/// Spill bytes a backward kernel may have (as `sdpa-cli/tests/ptxas.rs`
/// allows): the 16-bit main kernel spills 8 bytes at head size 256 on
/// sm_90 (255 registers); the allowance is meant to return to 0.
const SPILL_BYTES_TOLERATED: u32 = 32;

/// The larger of the spill stores and loads `ptxas -v` reports.
fn spill_bytes(text: &str) -> u32 {
    let stores = text
        .split_once(" bytes spill stores")
        .and_then(|(head, _)| head.split_whitespace().last())
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    let loads = text
        .split(" bytes spill stores, ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    stores.max(loads)
}

/// Assembles every kernel of the sample with `ptxas` for sm_80 and sm_90:
/// spills within [`SPILL_BYTES_TOLERATED`] (reported), registers reported. Needs `SDPA_PTXAS`, so it runs on request
/// (`SDPA_PTXAS=/path/to/ptxas cargo test -p kernels-gen backward --
/// --ignored --nocapture`).
#[test]
#[ignore = "needs SDPA_PTXAS; CI assembles every variant in sdpa-cli/tests/ptxas.rs"]
fn assembles_without_spills() {
    let ptxas = std::env::var_os("SDPA_PTXAS").expect("set SDPA_PTXAS to a ptxas binary");
    let dir = std::env::temp_dir().join(format!("bwd-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut report = String::new();
    let mut failures = Vec::new();
    for spec in sample() {
        let b = generate(&spec);
        for k in [&b.preprocess, &b.main, &b.convert] {
            let path = dir.join(format!("{}.ptx", k.entry));
            std::fs::write(&path, &k.ptx).unwrap();
            for arch in ["sm_80", "sm_90"] {
                let out = std::process::Command::new(&ptxas)
                    .arg(format!("-arch={arch}"))
                    .arg("-v")
                    .arg(&path)
                    .arg("-o")
                    .arg(dir.join(format!("{}.{arch}.cubin", k.entry)))
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stderr).to_string();
                let spilled = spill_bytes(&text);
                if !out.status.success() || spilled > SPILL_BYTES_TOLERATED {
                    failures.push(format!("{} {arch}: {text}", k.entry));
                } else if spilled > 0 {
                    report.push_str(&format!("{} {arch}: spills {spilled} bytes\n", k.entry));
                }
                let regs = text
                    .split("Used ")
                    .nth(1)
                    .and_then(|t| t.split(' ').next())
                    .unwrap_or("?");
                report.push_str(&format!(
                    "{} {arch}: {regs} registers, smem {} B\n",
                    k.entry, k.smem_bytes
                ));
            }
        }
    }
    eprintln!("{report}(files in {})", dir.display());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

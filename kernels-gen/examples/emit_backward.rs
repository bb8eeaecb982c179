//! Writes the backward kernels (preprocess, main, dq conversion) of
//! several head sizes, for every causal value and dtype, and a
//! `manifest.json` of their launch metadata into a folder, for
//! `tests/gpu/backward_harness.py`:
//!
//! `cargo run -p kernels-gen --example emit_backward -- OUT 40 64 128`
//!
//! The kernels take sequence bounds and masks of every element kind at run
//! time (nothing to emit for them): the harness's `--varlen 3,0,17,64`
//! (`--varlen-k` for other key lengths), `--mask-kind f32|f16|bf16|bool|i32|i64`
//! and `--mask-pad N` exercise them.
//!
//! `--racing` writes the main kernels without the semaphore (their `dq`
//! additions race), for measuring what the ordering costs; `--block-m N`
//! sets their query rows per step.

use kernels_gen::backward::{mma, BACKWARD_PARAMS};
use kernels_gen::ptx::Target;
use kernels_gen::{backward_kernels, DType, GpuKernel, VariantSpec};

fn meta(k: &GpuKernel) -> String {
    format!(
        r#"{{"entry": "{}", "block_m": {}, "threads": {}, "smem_bytes": {}, "mask_smem_bytes": {}}}"#,
        k.entry, k.block_m, k.threads, k.smem_bytes, k.mask_smem_bytes
    )
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let racing = args.iter().any(|a| a == "--racing");
    args.retain(|a| a != "--racing");
    let block_m: Option<usize> = args.iter().position(|a| a == "--block-m").map(|i| {
        let v = args
            .remove(i + 1)
            .parse()
            .expect("--block-m takes a number");
        args.remove(i);
        v
    });
    let mut args = args.into_iter();
    let Some(dir) = args.next() else {
        eprintln!("usage: emit_backward OUT HEAD_SIZE...");
        std::process::exit(2);
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("creating the output folder");
    let mut entries = Vec::new();
    for d in args {
        let d: usize = d.parse().expect("head sizes are numbers");
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            for causal in [false, true] {
                let spec = VariantSpec::new(d, causal, dtype).expect("a valid variant");
                let mut b = backward_kernels(&spec);
                if (racing || block_m.is_some()) && dtype != DType::F32 {
                    let mut cfg = mma::MmaBackwardConfig::new(&spec);
                    cfg.deterministic = !racing;
                    if let Some(m) = block_m {
                        cfg.block_m = m;
                    }
                    b.main = mma::main_kernel_with(&spec, cfg, Target::Sm80).0;
                    let tuned = format!("{}_tuned", b.main.entry);
                    b.main.ptx = b.main.ptx.replace(&b.main.entry, &tuned);
                    b.main.entry = tuned;
                }
                for k in [&b.preprocess, &b.main, &b.convert] {
                    std::fs::write(dir.join(format!("{}.ptx", k.entry)), &k.ptx)
                        .expect("writing PTX");
                }
                entries.push(format!(
                    r#"{{"d": {d}, "causal": {causal}, "dtype": "{dtype}", "block_n": {}, "pre": {}, "main": {}, "convert": {}}}"#,
                    b.block_n,
                    meta(&b.preprocess),
                    meta(&b.main),
                    meta(&b.convert)
                ));
            }
        }
    }
    let params: Vec<String> = BACKWARD_PARAMS
        .iter()
        .map(|(name, kind)| format!(r#"["{name}", "{}"]"#, kind.ty()))
        .collect();
    std::fs::write(
        dir.join("manifest.json"),
        format!(
            "{{\"params\": [{}],\n\"variants\": [\n{}\n]}}\n",
            params.join(", "),
            entries.join(",\n")
        ),
    )
    .expect("writing the manifest");
}

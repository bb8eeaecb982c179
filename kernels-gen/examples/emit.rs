//! Prints the sm_80 PTX of one variant, for reading or for `ptxas`:
//!
//! `cargo run -p kernels-gen --example emit -- 128 causal bf16 > k.ptx`
//!
//! or writes the PTX of several head sizes (every causal value and dtype)
//! and a `manifest.json` of their launch metadata into a folder, for the
//! GPU harness in `tests/gpu/`:
//!
//! `cargo run -p kernels-gen --example emit -- --dir OUT 40 64 80 128`
//!
//! `--sm90` writes the Hopper (sm_90a, `wgmma`) kernels instead, skipping
//! the variants that have none. For tuning runs, `--wgs N` (consumer
//! warpgroups, 2 or 3) and `--block-n N` (keys per block) override their
//! tiles (either alone keeps the other's default; stages as many as fit),
//! `--stages N` their K/V stages (2 or 3) and `--no-lazy-rescale` turns the
//! lazy rescale off; a combination the kernel cannot take is an error.

use kernels_gen::fa2::{self, Fa2Config};

use kernels_gen::ptx::Target;
use kernels_gen::sm90::{self, ConfigError, Sm90Config};
use kernels_gen::{DType, GpuKernel, VariantSpec};

/// The overrides of the sm_90a defaults (`--wgs`, `--block-n`,
/// `--stages`, `--no-lazy-rescale`).
#[derive(Default)]
struct Sm90Tuning {
    wgs: Option<usize>,
    block_n: Option<usize>,
    stages: Option<usize>,
    no_lazy_rescale: bool,
}

/// The sm_90a kernel of `spec`, if it has one, with `tuning` applied; an
/// illegal combination ends the program with its reason.
fn kernel_sm90(spec: &VariantSpec, tuning: &Sm90Tuning) -> Option<GpuKernel> {
    let mut c = Sm90Config::new(spec)?;
    let checked = |r: Result<Sm90Config, ConfigError>| {
        r.unwrap_or_else(|e| {
            eprintln!("emit: {}: {e}", spec.kernel_name());
            std::process::exit(2)
        })
    };
    if tuning.wgs.is_some() || tuning.block_n.is_some() {
        let wgs = tuning.wgs.unwrap_or(c.wgs());
        let block_n = tuning.block_n.unwrap_or(c.block_n());
        c = checked(c.with_tiles(wgs, block_n));
    }
    if let Some(s) = tuning.stages {
        c = checked(c.with_stages(s));
    }
    if tuning.no_lazy_rescale {
        c = c.with_lazy_rescale(false);
    }
    Some(sm90::generate_with(c))
}

/// Removes `flag` and its value from `args`, parsed as a count; a missing
/// or malformed value ends the program.
fn take_count(args: &mut Vec<String>, flag: &str) -> Option<usize> {
    let i = args.iter().position(|a| a == flag)?;
    args.remove(i);
    let value = (i < args.len()).then(|| args.remove(i));
    match value.as_deref().map(str::parse) {
        Some(Ok(n)) => Some(n),
        _ => {
            eprintln!("emit: {flag} takes a number");
            std::process::exit(2)
        }
    }
}

/// `--tiles WARPS,M_TILES,BLOCK_N,QREGS` overrides the 16-bit kernels' tiles
/// (for tuning runs).
fn kernel(spec: &VariantSpec, tiles: Option<&[usize]>) -> GpuKernel {
    match (tiles, spec.dtype) {
        (Some(t), DType::F16 | DType::BF16) => {
            let cfg = Fa2Config::new(spec).with_tiles(t[0], t[1], t[2], t[3] != 0);
            fa2::generate_with(spec, cfg, Target::Sm80)
        }
        _ => kernels_gen::generate(spec, Target::Sm80),
    }
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let tiles: Option<Vec<usize>> = args.iter().position(|a| a == "--tiles").map(|i| {
        let t = args.remove(i + 1);
        args.remove(i);
        t.split(',')
            .map(|x| x.parse().expect("--tiles W,M,BN,Q"))
            .collect()
    });
    let tiles = tiles.as_deref();
    let hopper = args.iter().position(|a| a == "--sm90").map(|i| {
        args.remove(i);
    });
    let hopper = hopper.is_some();
    let tuning = Sm90Tuning {
        wgs: take_count(&mut args, "--wgs"),
        block_n: take_count(&mut args, "--block-n"),
        stages: take_count(&mut args, "--stages"),
        no_lazy_rescale: args
            .iter()
            .position(|a| a == "--no-lazy-rescale")
            .map(|i| args.remove(i))
            .is_some(),
    };
    let tuned = tuning.wgs.is_some()
        || tuning.block_n.is_some()
        || tuning.stages.is_some()
        || tuning.no_lazy_rescale;
    if tuned && !hopper {
        eprintln!("emit: --wgs, --block-n, --stages and --no-lazy-rescale tune --sm90 kernels");
        std::process::exit(2);
    }
    let pick = |spec: &VariantSpec| -> Option<GpuKernel> {
        if hopper {
            kernel_sm90(spec, &tuning)
        } else {
            Some(kernel(spec, tiles))
        }
    };
    let only: Option<DType> = args.iter().position(|a| a == "--dtype").map(|i| {
        let t = args.remove(i + 1);
        args.remove(i);
        DType::from_name(&t).expect("--dtype f32|f16|bf16")
    });
    let usage = "usage: emit HEAD_SIZE [causal] f32|f16|bf16 | emit --dir OUT HEAD_SIZE...";
    if args.first().map(String::as_str) == Some("--dir") {
        let dir = std::path::PathBuf::from(args.get(1).expect(usage));
        std::fs::create_dir_all(&dir).expect("cannot create the output folder");
        let mut manifest = Vec::new();
        for d in &args[2..] {
            let d: usize = d.parse().expect(usage);
            for causal in [false, true] {
                for dtype in DType::ALL
                    .into_iter()
                    .filter(|d| only.is_none_or(|o| o == *d))
                {
                    let spec = VariantSpec::new(d, causal, dtype).unwrap_or_else(|e| panic!("{e}"));
                    let Some(k) = pick(&spec) else { continue };
                    std::fs::write(dir.join(format!("{}.ptx", k.entry)), &k.ptx).unwrap();
                    manifest.push(format!(
                        "{{\"entry\": \"{}\", \"head_size\": {d}, \"causal\": {causal}, \
                         \"dtype\": \"{dtype}\", \"block_m\": {}, \"threads\": {}, \"smem_bytes\": {}, \"tensor_maps\": {}}}",
                        k.entry,
                        k.block_m,
                        k.threads,
                        k.smem_bytes,
                        k.tensor_maps.map_or("null".to_string(), |m| format!(
                            "{{\"q_rows\": {}, \"kv_rows\": {}}}",
                            m.q_rows, m.kv_rows
                        )),
                    ));
                }
            }
        }
        std::fs::write(
            dir.join("manifest.json"),
            format!("[\n{}\n]\n", manifest.join(",\n")),
        )
        .unwrap();
        return;
    }
    let head_size: usize = args.first().and_then(|s| s.parse().ok()).expect(usage);
    let causal = args.iter().any(|a| a == "causal");
    let dtype = args.iter().find_map(|a| DType::from_name(a)).expect(usage);
    let spec = VariantSpec::new(head_size, causal, dtype).unwrap_or_else(|e| panic!("{e}"));
    let k = pick(&spec).expect("no sm_90a kernel for this variant");
    eprintln!(
        "{}: block_m {} threads {} smem {} B",
        k.entry, k.block_m, k.threads, k.smem_bytes
    );
    print!("{}", k.ptx);
}

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
//! the variants that have none; `--sm90-cfg BLOCK_N,PV_PER_PANEL[,OVERLAP[,WGS[,PRODUCER[,PING_PONG[,SPLIT_KV[,PV_EXACT[,TMA[,PERSISTENT[,LAZY_RESCALE[,STAGED_STORE[,LEADER_RELEASE]]]]]]]]]]]` overrides
//! their tiles (for tuning runs).

use kernels_gen::fa2::{self, Fa2Config};
use kernels_gen::ptx::Target;
use kernels_gen::sm90::{self, Sm90Config};
use kernels_gen::{DType, GpuKernel, VariantSpec};

/// The sm_90a kernel of `spec`, if it has one, with `cfg` overriding
/// `BLOCK_N,PV_PER_PANEL[,OVERLAP[,WARPGROUPS[,PRODUCER[,PING_PONG[,SPLIT_KV[,PV_EXACT[,TMA[,PERSISTENT[,LAZY_RESCALE[,STAGED_STORE[,LEADER_RELEASE]]]]]]]]]]]`.
fn kernel_sm90(spec: &VariantSpec, cfg: Option<&[usize]>) -> Option<GpuKernel> {
    let mut c = Sm90Config::new(spec)?;
    if let Some(t) = cfg {
        c.block_n = t[0];
        c.pv_per_panel = t[1] != 0;
        if let Some(&o) = t.get(2) {
            c.overlap = o != 0;
        }
        if let Some(&w) = t.get(3) {
            c.wgs = w;
        }
        if let Some(&p) = t.get(4) {
            c.producer = p != 0;
        }
        if let Some(&p) = t.get(5) {
            c.ping_pong = p != 0;
        }
        if let Some(&x) = t.get(6) {
            c.split_kv = x != 0;
        }
        if let Some(&x) = t.get(7) {
            c.pv_exact = x != 0;
        }
        if let Some(&x) = t.get(8) {
            c.tma = x != 0;
            c.persistent = c.tma;
        }
        if let Some(&x) = t.get(9) {
            c.persistent = x != 0;
        }
        if let Some(&x) = t.get(10) {
            c.lazy_rescale = x != 0;
        }
        if let Some(&x) = t.get(11) {
            c.staged_store = x != 0;
        }
        if let Some(&x) = t.get(12) {
            c.leader_release = x != 0;
        }
    }
    Some(sm90::generate_with(spec, c))
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
    let sm90_cfg: Option<Vec<usize>> = args.iter().position(|a| a == "--sm90-cfg").map(|i| {
        let t = args.remove(i + 1);
        args.remove(i);
        t.split(',')
            .map(|x| {
                x.parse().expect(
                    "--sm90-cfg BLOCK_N,PV_PER_PANEL[,OVERLAP[,WGS[,PRODUCER[,PING_PONG[,SPLIT_KV[,PV_EXACT[,TMA[,PERSISTENT[,LAZY_RESCALE[,STAGED_STORE[,LEADER_RELEASE]]]]]]]]]]]",
                )
            })
            .collect()
    });
    let sm90_cfg = sm90_cfg.as_deref();
    let pick = |spec: &VariantSpec| -> Option<GpuKernel> {
        if hopper {
            kernel_sm90(spec, sm90_cfg)
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

//! Unit tests of the Hopper emitter: structure of the PTX, tiles and
//! shared memory per head size, and (with `PTXAS` set) assembly.

use super::config::SMEM_LIMIT;
use super::*;
use crate::contract::{TensorMaps, TENSOR_MAP_PARAMS};
use crate::ptx::Target;
use crate::DType;

fn spec(d: usize, causal: bool, dtype: DType) -> VariantSpec {
    VariantSpec::new(d, causal, dtype).unwrap()
}

#[test]
fn applies_to_the_measured_16_bit_head_sizes() {
    for d in HEAD_SIZES {
        assert!(generate(&spec(d, false, DType::BF16)).is_some(), "{d}");
        assert!(generate(&spec(d, true, DType::F16)).is_some(), "{d}");
    }
    // Correct but slower than sm_80; not a multiple of 16; 32-bit.
    assert!(generate(&spec(32, false, DType::BF16)).is_none());
    assert!(generate(&spec(72, false, DType::BF16)).is_none());
    assert!(generate(&spec(128, false, DType::F32)).is_none());
}

#[test]
fn head_size_256_splits_k_and_v_stages_within_shared_memory() {
    let s = spec(256, false, DType::BF16);
    let k = generate_with(&s, Sm90Config::cp_async(&s).unwrap());
    assert_eq!((k.block_m, k.threads), (128, 256));
    // Q, two K and two V slots of 80 keys, 1 KB of slack.
    assert_eq!(k.smem_bytes, 1024 + (128 + 4 * 80) * 512);
    assert!(k.smem_bytes <= 232_448);
    assert!(k
        .ptx
        .contains("wgmma.mma_async.sync.aligned.m64n80k16.f32.bf16.bf16"));
    assert!(k
        .ptx
        .contains("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16"));
}

#[test]
fn head_sizes_off_the_panel_width_pad_tiles_but_not_products() {
    let s = spec(80, false, DType::F16);
    let k = generate_with(&s, Sm90Config::cp_async(&s).unwrap());
    // Tiles padded to 128 columns; Q·Kᵀ over 5 k-steps, P·V m64n80.
    assert_eq!(k.smem_bytes, 1024 + (192 + 6 * 96) * 128 * 2);
    assert!(k
        .ptx
        .contains("wgmma.mma_async.sync.aligned.m64n80k16.f32.f16.f16"));
    assert!(!k.ptx.contains("m64n128k16"));
    assert_eq!(k.ptx.matches("m64n96k16").count(), 2 * 5);
}

#[test]
fn uses_wgmma_with_swizzled_descriptors() {
    let s = spec(128, false, DType::BF16);
    let k = generate_with(&s, Sm90Config::cp_async(&s).unwrap());
    assert_eq!(k.target, Target::Sm90a);
    assert!(k.ptx.contains(".target sm_90a"));
    assert!(k
        .ptx
        .contains("wgmma.mma_async.sync.aligned.m64n96k16.f32.bf16.bf16"));
    assert!(k.ptx.contains("wgmma.fence.sync.aligned;"));
    assert!(k.ptx.contains("fence.proxy.async.shared::cta;"));
    assert!(k
        .ptx
        .contains("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16"));
    assert_eq!(k.block_m, 192);
    assert_eq!(k.threads, 384);
    assert_eq!(k.smem_bytes, 1024 + (192 + 6 * 96) * 128 * 2);
}

#[test]
fn the_producer_variant_specialises_warpgroups() {
    let s = spec(128, true, DType::BF16);
    let mut cfg = Sm90Config::cp_async(&s).unwrap();
    cfg.producer = true;
    cfg.wgs = 2;
    cfg.block_n = 128;
    let k = generate_with(&s, cfg);
    assert_eq!(k.threads, 384);
    assert_eq!(k.tensor_maps, None);
    assert!(k.ptx.contains("setmaxnreg.dec.sync.aligned.u32 24;"));
    assert!(k.ptx.contains("setmaxnreg.inc.sync.aligned.u32 240;"));
    assert!(k.ptx.contains("mbarrier.try_wait.parity.shared::cta.b64"));
    assert_eq!(k.smem_bytes, 1024 + (128 + 6 * 128) * 128 * 2 + 48);
}

#[test]
fn the_default_loads_with_tma_through_three_tensor_maps() {
    for (d, wgs, rows) in [
        (64, 3, 128),
        (96, 3, 96),
        (128, 2, 128),
        (192, 2, 112),
        (256, 2, 80),
    ] {
        let k = generate(&spec(d, false, DType::BF16)).unwrap();
        assert_eq!((k.block_m, k.threads), (64 * wgs, 128 * (wgs + 1)), "d={d}");
        assert_eq!(
            k.tensor_maps,
            Some(TensorMaps {
                q_rows: 64 * wgs,
                kv_rows: rows
            }),
            "d={d}"
        );
        assert!(k.smem_bytes as usize <= SMEM_LIMIT, "d={d}");
        for name in TENSOR_MAP_PARAMS {
            assert!(
                k.ptx
                    .contains(&format!(".param .align 64 .b8 {}_{name}[128]", k.entry)),
                "d={d} {name}"
            );
        }
        assert!(k.ptx.contains(
            "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        ));
        assert!(k.ptx.contains("mbarrier.arrive.expect_tx.shared::cta.b64"));
        assert!(k.ptx.contains("fence.mbarrier_init.release.cluster;"));
        assert!(!k.ptx.contains("cp.async.ca") && !k.ptx.contains("cp.async.cg"));
    }
    // The output is rescaled lazily (a warp vote) where not causal.
    let plain = generate(&spec(128, false, DType::F16)).unwrap();
    assert!(plain.ptx.contains("vote.sync.all.pred"));
    // d=128: Q (32 KB) and three stages of 128-key K and V tiles.
    let k = generate(&spec(128, true, DType::F16)).unwrap();
    assert!(!k.ptx.contains("vote.sync"));
    assert_eq!(k.smem_bytes, 1024 + (128 + 6 * 128) * 256 + 88);
}

#[test]
fn the_persistent_variant_loops_over_tiles() {
    let s = spec(128, true, DType::BF16);
    let cfg = Sm90Config {
        persistent: true,
        ..Sm90Config::new(&s).unwrap()
    };
    let k = generate_with(&s, cfg);
    for name in ["heads", "batch"] {
        assert!(k.ptx.contains(&format!(".param .u32 {}_{name}", k.entry)));
    }
    assert!(k.ptx.contains("%nctaid.x"));
    // Q-full and Q-empty after the three stages' three barriers.
    assert_eq!(k.smem_bytes, 1024 + (128 + 6 * 128) * 256 + 88);
}

#[test]
fn the_staged_store_writes_rows_through_shared_memory() {
    let s = spec(80, false, DType::BF16);
    let cfg = Sm90Config {
        staged_store: true,
        ..Sm90Config::new(&s).unwrap()
    };
    let k = generate_with(&s, cfg);
    // 64 rows of 10 chunks per warpgroup: 5 row-contiguous 16-byte
    // stores per thread; the plain kernel stores 4 bytes at a time.
    assert_eq!(k.ptx.matches("st.global.v4.b32").count(), 5);
    assert_eq!(k.ptx.matches("ld.shared.v4.b32").count(), 5);
    assert!(k.ptx.contains("bar.sync %r"));
    let plain = generate(&s).unwrap();
    assert!(!plain.ptx.contains("st.global.v4"));
}

/// Assembles every variant with `ptxas` for sm_90a when `PTXAS` names
/// the binary (`PTXAS=/path/to/ptxas cargo test -p kernels-gen sm90`):
/// none may spill.
#[test]
fn assembles_without_spills_when_ptxas_is_available() {
    let Some(ptxas) = std::env::var_os("PTXAS") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("sm90-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut failures = Vec::new();
    for d in HEAD_SIZES {
        for causal in [false, true] {
            for dtype in [DType::BF16, DType::F16] {
                let s = spec(d, causal, dtype);
                // The default (TMA), cp.async, cp.async with a producer.
                for form in 0..3 {
                    if form == 2 && !matches!(d, 64 | 128) {
                        continue;
                    }
                    let mut cfg = Sm90Config::new(&s).unwrap();
                    if form > 0 {
                        cfg = Sm90Config::cp_async(&s).unwrap();
                    }
                    if form == 2 {
                        cfg.producer = true;
                        cfg.wgs = 2;
                        cfg.block_n = 128;
                    }
                    let k = generate_with(&s, cfg);
                    let path = dir.join(format!("{}-{form}.ptx", k.entry));
                    std::fs::write(&path, &k.ptx).unwrap();
                    let out = std::process::Command::new(&ptxas)
                        .args(["-arch=sm_90a", "-v"])
                        .arg(&path)
                        .arg("-o")
                        .arg(path.with_extension("cubin"))
                        .output()
                        .unwrap();
                    let text = String::from_utf8_lossy(&out.stderr).to_string();
                    if !out.status.success()
                        || !text.contains("0 bytes spill stores, 0 bytes spill loads")
                        || text.contains("warning")
                        || text.contains("C7512")
                    {
                        failures.push(format!("{} form {form}: {text}", k.entry));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn descriptor_bits() {
    // 128-byte swizzle in bits 62-63, offsets >> 4 at 16 and 32.
    assert_eq!(desc_bits(16, 1024), (1 << 62) | (64 << 32) | (1 << 16));
}

#[test]
fn the_leader_release_gives_stages_back_once_per_warpgroup() {
    let s = spec(128, false, DType::BF16);
    let cfg = Sm90Config {
        leader_release: true,
        ..Sm90Config::new(&s).unwrap()
    };
    let k = generate_with(&s, cfg);
    // Empty barriers count the two consumer warpgroups, not their threads.
    assert!(k.ptx.contains("mbarrier.init.shared::cta.b64 [%r"));
    assert!(k.ptx.contains("], 2;"));
    assert!(!k.ptx.contains("], 256;"));
    let guarded = k
        .ptx
        .lines()
        .filter(|l| l.trim_start().starts_with("@%p") && l.contains("mbarrier.arrive.shared"))
        .count();
    assert_eq!(guarded, 2, "one release on each of the loop's two paths");
    assert!(generate(&s).unwrap().ptx.contains("], 256;"));
}

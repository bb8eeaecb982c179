//! Unit tests of the Hopper emitter: the configuration's checks, the
//! structure of the PTX, tiles and shared memory per head size, and (with
//! `PTXAS` set) assembly.

use super::emitter::desc_bits;
use super::*;
use crate::contract::TENSOR_MAP_PARAMS;
use crate::DType;

fn spec(d: usize, causal: bool, dtype: DType) -> VariantSpec {
    VariantSpec::new(d, causal, dtype).unwrap()
}

fn config(d: usize) -> Sm90Config {
    Sm90Config::new(&spec(d, false, DType::BF16)).unwrap()
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
    assert!(Sm90Config::new(&spec(72, false, DType::BF16)).is_none());
    assert!(Sm90Config::new(&spec(128, false, DType::F32)).is_none());
}

#[test]
fn the_defaults_by_head_size() {
    // (d, consumers, keys per block, stages)
    for (d, wgs, bn, stages) in [
        (48, 3, 128, 3),
        (64, 3, 128, 3),
        (80, 3, 96, 3),
        (112, 3, 96, 3),
        (128, 2, 128, 3),
        (160, 2, 112, 2),
        (192, 2, 112, 2),
        (224, 2, 80, 2),
        (256, 2, 80, 2),
    ] {
        for causal in [false, true] {
            let c = Sm90Config::new(&spec(d, causal, DType::F16)).unwrap();
            assert_eq!(
                (c.wgs(), c.block_n(), c.stages()),
                (wgs, bn, stages),
                "d={d}"
            );
            assert_eq!(*c.spec(), spec(d, causal, DType::F16));
            assert_eq!(c.head_size(), d);
            assert_eq!(c.causal(), causal);
            assert_eq!(c.lazy_rescale(), !causal, "lazy rescale off where causal");
            assert_eq!(c.consumer_regs(), [240, 160][wgs - 2]);
            assert!(c.smem_bytes() <= SMEM_LIMIT, "d={d}");
            // The defaults are what the checked overrides give.
            assert_eq!(c.with_tiles(wgs, bn), Ok(c));
            assert_eq!(c.with_stages(stages), Ok(c));
        }
    }
    // Every head size the configuration admits builds.
    for d in (16..=256).step_by(16) {
        assert!(
            Sm90Config::new(&spec(d, false, DType::BF16)).is_some(),
            "{d}"
        );
    }
}

#[test]
fn illegal_tunings_are_typed_errors() {
    let c = config(128);
    assert_eq!(c.with_tiles(1, 128), Err(ConfigError::Warpgroups(1)));
    assert_eq!(c.with_tiles(4, 128), Err(ConfigError::Warpgroups(4)));
    assert_eq!(c.with_tiles(2, 72), Err(ConfigError::BlockN(72)));
    assert_eq!(c.with_tiles(2, 0), Err(ConfigError::BlockN(0)));
    assert_eq!(c.with_tiles(2, 272), Err(ConfigError::BlockN(272)));
    assert_eq!(c.with_stages(1), Err(ConfigError::Stages(1)));
    assert_eq!(c.with_stages(4), Err(ConfigError::Stages(4)));
    // Three consumers at d=128 spill (measured: 64 bytes, 96 keys).
    assert_eq!(
        c.with_tiles(3, 96),
        Err(ConfigError::Registers {
            needed: 48 + 24 + 64,
            available: 160
        })
    );
    // 176-key blocks at d=128 serialise `wgmma` (ptxas C7512).
    assert!(matches!(
        c.with_tiles(2, 176),
        Err(ConfigError::Registers { available: 240, .. })
    ));
    // d=256: Q is 64 KB, three stages of 80-key K and V tiles are not.
    let err = config(256).with_stages(3).unwrap_err();
    assert_eq!(
        err,
        ConfigError::SharedMemory {
            bytes: 1024 + (128 + 6 * 80) * 512 + 8 * (3 * 3 + 1),
            limit: SMEM_LIMIT
        }
    );
    assert!(err.to_string().contains("232448"), "{err}");
    assert!(ConfigError::BlockN(72)
        .to_string()
        .contains("multiple of 16"));
    // A legal override takes as many stages as fit.
    let two = config(64).with_tiles(2, 192).unwrap();
    assert_eq!((two.wgs(), two.block_n(), two.stages()), (2, 192, 3));
    let k = generate_with(two);
    // The kernel is named after the variant the configuration holds.
    assert_eq!(k.entry, spec(64, false, DType::BF16).kernel_name());
    assert_eq!((k.block_m, k.threads), (128, 384));
    assert!(k.ptx.contains("setmaxnreg.inc.sync.aligned.u32 240;"));
    assert!(!config(64).with_lazy_rescale(false).lazy_rescale());
}

#[test]
fn head_size_256_fits_shared_memory_in_two_stages() {
    let k = generate(&spec(256, false, DType::BF16)).unwrap();
    assert_eq!((k.block_m, k.threads), (128, 384));
    // Q, two stages of 80-key K and V tiles, 1 KB of slack, 7 barriers
    // (K-full, V-full and empty per stage, Q-full).
    assert_eq!(k.smem_bytes, 1024 + (128 + 4 * 80) * 512 + 8 * (3 * 2 + 1));
    assert!(k.smem_bytes as usize <= SMEM_LIMIT);
    assert!(k
        .ptx
        .contains("wgmma.mma_async.sync.aligned.m64n80k16.f32.bf16.bf16"));
    assert!(k
        .ptx
        .contains("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16"));
}

#[test]
fn head_sizes_off_the_panel_width_pad_tiles_but_not_products() {
    let k = generate(&spec(80, false, DType::F16)).unwrap();
    // Tiles padded to 128 columns; Q·Kᵀ over 5 k-steps, P·V m64n80.
    assert_eq!(
        k.smem_bytes,
        1024 + (192 + 6 * 96) * 128 * 2 + 8 * (3 * 3 + 1)
    );
    assert!(k
        .ptx
        .contains("wgmma.mma_async.sync.aligned.m64n80k16.f32.f16.f16"));
    assert!(!k.ptx.contains("m64n128k16"));
    assert_eq!(k.ptx.matches("m64n96k16").count(), 2 * 5);
    // Each 16 keys' P·V is one product over the whole head.
    assert_eq!(k.ptx.matches("m64n80k16").count(), 2 * 96 / 16);
}

#[test]
fn uses_wgmma_with_swizzled_descriptors() {
    let k = generate(&spec(64, false, DType::BF16)).unwrap();
    assert_eq!(k.target, Target::Sm90a);
    assert!(k.ptx.contains(".target sm_90a"));
    // S = Q·Kᵀ over 128 keys, O += P·V over the 64 columns.
    assert!(k
        .ptx
        .contains("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16"));
    assert!(k
        .ptx
        .contains("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16"));
    assert!(k.ptx.contains("wgmma.fence.sync.aligned;"));
    // K-major Q and K: 128-byte swizzle, atoms 1024 bytes apart; V N-major
    // with its 64-column panels 128 keys · 128 bytes apart.
    assert!(k.ptx.contains(&format!(", {};", desc_bits(16, 1024))));
    assert!(k
        .ptx
        .contains(&format!(", {};", desc_bits(128 * 128, 1024))));
    assert_eq!(k.block_m, 192);
    assert_eq!(k.threads, 512);
    assert_eq!(
        k.smem_bytes,
        1024 + (192 + 6 * 128) * 64 * 2 + 8 * (3 * 3 + 1)
    );
}

#[test]
fn the_producer_specialises_warpgroups() {
    for (d, consumers) in [(64, 160), (128, 240)] {
        let k = generate(&spec(d, true, DType::BF16)).unwrap();
        assert!(k.ptx.contains("setmaxnreg.dec.sync.aligned.u32 24;"));
        assert!(k
            .ptx
            .contains(&format!("setmaxnreg.inc.sync.aligned.u32 {consumers};")));
        assert!(k.ptx.contains("mbarrier.try_wait.parity.shared::cta.b64"));
        // K-full, V-full and empty per stage, then Q-full: the empty ones
        // count every consumer thread, the others the producer's arrival.
        let stages = Sm90Config::new(&spec(d, true, DType::BF16))
            .unwrap()
            .stages();
        let inits: Vec<&str> = k
            .ptx
            .lines()
            .filter(|l| l.contains("mbarrier.init"))
            .collect();
        assert_eq!(inits.len(), 3 * stages + 1, "d={d}");
        let by_producer = inits.iter().filter(|l| l.ends_with(", 1;")).count();
        assert_eq!(by_producer, 2 * stages + 1, "d={d}");
        // No CTA barrier after the barriers' initialisation, no ping-pong.
        assert_eq!(k.ptx.matches("bar.sync").count(), 1, "d={d}");
        assert!(!k.ptx.contains("bar.arrive"), "d={d}");
    }
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
    let cfg = Sm90Config::new(&spec(128, false, DType::F16)).unwrap();
    let eager = generate_with(cfg.with_lazy_rescale(false));
    assert!(!eager.ptx.contains("vote.sync"));
    // d=128: Q (32 KB) and three stages of 128-key K and V tiles.
    let k = generate(&spec(128, true, DType::F16)).unwrap();
    assert!(!k.ptx.contains("vote.sync"));
    assert_eq!(k.smem_bytes, 1024 + (128 + 6 * 128) * 256 + 8 * (3 * 3 + 1));
}

/// Assembles every variant with `ptxas` for sm_90a: none may spill, warn,
/// or serialise a `wgmma` (C7512). Needs `SDPA_PTXAS`, so it runs on
/// request (`SDPA_PTXAS=/path/to/ptxas cargo test -p kernels-gen sm90 --
/// --ignored`); CI's check of every declared variant is
/// `sdpa-cli/tests/ptxas.rs`.
#[test]
#[ignore = "needs SDPA_PTXAS; CI assembles every variant in sdpa-cli/tests/ptxas.rs"]
fn assembles_without_spills() {
    let ptxas = std::env::var_os("SDPA_PTXAS").expect("set SDPA_PTXAS to a ptxas binary");
    let dir = std::env::temp_dir().join(format!("sm90-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut failures = Vec::new();
    for d in HEAD_SIZES {
        for causal in [false, true] {
            for dtype in [DType::BF16, DType::F16] {
                let k = generate(&spec(d, causal, dtype)).unwrap();
                let path = dir.join(format!("{}.ptx", k.entry));
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
                    failures.push(format!("{}: {text}", k.entry));
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
fn tiles_past_their_sequence_leave_and_masks_of_every_kind_are_read() {
    let k = generate(&spec(128, true, DType::BF16)).unwrap();
    let t = &k.ptx;
    // A tile past its sequence's end leaves before the mbarriers exist.
    let exit = t.find("ret;").expect("an early exit");
    assert!(exit < t.find("mbarrier.init").expect("mbarriers"), "{t}");
    // The masked path reads every element kind in place.
    for form in [
        "ld.global.nc.f32",
        "ld.global.nc.b16",
        "ld.global.nc.u16",
        "ld.global.nc.u8",
        "ld.global.nc.u32",
    ] {
        assert!(t.contains(form), "{form}");
    }
}

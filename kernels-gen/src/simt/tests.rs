//! Tests of the CUDA-core kernel: its text, its plans, ptxas when available,
//! and a small PTX interpreter that runs the emitted instructions for one
//! CTA against a float64 reference.
use super::*;
use crate::attention::mask::MaskKind;
use crate::contract::PARAMS;

fn spec(d: usize, causal: bool, dtype: DType) -> VariantSpec {
    VariantSpec::new(d, causal, dtype).unwrap()
}

/// The variants the ptxas check covers: a sample of head sizes, or
/// every one when `SIMT_ALL_HEAD_SIZES` is set.
fn sample() -> Vec<VariantSpec> {
    let mut out = Vec::new();
    let all = std::env::var_os("SIMT_ALL_HEAD_SIZES").is_some();
    let sizes: Vec<usize> = if all {
        (8..=256).step_by(8).collect()
    } else {
        vec![8, 40, 64, 72, 80, 128, 136, 144, 256]
    };
    for d in sizes {
        for causal in [false, true] {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                out.push(spec(d, causal, dtype));
            }
        }
    }
    out
}

/// Assembles the sample with `ptxas`: every variant must assemble for
/// sm_80 and sm_90 without spilling, and the registers are reported. Needs
/// `SDPA_PTXAS`, so it runs on request (`SDPA_PTXAS=/path/to/ptxas cargo
/// test -p kernels-gen simt -- --ignored`); CI's check of every declared
/// variant is `sdpa-cli/tests/ptxas.rs`.
#[test]
#[ignore = "needs SDPA_PTXAS; CI assembles every variant in sdpa-cli/tests/ptxas.rs"]
fn assembles_without_spills() {
    let ptxas = std::env::var_os("SDPA_PTXAS").expect("set SDPA_PTXAS to a ptxas binary");
    let dir = std::env::temp_dir().join(format!("simt-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut report = String::new();
    let mut failures = Vec::new();
    for s in sample() {
        let k = generate(&s, Target::Sm80);
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
            if !out.status.success() || !text.contains("0 bytes spill stores, 0 bytes spill loads")
            {
                failures.push(format!("{} {arch}: {text}", k.entry));
            }
            let regs = text
                .split("Used ")
                .nth(1)
                .and_then(|t| t.split(' ').next())
                .unwrap_or("?");
            report.push_str(&format!(
                "{} {arch}: {regs} registers, smem {} B, block_m {}\n",
                k.entry, k.smem_bytes, k.block_m
            ));
        }
    }
    std::fs::write(dir.join("report.txt"), &report).unwrap();
    eprintln!("{report}(files in {})", dir.display());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Writes the sample's PTX and a `manifest.json` of launch metadata
/// (the format of `tests/gpu/ptx_harness.py`) into `SIMT_PTX_DIR` when
/// that is set, for running these kernels on a GPU.
#[test]
fn writes_ptx_for_the_gpu_harness_when_asked() {
    let Some(dir) = std::env::var_os("SIMT_PTX_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    // `SIMT_PLAN=lanes,rows` overrides the plan (for experiments).
    let forced: Option<(u32, u32)> = std::env::var("SIMT_PLAN").ok().map(|p| {
        let v: Vec<u32> = p.split(',').map(|x| x.parse().unwrap()).collect();
        (v[0], v[1])
    });
    let mut manifest = Vec::new();
    for s in sample() {
        let mut k = generate(&s, Target::Sm80);
        if let Some((lanes, rows)) = forced {
            let d = s.head_size as u32;
            if !d.is_multiple_of(lanes * 2) {
                continue;
            }
            let plan = Plan::with(d, lanes, rows);
            k.ptx = Module::new(Target::Sm80)
                .kernel(build(&s, plan))
                .to_string();
            k.block_m = plan.block_m();
            k.smem_bytes = plan.smem_bytes();
        }
        std::fs::write(dir.join(format!("{}.ptx", k.entry)), &k.ptx).unwrap();
        manifest.push(format!(
            "{{\"entry\": \"{}\", \"head_size\": {}, \"causal\": {}, \"dtype\": \"{}\", \
             \"block_m\": {}, \"threads\": {}, \"smem_bytes\": {}}}",
            k.entry, s.head_size, s.causal, s.dtype, k.block_m, k.threads, k.smem_bytes
        ));
    }
    let text = format!("[\n{}\n]\n", manifest.join(",\n"));
    std::fs::write(dir.join("manifest.json"), text).unwrap();
}

// ---- text checks ----

#[test]
fn the_text_has_the_contract_entry_and_the_expected_forms() {
    for (d, causal, dtype) in [
        (64, false, DType::F32),
        (128, true, DType::F16),
        (256, false, DType::BF16),
        (8, true, DType::F32),
    ] {
        let s = spec(d, causal, dtype);
        let k = generate(&s, Target::Sm80);
        assert_eq!(k.entry, s.kernel_name());
        assert_eq!(k.threads, THREADS);
        assert!(k.smem_bytes <= 48 * 1024);
        assert_eq!(k.block_m, Plan::new(d as u32).block_m());
        let t = &k.ptx;
        assert!(t.contains(&format!(".visible .entry {}(", k.entry)), "{t}");
        assert_eq!(t.matches(".param ").count(), PARAMS.len() + 1);
        assert!(t.contains(".maxntid 128, 1, 1"));
        assert!(t.contains(".extern .shared .align 16 .b8 smem[];"));
        assert!(t.contains("mov.u32 %r") && t.contains(", smem;"));
        assert!(t.contains("ex2.approx.ftz.f32"));
        assert!(t.contains("shfl.sync.bfly.b32"));
        assert!(t.contains("bar.sync 0;"));
        assert!(t.contains("rcp.rn.f32"));
        assert!(t.contains("mul.wide.u32") && t.contains("mad.lo.u64"));
        assert!(!t.contains("mma") && !t.contains("ldmatrix") && !t.contains("cp.async"));
        assert!(!t.contains(".aligned"));
        // Shuffles are never predicated.
        assert!(!t
            .lines()
            .any(|l| l.trim_start().starts_with('@') && l.contains("shfl")));
        match dtype {
            DType::F32 => {
                assert!(t.contains("ld.global.nc.v4.f32") || t.contains("ld.global.nc.v2.f32"))
            }
            DType::F16 => {
                assert!(t.contains("cvt.f32.f16") && t.contains("cvt.rn.f16x2.f32"));
                assert!(t.contains("mov.b32 {%h"));
            }
            DType::BF16 => {
                assert!(t.contains("cvt.rn.bf16x2.f32"));
                // PTX 7.0 has no cvt.f32.bf16: the widening is a shift.
                assert!(!t.contains("cvt.f32.bf16"));
            }
        }
    }
}

#[test]
fn plans_fit_the_limits() {
    for d in (8..=256).step_by(8) {
        let p = Plan::new(d);
        assert_eq!(d % (p.lanes * p.width), 0, "{p:?}");
        assert!(p.smem_bytes() <= TILE_BYTES, "{p:?}");
        assert_eq!(p.tile % p.group, 0, "{p:?}");
        assert!(p.block_m() >= 32 && p.block_m() <= 128, "{p:?}");
        // q and the accumulators in registers stay within budget.
        assert!(
            p.rows * d / p.lanes <= 72 && p.rows * p.group <= 32,
            "{p:?}"
        );
    }
    let shape = |d| {
        let p = Plan::new(d);
        (p.lanes, p.rows, p.width, p.tile, p.block_m())
    };
    assert_eq!(shape(64), (4, 4, 4, 64, 128));
    assert_eq!(shape(128), (8, 4, 4, 32, 64));
    assert_eq!(shape(256), (16, 4, 4, 16, 32));
    assert_eq!(shape(80), (8, 4, 2, 48, 64));
    assert_eq!(shape(136), (4, 2, 2, 24, 64));
}

// ---- an interpreter of the emitted instructions ----

use crate::ptx::{BinOp, Cmp, Instr, Operand, Reg, Special, StateSpace, Ty, UnOp};
use std::collections::HashMap;

fn f16_to_f32(h: u16) -> f32 {
    let neg = h >> 15 != 0;
    let exp = ((h >> 10) & 0x1f) as i32;
    let man = (h & 0x3ff) as u32;
    let v = if exp == 0 {
        man as f32 * 2f32.powi(-24)
    } else if exp == 31 {
        if man == 0 {
            f32::INFINITY
        } else {
            f32::NAN
        }
    } else {
        f32::from_bits((((exp + 112) as u32) << 23) | (man << 13))
    };
    if neg {
        -v
    } else {
        v
    }
}

fn f32_to_f16(x: f32) -> u16 {
    let sign = if x.is_sign_negative() { 0x8000u16 } else { 0 };
    if x.is_nan() {
        return 0x7e00;
    }
    let a = x.abs() as f64;
    if a >= 65520.0 {
        return sign | 0x7c00;
    }
    if a < 2f64.powi(-14) {
        return sign | (a / 2f64.powi(-24)).round_ties_even() as u16;
    }
    let mut e = a.log2().floor() as i32;
    if 2f64.powi(e) > a {
        e -= 1;
    }
    if 2f64.powi(e + 1) <= a {
        e += 1;
    }
    let mut mant = ((a / 2f64.powi(e) - 1.0) * 1024.0).round_ties_even() as u32;
    if mant == 1024 {
        mant = 0;
        e += 1;
    }
    if e > 15 {
        return sign | 0x7c00;
    }
    sign | (((e + 15) as u16) << 10) | mant as u16
}

fn f32_to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7fc0;
    }
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[test]
fn half_conversions_round_to_nearest_even() {
    for x in [0.0f32, 1.0, -2.5, 65504.0, 1e-7, 0.1, 3.0e-5, -7.0e4] {
        let h = f32_to_f16(x);
        let back = f16_to_f32(h);
        assert!(
            (back - x).abs() <= x.abs() * 1e-3 + 6e-8 || back.is_infinite(),
            "{x} {back}"
        );
    }
    assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00); // tie to even
    assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
    assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
    assert_eq!(bf16_to_f32(0x3f80), 1.0);
}

/// Device memory: one byte array; every access must fall inside one
/// allocation.
struct Memory {
    bytes: Vec<u8>,
    allocs: Vec<(u64, u64)>,
}

const HEAP: u64 = 0x1_0000;

impl Memory {
    fn new() -> Memory {
        Memory {
            bytes: Vec::new(),
            allocs: Vec::new(),
        }
    }
    fn alloc(&mut self, len: usize, fill: u8) -> u64 {
        // 256-byte aligned, with a gap between allocations.
        let start = (self.bytes.len() as u64).div_ceil(256) * 256 + 256;
        self.bytes.resize(start as usize, 0xEE);
        self.bytes.resize(start as usize + len, fill);
        self.allocs.push((HEAP + start, HEAP + start + len as u64));
        HEAP + start
    }
    fn check(&self, addr: u64, n: u64) -> usize {
        assert!(
            self.allocs.iter().any(|&(a, b)| addr >= a && addr + n <= b),
            "global access out of bounds: {addr:#x}+{n}"
        );
        (addr - HEAP) as usize
    }
}

fn bytes_of(ty: Ty) -> u64 {
    match ty {
        Ty::U8 => 1,
        Ty::B16 | Ty::U16 | Ty::F16 | Ty::BF16 => 2,
        Ty::B64 | Ty::U64 | Ty::S64 => 8,
        _ => 4,
    }
}

/// Runs one CTA of 128 threads in lock step. Branches must be uniform
/// over the CTA, shuffles must run with every lane.
struct Cta<'a> {
    body: &'a [Instr],
    labels: &'a HashMap<String, usize>,
    params: &'a HashMap<String, u64>,
    ctaid: [u32; 3],
    regs: Vec<Vec<u64>>,
    init: Vec<Vec<bool>>,
    smem: Vec<u8>,
}

const N: usize = THREADS as usize;

impl Cta<'_> {
    fn read(&self, op: &Operand, t: usize) -> u64 {
        match op {
            Operand::Reg(r) => {
                let s = r.id as usize;
                assert!(self.init[s][t], "read of unset register {r}");
                self.regs[s][t]
            }
            Operand::U(x) => *x,
            Operand::S(x) => *x as u64,
            Operand::F32(x) => x.to_bits() as u64,
            Operand::Special(Special::TidX) => t as u64,
            Operand::Special(Special::CtaIdX) => self.ctaid[0] as u64,
            Operand::Special(Special::CtaIdY) => self.ctaid[1] as u64,
            Operand::Special(Special::CtaIdZ) => self.ctaid[2] as u64,
            #[allow(unreachable_patterns)]
            Operand::Special(other) => panic!("the interpreter does not know {other}"),
            Operand::Symbol(s) => {
                assert_eq!(s, "smem");
                0
            }
        }
    }
    fn write(&mut self, r: Reg, t: usize, v: u64) {
        let s = r.id as usize;
        self.regs[s][t] = v;
        self.init[s][t] = true;
    }

    fn run(&mut self, mem: &mut Memory) {
        let mut pc = 0;
        loop {
            let instr = &self.body[pc];
            pc += 1;
            let (active, inner): ([bool; N], &Instr) = match instr {
                Instr::Guard {
                    pred,
                    negate,
                    instr,
                } => {
                    let mut a = [false; N];
                    for (t, x) in a.iter_mut().enumerate() {
                        *x = (self.read(&Operand::Reg(*pred), t) != 0) != *negate;
                    }
                    (a, instr)
                }
                i => ([true; N], i),
            };
            match inner {
                Instr::Comment(_) | Instr::Label(_) => {}
                Instr::Bra { target, .. } => {
                    let n = active.iter().filter(|&&x| x).count();
                    assert!(n == 0 || n == N, "divergent branch to {target}");
                    if n == N {
                        pc = self.labels[target];
                    }
                }
                Instr::Ret => {
                    // The whole CTA leaves, or none of it.
                    let n = active.iter().filter(|&&x| x).count();
                    assert!(n == 0 || n == N, "divergent exit");
                    if n == N {
                        return;
                    }
                }
                Instr::BarSync(_) => assert!(active.iter().all(|&x| x)),
                Instr::ShflBfly {
                    dst,
                    src,
                    lane_mask,
                } => {
                    assert!(active.iter().all(|&x| x), "predicated shuffle");
                    let vals: Vec<u64> = (0..N)
                        .map(|t| self.read(&Operand::Reg(*src), t ^ *lane_mask as usize))
                        .collect();
                    for (t, v) in vals.into_iter().enumerate() {
                        self.write(*dst, t, v & 0xffff_ffff);
                    }
                }
                i => {
                    for (t, &on) in active.iter().enumerate() {
                        if on {
                            self.exec(i, t, mem);
                        }
                    }
                }
            }
        }
    }

    fn exec(&mut self, i: &Instr, t: usize, mem: &mut Memory) {
        let f = |x: u64| f32::from_bits(x as u32);
        let fb = |x: f32| x.to_bits() as u64;
        match i {
            Instr::LdParam { dst, param, .. } => {
                let v = *self
                    .params
                    .get(&param.name)
                    .unwrap_or_else(|| panic!("no value for {}", param.name));
                self.write(*dst, t, v);
            }
            Instr::Mov { ty, dst, src } => {
                let v = self.read(src, t);
                let v = if bytes_of(*ty) == 8 {
                    v
                } else {
                    v & 0xffff_ffff
                };
                self.write(*dst, t, v);
            }
            Instr::Bin { op, ty, dst, a, b } => {
                let (x, y) = (self.read(a, t), self.read(b, t));
                let v = match ty {
                    Ty::F32 => fb(match op {
                        BinOp::Add => f(x) + f(y),
                        BinOp::Sub => f(x) - f(y),
                        BinOp::Mul => f(x) * f(y),
                        BinOp::Min => f(x).min(f(y)),
                        BinOp::Max => f(x).max(f(y)),
                        _ => panic!("{i}"),
                    }),
                    Ty::U32 | Ty::B32 => {
                        let (x, y) = (x as u32, y as u32);
                        match op {
                            BinOp::MulWide => x as u64 * y as u64,
                            _ => {
                                (match op {
                                    BinOp::Add => x.wrapping_add(y),
                                    BinOp::Sub => x.wrapping_sub(y),
                                    BinOp::Mul => x.wrapping_mul(y),
                                    BinOp::Min => x.min(y),
                                    BinOp::Max => x.max(y),
                                    BinOp::And => x & y,
                                    BinOp::Or => x | y,
                                    BinOp::Xor => x ^ y,
                                    BinOp::Shl => x.checked_shl(y).unwrap_or(0),
                                    BinOp::Shr => x.checked_shr(y).unwrap_or(0),
                                    BinOp::Div => x / y,
                                    BinOp::Rem => x % y,
                                    BinOp::MulWide => unreachable!(),
                                }) as u64
                            }
                        }
                    }
                    Ty::S32 => {
                        let (x, y) = (x as u32 as i32, y as u32 as i32);
                        (match op {
                            BinOp::Add => x.wrapping_add(y),
                            BinOp::Sub => x.wrapping_sub(y),
                            BinOp::Min => x.min(y),
                            BinOp::Max => x.max(y),
                            _ => panic!("{i}"),
                        }) as u32 as u64
                    }
                    Ty::U64 | Ty::B64 | Ty::S64 => match op {
                        BinOp::Add => x.wrapping_add(y),
                        BinOp::Sub => x.wrapping_sub(y),
                        BinOp::Min => x.min(y),
                        BinOp::Max => x.max(y),
                        BinOp::Mul => x.wrapping_mul(y),
                        BinOp::Shl => x << y,
                        BinOp::And => x & y,
                        _ => panic!("{i}"),
                    },
                    Ty::Pred => match op {
                        BinOp::And => x & y,
                        BinOp::Or => x | y,
                        _ => panic!("{i}"),
                    },
                    _ => panic!("{i}"),
                };
                self.write(*dst, t, v);
            }
            Instr::Mad {
                ty,
                wide,
                dst,
                a,
                b,
                c,
            } => {
                assert!(!wide);
                let (x, y, z) = (self.read(a, t), self.read(b, t), self.read(c, t));
                let v = match ty {
                    Ty::F32 => fb(f(x).mul_add(f(y), f(z))),
                    Ty::U32 | Ty::S32 => {
                        ((x as u32).wrapping_mul(y as u32).wrapping_add(z as u32)) as u64
                    }
                    Ty::U64 => x.wrapping_mul(y).wrapping_add(z),
                    _ => panic!("{i}"),
                };
                self.write(*dst, t, v);
            }
            Instr::Un { op, ty, dst, a } => {
                assert_eq!(*ty, Ty::F32);
                let x = f(self.read(a, t));
                let v = match op {
                    UnOp::Ex2 => {
                        let x = if x.is_subnormal() { 0.0 } else { x };
                        let r = (x as f64).exp2() as f32;
                        if r.is_subnormal() {
                            0.0
                        } else {
                            r
                        }
                    }
                    UnOp::Rcp => 1.0 / x,
                    UnOp::Lg2 => {
                        let x = if x.is_subnormal() { 0.0 } else { x };
                        (x as f64).log2() as f32
                    }
                    _ => panic!("{i}"),
                };
                self.write(*dst, t, fb(v));
            }
            Instr::Setp { cmp, ty, dst, a, b } => {
                let (x, y) = (self.read(a, t), self.read(b, t));
                use std::cmp::Ordering;
                let ord = match ty {
                    Ty::F32 => f(x).partial_cmp(&f(y)),
                    Ty::U32 => Some((x as u32).cmp(&(y as u32))),
                    Ty::S32 => Some((x as u32 as i32).cmp(&(y as u32 as i32))),
                    Ty::U64 => Some(x.cmp(&y)),
                    _ => panic!("{i}"),
                };
                let v = match ord {
                    None => false, // ordered comparisons are false on NaN
                    Some(o) => match cmp {
                        Cmp::Eq => o == Ordering::Equal,
                        Cmp::Ne => o != Ordering::Equal,
                        Cmp::Lt => o == Ordering::Less,
                        Cmp::Le => o != Ordering::Greater,
                        Cmp::Gt => o == Ordering::Greater,
                        Cmp::Ge => o != Ordering::Less,
                    },
                };
                self.write(*dst, t, v as u64);
            }
            Instr::Selp {
                dst, a, b, pred, ..
            } => {
                let p = self.read(&Operand::Reg(*pred), t) != 0;
                let v = if p { self.read(a, t) } else { self.read(b, t) };
                self.write(*dst, t, v);
            }
            Instr::Cvt {
                dst_ty,
                src_ty,
                dst,
                src,
                ..
            } => {
                let x = self.read(src, t);
                let v = match (dst_ty, src_ty) {
                    (Ty::U64, Ty::U32) => x as u32 as u64,
                    (Ty::F32, Ty::F16) => fb(f16_to_f32(x as u16)),
                    _ => panic!("{i}"),
                };
                self.write(*dst, t, v);
            }
            Instr::CvtPack { ty, dst, hi, lo } => {
                let (h, l) = (
                    f(self.read(&Operand::Reg(*hi), t)),
                    f(self.read(&Operand::Reg(*lo), t)),
                );
                let conv = if *ty == Ty::F16x2 {
                    f32_to_f16
                } else {
                    f32_to_bf16
                };
                self.write(*dst, t, ((conv(h) as u64) << 16) | conv(l) as u64);
            }
            Instr::Unpack { lo, hi, src } => {
                let x = self.read(&Operand::Reg(*src), t);
                self.write(*lo, t, x & 0xffff);
                self.write(*hi, t, (x >> 16) & 0xffff);
            }
            Instr::Ld {
                space,
                ty,
                dst,
                addr,
            } => {
                let size = bytes_of(*ty);
                let a = self.read(&addr.base, t).wrapping_add(addr.offset as u64);
                let n = dst.len() as u64;
                assert_eq!(a % (size * n), 0, "misaligned {i}");
                for (e, &d) in dst.iter().enumerate() {
                    let ea = a + e as u64 * size;
                    let bytes: &[u8] = match space {
                        StateSpace::Shared => {
                            assert!(ea + size <= self.smem.len() as u64, "smem OOB {i}");
                            &self.smem[ea as usize..(ea + size) as usize]
                        }
                        _ => {
                            let o = mem.check(ea, size);
                            &mem.bytes[o..o + size as usize]
                        }
                    };
                    let mut v = 0u64;
                    for (k, &byte) in bytes.iter().enumerate() {
                        v |= (byte as u64) << (8 * k);
                    }
                    self.write(d, t, v);
                }
            }
            Instr::St {
                space,
                ty,
                addr,
                src,
            } => {
                let size = bytes_of(*ty);
                let a = self.read(&addr.base, t).wrapping_add(addr.offset as u64);
                let n = src.len() as u64;
                assert_eq!(a % (size * n), 0, "misaligned {i}");
                for (e, &r) in src.iter().enumerate() {
                    let v = self.read(&Operand::Reg(r), t);
                    let ea = a + e as u64 * size;
                    let out: &mut [u8] = match space {
                        StateSpace::Shared => {
                            assert!(ea + size <= self.smem.len() as u64, "smem OOB {i}");
                            &mut self.smem[ea as usize..(ea + size) as usize]
                        }
                        _ => {
                            let o = mem.check(ea, size);
                            &mut mem.bytes[o..o + size as usize]
                        }
                    };
                    for (k, byte) in out.iter_mut().enumerate() {
                        *byte = (v >> (8 * k)) as u8;
                    }
                }
            }
            _ => panic!("the interpreter does not know {i}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum MaskShape {
    None,
    /// `[B, H, Sq, Sk]` with random values, some -inf, and query row 1
    /// of every (b, h) fully masked.
    Dense,
    /// `[B, 1, Sq, Sk]` broadcast over heads (stride 0), no -inf.
    PerBatch,
    /// `[B, 1, 1, Sk]` broadcast over heads and query rows (a key-padding
    /// mask), some -inf.
    Keys,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    d: usize,
    causal: bool,
    dtype: DType,
    b: usize,
    hq: usize,
    hkv: usize,
    sq: usize,
    sk: usize,
    mask: MaskShape,
    /// The mask's element kind (bool kinds: zero hides).
    mask_kind: MaskKind,
    /// The mask's front padding: keys before it attend, the mask holds
    /// `Sk - pad` columns.
    mask_pad: usize,
    /// Which tokens each batch entry's queries and keys are.
    seqs: Seqs,
    /// Puts a NaN into q at (batch 0, row 2, head 0).
    nan_q: bool,
    /// Asks for the row log-sum-exp, into a strided buffer with gaps
    /// (otherwise `lse` is null, and any store to it would be out of
    /// bounds).
    lse: bool,
    /// softmax_scale.
    scale: f32,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Rounds `x` to the element type; returns the stored bits and value.
fn quantise(dtype: DType, x: f32) -> (u32, f32) {
    match dtype {
        DType::F32 => (x.to_bits(), x),
        DType::F16 => {
            let h = f32_to_f16(x);
            (h as u32, f16_to_f32(h))
        }
        DType::BF16 => {
            let h = f32_to_bf16(x);
            (h as u32, bf16_to_f32(h))
        }
    }
}

fn put(mem: &mut Memory, dtype: DType, base: u64, index: usize, bits: u32) {
    let es = dtype.size_bytes();
    let o = mem.check(base + (index * es) as u64, es as u64);
    for k in 0..es {
        mem.bytes[o + k] = (bits >> (8 * k)) as u8;
    }
}

fn get(mem: &Memory, dtype: DType, base: u64, index: usize) -> f64 {
    let es = dtype.size_bytes();
    let o = mem.check(base + (index * es) as u64, es as u64);
    let mut v = 0u32;
    for k in 0..es {
        v |= (mem.bytes[o + k] as u32) << (8 * k);
    }
    match dtype {
        DType::F32 => f32::from_bits(v) as f64,
        DType::F16 => f16_to_f32(v as u16) as f64,
        DType::BF16 => bf16_to_f32(v as u16) as f64,
    }
}

/// Which tokens each batch entry's queries and keys are.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Seqs {
    /// No bounds: batch entry `b` is tokens `[0, Sq)` and `[0, Sk)` of
    /// batch `b`.
    Whole,
    /// Packed variable lengths (batch strides 0, one packed batch): the
    /// queries' and keys' lengths per batch entry, passed as `cu_seqlens`
    /// (`start = cu`, `end = cu + 1`); the tensors hold 3 more tokens past
    /// the last sequence, in no sequence.
    Packed { q: [usize; 4], k: [usize; 4] },
    /// Key runs over the padded layout: batch entry `b`'s keys are tokens
    /// `[k[b].0, k[b].1)` of batch `b` (`k_start`, `k_end`), its queries
    /// the whole `[0, Sq)`.
    KeyRuns { k: [(usize, usize); 2] },
}

/// One batch entry: its queries' and keys' `(first token, length)`, and
/// the batch of the tensors that hold them.
type Entry = ((usize, usize), (usize, usize), usize);

/// A sequence layout's batch entries: per entry the queries' and keys'
/// `(first token, length)` and the batch of the tensors holding them;
/// then the tokens per tensor batch (`tokens_q`, `tokens_k`), the tensor
/// batches, and the grid's bounds `(Sq, Sk)`.
struct Layout {
    entries: Vec<Entry>,
    tokens: (usize, usize),
    batches: usize,
    bounds: (usize, usize),
}

fn layout(c: &Case) -> Layout {
    match c.seqs {
        Seqs::Whole => Layout {
            entries: (0..c.b).map(|b| ((0, c.sq), (0, c.sk), b)).collect(),
            tokens: (c.sq, c.sk),
            batches: c.b,
            bounds: (c.sq, c.sk),
        },
        Seqs::Packed { q, k } => {
            let (mut qs, mut ks) = (0, 0);
            let mut entries = Vec::new();
            for b in 0..c.b {
                entries.push(((qs, q[b]), (ks, k[b]), 0));
                qs += q[b];
                ks += k[b];
            }
            let max = |x: &[usize]| x[..c.b].iter().copied().max().unwrap();
            Layout {
                entries,
                tokens: (qs + 3, ks + 3),
                batches: 1,
                bounds: (max(&q), max(&k)),
            }
        }
        Seqs::KeyRuns { k } => Layout {
            entries: (0..c.b)
                .map(|b| ((0, c.sq), (k[b].0, k[b].1 - k[b].0), b))
                .collect(),
            tokens: (c.sq, c.sk),
            batches: c.b,
            bounds: (c.sq, c.sk),
        },
    }
}

/// A mask element of `kind` for the bias `x` (bool kinds: `-inf` hides,
/// anything else attends): its bits and the bias it stands for.
fn mask_elem(kind: MaskKind, x: f32) -> (u64, f64) {
    let hide = x == f32::NEG_INFINITY;
    match kind {
        MaskKind::F32 => (x.to_bits() as u64, x as f64),
        MaskKind::F16 => {
            let h = f32_to_f16(x);
            (h as u64, f16_to_f32(h) as f64)
        }
        MaskKind::Bf16 => {
            let h = f32_to_bf16(x);
            (h as u64, bf16_to_f32(h) as f64)
        }
        MaskKind::U8 | MaskKind::I32 | MaskKind::I64 => {
            // Non-zero attends: various non-zero values, i64's above 32 bits.
            let attend = match kind {
                MaskKind::U8 => 0x80,
                MaskKind::I32 => 0x8000_0000,
                _ => 1u64 << 40,
            };
            if hide {
                (0, f64::NEG_INFINITY)
            } else {
                (attend, 0.0)
            }
        }
    }
}

/// Runs the kernel of `c` through the interpreter and checks it against
/// a float64 reference; every token of `out` and `lse` outside the
/// sequences must keep its NaN poison. Returns the relative L2 error of
/// the finite rows.
fn check(c: Case) -> f64 {
    let s = spec(c.d, c.causal, c.dtype);
    let plan = Plan::new(c.d as u32);
    let kernel = build(&s, plan);
    let body = kernel.body();
    let mut rng = Rng(0x5eed ^ (c.d as u64 * 31 + c.sq as u64 * 7 + c.sk as u64));
    let lay = layout(&c);
    let (d, b, hq, hkv) = (c.d, c.b, c.hq, c.hkv);
    let (tq, tk) = lay.tokens;
    let (sq, sk) = lay.bounds;
    let nb = lay.batches;
    let packed = matches!(c.seqs, Seqs::Packed { .. });

    // Layouts (strides in elements): q and out [B, Tq, H, D]; k and v
    // [B, H, Tk, D] (a transposed view); the mask [B, H, Sq, Sk - pad].
    // Packed tensors pass batch strides 0.
    let bstride = |x: usize| if packed { 0 } else { x };
    let q_st = [bstride(tq * hq * d), hq * d, d];
    let kv_st = [bstride(hkv * tk * d), d, tk * d];
    let mut mem = Memory::new();
    let es = c.dtype.size_bytes();
    let q_ptr = mem.alloc(nb * tq * hq * d * es, 0);
    let k_ptr = mem.alloc(nb * tk * hkv * d * es, 0);
    let v_ptr = mem.alloc(nb * tk * hkv * d * es, 0);
    // NaN poison: rows outside the sequences must keep it.
    let o_ptr = mem.alloc(nb * tq * hq * d * es, 0xFF);
    let mut qv = vec![0f64; nb * tq * hq * d];
    let mut kv = vec![0f64; nb * tk * hkv * d];
    let mut vv = vec![0f64; nb * tk * hkv * d];
    // Keys and values outside every sequence are NaN: never read.
    let mut key_used = vec![false; nb * tk];
    for &(_, (ks, kl), tb) in &lay.entries {
        for t in ks..ks + kl {
            key_used[tb * tk + t] = true;
        }
    }
    for (i, x) in qv.iter_mut().enumerate() {
        let (bits, val) = quantise(c.dtype, rng.next() * 2.0);
        put(&mut mem, c.dtype, q_ptr, i, bits);
        *x = val as f64;
    }
    for (ptr, vals, amp) in [(k_ptr, &mut kv, 2.0), (v_ptr, &mut vv, 1.0)] {
        for (i, x) in vals.iter_mut().enumerate() {
            // [B, H, Tk, D]: element i is token (i / d) % tk of batch
            // i / (hkv · tk · d).
            let token = (i / (hkv * tk * d)) * tk + (i / d) % tk;
            let v = if key_used[token] {
                rng.next() * amp
            } else {
                f32::NAN
            };
            let (bits, val) = quantise(c.dtype, v);
            put(&mut mem, c.dtype, ptr, i, bits);
            *x = val as f64;
        }
    }
    if c.nan_q {
        let i = 2 * q_st[1] + 3;
        let (bits, _) = quantise(c.dtype, f32::NAN);
        put(&mut mem, c.dtype, q_ptr, i, bits);
        qv[i] = f64::NAN;
    }
    let width = sk - c.mask_pad;
    let (m_ptr, m_st, mvals) = match c.mask {
        MaskShape::None => (0, [0, 0, 0], Vec::new()),
        shape => {
            assert_eq!(c.seqs, Seqs::Whole, "masks come without sequence bounds");
            let (n, st) = match shape {
                MaskShape::Dense => (b * hq * sq * width, [hq * sq * width, sq * width, width]),
                MaskShape::PerBatch => (b * sq * width, [sq * width, 0, width]),
                _ => (b * width, [width, 0, 0]),
            };
            let eb = c.mask_kind.bytes() as usize;
            let ptr = mem.alloc(n * eb, 0);
            let mut vals = vec![0f64; n];
            for (i, x) in vals.iter_mut().enumerate() {
                let row = (i / width) % sq;
                let mut m = rng.next() * 2.0;
                let hidden = match shape {
                    MaskShape::Dense => row == 1 || rng.next() > 0.7,
                    MaskShape::Keys => rng.next() > 0.6,
                    _ => false,
                };
                if hidden {
                    m = f32::NEG_INFINITY;
                }
                let (bits, bias) = mask_elem(c.mask_kind, m);
                let o = mem.check(ptr + (i * eb) as u64, eb as u64);
                for k in 0..eb {
                    mem.bytes[o + k] = (bits >> (8 * k)) as u8;
                }
                *x = bias;
            }
            (ptr, st, vals)
        }
    };

    // lse `[B, Hq, Tq]` with gaps between rows, heads and batches, NaN
    // bytes throughout.
    let lse_st = [bstride(hq * (2 * tq + 1) + 3), 2 * tq + 1, 2];
    let lse_len = nb * (hq * (2 * tq + 1) + 3);
    let lse_ptr = if c.lse {
        mem.alloc(lse_len * 4, 0xFF)
    } else {
        0
    };

    // The sequence bounds.
    let mut bound_arrays = [0u64; 4];
    let put_i32s = |mem: &mut Memory, xs: &[usize]| {
        let ptr = mem.alloc(xs.len() * 4, 0);
        for (i, &x) in xs.iter().enumerate() {
            let o = mem.check(ptr + 4 * i as u64, 4);
            mem.bytes[o..o + 4].copy_from_slice(&(x as i32).to_le_bytes());
        }
        ptr
    };
    match c.seqs {
        Seqs::Whole => {}
        Seqs::Packed { .. } => {
            // cu_seqlens: start = cu, end = cu + 1 element.
            for (side, n) in [(0, 0), (1, 2)] {
                let mut cu: Vec<usize> = lay
                    .entries
                    .iter()
                    .map(|e| if side == 0 { e.0 .0 } else { e.1 .0 })
                    .collect();
                let last = lay.entries.last().unwrap();
                cu.push(if side == 0 {
                    last.0 .0 + last.0 .1
                } else {
                    last.1 .0 + last.1 .1
                });
                let ptr = put_i32s(&mut mem, &cu);
                bound_arrays[n] = ptr;
                bound_arrays[n + 1] = ptr + 4;
            }
        }
        Seqs::KeyRuns { k } => {
            let starts: Vec<usize> = k[..b].iter().map(|r| r.0).collect();
            let ends: Vec<usize> = k[..b].iter().map(|r| r.1).collect();
            bound_arrays[2] = put_i32s(&mut mem, &starts);
            bound_arrays[3] = put_i32s(&mut mem, &ends);
        }
    }

    let name = kernel.name().to_string();
    let mut params: HashMap<String, u64> = HashMap::new();
    let mut set = |n: &str, v: u64| {
        params.insert(format!("{name}_{n}"), v);
    };
    set("q", q_ptr);
    set("k", k_ptr);
    set("v", v_ptr);
    set("out", o_ptr);
    set("mask", m_ptr);
    for (t, st) in [("q", q_st), ("k", kv_st), ("v", kv_st), ("out", q_st)] {
        for (dim, x) in ["b", "s", "h"].iter().zip(st) {
            set(&format!("{t}_stride_{dim}"), x as u64);
        }
    }
    for (dim, x) in ["b", "h", "q"].iter().zip(m_st) {
        set(&format!("mask_stride_{dim}"), x as u64);
    }
    set("lse", lse_ptr);
    for (dim, x) in ["b", "h", "q"].iter().zip(lse_st) {
        set(&format!("lse_stride_{dim}"), x as u64);
    }
    for (n, ptr) in ["q_start", "q_end", "k_start", "k_end"]
        .iter()
        .zip(bound_arrays)
    {
        set(n, ptr);
    }
    set("seq_q", sq as u64);
    set("seq_k", sk as u64);
    set("tokens_q", tq as u64);
    set("tokens_k", tk as u64);
    set("mask_kind", c.mask_kind.code() as u64);
    set("mask_pad", c.mask_pad as u64);
    set("mask_batches", 0);
    set("group", (hq / hkv) as u64);
    set(
        "scale_log2",
        (c.scale * std::f32::consts::LOG2_E).to_bits() as u64,
    );
    assert_eq!(params.len(), PARAMS.len() + 1);

    // Renumber the registers densely over all classes, so that a
    // register's id is its slot.
    let mut labels = HashMap::new();
    let mut slots: HashMap<Reg, u32> = HashMap::new();
    let mut body = body.to_vec();
    for (pc, i) in body.iter_mut().enumerate() {
        if let Instr::Label(l) = i {
            labels.insert(l.clone(), pc);
        }
        regs_of(i, &mut |r| {
            let n = slots.len() as u32;
            r.id = *slots.entry(*r).or_insert(n);
        });
    }
    let body = &body[..];

    let block_m = plan.block_m() as usize;
    for bz in 0..b {
        for hy in 0..hq {
            for bx in 0..sq.div_ceil(block_m) {
                let mut cta = Cta {
                    body,
                    labels: &labels,
                    params: &params,
                    ctaid: [bx as u32, hy as u32, bz as u32],
                    regs: vec![vec![0; N]; slots.len()],
                    init: vec![vec![false; N]; slots.len()],
                    // Shared memory starts as NaN garbage.
                    smem: vec![0xFF; plan.smem_bytes() as usize],
                };
                cta.run(&mut mem);
            }
        }
    }

    // The reference, in f64, in each batch entry's local positions.
    let group = hq / hkv;
    let (mut num, mut den) = (0f64, 0f64);
    let mut lse_written = vec![false; if c.lse { lse_len } else { 0 }];
    let mut out_written = vec![false; nb * tq * hq];
    for (bi, &((qs, ql), (ks, kl), tb)) in lay.entries.iter().enumerate() {
        for h in 0..hq {
            let kh = h / group;
            for i in 0..ql {
                let qrow = tb * tq * hq * d + (qs + i) * q_st[1] + h * q_st[2];
                out_written[(tb * tq + qs + i) * hq + h] = true;
                let mut sc = vec![f64::NEG_INFINITY; kl];
                for (j, s) in sc.iter_mut().enumerate() {
                    let krow = tb * hkv * tk * d + (ks + j) * kv_st[1] + kh * kv_st[2];
                    let mut dot = 0.0;
                    for x in 0..d {
                        dot += qv[qrow + x] * kv[krow + x];
                    }
                    *s = c.scale as f64 * dot;
                    if c.mask != MaskShape::None && j >= c.mask_pad {
                        *s += mvals[bi * m_st[0] + h * m_st[1] + i * m_st[2] + j - c.mask_pad];
                    }
                    if c.causal && j > i {
                        *s = f64::NEG_INFINITY;
                    }
                }
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let has_nan = sc.iter().any(|s| s.is_nan());
                let mut out = vec![0f64; d];
                let mut lse = f64::NEG_INFINITY;
                if has_nan {
                    out.fill(f64::NAN);
                    lse = f64::NAN;
                } else if mx > f64::NEG_INFINITY {
                    let mut sum = 0.0;
                    for (j, &s) in sc.iter().enumerate() {
                        let p = (s - mx).exp();
                        sum += p;
                        let vrow = tb * hkv * tk * d + (ks + j) * kv_st[1] + kh * kv_st[2];
                        for x in 0..d {
                            out[x] += p * vv[vrow + x];
                        }
                    }
                    for o in &mut out {
                        *o /= sum;
                    }
                    lse = mx + sum.ln();
                }
                if c.lse {
                    let n = tb * (hq * (2 * tq + 1) + 3) + h * lse_st[1] + (qs + i) * lse_st[2];
                    lse_written[n] = true;
                    let got = get(&mem, DType::F32, lse_ptr, n);
                    let at = format!("{c:?}: lse ({bi},{h},{i})");
                    if lse.is_nan() {
                        assert!(got.is_nan(), "{at}: want NaN, got {got}");
                    } else if lse == f64::NEG_INFINITY {
                        assert_eq!(got, f64::NEG_INFINITY, "{at}");
                    } else {
                        let err = (got - lse).abs();
                        assert!(err <= 2e-5 * (1.0 + lse.abs()), "{at}: {got} vs {lse}");
                    }
                }
                for (x, &want) in out.iter().enumerate() {
                    let got = get(&mem, c.dtype, o_ptr, qrow + x);
                    if want.is_nan() {
                        assert!(
                            got.is_nan(),
                            "{c:?}: ({bi},{i},{h},{x}) want NaN, got {got}"
                        );
                    } else if mx == f64::NEG_INFINITY {
                        assert_eq!(got.to_bits(), 0, "{c:?}: masked row ({bi},{i},{h})");
                    } else {
                        assert!(got.is_finite(), "{c:?}: ({bi},{i},{h},{x}) got {got}");
                        num += (got - want).powi(2);
                        den += want.powi(2);
                    }
                }
            }
        }
    }
    // Nothing is written outside the sequences' rows, nor between the
    // rows of the lse.
    for (n, written) in out_written.iter().enumerate() {
        if !written {
            let row = n * d * es;
            let o = mem.check(o_ptr + row as u64, (d * es) as u64);
            assert!(
                mem.bytes[o..o + d * es].iter().all(|&x| x == 0xFF),
                "{c:?}: out row (token, head) {n} outside the sequences was written"
            );
        }
    }
    for (n, written) in lse_written.iter().enumerate() {
        let untouched = get(&mem, DType::F32, lse_ptr, n).is_nan();
        assert!(*written || untouched, "{c:?}: lse gap {n} was written");
    }
    let err = (num / den.max(1e-30)).sqrt();
    let tol = match c.dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
    };
    assert!(err <= tol, "{c:?}: relative L2 error {err}");
    err
}

/// Applies `f` to every register an instruction names.
fn regs_of(i: &mut Instr, f: &mut dyn FnMut(&mut Reg)) {
    let op = |o: &mut Operand, f: &mut dyn FnMut(&mut Reg)| {
        if let Operand::Reg(r) = o {
            f(r)
        }
    };
    match i {
        Instr::Guard { pred, instr, .. } => {
            f(pred);
            regs_of(instr, f);
        }
        Instr::LdParam { dst, .. } => f(dst),
        Instr::Mov { dst, src, .. } => {
            f(dst);
            op(src, f);
        }
        Instr::Bin { dst, a, b, .. } | Instr::Setp { dst, a, b, .. } => {
            f(dst);
            op(a, f);
            op(b, f);
        }
        Instr::Mad { dst, a, b, c, .. } => {
            f(dst);
            op(a, f);
            op(b, f);
            op(c, f);
        }
        Instr::Un { dst, a, .. } => {
            f(dst);
            op(a, f);
        }
        Instr::Selp {
            dst, a, b, pred, ..
        } => {
            f(dst);
            op(a, f);
            op(b, f);
            f(pred);
        }
        Instr::Cvt { dst, src, .. } => {
            f(dst);
            op(src, f);
        }
        Instr::CvtPack { dst, hi, lo, .. } => {
            f(dst);
            f(hi);
            f(lo);
        }
        Instr::Unpack { lo, hi, src } => {
            f(lo);
            f(hi);
            f(src);
        }
        Instr::Ld { dst, addr, .. } => {
            dst.iter_mut().for_each(&mut *f);
            op(&mut addr.base, f);
        }
        Instr::St { src, addr, .. } => {
            src.iter_mut().for_each(&mut *f);
            op(&mut addr.base, f);
        }
        Instr::ShflBfly { dst, src, .. } => {
            f(dst);
            f(src);
        }
        _ => {}
    }
}

fn case(d: usize, causal: bool, dtype: DType, sq: usize, sk: usize) -> Case {
    Case {
        d,
        causal,
        dtype,
        b: 2,
        hq: 4,
        hkv: 2,
        sq,
        sk,
        mask: MaskShape::None,
        mask_kind: MaskKind::F32,
        mask_pad: 0,
        seqs: Seqs::Whole,
        nan_q: false,
        lse: true,
        scale: 1.0 / (d as f32).sqrt(),
    }
}

#[test]
fn interpreted_kernel_matches_the_reference_f32() {
    for d in [8, 40, 64, 80, 128, 136, 256] {
        for causal in [false, true] {
            // Ragged Sq and Sk, more than one key tile.
            let plan = Plan::new(d as u32);
            let sk = plan.tile as usize + 13;
            check(case(d, causal, DType::F32, 37, sk));
        }
    }
}

#[test]
fn interpreted_kernel_matches_the_reference_16_bit() {
    for dtype in [DType::F16, DType::BF16] {
        for d in [8, 48, 128, 136, 160] {
            check(case(d, d % 16 == 0, dtype, 21, 45));
        }
    }
}

#[test]
fn causal_with_unequal_lengths() {
    // Sq > Sk: rows past Sk see every key; Sq < Sk: later keys unseen.
    for (sq, sk) in [(150, 30), (20, 100), (129, 129)] {
        check(case(64, true, DType::F32, sq, sk));
        check(case(128, true, DType::F32, sq, sk));
    }
}

#[test]
fn masks_fully_masked_rows_and_nan() {
    for d in [16, 96, 192] {
        for causal in [false, true] {
            let mut c = case(d, causal, DType::F32, 35, 41);
            c.mask = MaskShape::Dense;
            check(c);
            c.mask = MaskShape::PerBatch;
            check(c);
            c.mask = MaskShape::None;
            c.nan_q = true;
            check(c);
        }
    }
    let mut c = case(64, false, DType::BF16, 33, 70);
    c.mask = MaskShape::Dense;
    c.nan_q = true;
    check(c);
}

#[test]
fn mqa_and_one_key() {
    let mut c = case(32, false, DType::F32, 5, 1);
    c.hkv = 1;
    check(c);
    // No lse asked for: nothing is stored through the null pointer (the
    // interpreter would refuse the access).
    c.lse = false;
    check(c);
    let mut c = case(32, true, DType::F16, 70, 1);
    c.hkv = 1;
    c.b = 1;
    check(c);
}

#[test]
fn packed_variable_lengths_with_an_empty_sequence() {
    // cu_seqlens over packed tensors (batch strides 0): ragged lengths, an
    // empty query sequence, an empty key sequence, one longer than a CTA.
    let seqs = Seqs::Packed {
        q: [37, 0, 150, 5],
        k: [45, 12, 70, 0],
    };
    for causal in [false, true] {
        for (d, dtype) in [(64, DType::F32), (128, DType::F16)] {
            let mut c = case(d, causal, dtype, 0, 0);
            c.b = 4;
            c.seqs = seqs;
            check(c);
        }
    }
    // Causal with more keys than queries and the reverse, in one batch.
    let mut c = case(40, true, DType::BF16, 0, 0);
    c.b = 3;
    c.seqs = Seqs::Packed {
        q: [9, 70, 33, 0],
        k: [60, 20, 33, 0],
    };
    check(c);
}

#[test]
fn key_runs_over_a_padded_layout() {
    // k_start/k_end pick each entry's keys out of the padded [B, Sk]
    // layout; the padding holds NaN, which must never be read.
    for causal in [false, true] {
        let mut c = case(64, causal, DType::F32, 33, 80);
        c.seqs = Seqs::KeyRuns {
            k: [(5, 62), (0, 80)],
        };
        check(c);
        c.dtype = DType::BF16;
        c.seqs = Seqs::KeyRuns {
            k: [(80, 80), (17, 18)],
        };
        check(c);
    }
}

#[test]
fn every_mask_kind_with_front_padding_and_broadcasts() {
    for kind in MaskKind::ALL {
        for (shape, pad) in [
            (MaskShape::Dense, 0),
            (MaskShape::Dense, 7),
            (MaskShape::PerBatch, 3),
            (MaskShape::Keys, 11),
        ] {
            let mut c = case(32, shape == MaskShape::Keys, DType::F32, 35, 41);
            c.mask = shape;
            c.mask_kind = kind;
            c.mask_pad = pad;
            check(c);
        }
    }
    // A 16-bit variant and more than one key tile.
    let mut c = case(128, false, DType::F16, 20, 90);
    c.mask = MaskShape::Dense;
    c.mask_kind = MaskKind::Bf16;
    c.mask_pad = 5;
    check(c);
    c.mask_kind = MaskKind::U8;
    check(c);
}

//! A PTX interpreter for tests: runs the instructions a kernel emitter
//! produced ([`crate::ptx::Kernel::body`]) for one CTA at a time, every
//! thread in lock step, over a flat device memory ([`Memory`]).
//!
//! The model: branches and exits must be uniform over the CTA (the
//! interpreter refuses divergent ones), barriers are no-ops in lock step,
//! shuffles run with every lane. [`forward`] holds the forward kernels'
//! harness: random cases, a float64 reference, and the checks.

pub mod forward;

use crate::ptx::{BinOp, Cmp, Instr, Kernel, Operand, Reg, Special, StateSpace, Ty, UnOp};
use std::collections::HashMap;

pub fn f16_to_f32(h: u16) -> f32 {
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

pub fn f32_to_f16(x: f32) -> u16 {
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

pub fn f32_to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7fc0;
    }
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

pub fn bf16_to_f32(h: u16) -> f32 {
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
#[derive(Default)]
pub struct Memory {
    pub bytes: Vec<u8>,
    allocs: Vec<(u64, u64)>,
}

const HEAP: u64 = 0x1_0000;

impl Memory {
    pub fn new() -> Memory {
        Memory {
            bytes: Vec::new(),
            allocs: Vec::new(),
        }
    }
    pub fn alloc(&mut self, len: usize, fill: u8) -> u64 {
        // 256-byte aligned, with a gap between allocations.
        let start = (self.bytes.len() as u64).div_ceil(256) * 256 + 256;
        self.bytes.resize(start as usize, 0xEE);
        self.bytes.resize(start as usize + len, fill);
        self.allocs.push((HEAP + start, HEAP + start + len as u64));
        HEAP + start
    }
    pub fn check(&self, addr: u64, n: u64) -> usize {
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

/// Runs one CTA of `threads` threads in lock step. Branches must be
/// uniform over the CTA, shuffles must run with every lane.
pub struct Cta<'a> {
    pub prog: &'a Program,
    pub params: &'a HashMap<String, u64>,
    pub ctaid: [u32; 3],
    pub nctaid: [u32; 3],
    pub threads: usize,
    regs: Vec<Vec<u64>>,
    init: Vec<Vec<bool>>,
    pub smem: Vec<u8>,
}

impl<'a> Cta<'a> {
    /// A CTA at `ctaid` of a grid of `nctaid`, its shared memory
    /// `smem_bytes` of NaN garbage (0xFF bytes).
    pub fn new(
        prog: &'a Program,
        params: &'a HashMap<String, u64>,
        ctaid: [u32; 3],
        nctaid: [u32; 3],
        threads: usize,
        smem_bytes: usize,
    ) -> Cta<'a> {
        Cta {
            prog,
            params,
            ctaid,
            nctaid,
            threads,
            regs: vec![vec![0; threads]; prog.slots],
            init: vec![vec![false; threads]; prog.slots],
            smem: vec![0xFF; smem_bytes],
        }
    }

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
            Operand::Special(Special::NCtaIdX) => self.nctaid[0] as u64,
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

    pub fn run(&mut self, mem: &mut Memory) {
        let mut pc = 0;
        loop {
            let instr = &self.prog.body[pc];
            pc += 1;
            let n_threads = self.threads;
            let (active, inner): (Vec<bool>, &Instr) = match instr {
                Instr::Guard {
                    pred,
                    negate,
                    instr,
                } => {
                    let mut a = vec![false; n_threads];
                    for (t, x) in a.iter_mut().enumerate() {
                        *x = (self.read(&Operand::Reg(*pred), t) != 0) != *negate;
                    }
                    (a, instr)
                }
                i => (vec![true; n_threads], i),
            };
            match inner {
                Instr::Comment(_) | Instr::Label(_) => {}
                Instr::Bra { target, .. } => {
                    let n = active.iter().filter(|&&x| x).count();
                    assert!(n == 0 || n == n_threads, "divergent branch to {target}");
                    if n == n_threads {
                        pc = self.prog.labels[target];
                    }
                }
                Instr::Ret => {
                    // The whole CTA leaves, or none of it.
                    let n = active.iter().filter(|&&x| x).count();
                    assert!(n == 0 || n == n_threads, "divergent exit");
                    if n == n_threads {
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
                    let vals: Vec<u64> = (0..n_threads)
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

/// A kernel's body ready to run: registers renumbered densely over all
/// classes (a register's id is its slot), labels resolved.
pub struct Program {
    pub body: Vec<Instr>,
    pub labels: HashMap<String, usize>,
    pub slots: usize,
}

impl Program {
    pub fn new(kernel: &Kernel) -> Program {
        let mut labels = HashMap::new();
        let mut slots: HashMap<Reg, u32> = HashMap::new();
        let mut body = kernel.body().to_vec();
        for (pc, i) in body.iter_mut().enumerate() {
            if let Instr::Label(l) = i {
                labels.insert(l.clone(), pc);
            }
            regs_of(i, &mut |r| {
                let n = slots.len() as u32;
                r.id = *slots.entry(*r).or_insert(n);
            });
        }
        Program {
            body,
            labels,
            slots: slots.len(),
        }
    }
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

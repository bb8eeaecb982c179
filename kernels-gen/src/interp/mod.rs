//! A PTX interpreter for tests: runs the instructions a kernel emitter
//! produced ([`crate::ptx::Kernel::body`]) for one CTA at a time, every
//! thread in lock step, over a flat device memory ([`Memory`]).
//!
//! The model: branches and exits must be uniform over the CTA (the
//! interpreter refuses divergent ones), barriers are no-ops in lock step,
//! shuffles run with every lane. [`forward`] holds the forward kernels'
//! harness: random cases, a float64 reference, and the checks; [`backward`]
//! the backward's.

pub mod backward;
pub mod forward;

use crate::ptx::{
    Addr, BinOp, Cmp, Instr, Kernel, MmaShape, Operand, Reg, Special, StateSpace, Ty, UnOp, WgmmaA,
};
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

/// Runs one CTA of `threads` threads in lock step: each instruction runs
/// for every live thread at once. Branches must be uniform over the CTA
/// unless `divergence` allows otherwise; then the threads at the lowest
/// instruction run first, so that paths that split join again (forward
/// branches, loops within one path). Barriers must be reached by every
/// live thread, warp-collective instructions (shuffles, `ldmatrix`,
/// `mma`) by whole warps.
pub struct Cta<'a> {
    pub prog: &'a Program,
    pub params: &'a HashMap<String, u64>,
    pub ctaid: [u32; 3],
    pub nctaid: [u32; 3],
    pub threads: usize,
    /// Allows branches and exits that split the CTA.
    pub divergence: bool,
    regs: Vec<Vec<u64>>,
    init: Vec<Vec<bool>>,
    pub smem: Vec<u8>,
}

/// How a grid is launched: its size, the threads and shared memory of each
/// CTA, and whether its CTAs may diverge ([`Cta::divergence`]).
#[derive(Clone, Copy, Debug)]
pub struct Grid {
    pub size: [usize; 3],
    pub threads: usize,
    pub smem_bytes: usize,
    pub divergence: bool,
}

/// Runs every CTA of `grid` one after another in the hardware's linear
/// order (x fastest, then y, then z) against `mem`.
pub fn launch(prog: &Program, params: &HashMap<String, u64>, grid: Grid, mem: &mut Memory) {
    let nctaid = grid.size.map(|x| x as u32);
    for z in 0..grid.size[2] {
        for y in 0..grid.size[1] {
            for x in 0..grid.size[0] {
                let ctaid = [x as u32, y as u32, z as u32];
                let mut cta = Cta::new(prog, params, ctaid, nctaid, grid.threads, grid.smem_bytes);
                cta.divergence = grid.divergence;
                cta.run(mem);
            }
        }
    }
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
            divergence: false,
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
        let prog = self.prog;
        let n = self.threads;
        let mut pc = vec![0usize; n];
        let mut live = vec![true; n];
        let mut group = vec![false; n];
        let mut active = vec![false; n];
        let mut acquires = 0usize;
        loop {
            // The live threads at the lowest pc run the next instruction:
            // threads that branched apart run one path, then the other,
            // and meet again where the paths join.
            let Some(at) = (0..n).filter(|&t| live[t]).map(|t| pc[t]).min() else {
                return;
            };
            let mut converged = true;
            for t in 0..n {
                group[t] = live[t] && pc[t] == at;
                converged &= group[t] == live[t];
                if group[t] {
                    pc[t] = at + 1;
                }
            }
            assert!(
                converged || self.divergence,
                "divergent control flow at {}",
                prog.body[at]
            );
            let inner = match &prog.body[at] {
                Instr::Guard {
                    pred,
                    negate,
                    instr,
                } => {
                    for t in 0..n {
                        active[t] =
                            group[t] && (self.read(&Operand::Reg(*pred), t) != 0) != *negate;
                    }
                    &**instr
                }
                i => {
                    active.copy_from_slice(&group);
                    i
                }
            };
            let taken = active.iter().filter(|&&x| x).count();
            let all = taken == group.iter().filter(|&&x| x).count();
            match inner {
                Instr::Comment(_) | Instr::Label(_) => {}
                Instr::Bra { target, .. } => {
                    assert!(
                        taken == 0 || all || self.divergence,
                        "divergent branch to {target}"
                    );
                    for t in 0..n {
                        if active[t] {
                            pc[t] = prog.labels[target];
                        }
                    }
                }
                Instr::Ret => {
                    // Without divergence the whole CTA leaves, or none of it.
                    assert!(taken == 0 || all || self.divergence, "divergent exit");
                    for t in 0..n {
                        live[t] &= !active[t];
                    }
                }
                Instr::BarSync(_) | Instr::BarSyncCount { .. } | Instr::NamedBarrier { .. } => {
                    assert!(all, "predicated barrier");
                    assert!(converged, "a barrier that part of the CTA passed by");
                }
                // Asynchronous copies complete when issued; fences order
                // nothing in a sequential machine.
                Instr::CpAsyncCommit | Instr::CpAsyncWait(_) | Instr::FenceGpu => {}
                Instr::ShflBfly {
                    dst,
                    src,
                    lane_mask,
                } => {
                    for w in self.warps(&active, "shfl") {
                        let vals: Vec<u64> = (w..w + 32)
                            .map(|t| self.read(&Operand::Reg(*src), t ^ *lane_mask as usize))
                            .collect();
                        for (l, v) in vals.into_iter().enumerate() {
                            self.write(*dst, w + l, v & 0xffff_ffff);
                        }
                    }
                }
                Instr::Ldmatrix { trans, dst, addr } => {
                    for w in self.warps(&active, "ldmatrix") {
                        self.ldmatrix(w, *trans, dst, addr);
                    }
                }
                Instr::Mma {
                    shape,
                    ab,
                    d,
                    a,
                    b,
                    c,
                } => {
                    for w in self.warps(&active, "mma") {
                        self.mma(w, *shape, *ab, d, a, b, c);
                    }
                }
                i => {
                    if matches!(i, Instr::LdAcquire { .. }) {
                        // Run in grid order, a counter's turn has come
                        // before anyone reads it: a spin never ends.
                        acquires += taken;
                        assert!(acquires < 64, "spinning on {i}: its turn never comes");
                    }
                    for (t, &on) in active.iter().enumerate() {
                        if on {
                            self.exec(i, t, mem);
                        }
                    }
                }
            }
        }
    }

    /// The first threads of the warps that run a warp-collective
    /// instruction: each warp's lanes all run it or none does.
    fn warps(&self, active: &[bool], what: &str) -> Vec<usize> {
        assert_eq!(self.threads % 32, 0);
        (0..self.threads)
            .step_by(32)
            .filter(|&w| {
                let n = active[w..w + 32].iter().filter(|&&x| x).count();
                assert!(n == 0 || n == 32, "{what} with part of a warp");
                n == 32
            })
            .collect()
    }

    /// `ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16` for the warp of
    /// first thread `w`: lanes `8i..8i + 8` give the row addresses of
    /// matrix `i`; lane `l` receives, in register `i`, row `l / 4`
    /// elements `2 (l % 4)` and `2 (l % 4) + 1` of matrix `i` (low half
    /// first), or with `.trans` column `l / 4` rows `2 (l % 4)` and
    /// `2 (l % 4) + 1`.
    fn ldmatrix(&mut self, w: usize, trans: bool, dst: &[Reg], addr: &Addr) {
        assert!(matches!(dst.len(), 1 | 2 | 4), "ldmatrix x{}", dst.len());
        let mut vals = vec![[0u64; 4]; 32];
        for (m, _) in dst.iter().enumerate() {
            let mut e = [[0u16; 8]; 8];
            for (r, row) in e.iter_mut().enumerate() {
                let a = self
                    .read(&addr.base, w + 8 * m + r)
                    .wrapping_add(addr.offset as u64);
                assert_eq!(a % 16, 0, "misaligned ldmatrix row {a:#x}");
                assert!(a + 16 <= self.smem.len() as u64, "ldmatrix smem OOB {a:#x}");
                for (c, x) in row.iter_mut().enumerate() {
                    let o = a as usize + 2 * c;
                    *x = u16::from_le_bytes([self.smem[o], self.smem[o + 1]]);
                }
            }
            for (lane, v) in vals.iter_mut().enumerate() {
                let (g, q) = (lane / 4, lane % 4);
                let (lo, hi) = if trans {
                    (e[2 * q][g], e[2 * q + 1][g])
                } else {
                    (e[g][2 * q], e[g][2 * q + 1])
                };
                v[m] = lo as u64 | (hi as u64) << 16;
            }
        }
        for (lane, v) in vals.iter().enumerate() {
            for (m, &r) in dst.iter().enumerate() {
                self.write(r, w + lane, v[m]);
            }
        }
    }

    /// `mma.sync.aligned.m16n8k{16,8}.row.col.f32.ab.ab.f32` for the warp
    /// of first thread `w`, with the PTX ISA's fragment layouts (`g = lane
    /// / 4`, `q = lane % 4`): A register `i` holds row `g + 8 (i % 2)`,
    /// columns `2q + 8 (i / 2)` and one more (low half first); B register
    /// `i` holds column `g`, rows `2q + 8i` and one more; C and D register
    /// `i` hold row `g + 8 (i / 2)`, column `2q + i % 2`. The products are
    /// exact and summed in f64, rounded once to f32.
    #[allow(clippy::too_many_arguments)]
    fn mma(
        &mut self,
        w: usize,
        shape: MmaShape,
        ab: Ty,
        d: &[Reg; 4],
        a: &[Reg],
        b: &[Reg],
        c: &[Reg; 4],
    ) {
        let kk = match shape {
            MmaShape::M16N8K16 => 16,
            MmaShape::M16N8K8 => 8,
        };
        assert_eq!((a.len(), b.len()), (kk / 4, kk / 8), "mma fragments");
        let half = |x: u64| -> f64 {
            let h = x as u16;
            match ab {
                Ty::BF16 => bf16_to_f32(h) as f64,
                Ty::F16 => f16_to_f32(h) as f64,
                _ => panic!("mma of {ab}"),
            }
        };
        let mut am = [[0f64; 16]; 16];
        let mut bm = [[0f64; 8]; 16];
        let mut cm = [[0f64; 8]; 16];
        for lane in 0..32 {
            let (g, q) = (lane / 4, lane % 4);
            let t = w + lane;
            for (i, r) in a.iter().enumerate() {
                let x = self.read(&Operand::Reg(*r), t);
                let (row, col) = (g + 8 * (i % 2), 2 * q + 8 * (i / 2));
                am[row][col] = half(x);
                am[row][col + 1] = half(x >> 16);
            }
            for (i, r) in b.iter().enumerate() {
                let x = self.read(&Operand::Reg(*r), t);
                let row = 2 * q + 8 * i;
                bm[row][g] = half(x);
                bm[row + 1][g] = half(x >> 16);
            }
            for (i, r) in c.iter().enumerate() {
                let x = self.read(&Operand::Reg(*r), t);
                cm[g + 8 * (i / 2)][2 * q + i % 2] = f32::from_bits(x as u32) as f64;
            }
        }
        for lane in 0..32 {
            let (g, q) = (lane / 4, lane % 4);
            for (i, r) in d.iter().enumerate() {
                let (row, col) = (g + 8 * (i / 2), 2 * q + i % 2);
                let mut s = cm[row][col];
                for k in 0..kk {
                    s += am[row][k] * bm[k][col];
                }
                self.write(*r, w + lane, (s as f32).to_bits() as u64);
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
            Instr::LdAcquire { dst, addr } | Instr::LdRelaxed { dst, addr } => {
                let a = self.read(&addr.base, t).wrapping_add(addr.offset as u64);
                assert_eq!(a % 4, 0, "misaligned {i}");
                let o = mem.check(a, 4);
                let v = u32::from_le_bytes(mem.bytes[o..o + 4].try_into().unwrap());
                self.write(*dst, t, v as u64);
            }
            Instr::StRelease { addr, src } => {
                let a = self.read(&addr.base, t).wrapping_add(addr.offset as u64);
                assert_eq!(a % 4, 0, "misaligned {i}");
                let v = self.read(src, t) as u32;
                let o = mem.check(a, 4);
                mem.bytes[o..o + 4].copy_from_slice(&v.to_le_bytes());
            }
            Instr::RedAddF32 { addr, src } => {
                let a = self.read(&addr.base, t).wrapping_add(addr.offset as u64);
                assert_eq!(a % 4, 0, "misaligned {i}");
                let x = f(self.read(&Operand::Reg(*src), t));
                let o = mem.check(a, 4);
                let old = f32::from_le_bytes(mem.bytes[o..o + 4].try_into().unwrap());
                mem.bytes[o..o + 4].copy_from_slice(&(old + x).to_le_bytes());
            }
            Instr::CpAsync16 { dst, src, src_size } => {
                // The copy completes at once: `src_size` bytes read, the
                // rest of the 16 zero-filled; nothing read for 0.
                let n = self.read(src_size, t) as u32 as usize;
                assert!(n <= 16, "cp.async source size {n}");
                let d = self.read(&dst.base, t).wrapping_add(dst.offset as u64);
                let s = self.read(&src.base, t).wrapping_add(src.offset as u64);
                assert_eq!(d % 16, 0, "misaligned {i}");
                assert!(d + 16 <= self.smem.len() as u64, "smem OOB {i}");
                let mut chunk = [0u8; 16];
                if n > 0 {
                    assert_eq!(s % 16, 0, "misaligned {i}");
                    let o = mem.check(s, n as u64);
                    chunk[..n].copy_from_slice(&mem.bytes[o..o + n]);
                }
                self.smem[d as usize..d as usize + 16].copy_from_slice(&chunk);
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

/// Applies `f` to every register an instruction names (every variant is
/// listed: a new instruction must say which registers it names).
fn regs_of(i: &mut Instr, f: &mut dyn FnMut(&mut Reg)) {
    fn op(o: &mut Operand, f: &mut dyn FnMut(&mut Reg)) {
        if let Operand::Reg(r) = o {
            f(r)
        }
    }
    fn regs(rs: &mut [Reg], f: &mut dyn FnMut(&mut Reg)) {
        rs.iter_mut().for_each(f);
    }
    match i {
        Instr::Guard { pred, instr, .. } => {
            f(pred);
            regs_of(instr, f);
        }
        Instr::LdParam { dst, .. } | Instr::CvtaParam { dst, .. } => f(dst),
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
            regs(dst, f);
            op(&mut addr.base, f);
        }
        Instr::St { src, addr, .. } => {
            regs(src, f);
            op(&mut addr.base, f);
        }
        Instr::CpAsync16 { dst, src, src_size } => {
            op(&mut dst.base, f);
            op(&mut src.base, f);
            op(src_size, f);
        }
        Instr::Ldmatrix { dst, addr, .. } => {
            regs(dst, f);
            op(&mut addr.base, f);
        }
        Instr::Mma { d, a, b, c, .. } => {
            regs(d, f);
            regs(a, f);
            regs(b, f);
            regs(c, f);
        }
        Instr::ShflBfly { dst, src, .. } => {
            f(dst);
            f(src);
        }
        Instr::NamedBarrier { id, .. } => op(id, f),
        Instr::Wgmma {
            d, a, b, scale_d, ..
        } => {
            regs(d, f);
            match a {
                WgmmaA::Desc { desc, .. } => f(desc),
                WgmmaA::Regs(rs) => regs(rs, f),
            }
            f(b);
            f(scale_d);
        }
        Instr::MbarInit { addr, .. } => op(&mut addr.base, f),
        Instr::MbarArrive { state, addr, .. } => {
            f(state);
            op(&mut addr.base, f);
        }
        Instr::TmaLoad {
            dst,
            map,
            coords,
            mbar,
        } => {
            f(dst);
            f(map);
            coords.iter_mut().for_each(|c| op(c, f));
            f(mbar);
        }
        Instr::MbarTryWait { done, addr, parity } => {
            f(done);
            op(&mut addr.base, f);
            op(parity, f);
        }
        Instr::VoteAll { dst, src } => {
            f(dst);
            f(src);
        }
        Instr::RedAddF32 { addr, src } => {
            op(&mut addr.base, f);
            f(src);
        }
        Instr::LdAcquire { dst, addr } | Instr::LdRelaxed { dst, addr } => {
            f(dst);
            op(&mut addr.base, f);
        }
        Instr::StRelease { addr, src } => {
            op(&mut addr.base, f);
            op(src, f);
        }
        Instr::Comment(_)
        | Instr::Label(_)
        | Instr::Bra { .. }
        | Instr::Ret
        | Instr::CpAsyncCommit
        | Instr::CpAsyncWait(_)
        | Instr::BarSync(_)
        | Instr::BarSyncCount { .. }
        | Instr::WgmmaFence
        | Instr::WgmmaCommit
        | Instr::WgmmaWait(_)
        | Instr::FenceProxyAsync
        | Instr::SetMaxNReg { .. }
        | Instr::FenceMbarrierInit
        | Instr::FenceGpu => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ptx::{Addr, Kernel, Special};

    /// Runs `ldmatrix` of `n` matrices (`trans` or not) over shared memory
    /// whose 16-bit element at byte `2e` is `e`, each lane pointing at row
    /// `lane` (rows of 16 bytes, matrix `m` being rows `8m..8m + 8`), and
    /// returns each lane's registers.
    fn ldmatrix(n: usize, trans: bool) -> Vec<Vec<u32>> {
        let mut k = Kernel::new("t");
        let out = k.param(Ty::U64, "out");
        let out = k.ld_param(Ty::U64, &out);
        let tid = k.mov(Ty::U32, Operand::Special(Special::TidX));
        let row = k.bin(BinOp::Shl, Ty::U32, tid, Operand::U(4));
        let dst = k.regs(Ty::B32, n);
        k.push(Instr::Ldmatrix {
            trans,
            dst: dst.clone(),
            addr: Addr::at(row, 0),
        });
        let at = k.bin(BinOp::MulWide, Ty::U32, tid, Operand::U(4 * n as u64));
        let at = k.bin(BinOp::Add, Ty::U64, at, out);
        for (i, &r) in dst.iter().enumerate() {
            k.push(Instr::St {
                space: StateSpace::Global,
                ty: Ty::B32,
                addr: Addr::at(at, 4 * i as i64),
                src: vec![r],
            });
        }
        k.push(Instr::Ret);
        let prog = Program::new(&k);
        let mut mem = Memory::new();
        let ptr = mem.alloc(32 * 4 * n, 0);
        let params = HashMap::from([("t_out".to_string(), ptr)]);
        let mut cta = Cta::new(&prog, &params, [0; 3], [1; 3], 32, 32 * 16);
        for (e, pair) in cta.smem.chunks_mut(2).enumerate() {
            pair.copy_from_slice(&(e as u16).to_le_bytes());
        }
        cta.run(&mut mem);
        (0..32)
            .map(|lane| {
                (0..n)
                    .map(|i| {
                        let o = mem.check(ptr + (4 * (lane * n + i)) as u64, 4);
                        u32::from_le_bytes(mem.bytes[o..o + 4].try_into().unwrap())
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn ldmatrix_gives_each_lane_a_row_pair_or_a_column_pair() {
        // Element (r, c) of matrix m is 64m + 8r + c; a register holds two
        // elements, the first in its low half.
        let pair = |lo: u32, hi: u32| lo | hi << 16;
        for n in [1, 2, 4] {
            let plain = ldmatrix(n, false);
            let trans = ldmatrix(n, true);
            for lane in 0..32u32 {
                let (g, q) = (lane / 4, lane % 4);
                for m in 0..n as u32 {
                    let e = |r: u32, c: u32| 64 * m + 8 * r + c;
                    let got = (
                        plain[lane as usize][m as usize],
                        trans[lane as usize][m as usize],
                    );
                    // Lane 5, matrix 0: row 1, columns 2 and 3 = 10, 11;
                    // transposed, rows 2 and 3 of column 1 = 17, 25.
                    let want = (
                        pair(e(g, 2 * q), e(g, 2 * q + 1)),
                        pair(e(2 * q, g), e(2 * q + 1, g)),
                    );
                    assert_eq!(got, want, "x{n} lane {lane} matrix {m}");
                }
            }
        }
        assert_eq!(ldmatrix(1, false)[5][0], 10 | 11 << 16);
        assert_eq!(ldmatrix(1, true)[5][0], 17 | 25 << 16);
    }
}

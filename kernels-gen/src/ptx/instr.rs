//! PTX instructions as values, each printing its own text.

use std::fmt;

use super::reg::{Param, Reg, Ty};

/// A special register readable with `mov`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Special {
    /// `%tid.x`.
    TidX,
    /// `%ctaid.x`.
    CtaIdX,
    /// `%ctaid.y`.
    CtaIdY,
    /// `%ctaid.z`.
    CtaIdZ,
    /// `%nctaid.x`.
    NCtaIdX,
}

impl fmt::Display for Special {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Special::TidX => "%tid.x",
            Special::CtaIdX => "%ctaid.x",
            Special::CtaIdY => "%ctaid.y",
            Special::CtaIdZ => "%ctaid.z",
            Special::NCtaIdX => "%nctaid.x",
        })
    }
}

/// A source operand.
#[derive(Clone, Debug, PartialEq)]
pub enum Operand {
    /// A register.
    Reg(Reg),
    /// An unsigned immediate.
    U(u64),
    /// A signed immediate.
    S(i64),
    /// A single-precision immediate, printed exactly as `0fXXXXXXXX`.
    F32(f32),
    /// A special register.
    Special(Special),
    /// The address of a named variable (a shared-memory array).
    Symbol(String),
}

impl From<Reg> for Operand {
    fn from(r: Reg) -> Self {
        Operand::Reg(r)
    }
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operand::Reg(r) => write!(f, "{r}"),
            Operand::U(x) => write!(f, "{x}"),
            Operand::S(x) => write!(f, "{x}"),
            Operand::F32(x) => write!(f, "0f{:08X}", x.to_bits()),
            Operand::Special(s) => write!(f, "{s}"),
            Operand::Symbol(s) => f.write_str(s),
        }
    }
}

/// A memory address: a register or symbol plus a byte offset.
#[derive(Clone, Debug, PartialEq)]
pub struct Addr {
    /// The base.
    pub base: Operand,
    /// A constant byte offset.
    pub offset: i64,
}

impl From<Reg> for Addr {
    fn from(r: Reg) -> Self {
        Addr {
            base: r.into(),
            offset: 0,
        }
    }
}

impl Addr {
    /// `base + offset` bytes.
    pub fn at(base: Reg, offset: i64) -> Addr {
        Addr {
            base: base.into(),
            offset,
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset {
            0 => write!(f, "[{}]", self.base),
            o if o > 0 => write!(f, "[{}+{o}]", self.base),
            o => write!(f, "[{}{o}]", self.base),
        }
    }
}

/// A state space of a load or store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateSpace {
    /// Device memory.
    Global,
    /// Device memory read through the non-coherent (read-only) cache.
    GlobalNc,
    /// The CTA's shared memory.
    Shared,
}

impl fmt::Display for StateSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StateSpace::Global => ".global",
            StateSpace::GlobalNc => ".global.nc",
            StateSpace::Shared => ".shared",
        })
    }
}

/// Two-operand arithmetic and logic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    /// `add`.
    Add,
    /// `sub`.
    Sub,
    /// `mul.lo` on integers, `mul` on floats.
    Mul,
    /// `mul.wide`: 32 × 32 → 64 bits (the type names the sources).
    MulWide,
    /// `min`.
    Min,
    /// `max`.
    Max,
    /// `and`.
    And,
    /// `or`.
    Or,
    /// `xor`.
    Xor,
    /// `shl`.
    Shl,
    /// `shr`.
    Shr,
    /// `div` (integers).
    Div,
    /// `rem` (integers).
    Rem,
}

/// One-operand operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    /// `ex2.approx.ftz.f32`: 2^x, `ex2(-inf) = +0`.
    Ex2,
    /// `rcp.rn.f32`: 1/x, correctly rounded.
    Rcp,
    /// `lg2.approx.ftz.f32`: log2(x), `lg2(+0) = -inf`.
    Lg2,
    /// `neg`.
    Neg,
    /// `not`.
    Not,
}

/// A comparison of `setp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    /// `==`.
    Eq,
    /// `!=`.
    Ne,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
}

impl fmt::Display for Cmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cmp::Eq => "eq",
            Cmp::Ne => "ne",
            Cmp::Lt => "lt",
            Cmp::Le => "le",
            Cmp::Gt => "gt",
            Cmp::Ge => "ge",
        })
    }
}

/// The shape of a warp-level `mma.sync`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmaShape {
    /// m16n8k16: A in 4 registers, B in 2.
    M16N8K16,
    /// m16n8k8: A in 2 registers, B in 1.
    M16N8K8,
}

/// The A operand of a `wgmma`: a shared-memory matrix descriptor or four
/// registers of packed 16-bit pairs (the m16n8k16 A fragment of each warp).
#[derive(Clone, Debug, PartialEq)]
pub enum WgmmaA {
    /// A 64-bit descriptor; `trans` reads A as M-major.
    Desc {
        /// The descriptor register.
        desc: Reg,
        /// `imm-trans-a`.
        trans: bool,
    },
    /// Four `.b32` registers.
    Regs([Reg; 4]),
}

/// One PTX instruction (or a label or comment).
#[derive(Clone, Debug, PartialEq)]
pub enum Instr {
    /// `// text`.
    Comment(String),
    /// `name:`.
    Label(String),
    /// `@p` / `@!p` in front of another instruction.
    Guard {
        /// The predicate.
        pred: Reg,
        /// Execute when the predicate is false.
        negate: bool,
        /// The guarded instruction.
        instr: Box<Instr>,
    },
    /// `bra[.uni] target;`.
    Bra {
        /// The label.
        target: String,
        /// All threads take the same path.
        uni: bool,
    },
    /// `ret;`.
    Ret,
    /// `ld.param.ty dst, [param];`.
    LdParam {
        /// The type.
        ty: Ty,
        /// Destination.
        dst: Reg,
        /// The kernel parameter.
        param: Param,
    },
    /// `mov.ty dst, src;`.
    Mov {
        /// The type.
        ty: Ty,
        /// Destination.
        dst: Reg,
        /// Source.
        src: Operand,
    },
    /// `op.ty dst, a, b;`.
    Bin {
        /// The operation.
        op: BinOp,
        /// The type (of the sources for `mul.wide`).
        ty: Ty,
        /// Destination.
        dst: Reg,
        /// First source.
        a: Operand,
        /// Second source.
        b: Operand,
    },
    /// `mad.lo.ty` / `mad.wide.ty` on integers, `fma.rn.f32` on floats:
    /// `dst = a * b + c`.
    Mad {
        /// The type (of `a` and `b` for the wide form).
        ty: Ty,
        /// 32 × 32 + 64 → 64 bits.
        wide: bool,
        /// Destination.
        dst: Reg,
        /// Factor.
        a: Operand,
        /// Factor.
        b: Operand,
        /// Addend.
        c: Operand,
    },
    /// `op.ty dst, a;`.
    Un {
        /// The operation.
        op: UnOp,
        /// The type.
        ty: Ty,
        /// Destination.
        dst: Reg,
        /// Source.
        a: Operand,
    },
    /// `setp.cmp.ty dst, a, b;`.
    Setp {
        /// The comparison.
        cmp: Cmp,
        /// The type of the sources.
        ty: Ty,
        /// The predicate written.
        dst: Reg,
        /// Left.
        a: Operand,
        /// Right.
        b: Operand,
    },
    /// `selp.ty dst, a, b, pred;`: `pred ? a : b`.
    Selp {
        /// The type.
        ty: Ty,
        /// Destination.
        dst: Reg,
        /// Value when true.
        a: Operand,
        /// Value when false.
        b: Operand,
        /// The predicate.
        pred: Reg,
    },
    /// `cvt[.rnd].dst_ty.src_ty dst, src;`.
    Cvt {
        /// Rounding (`rn`, `rzi`, ...) if any.
        rnd: Option<&'static str>,
        /// Destination type.
        dst_ty: Ty,
        /// Source type.
        src_ty: Ty,
        /// Destination.
        dst: Reg,
        /// Source.
        src: Operand,
    },
    /// `cvt.rn.{bf16x2,f16x2}.f32 dst, hi, lo;`: packs two `f32`, `hi` in
    /// the upper half.
    CvtPack {
        /// `BF16x2` or `F16x2`.
        ty: Ty,
        /// Destination.
        dst: Reg,
        /// Upper half.
        hi: Reg,
        /// Lower half.
        lo: Reg,
    },
    /// `ld.space[.vN].ty {dst..}, [addr];`.
    Ld {
        /// Where from.
        space: StateSpace,
        /// The element type.
        ty: Ty,
        /// Destinations (1, 2 or 4).
        dst: Vec<Reg>,
        /// The address.
        addr: Addr,
    },
    /// `st.space[.vN].ty [addr], {src..};`.
    St {
        /// Where to.
        space: StateSpace,
        /// The element type.
        ty: Ty,
        /// The address.
        addr: Addr,
        /// Sources (1, 2 or 4).
        src: Vec<Reg>,
    },
    /// `cp.async.cg.shared.global [dst], [src], 16, src_size;`: copies 16
    /// bytes, zero-filling past `src_size`.
    CpAsync16 {
        /// Shared-memory destination.
        dst: Addr,
        /// Global source.
        src: Addr,
        /// Bytes to read (0..=16); the rest is zero.
        src_size: Operand,
    },
    /// `cp.async.commit_group;`.
    CpAsyncCommit,
    /// `cp.async.wait_group n;`.
    CpAsyncWait(u32),
    /// `bar.sync id;`.
    BarSync(u32),
    /// `ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16 {dst..}, [addr];`.
    Ldmatrix {
        /// Transpose each 8×8 matrix.
        trans: bool,
        /// One register per matrix (1, 2 or 4).
        dst: Vec<Reg>,
        /// This lane's row address.
        addr: Addr,
    },
    /// `mma.sync.aligned.SHAPE.row.col.f32.AB.AB.f32 {d}, {a}, {b}, {c};`.
    Mma {
        /// The shape.
        shape: MmaShape,
        /// `BF16` or `F16`.
        ab: Ty,
        /// Accumulator out.
        d: [Reg; 4],
        /// A fragment.
        a: Vec<Reg>,
        /// B fragment.
        b: Vec<Reg>,
        /// Accumulator in.
        c: [Reg; 4],
    },
    /// `mov.b32 {lo, hi}, src;`: splits a 32-bit register into its two
    /// 16-bit halves (`lo` gets bits 0..16), e.g. two packed `f16`.
    Unpack {
        /// The lower half (a `.b16` register).
        lo: Reg,
        /// The upper half (a `.b16` register).
        hi: Reg,
        /// The packed 32 bits.
        src: Reg,
    },
    /// `shfl.sync.bfly.b32 dst, src, lane_mask, 31, 0xffffffff;`.
    ShflBfly {
        /// Destination.
        dst: Reg,
        /// Source.
        src: Reg,
        /// The xor distance.
        lane_mask: u32,
    },
    /// `bar.sync id, threads;`: a named barrier over `threads` threads (a
    /// multiple of 32).
    BarSyncCount {
        /// The barrier (0..16).
        id: u32,
        /// Threads taking part.
        threads: u32,
    },
    /// `bar.sync id, threads;` or `bar.arrive id, threads;` with the
    /// barrier given by an operand (a register or an immediate).
    NamedBarrier {
        /// Arrive without waiting.
        arrive: bool,
        /// The barrier (0..16).
        id: Operand,
        /// Threads taking part.
        threads: u32,
    },
    /// `wgmma.fence.sync.aligned;`: orders register accesses before the
    /// next `wgmma` of the warpgroup.
    WgmmaFence,
    /// `wgmma.commit_group.sync.aligned;`.
    WgmmaCommit,
    /// `wgmma.wait_group.sync.aligned n;`: waits until at most `n` groups
    /// are pending.
    WgmmaWait(u32),
    /// `wgmma.mma_async.sync.aligned.m64nNk16.f32.AB.AB d, a, b, scale-d,
    /// 1, 1, [trans-a,] trans-b;`: `d = a·b + (scale-d ? d : 0)` over the
    /// warpgroup, `N/2` `f32` accumulators per thread.
    Wgmma {
        /// N: a multiple of 8 up to 256.
        n: u32,
        /// `BF16` or `F16`.
        ab: Ty,
        /// The accumulators, `n / 2` of them.
        d: Vec<Reg>,
        /// A.
        a: WgmmaA,
        /// B's descriptor.
        b: Reg,
        /// A predicate: accumulate onto `d` when true, overwrite when false.
        scale_d: Reg,
        /// `imm-trans-b`: B is N-major in shared memory.
        trans_b: bool,
    },
    /// `fence.proxy.async.shared::cta;`: makes this thread's generic-proxy
    /// shared-memory writes visible to the async proxy (wgmma, TMA).
    FenceProxyAsync,
    /// `setmaxnreg.{inc,dec}.sync.aligned.u32 regs;`.
    SetMaxNReg {
        /// Raise (true) or lower the warpgroup's register count.
        inc: bool,
        /// The new count per thread (24..=256, a multiple of 8).
        regs: u32,
    },
    /// `mbarrier.init.shared::cta.b64 [addr], count;`.
    MbarInit {
        /// The 8-byte barrier in shared memory.
        addr: Addr,
        /// Expected arrivals per phase.
        count: u32,
    },
    /// `mbarrier.arrive[.expect_tx].shared::cta.b64 state, [addr][, tx];`.
    MbarArrive {
        /// The returned state (a `.b64` register).
        state: Reg,
        /// The barrier.
        addr: Addr,
        /// Transaction bytes to expect, if any.
        expect_tx: Option<u32>,
    },
    /// `vote.sync.all.pred dst, src, 0xffffffff;`: whether `src` holds in
    /// every lane of the (fully active) warp.
    VoteAll {
        /// The result (a predicate).
        dst: Reg,
        /// The lane's predicate.
        src: Reg,
    },
    /// `fence.mbarrier_init.release.cluster;`: makes this thread's
    /// `mbarrier.init`s visible to the async proxy (TMA completions).
    FenceMbarrierInit,
    /// `cvta.param.u64 dst, param;`: the generic address of a by-value
    /// kernel parameter (a tensor map), for TMA.
    CvtaParam {
        /// The address (a `.b64` register).
        dst: Reg,
        /// The parameter.
        param: Param,
    },
    /// `cp.async.bulk.tensor.{n}d.shared::cluster.global.tile.mbarrier::complete_tx::bytes
    /// [dst], [map, {coords}], [mbar];`: a TMA copy of one box of the
    /// tensor map at `map` (a generic address) at `coords` (innermost
    /// first, `.s32`) into shared `dst`, completing `box bytes` of
    /// transactions on the mbarrier at `mbar`.
    TmaLoad {
        /// Shared destination (32-bit shared address, 128-byte aligned;
        /// 1024 for the 128-byte swizzle).
        dst: Reg,
        /// The tensor map's generic address.
        map: Reg,
        /// Box coordinates, innermost dimension first (1 to 5).
        coords: Vec<Operand>,
        /// The mbarrier (32-bit shared address).
        mbar: Reg,
    },
    /// `mbarrier.try_wait.parity.shared::cta.b64 done, [addr], parity;`.
    MbarTryWait {
        /// Set when the phase of `parity` has completed.
        done: Reg,
        /// The barrier.
        addr: Addr,
        /// The phase parity waited for (0 or 1).
        parity: Operand,
    },
    /// `red.global.add.f32 [addr], src;`: adds `src` to the `f32` at `addr`
    /// in device memory (performed at L2; no value comes back).
    RedAddF32 {
        /// The address.
        addr: Addr,
        /// The addend.
        src: Reg,
    },
    /// `ld.acquire.gpu.global.u32 dst, [addr];`: a load that orders every
    /// later memory access of the thread after it, at device scope.
    LdAcquire {
        /// Destination.
        dst: Reg,
        /// The address.
        addr: Addr,
    },
    /// `ld.relaxed.gpu.global.u32 dst, [addr];`: a strong load at device
    /// scope that orders nothing (followed by a `fence.acq_rel.gpu`, an
    /// acquire).
    LdRelaxed {
        /// Destination.
        dst: Reg,
        /// The address.
        addr: Addr,
    },
    /// `st.release.gpu.global.u32 [addr], src;`: a store that orders every
    /// earlier memory access of the thread (and those it observed) before
    /// it, at device scope.
    StRelease {
        /// The address.
        addr: Addr,
        /// The value.
        src: Operand,
    },
    /// `fence.acq_rel.gpu;`.
    FenceGpu,
}

impl Instr {
    /// `add.ty dst, a, b;`.
    pub fn add(ty: Ty, dst: Reg, a: Operand, b: Operand) -> Instr {
        Instr::Bin {
            op: BinOp::Add,
            ty,
            dst,
            a,
            b,
        }
    }
    /// `mul.ty dst, a, b;` (`mul.lo` on integers).
    pub fn mul(ty: Ty, dst: Reg, a: Operand, b: Operand) -> Instr {
        Instr::Bin {
            op: BinOp::Mul,
            ty,
            dst,
            a,
            b,
        }
    }
    /// A global load of one value.
    pub fn ld_global(ty: Ty, dst: Reg, base: Operand, offset: i64) -> Instr {
        Instr::Ld {
            space: StateSpace::Global,
            ty,
            dst: vec![dst],
            addr: Addr { base, offset },
        }
    }
    /// A global store of one value.
    pub fn st_global(ty: Ty, base: Operand, offset: i64, src: Reg) -> Instr {
        Instr::St {
            space: StateSpace::Global,
            ty,
            addr: Addr { base, offset },
            src: vec![src],
        }
    }
    /// Guards `self` with `@pred` (or `@!pred`).
    pub fn guarded(self, pred: Reg, negate: bool) -> Instr {
        Instr::Guard {
            pred,
            negate,
            instr: Box::new(self),
        }
    }
}

fn vec_suffix(n: usize) -> &'static str {
    match n {
        1 => "",
        2 => ".v2",
        4 => ".v4",
        _ => panic!("vector of {n} elements does not exist in PTX"),
    }
}

struct List<'a>(&'a [Reg]);

impl fmt::Display for List<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.len() == 1 {
            return write!(f, "{}", self.0[0]);
        }
        f.write_str("{")?;
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r}")?;
        }
        f.write_str("}")
    }
}

fn is_float(ty: Ty) -> bool {
    matches!(ty, Ty::F32 | Ty::F16 | Ty::BF16 | Ty::F16x2 | Ty::BF16x2)
}

impl fmt::Display for Instr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Instr::Comment(c) => write!(f, "// {c}"),
            Instr::Label(l) => write!(f, "{l}:"),
            Instr::Guard {
                pred,
                negate,
                instr,
            } => write!(f, "@{}{pred} {instr}", if *negate { "!" } else { "" }),
            Instr::Bra { target, uni } => {
                write!(f, "bra{} {target};", if *uni { ".uni" } else { "" })
            }
            Instr::Ret => f.write_str("ret;"),
            Instr::LdParam { ty, dst, param } => write!(f, "ld.param{ty} {dst}, [{}];", param.name),
            Instr::Mov { ty, dst, src } => write!(f, "mov{ty} {dst}, {src};"),
            Instr::Bin { op, ty, dst, a, b } => {
                let name = match op {
                    BinOp::Add => "add",
                    BinOp::Sub => "sub",
                    BinOp::Mul if is_float(*ty) => "mul",
                    BinOp::Mul => "mul.lo",
                    BinOp::MulWide => "mul.wide",
                    BinOp::Min => "min",
                    BinOp::Max => "max",
                    BinOp::And => "and",
                    BinOp::Or => "or",
                    BinOp::Xor => "xor",
                    BinOp::Shl => "shl",
                    BinOp::Shr => "shr",
                    BinOp::Div => "div",
                    BinOp::Rem => "rem",
                };
                // Logic and left shifts exist only on bit types: print the
                // bit type of the same width.
                let ty = match (op, ty) {
                    (BinOp::And | BinOp::Or | BinOp::Xor | BinOp::Shl, Ty::U32 | Ty::S32) => {
                        Ty::B32
                    }
                    (BinOp::And | BinOp::Or | BinOp::Xor | BinOp::Shl, Ty::U64 | Ty::S64) => {
                        Ty::B64
                    }
                    _ => *ty,
                };
                write!(f, "{name}{ty} {dst}, {a}, {b};")
            }
            Instr::Mad {
                ty,
                wide,
                dst,
                a,
                b,
                c,
            } => {
                let name = if is_float(*ty) {
                    "fma.rn"
                } else if *wide {
                    "mad.wide"
                } else {
                    "mad.lo"
                };
                write!(f, "{name}{ty} {dst}, {a}, {b}, {c};")
            }
            Instr::Un { op, ty, dst, a } => {
                let name = match op {
                    UnOp::Ex2 => "ex2.approx.ftz",
                    UnOp::Rcp => "rcp.rn",
                    UnOp::Lg2 => "lg2.approx.ftz",
                    UnOp::Neg => "neg",
                    UnOp::Not => "not",
                };
                write!(f, "{name}{ty} {dst}, {a};")
            }
            Instr::Setp { cmp, ty, dst, a, b } => write!(f, "setp.{cmp}{ty} {dst}, {a}, {b};"),
            Instr::Selp {
                ty,
                dst,
                a,
                b,
                pred,
            } => write!(f, "selp{ty} {dst}, {a}, {b}, {pred};"),
            Instr::Cvt {
                rnd,
                dst_ty,
                src_ty,
                dst,
                src,
            } => {
                let rnd = rnd.map(|r| format!(".{r}")).unwrap_or_default();
                write!(f, "cvt{rnd}{dst_ty}{src_ty} {dst}, {src};")
            }
            Instr::CvtPack { ty, dst, hi, lo } => write!(f, "cvt.rn{ty}.f32 {dst}, {hi}, {lo};"),
            Instr::Ld {
                space,
                ty,
                dst,
                addr,
            } => write!(
                f,
                "ld{space}{}{ty} {}, {addr};",
                vec_suffix(dst.len()),
                List(dst)
            ),
            Instr::St {
                space,
                ty,
                addr,
                src,
            } => write!(
                f,
                "st{space}{}{ty} {addr}, {};",
                vec_suffix(src.len()),
                List(src)
            ),
            Instr::CpAsync16 { dst, src, src_size } => {
                write!(f, "cp.async.cg.shared.global {dst}, {src}, 16, {src_size};")
            }
            Instr::CpAsyncCommit => f.write_str("cp.async.commit_group;"),
            Instr::CpAsyncWait(n) => write!(f, "cp.async.wait_group {n};"),
            Instr::BarSync(id) => write!(f, "bar.sync {id};"),
            Instr::Ldmatrix { trans, dst, addr } => write!(
                f,
                "ldmatrix.sync.aligned.m8n8.x{}{}.shared.b16 {{{}}}, {addr};",
                dst.len(),
                if *trans { ".trans" } else { "" },
                List(dst).to_string().trim_matches(|c| c == '{' || c == '}')
            ),
            Instr::Mma {
                shape,
                ab,
                d,
                a,
                b,
                c,
            } => {
                let shape = match shape {
                    MmaShape::M16N8K16 => "m16n8k16",
                    MmaShape::M16N8K8 => "m16n8k8",
                };
                let braced = |r: &[Reg]| {
                    let l = List(r).to_string();
                    if r.len() == 1 {
                        format!("{{{l}}}")
                    } else {
                        l
                    }
                };
                write!(
                    f,
                    "mma.sync.aligned.{shape}.row.col.f32{ab}{ab}.f32 {}, {}, {}, {};",
                    braced(d),
                    braced(a),
                    braced(b),
                    braced(c)
                )
            }
            Instr::Unpack { lo, hi, src } => write!(f, "mov.b32 {{{lo}, {hi}}}, {src};"),
            Instr::ShflBfly {
                dst,
                src,
                lane_mask,
            } => write!(
                f,
                "shfl.sync.bfly.b32 {dst}, {src}, {lane_mask}, 31, 0xffffffff;"
            ),
            Instr::BarSyncCount { id, threads } => write!(f, "bar.sync {id}, {threads};"),
            Instr::NamedBarrier {
                arrive,
                id,
                threads,
            } => write!(
                f,
                "bar.{} {id}, {threads};",
                if *arrive { "arrive" } else { "sync" }
            ),
            Instr::WgmmaFence => f.write_str("wgmma.fence.sync.aligned;"),
            Instr::WgmmaCommit => f.write_str("wgmma.commit_group.sync.aligned;"),
            Instr::WgmmaWait(n) => write!(f, "wgmma.wait_group.sync.aligned {n};"),
            Instr::Wgmma {
                n,
                ab,
                d,
                a,
                b,
                scale_d,
                trans_b,
            } => {
                assert_eq!(
                    d.len() as u32 * 2,
                    *n,
                    "m64n{n} needs {} accumulators",
                    n / 2
                );
                let a = match a {
                    WgmmaA::Desc { desc, trans } => {
                        format!("{desc}, {b}, {scale_d}, 1, 1, {}", u8::from(*trans))
                    }
                    WgmmaA::Regs(r) => format!("{}, {b}, {scale_d}, 1, 1", List(r)),
                };
                write!(
                    f,
                    "wgmma.mma_async.sync.aligned.m64n{n}k16.f32{ab}{ab} {}, {a}, {};",
                    List(d),
                    u8::from(*trans_b)
                )
            }
            Instr::FenceProxyAsync => f.write_str("fence.proxy.async.shared::cta;"),
            Instr::SetMaxNReg { inc, regs } => write!(
                f,
                "setmaxnreg.{}.sync.aligned.u32 {regs};",
                if *inc { "inc" } else { "dec" }
            ),
            Instr::MbarInit { addr, count } => {
                write!(f, "mbarrier.init.shared::cta.b64 {addr}, {count};")
            }
            Instr::MbarArrive {
                state,
                addr,
                expect_tx,
            } => match expect_tx {
                None => write!(f, "mbarrier.arrive.shared::cta.b64 {state}, {addr};"),
                Some(tx) => write!(
                    f,
                    "mbarrier.arrive.expect_tx.shared::cta.b64 {state}, {addr}, {tx};"
                ),
            },
            Instr::VoteAll { dst, src } => {
                write!(f, "vote.sync.all.pred {dst}, {src}, 0xffffffff;")
            }
            Instr::FenceMbarrierInit => f.write_str("fence.mbarrier_init.release.cluster;"),
            Instr::CvtaParam { dst, param } => write!(f, "cvta.param.u64 {dst}, {};", param.name),
            Instr::TmaLoad {
                dst,
                map,
                coords,
                mbar,
            } => write!(
                f,
                "cp.async.bulk.tensor.{}d.shared::cluster.global.tile.mbarrier::complete_tx::bytes \
                 [{dst}], [{map}, {{{}}}], [{mbar}];",
                coords.len(),
                coords
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Instr::MbarTryWait { done, addr, parity } => write!(
                f,
                "mbarrier.try_wait.parity.shared::cta.b64 {done}, {addr}, {parity};"
            ),
            Instr::RedAddF32 { addr, src } => write!(f, "red.global.add.f32 {addr}, {src};"),
            Instr::LdAcquire { dst, addr } => write!(f, "ld.acquire.gpu.global.u32 {dst}, {addr};"),
            Instr::LdRelaxed { dst, addr } => write!(f, "ld.relaxed.gpu.global.u32 {dst}, {addr};"),
            Instr::StRelease { addr, src } => {
                write!(f, "st.release.gpu.global.u32 {addr}, {src};")
            }
            Instr::FenceGpu => f.write_str("fence.acq_rel.gpu;"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::reg::RegClass;
    use super::*;

    fn r(id: u32) -> Reg {
        Reg {
            class: RegClass::B32,
            id,
        }
    }
    fn rd(id: u32) -> Reg {
        Reg {
            class: RegClass::B64,
            id,
        }
    }
    fn fr(id: u32) -> Reg {
        Reg {
            class: RegClass::F32,
            id,
        }
    }
    fn p(id: u32) -> Reg {
        Reg {
            class: RegClass::Pred,
            id,
        }
    }
    fn text(i: Instr) -> String {
        i.to_string()
    }

    #[test]
    fn moves_and_specials() {
        let i = Instr::Mov {
            ty: Ty::U32,
            dst: r(1),
            src: Operand::Special(Special::TidX),
        };
        assert_eq!(text(i), "mov.u32 %r1, %tid.x;");
        let i = Instr::Mov {
            ty: Ty::U32,
            dst: r(2),
            src: Operand::Symbol("smem".into()),
        };
        assert_eq!(text(i), "mov.u32 %r2, smem;");
        let i = Instr::Mov {
            ty: Ty::F32,
            dst: fr(0),
            src: Operand::F32(f32::NEG_INFINITY),
        };
        assert_eq!(text(i), "mov.f32 %f0, 0fFF800000;");
    }

    #[test]
    fn integer_and_float_arithmetic() {
        assert_eq!(
            text(Instr::mul(Ty::U32, r(1), r(2).into(), Operand::U(3))),
            "mul.lo.u32 %r1, %r2, 3;"
        );
        assert_eq!(
            text(Instr::mul(Ty::F32, fr(1), fr(2).into(), fr(3).into())),
            "mul.f32 %f1, %f2, %f3;"
        );
        let i = Instr::Bin {
            op: BinOp::MulWide,
            ty: Ty::U32,
            dst: rd(1),
            a: r(1).into(),
            b: Operand::U(4),
        };
        assert_eq!(text(i), "mul.wide.u32 %rd1, %r1, 4;");
        let i = Instr::Mad {
            ty: Ty::U32,
            wide: true,
            dst: rd(2),
            a: r(1).into(),
            b: r(2).into(),
            c: rd(3).into(),
        };
        assert_eq!(text(i), "mad.wide.u32 %rd2, %r1, %r2, %rd3;");
        let i = Instr::Mad {
            ty: Ty::S32,
            wide: false,
            dst: r(0),
            a: r(1).into(),
            b: Operand::S(-2),
            c: r(3).into(),
        };
        assert_eq!(text(i), "mad.lo.s32 %r0, %r1, -2, %r3;");
        let i = Instr::Mad {
            ty: Ty::F32,
            wide: false,
            dst: fr(0),
            a: fr(1).into(),
            b: fr(2).into(),
            c: fr(3).into(),
        };
        assert_eq!(text(i), "fma.rn.f32 %f0, %f1, %f2, %f3;");
        let i = Instr::Bin {
            op: BinOp::Shr,
            ty: Ty::U32,
            dst: r(0),
            a: r(1).into(),
            b: Operand::U(2),
        };
        assert_eq!(text(i), "shr.u32 %r0, %r1, 2;");
        let i = Instr::Bin {
            op: BinOp::Max,
            ty: Ty::F32,
            dst: fr(0),
            a: fr(1).into(),
            b: fr(2).into(),
        };
        assert_eq!(text(i), "max.f32 %f0, %f1, %f2;");
    }

    #[test]
    fn logic_prints_bit_types() {
        let i = Instr::Bin {
            op: BinOp::And,
            ty: Ty::U32,
            dst: r(0),
            a: r(1).into(),
            b: Operand::U(31),
        };
        assert_eq!(text(i), "and.b32 %r0, %r1, 31;");
        let i = Instr::Bin {
            op: BinOp::Or,
            ty: Ty::Pred,
            dst: p(0),
            a: p(1).into(),
            b: p(2).into(),
        };
        assert_eq!(text(i), "or.pred %p0, %p1, %p2;");
        let i = Instr::Bin {
            op: BinOp::Shl,
            ty: Ty::U64,
            dst: rd(0),
            a: rd(1).into(),
            b: Operand::U(4),
        };
        assert_eq!(text(i), "shl.b64 %rd0, %rd1, 4;");
    }

    #[test]
    fn unary_compare_select_convert() {
        let i = Instr::Un {
            op: UnOp::Ex2,
            ty: Ty::F32,
            dst: fr(1),
            a: fr(2).into(),
        };
        assert_eq!(text(i), "ex2.approx.ftz.f32 %f1, %f2;");
        let i = Instr::Un {
            op: UnOp::Rcp,
            ty: Ty::F32,
            dst: fr(1),
            a: fr(2).into(),
        };
        assert_eq!(text(i), "rcp.rn.f32 %f1, %f2;");
        let i = Instr::Un {
            op: UnOp::Lg2,
            ty: Ty::F32,
            dst: fr(1),
            a: fr(2).into(),
        };
        assert_eq!(text(i), "lg2.approx.ftz.f32 %f1, %f2;");
        let i = Instr::Setp {
            cmp: Cmp::Lt,
            ty: Ty::U32,
            dst: p(0),
            a: r(1).into(),
            b: r(2).into(),
        };
        assert_eq!(text(i), "setp.lt.u32 %p0, %r1, %r2;");
        let i = Instr::Selp {
            ty: Ty::F32,
            dst: fr(0),
            a: fr(1).into(),
            b: Operand::F32(0.0),
            pred: p(1),
        };
        assert_eq!(text(i), "selp.f32 %f0, %f1, 0f00000000, %p1;");
        let i = Instr::Cvt {
            rnd: None,
            dst_ty: Ty::U64,
            src_ty: Ty::U32,
            dst: rd(0),
            src: r(0).into(),
        };
        assert_eq!(text(i), "cvt.u64.u32 %rd0, %r0;");
        let i = Instr::CvtPack {
            ty: Ty::BF16x2,
            dst: r(0),
            hi: fr(1),
            lo: fr(0),
        };
        assert_eq!(text(i), "cvt.rn.bf16x2.f32 %r0, %f1, %f0;");
    }

    #[test]
    fn loads_stores_and_async_copies() {
        let i = Instr::Ld {
            space: StateSpace::Shared,
            ty: Ty::U32,
            dst: vec![r(0), r(1), r(2), r(3)],
            addr: Addr::at(r(9), 16),
        };
        assert_eq!(text(i), "ld.shared.v4.u32 {%r0, %r1, %r2, %r3}, [%r9+16];");
        let i = Instr::St {
            space: StateSpace::Global,
            ty: Ty::F32,
            addr: Addr::at(rd(1), -8),
            src: vec![fr(0), fr(1)],
        };
        assert_eq!(text(i), "st.global.v2.f32 [%rd1-8], {%f0, %f1};");
        let i = Instr::ld_global(Ty::F32, fr(3), rd(2).into(), 0);
        assert_eq!(text(i), "ld.global.f32 %f3, [%rd2];");
        let i = Instr::Ld {
            space: StateSpace::GlobalNc,
            ty: Ty::F32,
            dst: vec![fr(0)],
            addr: rd(1).into(),
        };
        assert_eq!(text(i), "ld.global.nc.f32 %f0, [%rd1];");
        let i = Instr::CpAsync16 {
            dst: r(4).into(),
            src: rd(5).into(),
            src_size: r(6).into(),
        };
        assert_eq!(text(i), "cp.async.cg.shared.global [%r4], [%rd5], 16, %r6;");
        assert_eq!(text(Instr::CpAsyncCommit), "cp.async.commit_group;");
        assert_eq!(text(Instr::CpAsyncWait(1)), "cp.async.wait_group 1;");
        assert_eq!(text(Instr::BarSync(0)), "bar.sync 0;");
    }

    #[test]
    fn matrix_instructions() {
        let i = Instr::Ldmatrix {
            trans: false,
            dst: vec![r(0), r(1), r(2), r(3)],
            addr: r(8).into(),
        };
        assert_eq!(
            text(i),
            "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r0, %r1, %r2, %r3}, [%r8];"
        );
        let i = Instr::Ldmatrix {
            trans: true,
            dst: vec![r(0), r(1)],
            addr: Addr::at(r(8), 32),
        };
        assert_eq!(
            text(i),
            "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%r0, %r1}, [%r8+32];"
        );
        let i = Instr::Ldmatrix {
            trans: true,
            dst: vec![r(0)],
            addr: r(8).into(),
        };
        assert_eq!(
            text(i),
            "ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%r0}, [%r8];"
        );
        let f4 = [fr(0), fr(1), fr(2), fr(3)];
        let i = Instr::Mma {
            shape: MmaShape::M16N8K16,
            ab: Ty::BF16,
            d: f4,
            a: vec![r(0), r(1), r(2), r(3)],
            b: vec![r(4), r(5)],
            c: f4,
        };
        assert_eq!(
            text(i),
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f0, %f1, %f2, %f3}, \
             {%r0, %r1, %r2, %r3}, {%r4, %r5}, {%f0, %f1, %f2, %f3};"
        );
        let i = Instr::Mma {
            shape: MmaShape::M16N8K8,
            ab: Ty::F16,
            d: f4,
            a: vec![r(0), r(1)],
            b: vec![r(4)],
            c: f4,
        };
        assert_eq!(
            text(i),
            "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%f0, %f1, %f2, %f3}, \
             {%r0, %r1}, {%r4}, {%f0, %f1, %f2, %f3};"
        );
        let i = Instr::ShflBfly {
            dst: r(1),
            src: r(2),
            lane_mask: 2,
        };
        assert_eq!(text(i), "shfl.sync.bfly.b32 %r1, %r2, 2, 31, 0xffffffff;");
    }

    #[test]
    fn unpack_splits_a_register_into_halves() {
        let h = |id| Reg {
            class: RegClass::B16,
            id,
        };
        let i = Instr::Unpack {
            lo: h(0),
            hi: h(1),
            src: r(5),
        };
        assert_eq!(text(i), "mov.b32 {%h0, %h1}, %r5;");
    }

    #[test]
    fn hopper_warpgroup_instructions() {
        assert_eq!(text(Instr::WgmmaFence), "wgmma.fence.sync.aligned;");
        assert_eq!(text(Instr::WgmmaCommit), "wgmma.commit_group.sync.aligned;");
        assert_eq!(
            text(Instr::WgmmaWait(1)),
            "wgmma.wait_group.sync.aligned 1;"
        );
        assert_eq!(
            text(Instr::FenceProxyAsync),
            "fence.proxy.async.shared::cta;"
        );
        assert_eq!(
            text(Instr::BarSyncCount {
                id: 1,
                threads: 128
            }),
            "bar.sync 1, 128;"
        );
        assert_eq!(
            text(Instr::SetMaxNReg {
                inc: true,
                regs: 240
            }),
            "setmaxnreg.inc.sync.aligned.u32 240;"
        );
        assert_eq!(
            text(Instr::SetMaxNReg {
                inc: false,
                regs: 24
            }),
            "setmaxnreg.dec.sync.aligned.u32 24;"
        );
        let i = Instr::Wgmma {
            n: 8,
            ab: Ty::BF16,
            d: vec![fr(0), fr(1), fr(2), fr(3)],
            a: WgmmaA::Desc {
                desc: rd(1),
                trans: false,
            },
            b: rd(2),
            scale_d: p(0),
            trans_b: false,
        };
        assert_eq!(
            text(i),
            "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%f0, %f1, %f2, %f3}, \
             %rd1, %rd2, %p0, 1, 1, 0, 0;"
        );
        let i = Instr::Wgmma {
            n: 16,
            ab: Ty::F16,
            d: (0..8).map(fr).collect(),
            a: WgmmaA::Regs([r(0), r(1), r(2), r(3)]),
            b: rd(2),
            scale_d: p(1),
            trans_b: true,
        };
        assert_eq!(
            text(i),
            "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 \
             {%f0, %f1, %f2, %f3, %f4, %f5, %f6, %f7}, \
             {%r0, %r1, %r2, %r3}, %rd2, %p1, 1, 1, 1;"
        );
    }

    #[test]
    #[should_panic(expected = "accumulators")]
    fn wgmma_checks_its_accumulator_count() {
        let _ = Instr::Wgmma {
            n: 16,
            ab: Ty::BF16,
            d: vec![fr(0)],
            a: WgmmaA::Regs([r(0), r(1), r(2), r(3)]),
            b: rd(2),
            scale_d: p(1),
            trans_b: false,
        }
        .to_string();
    }

    #[test]
    fn device_scope_synchronisation() {
        let at = || Addr::at(rd(4), 8);
        assert_eq!(
            text(Instr::RedAddF32 {
                addr: at(),
                src: fr(2)
            }),
            "red.global.add.f32 [%rd4+8], %f2;"
        );
        assert_eq!(
            text(Instr::LdAcquire {
                dst: r(1),
                addr: at()
            }),
            "ld.acquire.gpu.global.u32 %r1, [%rd4+8];"
        );
        assert_eq!(
            text(Instr::LdRelaxed {
                dst: r(1),
                addr: at()
            }),
            "ld.relaxed.gpu.global.u32 %r1, [%rd4+8];"
        );
        assert_eq!(
            text(Instr::StRelease {
                addr: at(),
                src: r(3).into()
            }),
            "st.release.gpu.global.u32 [%rd4+8], %r3;"
        );
        assert_eq!(text(Instr::FenceGpu), "fence.acq_rel.gpu;");
    }

    #[test]
    fn mbarriers() {
        let i = Instr::MbarInit {
            addr: r(3).into(),
            count: 128,
        };
        assert_eq!(text(i), "mbarrier.init.shared::cta.b64 [%r3], 128;");
        let i = Instr::MbarArrive {
            state: rd(0),
            addr: Addr::at(r(3), 8),
            expect_tx: None,
        };
        assert_eq!(text(i), "mbarrier.arrive.shared::cta.b64 %rd0, [%r3+8];");
        let i = Instr::MbarArrive {
            state: rd(0),
            addr: r(3).into(),
            expect_tx: Some(16384),
        };
        assert_eq!(
            text(i),
            "mbarrier.arrive.expect_tx.shared::cta.b64 %rd0, [%r3], 16384;"
        );
        let i = Instr::MbarTryWait {
            done: p(2),
            addr: r(3).into(),
            parity: r(4).into(),
        };
        assert_eq!(
            text(i),
            "mbarrier.try_wait.parity.shared::cta.b64 %p2, [%r3], %r4;"
        );
    }

    #[test]
    fn control_flow() {
        let i = Instr::Bra {
            target: "LOOP".into(),
            uni: true,
        }
        .guarded(p(2), true);
        assert_eq!(text(i), "@!%p2 bra.uni LOOP;");
        assert_eq!(text(Instr::Label("LOOP".into())), "LOOP:");
        assert_eq!(text(Instr::Ret), "ret;");
        assert_eq!(text(Instr::Comment("x".into())), "// x");
    }
}

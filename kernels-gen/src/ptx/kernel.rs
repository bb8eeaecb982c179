//! Kernels and modules: parameters, register declarations, the body, and
//! the module header.

use std::fmt;

use super::instr::Instr;
use super::reg::{Param, Reg, RegClass, Ty};

/// The architecture a module is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// Ampere: `mma.sync`, `ldmatrix`, `cp.async`. Runs on sm_80 and every
    /// later architecture (the driver compiles it for the device at load
    /// time).
    Sm80,
    /// Hopper with its architecture-specific features: `wgmma`,
    /// `setmaxnreg`, `mbarrier` waits, bulk copies. Runs only on sm_90.
    Sm90a,
}

impl Target {
    /// The `.target` name.
    pub const fn name(self) -> &'static str {
        match self {
            Target::Sm80 => "sm_80",
            Target::Sm90a => "sm_90a",
        }
    }
    /// The lowest PTX ISA version with everything the kernels use.
    pub const fn isa_version(self) -> &'static str {
        match self {
            Target::Sm80 => "7.0",
            Target::Sm90a => "8.0",
        }
    }

    /// Whether a device of compute capability `major.minor` can run PTX
    /// written for this target: `sm_80` PTX runs on every capability from
    /// 8.0 on (the driver compiles it forward), `sm_90a` PTX only on
    /// exactly 9.0 (architecture-specific `a` features do not carry
    /// forward).
    pub const fn runs_on(self, major: u32, minor: u32) -> bool {
        match self {
            Target::Sm80 => major >= 8,
            Target::Sm90a => major == 9 && minor == 0,
        }
    }
}

/// A kernel under construction: parameters, registers and a body.
#[derive(Clone, Debug)]
pub struct Kernel {
    name: String,
    params: Vec<Param>,
    counts: [u32; 5],
    body: Vec<Instr>,
    max_threads: Option<u32>,
    min_blocks: Option<u32>,
    shared_align: Option<u32>,
    labels: u32,
}

impl Kernel {
    /// An empty kernel named `name`.
    pub fn new(name: impl Into<String>) -> Kernel {
        Kernel {
            name: name.into(),
            params: Vec::new(),
            counts: [0; 5],
            body: Vec::new(),
            max_threads: None,
            min_blocks: None,
            shared_align: None,
            labels: 0,
        }
    }

    /// Appends a parameter.
    pub fn param(&mut self, ty: Ty, name: &str) -> Param {
        let p = Param {
            ty,
            name: format!("{}_{name}", self.name),
            bytes: None,
        };
        self.params.push(p.clone());
        p
    }

    /// Appends a by-value parameter of `size` bytes aligned to `align`
    /// (`.param .align align .b8 name[size]`), such as a tensor map.
    pub fn param_bytes(&mut self, name: &str, align: u32, size: u32) -> Param {
        let p = Param {
            ty: Ty::B64,
            name: format!("{}_{name}", self.name),
            bytes: Some((align, size)),
        };
        self.params.push(p.clone());
        p
    }

    /// A fresh register that holds `ty`.
    pub fn reg(&mut self, ty: Ty) -> Reg {
        let class = ty.class();
        let id = self.counts[class.index()];
        self.counts[class.index()] += 1;
        Reg { class, id }
    }

    /// `n` fresh registers.
    pub fn regs(&mut self, ty: Ty, n: usize) -> Vec<Reg> {
        (0..n).map(|_| self.reg(ty)).collect()
    }

    /// A fresh label name with a readable stem.
    pub fn label(&mut self, stem: &str) -> String {
        self.labels += 1;
        format!("${stem}_{}", self.labels)
    }

    /// Appends an instruction.
    pub fn push(&mut self, i: Instr) {
        self.body.push(i);
    }

    /// Appends a comment.
    pub fn comment(&mut self, c: impl Into<String>) {
        self.body.push(Instr::Comment(c.into()));
    }

    /// `.maxntid threads` and, if given, `.minnctapersm blocks`.
    pub fn launch_bounds(&mut self, threads: u32, min_blocks: Option<u32>) {
        self.max_threads = Some(threads);
        self.min_blocks = min_blocks;
    }

    /// Declares the dynamic shared-memory array `smem` with `align`.
    pub fn dynamic_shared(&mut self, align: u32) {
        self.shared_align = Some(align);
    }

    /// The kernel's entry name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The instructions so far.
    pub fn body(&self) -> &[Instr] {
        &self.body
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, ".visible .entry {}(", self.name)?;
        for (i, p) in self.params.iter().enumerate() {
            let sep = if i + 1 < self.params.len() { "," } else { "" };
            match p.bytes {
                Some((align, size)) => {
                    writeln!(f, "    .param .align {align} .b8 {}[{size}]{sep}", p.name)?
                }
                None => writeln!(f, "    .param {} {}{sep}", p.ty, p.name)?,
            }
        }
        writeln!(f, ")")?;
        if let Some(t) = self.max_threads {
            writeln!(f, ".maxntid {t}, 1, 1")?;
        }
        if let Some(b) = self.min_blocks {
            writeln!(f, ".minnctapersm {b}")?;
        }
        writeln!(f, "{{")?;
        for class in RegClass::ALL {
            let n = self.counts[class.index()];
            if n > 0 {
                writeln!(f, "    .reg {} {}<{n}>;", class.decl_ty(), class.prefix())?;
            }
        }
        for i in &self.body {
            match i {
                Instr::Label(_) => writeln!(f, "{i}")?,
                _ => writeln!(f, "    {i}")?,
            }
        }
        writeln!(f, "}}")
    }
}

/// A PTX module: header, the shared-memory declaration, kernels.
#[derive(Clone, Debug)]
pub struct Module {
    target: Target,
    kernels: Vec<Kernel>,
}

impl Module {
    /// An empty module for `target`.
    pub fn new(target: Target) -> Module {
        Module {
            target,
            kernels: Vec::new(),
        }
    }
    /// Adds a kernel.
    pub fn kernel(mut self, k: Kernel) -> Module {
        self.kernels.push(k);
        self
    }
}

impl fmt::Display for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "// Generated by kernels-gen {}",
            env!("CARGO_PKG_VERSION")
        )?;
        writeln!(f, ".version {}", self.target.isa_version())?;
        writeln!(f, ".target {}", self.target.name())?;
        writeln!(f, ".address_size 64")?;
        if let Some(align) = self.kernels.iter().filter_map(|k| k.shared_align).max() {
            writeln!(f, ".extern .shared .align {align} .b8 smem[];")?;
        }
        for k in &self.kernels {
            writeln!(f)?;
            write!(f, "{k}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::instr::Operand;
    use super::*;

    #[test]
    fn a_kernel_prints_params_declarations_and_body() {
        let mut k = Kernel::new("k");
        let p = k.param(Ty::U64, "out");
        let _ = k.param(Ty::U32, "n");
        k.launch_bounds(128, Some(2));
        k.dynamic_shared(128);
        let rd = k.reg(Ty::U64);
        let x = k.reg(Ty::F32);
        let pr = k.reg(Ty::Pred);
        k.push(Instr::LdParam {
            ty: Ty::U64,
            dst: rd,
            param: p,
        });
        k.push(Instr::Mov {
            ty: Ty::F32,
            dst: x,
            src: Operand::F32(1.0),
        });
        let l = k.label("done");
        k.push(Instr::Label(l.clone()));
        k.push(Instr::Ret);
        let _ = pr;
        let text = Module::new(Target::Sm80).kernel(k).to_string();
        let expected = "\
.version 7.0
.target sm_80
.address_size 64
.extern .shared .align 128 .b8 smem[];

.visible .entry k(
    .param .u64 k_out,
    .param .u32 k_n
)
.maxntid 128, 1, 1
.minnctapersm 2
{
    .reg .pred %p<1>;
    .reg .b64 %rd<1>;
    .reg .f32 %f<1>;
    ld.param.u64 %rd0, [k_out];
    mov.f32 %f0, 0f3F800000;
$done_1:
    ret;
}
";
        assert!(text.ends_with(expected), "{text}");
    }

    #[test]
    fn sm90a_modules_name_their_target_and_isa() {
        let text = Module::new(Target::Sm90a)
            .kernel(Kernel::new("k"))
            .to_string();
        assert!(text.contains(".version 8.0\n.target sm_90a\n"), "{text}");
    }

    #[test]
    fn targets_say_which_devices_run_them() {
        // sm_80 PTX is compiled forward by the driver: every 8.x and later.
        for (major, minor) in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)] {
            assert!(Target::Sm80.runs_on(major, minor), "{major}.{minor}");
        }
        for (major, minor) in [(7, 0), (7, 5), (6, 1)] {
            assert!(!Target::Sm80.runs_on(major, minor), "{major}.{minor}");
        }
        // sm_90a features exist on 9.0 only.
        assert!(Target::Sm90a.runs_on(9, 0));
        for (major, minor) in [(8, 0), (8, 9), (9, 1), (10, 0), (12, 0)] {
            assert!(!Target::Sm90a.runs_on(major, minor), "{major}.{minor}");
        }
    }
}

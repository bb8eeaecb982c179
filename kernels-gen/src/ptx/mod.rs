//! A small typed vocabulary for writing PTX: registers ([`Reg`]), operands,
//! instructions ([`Instr`]) and kernels ([`Kernel`], [`Module`]).
//!
//! Kernel emitters build a `Vec<Instr>` with a [`Kernel`] and print it; the
//! text of every instruction form is fixed in one place (its `Display`) and
//! unit-tested there, so emitters never paste strings.
//!
//! ```
//! use kernels_gen::ptx::{Kernel, Ty, Instr, Operand, Target};
//!
//! let mut k = Kernel::new("add_one");
//! let p = k.param(Ty::U64, "ptr");
//! let addr = k.reg(Ty::U64);
//! k.push(Instr::LdParam { ty: Ty::U64, dst: addr, param: p });
//! let x = k.reg(Ty::F32);
//! k.push(Instr::ld_global(Ty::F32, x, addr.into(), 0));
//! k.push(Instr::add(Ty::F32, x, x.into(), Operand::F32(1.0)));
//! k.push(Instr::st_global(Ty::F32, addr.into(), 0, x));
//! let text = kernels_gen::ptx::Module::new(Target::Sm80).kernel(k).to_string();
//! assert!(text.contains("add.f32 %f0, %f0, 0f3F800000;"));
//! ```

mod build;
mod instr;
mod kernel;
mod reg;

pub use instr::{Addr, BinOp, Cmp, Instr, MmaShape, Operand, Special, StateSpace, UnOp, WgmmaA};
pub use kernel::{Kernel, Module, Target};
pub use reg::{Param, Reg, Ty};

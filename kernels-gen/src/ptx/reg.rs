//! Virtual registers and the PTX types they hold.

use std::fmt;

/// A PTX type, as written in instruction suffixes (`.u32`, `.bf16x2`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ty {
    /// A predicate.
    Pred,
    /// 16 untyped bits.
    B16,
    /// 32 untyped bits.
    B32,
    /// 64 untyped bits.
    B64,
    /// Unsigned 8-bit integer: only a load's width, into a 32-bit register
    /// (sub-word loads zero-extend).
    U8,
    /// Unsigned 16-bit integer: only a load's width, into a 32-bit register.
    U16,
    /// Unsigned 32-bit integer.
    U32,
    /// Unsigned 64-bit integer.
    U64,
    /// Signed 32-bit integer.
    S32,
    /// Signed 64-bit integer.
    S64,
    /// Single precision.
    F32,
    /// Half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Two halves in 32 bits.
    F16x2,
    /// Two bfloat16 in 32 bits.
    BF16x2,
}

impl Ty {
    /// The suffix without its dot: `u32`.
    pub const fn name(self) -> &'static str {
        match self {
            Ty::Pred => "pred",
            Ty::B16 => "b16",
            Ty::B32 => "b32",
            Ty::B64 => "b64",
            Ty::U8 => "u8",
            Ty::U16 => "u16",
            Ty::U32 => "u32",
            Ty::U64 => "u64",
            Ty::S32 => "s32",
            Ty::S64 => "s64",
            Ty::F32 => "f32",
            Ty::F16 => "f16",
            Ty::BF16 => "bf16",
            Ty::F16x2 => "f16x2",
            Ty::BF16x2 => "bf16x2",
        }
    }

    /// The register class that holds a value of this type.
    pub const fn class(self) -> RegClass {
        match self {
            Ty::Pred => RegClass::Pred,
            Ty::B16 | Ty::F16 | Ty::BF16 => RegClass::B16,
            Ty::B32 | Ty::U8 | Ty::U16 | Ty::U32 | Ty::S32 | Ty::F16x2 | Ty::BF16x2 => {
                RegClass::B32
            }
            Ty::B64 | Ty::U64 | Ty::S64 => RegClass::B64,
            Ty::F32 => RegClass::F32,
        }
    }
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, ".{}", self.name())
    }
}

/// The register files a kernel declares, one name prefix each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegClass {
    /// `%p`: `.pred`.
    Pred,
    /// `%h`: `.b16`.
    B16,
    /// `%r`: `.b32`.
    B32,
    /// `%rd`: `.b64`.
    B64,
    /// `%f`: `.f32`.
    F32,
}

impl RegClass {
    /// Every class, in declaration order.
    pub const ALL: [RegClass; 5] = [
        RegClass::Pred,
        RegClass::B16,
        RegClass::B32,
        RegClass::B64,
        RegClass::F32,
    ];
    /// The register name prefix.
    pub const fn prefix(self) -> &'static str {
        match self {
            RegClass::Pred => "%p",
            RegClass::B16 => "%h",
            RegClass::B32 => "%r",
            RegClass::B64 => "%rd",
            RegClass::F32 => "%f",
        }
    }
    /// The type of the declaration.
    pub const fn decl_ty(self) -> Ty {
        match self {
            RegClass::Pred => Ty::Pred,
            RegClass::B16 => Ty::B16,
            RegClass::B32 => Ty::B32,
            RegClass::B64 => Ty::B64,
            RegClass::F32 => Ty::F32,
        }
    }
    pub(crate) const fn index(self) -> usize {
        match self {
            RegClass::Pred => 0,
            RegClass::B16 => 1,
            RegClass::B32 => 2,
            RegClass::B64 => 3,
            RegClass::F32 => 4,
        }
    }
}

/// A virtual register. PTX registers are unlimited; ptxas allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reg {
    pub(crate) class: RegClass,
    pub(crate) id: u32,
}

impl Reg {
    /// The register file it lives in.
    pub fn class(&self) -> RegClass {
        self.class
    }
}

impl fmt::Display for Reg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.class.prefix(), self.id)
    }
}

/// A kernel parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub(crate) ty: Ty,
    pub(crate) name: String,
    /// A by-value byte array (`.param .align A .b8 name[N]`): `(A, N)`.
    pub(crate) bytes: Option<(u32, u32)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_print_with_their_class_prefix() {
        let r = |class, id| Reg { class, id }.to_string();
        assert_eq!(r(RegClass::Pred, 3), "%p3");
        assert_eq!(r(RegClass::B16, 0), "%h0");
        assert_eq!(r(RegClass::B32, 12), "%r12");
        assert_eq!(r(RegClass::B64, 7), "%rd7");
        assert_eq!(r(RegClass::F32, 1), "%f1");
    }

    #[test]
    fn types_map_to_classes() {
        assert_eq!(Ty::BF16x2.class(), RegClass::B32);
        assert_eq!(Ty::U64.class(), RegClass::B64);
        assert_eq!(Ty::F32.to_string(), ".f32");
    }
}

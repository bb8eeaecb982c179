//! Which instruction set the CPU kernels run with: detected once, overridable
//! by the `SDPA_CPU_ISA` environment variable (read once) or, per thread, by
//! [`with_isa`] (for tests and benchmarks).

use std::cell::Cell;
use std::fmt;
use std::sync::OnceLock;

use crate::error::{Result, SdpaError};

/// The environment variable that picks the CPU path: `auto` (the default),
/// `avx512`, `avx2` or `portable`. A path the CPU lacks falls back to the
/// best one it has, with a warning in the log.
pub const CPU_ISA_ENV: &str = "SDPA_CPU_ISA";

/// A code path of the CPU kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512 F/BW/VL/DQ with FMA and F16C (x86-64), 16 lanes; `bf16`
    /// inputs use the AVX-512 BF16 dot products where the CPU has them.
    Avx512,
    /// AVX2 with FMA and F16C (x86-64), 8 lanes.
    Avx2,
    /// Plain Rust shaped for the compiler's auto-vectoriser; runs anywhere.
    Portable,
}

impl Isa {
    /// Every path, best first.
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Portable];

    /// The name `SDPA_CPU_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// The path named `name` (as [`Isa::name`] spells it).
    pub fn parse(name: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Whether this CPU can run the path.
    pub fn is_supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => super::simd::Avx512::detect().is_some(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => super::simd::Avx2::detect().is_some(),
            Isa::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The paths this CPU can run, best first.
    pub fn supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// The best path this CPU has.
pub fn detected_isa() -> Isa {
    static DETECTED: OnceLock<Isa> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        Isa::ALL
            .into_iter()
            .find(|i| i.is_supported())
            .unwrap_or(Isa::Portable)
    })
}

/// The process-wide path: `SDPA_CPU_ISA` if set and supported, else the
/// detected one. Read once.
fn process_isa() -> Isa {
    static CHOSEN: OnceLock<Isa> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let best = detected_isa();
        let Ok(value) = std::env::var(CPU_ISA_ENV) else {
            return best;
        };
        if value.trim().is_empty() || value.trim().eq_ignore_ascii_case("auto") {
            return best;
        }
        match Isa::parse(&value) {
            Some(isa) if isa.is_supported() => isa,
            Some(isa) => {
                tracing::warn!("{CPU_ISA_ENV}={value}: this CPU lacks {isa}; using {best} instead");
                best
            }
            None => {
                tracing::warn!(
                    "{CPU_ISA_ENV}={value:?} is not one of auto, avx512, avx2, portable; \
                     using {best}"
                );
                best
            }
        }
    })
}

thread_local! {
    static FORCED: Cell<Option<Isa>> = const { Cell::new(None) };
}

/// The path the next CPU kernel call on this thread runs with: a
/// [`with_isa`] override, else `SDPA_CPU_ISA`, else the best the CPU has.
pub fn active_isa() -> Isa {
    FORCED.with(Cell::get).unwrap_or_else(process_isa)
}

/// Runs `f` with the CPU kernels forced onto `isa` for calls made from this
/// thread (the kernel's worker threads follow the calling thread's choice).
///
/// An `isa` this CPU lacks is an error, and `f` does not run.
///
/// ```
/// use sdpa_runtime::cpu::{with_isa, Isa, active_isa};
/// let isa = with_isa(Isa::Portable, active_isa).unwrap();
/// assert_eq!(isa, Isa::Portable);
/// ```
pub fn with_isa<R>(isa: Isa, f: impl FnOnce() -> R) -> Result<R> {
    if !isa.is_supported() {
        return Err(SdpaError::BackendUnavailable {
            backend: "cpu",
            reason: format!(
                "this CPU cannot run the {isa} path; it supports {}",
                Isa::supported()
                    .iter()
                    .map(|i| i.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    struct Restore(Option<Isa>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCED.with(|c| c.replace(Some(isa))));
    Ok(f())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
        assert_eq!(Isa::parse(" AVX2 "), Some(Isa::Avx2));
        assert_eq!(Isa::parse("sse"), None);
    }

    #[test]
    fn overrides_nest_and_restore() {
        let outer = active_isa();
        with_isa(Isa::Portable, || {
            assert_eq!(active_isa(), Isa::Portable);
        })
        .unwrap();
        assert_eq!(active_isa(), outer);
        assert!(Isa::Portable.is_supported());
        assert_eq!(Isa::supported()[0], detected_isa());
    }
}

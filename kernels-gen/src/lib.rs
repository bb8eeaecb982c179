//! The attention kernel generator.
//!
//! `kernels-gen` is a plain library: it takes a [`VariantSpec`] (head size,
//! causal or not, element type) and describes the kernels to build for it. It
//! is called by the `#[sdpa_variants]` proc macro at expansion time and never
//! touches CUDA, so every rule it holds can be unit-tested on any machine.
//!
//! The rules about which variants exist live here, in one place, so that the
//! macro (which reports them as compile errors) and the runtime (which looks
//! variants up) agree:
//!
//! ```
//! use kernels_gen::{DType, VariantSpec};
//!
//! let spec = VariantSpec::new(128, true, DType::BF16).unwrap();
//! assert_eq!(spec.kernel_name(), "sdpa_fwd_d128_causal_bf16");
//! assert!(VariantSpec::new(65, false, DType::F32).is_err());
//! ```

pub mod attention;
pub mod backward;
pub mod contract;
pub mod fa2;
#[cfg(test)]
mod interp;
pub mod key_runs;
pub mod ptx;
mod simt;
pub mod sm90;
mod spec;

pub use backward::BackwardKernels;
pub use contract::GpuKernel;
use ptx::Target;

pub use spec::{
    check_head_size, DType, SpecError, VariantSpec, HEAD_SIZE_STEP, MAX_HEAD_SIZE, MIN_HEAD_SIZE,
};

/// Generates the portable GPU kernel of `spec` for `target`: the CUDA-core
/// kernel for `f32`, the `mma.sync` one for 16-bit types.
pub fn generate(spec: &VariantSpec, target: Target) -> GpuKernel {
    match spec.dtype {
        DType::F32 => simt::generate(spec, target),
        DType::F16 | DType::BF16 => fa2::generate(spec, target),
    }
}

/// Generates the Hopper (sm_90a, `wgmma`) kernel of `spec`, or `None` where
/// there is none (32-bit elements, head sizes not in
/// [`sm90::HEAD_SIZES`]: 48, 64, 80, 96, 112, 128, 160, 192, 224, 256):
/// use [`generate`] then. Same parameters and launch contract.
pub fn generate_sm90(spec: &VariantSpec) -> Option<GpuKernel> {
    sm90::generate(spec)
}

/// The GPU kernels of `spec`, by preference: the sm_90a kernel where
/// [`generate_sm90`] has one, then the portable sm_80 one. A runtime runs
/// the first whose [`GpuKernel::target`] the device can run
/// ([`Target::runs_on`]); the last one runs on every device of compute
/// capability 8.0 and later.
pub fn kernels(spec: &VariantSpec) -> Vec<GpuKernel> {
    generate_sm90(spec)
        .into_iter()
        .chain([generate(spec, Target::Sm80)])
        .collect()
}

/// The backward kernels of `spec` (for a variant declared with `backward
/// = true`): portable sm_80 PTX, run on every device of compute capability
/// 8.0 and later; [`backward`] holds their launch contract.
pub fn backward_kernels(spec: &VariantSpec) -> BackwardKernels {
    backward::generate(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// The registers an instruction line names, in order (a guard's
    /// predicate first).
    fn regs(line: &str) -> Vec<&str> {
        line.split(|c: char| c.is_whitespace() || ",;[]{}|@!".contains(c))
            .filter(|t| t.starts_with('%') && !t.contains('.'))
            .collect()
    }

    /// The lse stores of a kernel's text, after checking how the lse is
    /// written: one `ld.param` of `lse`; what is computed from it is
    /// address arithmetic, the null test (`setp.ne.u64 .., 0`) and the
    /// predicates combined with it (`and.pred`), and `st.global.f32`
    /// stores guarded by such a predicate, each of a value `(m + lg2 l) ·
    /// ln 2`. Nothing else (no branch, no other store) depends on `lse`.
    fn lse_stores(k: &GpuKernel) -> Vec<String> {
        let body: Vec<&str> = k.ptx.lines().map(str::trim).collect();
        let param = format!("[{}_lse];", k.entry);
        let loads: Vec<&&str> = body.iter().filter(|l| l.ends_with(&param)).collect();
        assert_eq!(loads.len(), 1, "{}: one load of lse", k.entry);
        let mut addr: HashSet<&str> = HashSet::from([regs(loads[0])[0]]);
        let mut guards: HashSet<&str> = HashSet::new();
        let mut logs: HashSet<&str> = HashSet::new();
        let mut values: HashSet<&str> = HashSet::new();
        let mut stores = Vec::new();
        let what = |l: &str| format!("{} ({:?}): {l}", k.entry, k.target);
        for l in &body {
            let r = regs(l);
            let writes = !l.starts_with('@') && !l.starts_with("st.") && !r.is_empty();
            let (dst, uses) = if writes {
                (Some(r[0]), &r[1..])
            } else {
                (None, &r[..])
            };
            let op = l.split(|c: char| c == '.' || c.is_whitespace()).next();
            if l.starts_with("lg2.approx.ftz.f32") {
                logs.insert(r[0]);
            }
            if l.starts_with("add.f32") && logs.contains(uses[1]) {
                values.insert(r[0]);
            }
            if l.starts_with("mul.f32") && l.ends_with(", 0f3F317218;") && values.contains(uses[0])
            {
                values.insert(r[0]);
            }
            if l.contains("st.global.f32 [") && uses.len() == 3 && addr.contains(uses[1]) {
                assert!(
                    guards.contains(uses[0]),
                    "{} is not guarded by lse != 0",
                    what(l)
                );
                assert!(
                    values.contains(uses[2]),
                    "{} does not store (m + lg2 l) ln 2",
                    what(l)
                );
                stores.push(l.to_string());
                continue;
            }
            match dst {
                Some(d)
                    if l.starts_with("setp.ne.u64")
                        && l.ends_with(", 0;")
                        && addr.contains(uses[0]) =>
                {
                    guards.insert(d);
                    continue;
                }
                Some(d) if l.starts_with("and.pred") && uses.iter().any(|u| guards.contains(u)) => {
                    guards.insert(d);
                    continue;
                }
                _ => {}
            }
            assert!(
                !uses.iter().any(|u| guards.contains(u)),
                "{} reads the lse test",
                what(l)
            );
            if uses.iter().any(|u| addr.contains(u)) {
                let arithmetic = matches!(op, Some("mul" | "mad" | "shl" | "add" | "cvt"));
                assert!(arithmetic && dst.is_some(), "{} reads lse", what(l));
                addr.insert(dst.unwrap());
            }
        }
        assert_eq!(logs.len(), stores.len(), "{}: one lg2 a store", k.entry);
        stores
    }

    #[test]
    fn every_kernel_writes_the_lse_behind_a_null_test() {
        // (spec, kernel, lse stores per thread: one per row slot).
        let spec = |d, causal, dtype| VariantSpec::new(d, causal, dtype).unwrap();
        let mut cases = Vec::new();
        for (d, causal) in [
            (8, false),
            (40, true),
            (64, false),
            (136, true),
            (256, false),
        ] {
            let s = spec(d, causal, DType::F32);
            let rows = simt::Plan::new(d as u32).rows as usize;
            cases.push((generate(&s, Target::Sm80), rows));
        }
        for (d, causal, dtype) in [
            (8, false, DType::F16),
            (40, true, DType::BF16),
            (128, false, DType::BF16),
            (256, true, DType::F16),
        ] {
            let s = spec(d, causal, dtype);
            let slots = 2 * fa2::Fa2Config::new(&s).m_tiles;
            cases.push((generate(&s, Target::Sm80), slots));
        }
        for (d, causal, dtype) in [
            (64, false, DType::BF16),
            (128, true, DType::F16),
            (256, false, DType::BF16),
        ] {
            cases.push((generate_sm90(&spec(d, causal, dtype)).unwrap(), 2));
        }
        for (k, slots) in cases {
            assert_eq!(lse_stores(&k).len(), slots, "{} on {:?}", k.entry, k.target);
        }
    }

    #[test]
    fn kernels_come_by_preference() {
        let hopper = VariantSpec::new(128, true, DType::BF16).unwrap();
        let ks = kernels(&hopper);
        let targets: Vec<Target> = ks.iter().map(|k| k.target).collect();
        assert_eq!(targets, [Target::Sm90a, Target::Sm80]);
        assert_eq!(ks[0], generate_sm90(&hopper).unwrap());
        assert_eq!(ks[1], generate(&hopper, Target::Sm80));
        // The first kernel a device can run: sm_90a on 9.0, sm_80 elsewhere.
        let pick = |major, minor| ks.iter().find(|k| k.target.runs_on(major, minor));
        assert_eq!(pick(9, 0).map(|k| k.target), Some(Target::Sm90a));
        assert_eq!(pick(8, 6).map(|k| k.target), Some(Target::Sm80));
        assert_eq!(pick(10, 0).map(|k| k.target), Some(Target::Sm80));
        assert!(pick(7, 5).is_none());
        for spec in [
            VariantSpec::new(128, false, DType::F32).unwrap(),
            VariantSpec::new(40, false, DType::F16).unwrap(),
        ] {
            let targets: Vec<Target> = kernels(&spec).iter().map(|k| k.target).collect();
            assert_eq!(targets, [Target::Sm80], "{}", spec.kernel_name());
        }
    }
}

//! The variant table the `#[sdpa_variants]` macro emits: one entry per
//! declared (head size, causal, dtype), each holding its CPU kernel and its
//! GPU kernels in order of preference, and, where declared with `backward =
//! true`, its CPU and GPU backward kernels.

use kernels_gen::contract::TensorMaps;
use kernels_gen::ptx::Target;

use crate::error::{Result, SdpaError};
use crate::grad::{BackwardInputs, Gradients};
use crate::problem::Problem;
use crate::tensor::TensorViewMut;
use crate::{DType, VariantSpec};

/// The compute capability whose kernels every supported device runs: the
/// portable kernel is the one a device of this capability prefers
/// ([`Variant::gpu_kernel`]).
pub(crate) const PORTABLE_CAPABILITY: (i32, i32) = (8, 0);

/// A CPU kernel: one instantiation of [`crate::cpu::attention_lse`] (the
/// output, and the row log-sum-exp where one is asked for).
pub type CpuKernelFn =
    fn(&Problem<'_>, &mut TensorViewMut<'_>, Option<&mut TensorViewMut<'_>>) -> Result<()>;

/// A CPU backward kernel: one instantiation of [`crate::cpu::backward`].
pub type CpuBackwardFn = fn(&Problem<'_>, &BackwardInputs<'_>, &mut Gradients<'_>) -> Result<()>;

/// A GPU kernel generated at compile time: its PTX text and how to launch
/// it, following the launch contract of [`kernels_gen::contract`].
///
/// The `#[sdpa_variants]` macro runs the generator when it expands and
/// embeds the result as a static; the CUDA backend JIT-loads the PTX through
/// the driver the first time a device runs the variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuKernel {
    ptx: &'static str,
    entry: &'static str,
    target: Target,
    block_m: u32,
    threads: u32,
    smem_bytes: u32,
    mask_smem_bytes: u32,
    tensor_maps: Option<TensorMaps>,
}

impl GpuKernel {
    /// A kernel: its PTX module text, the entry point's name, the
    /// architecture the PTX targets, query rows
    /// per CTA, threads per CTA and dynamic shared memory per CTA in bytes.
    pub const fn new(
        ptx: &'static str,
        entry: &'static str,
        target: Target,
        block_m: u32,
        threads: u32,
        smem_bytes: u32,
    ) -> GpuKernel {
        GpuKernel {
            ptx,
            entry,
            target,
            block_m,
            threads,
            smem_bytes,
            mask_smem_bytes: 0,
            tensor_maps: None,
        }
    }
    /// The same kernel, needing `bytes` more dynamic shared memory when a
    /// launch passes a mask (a tile the kernel stages the mask in, last in
    /// its shared memory and touched only then).
    pub const fn with_mask_smem(self, bytes: u32) -> GpuKernel {
        GpuKernel {
            mask_smem_bytes: bytes,
            ..self
        }
    }
    /// The same kernel, taking the tensor maps of `q`, `k` and `v` after the
    /// contract's parameters, with boxes of `q_rows` tokens for `q` and
    /// `kv_rows` tokens for `k` and `v`.
    pub const fn with_tensor_maps(self, q_rows: u32, kv_rows: u32) -> GpuKernel {
        GpuKernel {
            tensor_maps: Some(TensorMaps { q_rows, kv_rows }),
            ..self
        }
    }
    /// The PTX module text.
    pub fn ptx(&self) -> &'static str {
        self.ptx
    }
    /// The entry point's name.
    pub fn entry(&self) -> &'static str {
        self.entry
    }
    /// The architecture the PTX targets ([`Target::name`] is its
    /// `.target` name).
    pub fn target(&self) -> Target {
        self.target
    }
    /// Query rows per CTA: the grid has `ceil(Sq / block_m)` CTAs in x.
    pub fn block_m(&self) -> u32 {
        self.block_m
    }
    /// Threads per CTA.
    pub fn threads(&self) -> u32 {
        self.threads
    }
    /// Dynamic shared memory per CTA of a launch without a mask, in bytes.
    pub fn smem_bytes(&self) -> u32 {
        self.smem_bytes
    }
    /// The dynamic shared memory a launch with a mask adds, in bytes (0 for
    /// most kernels).
    pub fn mask_smem_bytes(&self) -> u32 {
        self.mask_smem_bytes
    }
    /// Dynamic shared memory per CTA of a launch with (`masked`) or
    /// without a mask, in bytes.
    pub fn smem_bytes_for(&self, masked: bool) -> u32 {
        if masked {
            self.smem_bytes.saturating_add(self.mask_smem_bytes)
        } else {
            self.smem_bytes
        }
    }
    /// The tensor maps the kernel takes after the contract's parameters
    /// (their boxes' tokens; [`TensorMaps`] says how the runtime encodes
    /// them), or `None` where it takes none.
    pub fn tensor_maps(&self) -> Option<TensorMaps> {
        self.tensor_maps
    }
    /// Whether a device of compute capability `(major, minor)` can run the
    /// kernel: the rule of its target ([`Target::runs_on`]).
    pub fn runs_on(&self, capability: (i32, i32)) -> bool {
        match (u32::try_from(capability.0), u32::try_from(capability.1)) {
            (Ok(major), Ok(minor)) => self.target.runs_on(major, minor),
            _ => false,
        }
    }
}

/// A variant's GPU backward pass: the three kernels of the backward launch
/// contract ([`kernels_gen::backward`]), launched in order on one stream
/// with one argument list, and the keys per CTA of the main one.
///
/// The `#[sdpa_variants]` macro embeds it, as a constant, for a declaration
/// with `backward = true`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuBackward {
    preprocess: GpuKernel,
    main: GpuKernel,
    block_n: u32,
    convert: GpuKernel,
}

impl GpuBackward {
    /// The backward kernels: `preprocess` (`delta` and `lse_log2` per query
    /// row), `main` (`dk`, `dv` and the `dq` sums, `block_n` keys per CTA)
    /// and `convert` (`dq` from its `f32` sums).
    pub const fn new(
        preprocess: GpuKernel,
        main: GpuKernel,
        block_n: u32,
        convert: GpuKernel,
    ) -> GpuBackward {
        GpuBackward {
            preprocess,
            main,
            block_n,
            convert,
        }
    }
    /// The first kernel: `delta = rowsum(dout ∘ out)` and `lse · log2(e)`
    /// per query row; grid `(ceil(Sq / block_m), Hq, B)`.
    pub fn preprocess(&self) -> &GpuKernel {
        &self.preprocess
    }
    /// The second kernel: `dk`, `dv` and the `dq` sums; grid
    /// `(ceil(Sk / block_n), Hkv, B)`. Its `block_m` is the query rows per
    /// `dq` block, the granularity of the `sem` counters.
    pub fn main(&self) -> &GpuKernel {
        &self.main
    }
    /// Keys per CTA of [`GpuBackward::main`].
    pub fn block_n(&self) -> u32 {
        self.block_n
    }
    /// The third kernel: `dq = dq_accum · scale` in the input dtype; grid
    /// `(ceil(Sq / block_m), Hq, B)`.
    pub fn convert(&self) -> &GpuKernel {
        &self.convert
    }
    /// The three kernels in launch order.
    pub fn kernels(&self) -> [&GpuKernel; 3] {
        [&self.preprocess, &self.main, &self.convert]
    }
    /// Whether a device of compute capability `(major, minor)` runs all
    /// three kernels ([`GpuKernel::runs_on`]).
    pub fn runs_on(&self, capability: (i32, i32)) -> bool {
        self.kernels().iter().all(|k| k.runs_on(capability))
    }
}

/// One compiled variant: its spec, its CPU kernel, its GPU kernels and,
/// where declared with `backward = true`, its backward kernels.
#[derive(Clone, Copy, Debug)]
pub struct Variant {
    spec: VariantSpec,
    cpu: CpuKernelFn,
    backward: Option<CpuBackwardFn>,
    gpu: &'static [GpuKernel],
    gpu_backward: Option<GpuBackward>,
}

impl Variant {
    /// A variant with its CPU kernel and no GPU kernel.
    pub const fn new(spec: VariantSpec, cpu: CpuKernelFn) -> Variant {
        Variant {
            spec,
            cpu,
            backward: None,
            gpu: &[],
            gpu_backward: None,
        }
    }
    /// The same variant with its CPU backward kernel (the macro adds it
    /// where the declaration says `backward = true`).
    pub const fn with_cpu_backward(self, backward: CpuBackwardFn) -> Variant {
        Variant {
            backward: Some(backward),
            ..self
        }
    }
    /// The CPU backward kernel, or an error saying which attribute to add
    /// where the variant was declared without one.
    pub fn cpu_backward(&self) -> Result<CpuBackwardFn> {
        self.backward
            .ok_or(SdpaError::BackwardNotDeclared { variant: self.spec })
    }
    /// The same variant with its GPU backward kernels (the macro adds them
    /// where the declaration says `backward = true`).
    pub const fn with_gpu_backward(self, gpu_backward: GpuBackward) -> Variant {
        Variant {
            gpu_backward: Some(gpu_backward),
            ..self
        }
    }
    /// The GPU backward kernels, or an error saying which attribute to add
    /// where the variant was declared without them.
    pub fn gpu_backward(&self) -> Result<&GpuBackward> {
        self.gpu_backward
            .as_ref()
            .ok_or(SdpaError::BackwardNotDeclared { variant: self.spec })
    }
    /// The same variant with GPU kernels in order of preference: a device
    /// runs the first one it can ([`GpuKernel::runs_on`]) that can run the
    /// call (a kernel that loads through tensor maps cannot where no map
    /// describes a tensor; the next one runs instead). The macro lists the
    /// architecture-specific kernels first and the portable (sm_80) one
    /// last.
    pub const fn with_gpu_kernels(self, gpu: &'static [GpuKernel]) -> Variant {
        Variant { gpu, ..self }
    }
    /// What the variant is specialised for.
    pub fn spec(&self) -> &VariantSpec {
        &self.spec
    }
    /// The CPU kernel.
    pub fn cpu_kernel(&self) -> CpuKernelFn {
        self.cpu
    }
    /// Every GPU kernel, in order of preference.
    pub fn gpu_kernels(&self) -> &'static [GpuKernel] {
        self.gpu
    }
    /// The portable GPU kernel, if one was generated: the one a device of
    /// compute capability 8.0, the oldest the kernels support, prefers
    /// ([`Variant::gpu_kernel_for`]).
    pub fn gpu_kernel(&self) -> Option<&'static GpuKernel> {
        self.gpu_kernel_for(PORTABLE_CAPABILITY)
    }
    /// The Hopper (sm_90a) kernel, if one was generated for this variant.
    pub fn gpu_kernel_sm90(&self) -> Option<&'static GpuKernel> {
        self.gpu.iter().find(|k| k.target() == Target::Sm90a)
    }
    /// The GPU kernels a device of compute capability `(major, minor)` runs
    /// ([`GpuKernel::runs_on`]), in order of preference: the one place
    /// that rule is written.
    pub fn gpu_kernels_for(
        &self,
        capability: (i32, i32),
    ) -> impl Iterator<Item = &'static GpuKernel> {
        self.gpu.iter().filter(move |k| k.runs_on(capability))
    }
    /// The kernel a device of compute capability `(major, minor)` prefers:
    /// the first of [`Variant::gpu_kernels_for`]. A call runs a later one
    /// where this one cannot run it (see [`Variant::with_gpu_kernels`]).
    pub fn gpu_kernel_for(&self, capability: (i32, i32)) -> Option<&'static GpuKernel> {
        self.gpu_kernels_for(capability).next()
    }
    /// The kernel family a call of this variant runs on a machine, as `sdpa
    /// info` reports it: the CPU kernel where there is no CUDA device
    /// (`device` is `None`), else the target of the kernel a device of
    /// compute capability `device` prefers ([`Variant::gpu_kernel_for`];
    /// with `portable_only`, as `SDPA_CUDA_KERNEL=sm80` asks, the one a
    /// device of capability 8.0 prefers). `None` where the device runs none
    /// of the variant's GPU kernels. A call that the preferred kernel cannot
    /// run runs the next one (see [`Variant::with_gpu_kernels`]).
    ///
    /// ```
    /// use sdpa_runtime::prelude::*;
    /// use sdpa_runtime::{KernelFamily, Target};
    ///
    /// #[sdpa_variants(head_sizes = [128], causal = [false], dtypes = [bf16])]
    /// pub struct Hopper;
    ///
    /// let variant = Hopper.variant_table().find(128, false, DType::BF16).unwrap();
    /// assert_eq!(variant.kernel_family(None, false), Some(KernelFamily::Cpu));
    /// assert_eq!(variant.kernel_family(Some((9, 0)), false), Some(KernelFamily::Gpu(Target::Sm90a)));
    /// assert_eq!(variant.kernel_family(Some((9, 0)), true), Some(KernelFamily::Gpu(Target::Sm80)));
    /// assert_eq!(variant.kernel_family(Some((7, 5)), false), None);
    /// ```
    pub fn kernel_family(
        &self,
        device: Option<(i32, i32)>,
        portable_only: bool,
    ) -> Option<KernelFamily> {
        match device {
            None => Some(KernelFamily::Cpu),
            Some(_) if portable_only => self.gpu_kernel().map(|k| KernelFamily::Gpu(k.target())),
            Some(capability) => self
                .gpu_kernel_for(capability)
                .map(|k| KernelFamily::Gpu(k.target())),
        }
    }
}

/// Where a variant's forward pass runs ([`Variant::kernel_family`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelFamily {
    /// The CPU kernel compiled for the variant.
    Cpu,
    /// The variant's GPU kernel for this target.
    Gpu(Target),
}

/// `cpu`, or the GPU kernel's target (`sm_80`, `sm_90a`).
impl std::fmt::Display for KernelFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelFamily::Cpu => f.pad("cpu"),
            KernelFamily::Gpu(target) => f.pad(target.name()),
        }
    }
}

/// Every variant a backend type was declared with, and the declaration
/// itself (for error messages).
#[derive(Debug)]
pub struct VariantTable {
    variants: &'static [Variant],
    head_sizes: &'static [usize],
    causal: &'static [bool],
    dtypes: &'static [DType],
}

impl VariantTable {
    /// A table; the macro builds it from the declaration.
    pub const fn new(
        variants: &'static [Variant],
        head_sizes: &'static [usize],
        causal: &'static [bool],
        dtypes: &'static [DType],
    ) -> VariantTable {
        VariantTable {
            variants,
            head_sizes,
            causal,
            dtypes,
        }
    }
    /// Every variant.
    pub fn variants(&self) -> &'static [Variant] {
        self.variants
    }
    /// The declared head sizes.
    pub fn head_sizes(&self) -> &'static [usize] {
        self.head_sizes
    }
    /// The declared causal values.
    pub fn causal(&self) -> &'static [bool] {
        self.causal
    }
    /// The declared element types.
    pub fn dtypes(&self) -> &'static [DType] {
        self.dtypes
    }

    /// Checks that a head size and causal flag were declared.
    pub fn check_declared(&self, head_size: usize, causal: bool) -> Result<()> {
        if !self.head_sizes.contains(&head_size) {
            return Err(SdpaError::UndeclaredHeadSize {
                head_size,
                declared: self.head_sizes.to_vec(),
            });
        }
        if !self.causal.contains(&causal) {
            return Err(SdpaError::UndeclaredCausal {
                causal,
                declared: self.causal.to_vec(),
            });
        }
        Ok(())
    }

    /// The variant for a (head size, causal, dtype), or an error naming what
    /// was declared.
    pub fn find(&self, head_size: usize, causal: bool, dtype: DType) -> Result<&'static Variant> {
        self.check_declared(head_size, causal)?;
        self.variants
            .iter()
            .find(|v| {
                v.spec
                    == VariantSpec {
                        head_size,
                        causal,
                        dtype,
                    }
            })
            .ok_or_else(|| SdpaError::UndeclaredDtype {
                dtype,
                declared: self
                    .dtypes
                    .iter()
                    .map(|d| d.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_maps_are_declared_in_a_const() {
        const PLAIN: GpuKernel = GpuKernel::new("", "k", Target::Sm90a, 128, 384, 1024);
        const MAPPED: GpuKernel = PLAIN.with_tensor_maps(128, 96);
        assert_eq!(PLAIN.tensor_maps(), None);
        assert_eq!(
            MAPPED.tensor_maps(),
            Some(TensorMaps {
                q_rows: 128,
                kv_rows: 96
            })
        );
        assert_eq!((MAPPED.entry(), MAPPED.block_m()), ("k", 128));
    }

    #[test]
    fn a_kernel_runs_where_its_target_does() {
        let sm80 = GpuKernel::new("", "k", Target::Sm80, 64, 128, 0);
        let sm90a = GpuKernel::new("", "k", Target::Sm90a, 128, 384, 0);
        for cap in [
            (7, 5),
            (8, 0),
            (8, 9),
            (9, 0),
            (9, 1),
            (10, 0),
            (-1, 0),
            (9, -1),
        ] {
            for k in [sm80, sm90a] {
                let (major, minor) = (cap.0.max(0) as u32, cap.1.max(0) as u32);
                let expected = cap.0 >= 0 && cap.1 >= 0 && k.target().runs_on(major, minor);
                assert_eq!(k.runs_on(cap), expected, "{:?} on {cap:?}", k.target());
            }
        }
        assert!(sm80.runs_on((12, 0)) && !sm80.runs_on((7, 5)));
        assert!(sm90a.runs_on((9, 0)) && !sm90a.runs_on((10, 0)));
    }

    #[test]
    fn a_device_prefers_the_first_kernel_it_runs() {
        static KERNELS: [GpuKernel; 2] = [
            GpuKernel::new("", "hopper", Target::Sm90a, 128, 384, 0),
            GpuKernel::new("", "portable", Target::Sm80, 64, 128, 0),
        ];
        fn cpu(
            _: &Problem<'_>,
            _: &mut TensorViewMut<'_>,
            _: Option<&mut TensorViewMut<'_>>,
        ) -> Result<()> {
            Ok(())
        }
        let spec = VariantSpec::new(64, false, DType::BF16).unwrap();
        let v = Variant::new(spec, cpu).with_gpu_kernels(&KERNELS);
        let entry = |cap| v.gpu_kernel_for(cap).map(|k| k.entry());
        assert_eq!(entry((9, 0)), Some("hopper"));
        assert_eq!(entry((8, 6)), Some("portable"));
        assert_eq!(entry((10, 0)), Some("portable"));
        assert_eq!(entry((7, 0)), None);
        let runs = |cap| {
            v.gpu_kernels_for(cap)
                .map(|k| k.entry())
                .collect::<Vec<_>>()
        };
        assert_eq!(runs((9, 0)), ["hopper", "portable"]);
        assert_eq!(runs((8, 0)), ["portable"]);
        assert!(runs((7, 5)).is_empty());
        assert_eq!(v.gpu_kernel().map(|k| k.entry()), Some("portable"));
        assert_eq!(v.gpu_kernel_sm90().map(|k| k.entry()), Some("hopper"));
        let cpu_only = Variant::new(spec, cpu);
        assert!(cpu_only.gpu_kernels().is_empty() && cpu_only.gpu_kernel().is_none());
    }

    #[test]
    fn the_gpu_backward_is_declared_in_a_const_and_absent_without_it() {
        const PRE: GpuKernel = GpuKernel::new("", "pre", Target::Sm80, 8, 256, 0);
        const MAIN: GpuKernel = GpuKernel::new("", "main", Target::Sm80, 64, 128, 0);
        const CONVERT: GpuKernel = GpuKernel::new("", "dq", Target::Sm80, 8, 256, 0);
        const BACKWARD: GpuBackward = GpuBackward::new(PRE, MAIN, 128, CONVERT);
        fn cpu(
            _: &Problem<'_>,
            _: &mut TensorViewMut<'_>,
            _: Option<&mut TensorViewMut<'_>>,
        ) -> Result<()> {
            Ok(())
        }
        const SPEC: VariantSpec = VariantSpec {
            head_size: 64,
            causal: true,
            dtype: DType::F16,
        };
        static TRAINING: Variant = Variant::new(SPEC, cpu).with_gpu_backward(BACKWARD);
        static INFERENCE: Variant = Variant::new(SPEC, cpu);
        let b = TRAINING.gpu_backward().unwrap();
        let entries = b.kernels().map(|k| k.entry());
        assert_eq!(entries, ["pre", "main", "dq"]);
        assert_eq!((b.block_n(), b.main().block_m()), (128, 64));
        assert!(b.runs_on((8, 0)) && b.runs_on((9, 0)) && !b.runs_on((7, 5)));
        let err = INFERENCE.gpu_backward().unwrap_err();
        assert!(matches!(err, SdpaError::BackwardNotDeclared { .. }));
        assert!(err.to_string().contains("add `backward = true`"), "{err}");
    }
}

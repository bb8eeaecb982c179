//! The JIT cache: each kernel's PTX (a variant has one per target) is
//! loaded into each context once, on first use, and its function handle
//! kept for the life of the process.
//!
//! Thread-safe: the map is locked only to find a kernel's slot; the slot's
//! own lock is held while the driver compiles, so concurrent first calls of
//! one kernel wait for a single load while other kernels load in
//! parallel. A failed load is not cached (the next call tries again).
//!
//! The PTX is handed to `CudaContext::load_module` as a `cudarc::nvrtc::Ptx`
//! built from source text: the `nvrtc` feature of `cudarc` is enabled for
//! that type alone. Nothing here compiles CUDA C; loaded at run time,
//! libnvrtc would be opened only by a call into NVRTC, and there is none,
//! so only the driver is needed at run time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::Ptx;
use kernels_gen::ptx::Target;

use super::jit_log;
use crate::error::{Result, SdpaError};
use crate::variant::GpuKernel;

/// Dynamic shared memory a CTA may use without opting in.
const DEFAULT_SMEM_LIMIT: u32 = 48 * 1024;

/// One JIT load: which kernel, on which device, how long the driver took,
/// and what it allocated.
///
/// A variant's kernels share their entry name (the Hopper kernel and the
/// portable one of `sdpa_fwd_d128_causal_bf16` are both called that), so a
/// kernel is its `entry` and its `target` together.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct JitLoad {
    /// The kernel's entry point, e.g. `sdpa_fwd_d128_causal_bf16`.
    pub entry: &'static str,
    /// The architecture the kernel's PTX targets ([`GpuKernel::target`]).
    pub target: Target,
    /// The device's ordinal.
    pub ordinal: usize,
    /// How long loading the module took (PTX to machine code included).
    pub elapsed: Duration,
    /// Registers per thread, as the driver reports them.
    pub registers: i32,
    /// Local memory per thread in bytes (spills and stack).
    pub local_bytes: i32,
}

/// Every JIT load of this process so far, oldest first.
///
/// A kernel (an `entry` and a `target`) appears once per context it ran
/// in; the first call that runs it on a device pays its `elapsed` time,
/// later calls nothing. A variant may appear with more than one kernel in a
/// context: a call whose tensors no tensor map describes runs the portable
/// kernel where the device prefers the Hopper one, so both are loaded.
pub fn jit_loads() -> Vec<JitLoad> {
    loads().lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn loads() -> &'static Mutex<Vec<JitLoad>> {
    static LOADS: OnceLock<Mutex<Vec<JitLoad>>> = OnceLock::new();
    LOADS.get_or_init(Default::default)
}

/// A context (by its driver handle) and a kernel (by the address of its
/// static PTX text, which the variant table holds for the whole process).
type Key = (usize, usize, usize);

type Slot = Arc<Mutex<Option<CudaFunction>>>;

/// The function of `kernel` in `ctx`, loading its module on first use.
pub(crate) fn function(ctx: &Arc<CudaContext>, kernel: &GpuKernel) -> Result<CudaFunction> {
    static SLOTS: OnceLock<Mutex<HashMap<Key, Slot>>> = OnceLock::new();
    let key = (
        ctx.cu_ctx() as usize,
        kernel.ptx().as_ptr() as usize,
        kernel.ptx().len(),
    );
    let slot = SLOTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key)
        .or_default()
        .clone();
    let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(function) = slot.as_ref() {
        return Ok(function.clone());
    }
    let start = Instant::now();
    let function = load(ctx, kernel)?;
    let elapsed = start.elapsed();
    let registers = function.num_regs().unwrap_or(-1);
    let local_bytes = function.local_size_bytes().unwrap_or(-1);
    tracing::debug!(
        entry = kernel.entry(),
        target = kernel.target().name(),
        device = ctx.ordinal(),
        jit_ms = elapsed.as_secs_f64() * 1e3,
        registers,
        local_bytes,
        smem_bytes = kernel.smem_bytes(),
        "JIT-loaded a kernel"
    );
    loads()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(JitLoad {
            entry: kernel.entry(),
            target: kernel.target(),
            ordinal: ctx.ordinal(),
            elapsed,
            registers,
            local_bytes,
        });
    *slot = Some(function.clone());
    Ok(function)
}

/// The most dynamic shared memory a block of `ctx`'s device may opt in to.
fn smem_limit(ctx: &Arc<CudaContext>) -> Result<i32> {
    ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_err(|e| {
            SdpaError::cuda(
                format_args!("reading device {}'s shared memory", ctx.ordinal()),
                e,
            )
        })
}

/// Refuses a launch of `kernel` with a mask on `ctx`'s device where the
/// shared memory it then needs ([`GpuKernel::smem_bytes_for`]) is more than
/// the device allows a block.
pub(crate) fn check_masked_smem(ctx: &Arc<CudaContext>, kernel: &GpuKernel) -> Result<()> {
    let need = kernel.smem_bytes_for(true);
    if need <= DEFAULT_SMEM_LIMIT || kernel.mask_smem_bytes() == 0 {
        return Ok(());
    }
    let limit = smem_limit(ctx)?;
    if i64::from(need) > i64::from(limit) {
        return Err(SdpaError::BackendUnavailable {
            backend: "cuda",
            reason: format!(
                "with a mask, kernel {} needs {need} bytes of shared memory per block and \
                 device {} allows {limit}; run this backward without the mask, or on the CPU",
                kernel.entry(),
                ctx.ordinal()
            ),
        });
    }
    Ok(())
}

/// Loads the module, finds the entry point and sets its shared-memory
/// limit, checking the kernel's needs against the device.
fn load(ctx: &Arc<CudaContext>, kernel: &GpuKernel) -> Result<CudaFunction> {
    let entry = kernel.entry();
    let ordinal = ctx.ordinal();
    if kernel.ptx().contains('\0') || entry.contains('\0') {
        return Err(SdpaError::Cuda(format!(
            "the PTX or entry name of kernel {entry:?} contains a NUL byte"
        )));
    }
    let module = ctx.load_module(Ptx::from_src(kernel.ptx())).map_err(|e| {
        let log = jit_log::error_log(ctx, kernel.ptx())
            .map(|log| format!("; the JIT compiler said: {log}"))
            .unwrap_or_default();
        SdpaError::Cuda(format!(
            "loading the PTX of {entry} ({}) on device {ordinal}: {e}{log}",
            kernel.target().name()
        ))
    })?;
    let function = module.load_function(entry).map_err(|e| {
        SdpaError::cuda(
            format_args!("finding entry point {entry} in its module on device {ordinal}"),
            e,
        )
    })?;

    // The limit covers a launch with a mask where the device allows it
    // (kernels that stage the mask need more then), and one without at
    // least; a masked launch past the device's limit is refused where it
    // is made (`check_masked_smem`).
    let smem = kernel.smem_bytes();
    let masked = kernel.smem_bytes_for(true);
    if masked > DEFAULT_SMEM_LIMIT {
        let limit = smem_limit(ctx)?;
        if i64::from(smem) > i64::from(limit) {
            return Err(SdpaError::BackendUnavailable {
                backend: "cuda",
                reason: format!(
                    "kernel {entry} needs {smem} bytes of shared memory per block and device \
                     {ordinal} allows {limit}"
                ),
            });
        }
        let raise = masked.min(u32::try_from(limit).unwrap_or(u32::MAX));
        function
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                raise as i32,
            )
            .map_err(|e| {
                SdpaError::cuda(
                    format_args!("raising the shared memory limit of {entry} to {raise} bytes"),
                    e,
                )
            })?;
    }
    let max_threads = function
        .max_threads_per_block()
        .map_err(|e| SdpaError::cuda(format_args!("reading the thread limit of {entry}"), e))?;
    if i64::from(kernel.threads()) > i64::from(max_threads) {
        return Err(SdpaError::BackendUnavailable {
            backend: "cuda",
            reason: format!(
                "kernel {entry} launches {} threads per block but device {ordinal} allows it \
                 only {max_threads} (registers per thread: {})",
                kernel.threads(),
                function.num_regs().unwrap_or(-1)
            ),
        });
    }
    Ok(function)
}

//! Why a PTX module failed to load, in the JIT compiler's own words.
//!
//! `cudarc`'s safe `CudaContext::load_module` calls `cuModuleLoadData`,
//! which reports only an error code (`CUDA_ERROR_INVALID_PTX`, ...). The
//! compiler's log, which names the line and the instruction, needs
//! `cuModuleLoadDataEx` with a log buffer, which the safe layer does not
//! offer. This module makes that one `sys` call, only after a load through
//! the safe layer has failed, to put the log into the error message.

use std::ffi::{c_void, CString};

use cudarc::driver::sys::{self, CUjit_option};
use cudarc::driver::CudaContext;

/// The size of the log buffer; the driver truncates longer logs.
const LOG_BYTES: usize = 16 * 1024;

/// Loads `ptx` again with an error log and returns the log, if the driver
/// wrote one.
pub(crate) fn error_log(ctx: &CudaContext, ptx: &str) -> Option<String> {
    let src = CString::new(ptx).ok()?;
    ctx.bind_to_thread().ok()?;
    let mut log = vec![0u8; LOG_BYTES];
    let mut options = [
        CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
        CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
    ];
    // The driver reads the size option's value as an integer stored in the
    // pointer-sized slot itself.
    let mut values: [*mut c_void; 2] = [log.as_mut_ptr().cast(), LOG_BYTES as *mut c_void];
    let mut module: sys::CUmodule = std::ptr::null_mut();
    // SAFETY: `src` is a NUL-terminated PTX text that outlives the call;
    // `options` and `values` hold two entries each, as `numOptions` says;
    // the log buffer is `LOG_BYTES` long, as its size option says, and
    // outlives the call; `module` is a valid place for the handle. The
    // context is bound to this thread above.
    let result = unsafe {
        sys::cuModuleLoadDataEx(
            &mut module,
            src.as_ptr().cast(),
            options.len() as u32,
            options.as_mut_ptr(),
            values.as_mut_ptr(),
        )
    };
    if result == sys::CUresult::CUDA_SUCCESS && !module.is_null() {
        // SAFETY: the module was just loaded by this call and nothing else
        // holds its handle.
        let _ = unsafe { sys::cuModuleUnload(module) };
    }
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]).trim().to_string();
    (!text.is_empty()).then_some(text)
}

//! Whether the CUDA driver and NCCL libraries can be opened, before any call
//! into them.
//!
//! `cudarc` opens them in one of two ways, chosen by the build: loaded at
//! run time (this crate's default, `fallback-dynamic-loading`), where a call
//! into a missing library panics; or linked (`dynamic-linking`, which
//! candle-core's `cuda` feature turns on for the whole build), where a
//! process that started already has them. Asking the loader for the
//! library by name answers for both, so the probe needs no knowledge of
//! which way this build went. The names are among those `cudarc` tries, so
//! a library found here is one `cudarc` finds.

/// The driver library's names: the unversioned development link first, then
/// the name every driver install has.
#[cfg(not(windows))]
const DRIVER: &[&str] = &["libcuda.so", "libcuda.so.1"];
#[cfg(windows)]
const DRIVER: &[&str] = &["nvcuda.dll"];

/// NCCL's name (its wheels ship `libnccl.so.2`, which `cudarc` does not try).
#[cfg(all(feature = "nccl", not(windows)))]
const NCCL: &[&str] = &["libnccl.so"];
#[cfg(all(feature = "nccl", windows))]
const NCCL: &[&str] = &["nccl.dll"];

/// Whether the loader finds one of `names`.
fn present(names: &[&str]) -> bool {
    names.iter().any(|name| {
        // SAFETY: opening a shared library runs its initialisers, as any
        // later use of it through cudarc would; it is closed again when the
        // handle drops (the loader keeps it if the process linked it).
        unsafe { libloading::Library::new(*name) }.is_ok()
    })
}

/// Whether the CUDA driver library (`libcuda`) can be opened.
pub(crate) fn driver_present() -> bool {
    present(DRIVER)
}

/// Whether the NCCL library can be opened.
#[cfg(feature = "nccl")]
pub(crate) fn nccl_present() -> bool {
    present(NCCL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_that_does_not_exist_is_absent() {
        assert!(!present(&["libsdpa-no-such-library.so.7"]));
    }

    #[test]
    fn the_c_library_is_present() {
        // Every Linux process has it; the probe must see a library the
        // loader can open.
        #[cfg(target_os = "linux")]
        assert!(present(&["libc.so.6"]));
    }
}

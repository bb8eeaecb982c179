//! `sdpa run` on well-formed safetensors files of arbitrary cases
//! (`sdpa_fuzz::structured`), given to the same code as `safetensors_case`.
//! The byte-level target spends most of its time in the JSON header; this
//! one reaches the checks and kernels behind it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sdpa_fuzz::structured::{file, Input};

fuzz_target!(|input: Input| {
    if let Some(file) = file(&input) {
        sdpa_fuzz::run(&file);
    }
});

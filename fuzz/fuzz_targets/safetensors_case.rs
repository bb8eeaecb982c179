//! `sdpa run` on arbitrary bytes: the input file is read by the command's
//! own reader and, when it is a case, computed on the CPU as the command
//! computes it (`sdpa_fuzz::run`). Any bytes must give a result or an
//! error, never a panic.
//!
//! Cases with a tensor of more than `MAX_ELEMENTS` elements, or more than
//! `MAX_WORK` multiply-adds, are read but not computed, to keep executions
//! fast; the reading itself is bounded by the input's length (safetensors
//! checks every tensor's bytes against its shape).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    sdpa_fuzz::run(bytes);
});

//! Compile-fail cases of `#[sdpa_variants]`: each `ui/<mistake>.rs` must fail
//! to compile with exactly the errors in `ui/<mistake>.stderr`.
//!
//! After changing a message, regenerate the expectations with
//! `TRYBUILD=overwrite cargo test -p sdpa-tests --test compiletest` and read
//! every changed `.stderr`.

#[test]
fn ui() {
    // Relative to this crate's manifest directory, where `cargo test` runs.
    trybuild::TestCases::new().compile_fail("ui/*.rs");
}

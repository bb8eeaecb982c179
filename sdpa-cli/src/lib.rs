//! The library half of the `sdpa` command: the attention variants the
//! command is compiled with ([`variants::SdpaCli`]), declared with
//! `#[sdpa_variants]` as any user of `sdpa-runtime` declares them. The
//! command and its tests (which assemble every variant's PTX with `ptxas`)
//! share this one table. The reading of `sdpa run`'s input files lives here
//! too ([`safetensors_io`], with the command's [`error`] type), so that the
//! fuzz target in `fuzz/` feeds its bytes to the same code.

pub mod error;
pub mod safetensors_io;
pub mod variants;

//! The library half of the `sdpa` command: the attention variants the
//! command is compiled with ([`variants::SdpaCli`]), declared with
//! `#[sdpa_variants]` as any user of `sdpa-runtime` declares them. The
//! command and its tests (which assemble every variant's PTX with `ptxas`)
//! share this one table.

pub mod variants;

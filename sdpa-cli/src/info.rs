//! `sdpa info`: what this binary was compiled with and where it would run.

use sdpa_runtime::prelude::*;
use sdpa_runtime::{probe_cuda, select, CudaProbe, Residence, BACKEND_ENV};

use crate::error::Result;
use crate::variants::SdpaCli;

/// Prints the compiled variants, the backend `auto` picks and why, the
/// `SDPA_BACKEND` request and the CPU thread count.
pub fn run() -> Result<()> {
    let table = SdpaCli.variant_table();
    let list = |items: Vec<String>| items.join(", ");
    println!(
        "variants: {} compiled ({} head sizes x {} causal values x {} dtypes)",
        table.variants().len(),
        table.head_sizes().len(),
        table.causal().len(),
        table.dtypes().len()
    );
    println!(
        "  head sizes: {}",
        list(table.head_sizes().iter().map(|d| d.to_string()).collect())
    );
    println!(
        "  causal:     {}",
        list(table.causal().iter().map(|c| c.to_string()).collect())
    );
    println!(
        "  dtypes:     {}",
        list(table.dtypes().iter().map(|d| d.to_string()).collect())
    );

    match probe_cuda() {
        CudaProbe::Present { devices } => println!("cuda: driver present, {devices} device(s)"),
        CudaProbe::Absent(reason) => println!("cuda: absent ({reason})"),
    }
    println!("auto: {}", describe(BackendKind::Auto));

    match std::env::var(BACKEND_ENV) {
        Ok(value) => match BackendKind::from_env() {
            Ok(Some(kind)) => println!("{BACKEND_ENV}={value:?}: {}", describe(kind)),
            Ok(None) => println!("{BACKEND_ENV}={value:?}: empty, so auto applies"),
            Err(e) => println!("{BACKEND_ENV}={value:?}: {e}"),
        },
        Err(_) => println!("{BACKEND_ENV}: not set, so auto applies unless --backend is given"),
    }
    println!("cpu threads: {} (rayon)", rayon::current_num_threads());
    Ok(())
}

/// "cpu, because ..." for a request on host tensors, or why it cannot run.
fn describe(request: BackendKind) -> String {
    match select(request, Residence::Host) {
        Ok(s) => format!("{}, because {}", s.backend, s.reason),
        Err(e) => format!("cannot run: {e}"),
    }
}

//! `sdpa info`: what this binary was compiled with and where it would run.

use sdpa_runtime::prelude::*;
use sdpa_runtime::{cuda, probe_cuda, select, CudaProbe, Residence, Target, BACKEND_ENV};

use crate::error::Result;
use sdpa_cli::variants::SdpaCli;

/// Prints the compiled variants, the CUDA devices, the backend `auto` picks
/// and why, the `SDPA_BACKEND` request and the CPU thread count.
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

    let gpu_kernels = table
        .variants()
        .iter()
        .flat_map(|v| v.gpu_kernels())
        .collect::<Vec<_>>();
    // Per target, in the order the variants prefer them.
    let mut targets: Vec<(Target, usize)> = Vec::new();
    for k in &gpu_kernels {
        match targets.iter_mut().find(|(t, _)| *t == k.target()) {
            Some((_, n)) => *n += 1,
            None => targets.push((k.target(), 1)),
        }
    }
    let targets: Vec<String> = targets
        .iter()
        .map(|(t, n)| format!("{n} {}", t.name()))
        .collect();
    println!(
        "  gpu kernels: {} embedded as PTX ({}), {} KiB in all",
        gpu_kernels.len(),
        targets.join(", "),
        gpu_kernels.iter().map(|k| k.ptx().len()).sum::<usize>() / 1024
    );

    let device = match probe_cuda() {
        CudaProbe::Present { devices } => {
            println!("cuda: driver present, {devices} device(s)");
            match cuda::devices() {
                Ok(list) => {
                    for d in list {
                        println!(
                            "  device {}: {}, sm_{}{}, {} MiB, {} SMs",
                            d.ordinal,
                            d.name,
                            d.compute_capability.0,
                            d.compute_capability.1,
                            d.total_memory >> 20,
                            d.multiprocessors
                        );
                    }
                }
                Err(e) => println!("  cannot describe the devices: {e}"),
            }
            Some(Residence::Cuda { ordinal: 0 })
        }
        CudaProbe::Absent(reason) => {
            println!("cuda: absent ({reason})");
            None
        }
    };
    println!(
        "auto, host tensors (sdpa run): {}",
        describe(BackendKind::Auto, Residence::Host)
    );
    match device {
        Some(residence) => println!(
            "auto, device tensors (sdpa bench puts them on device 0): {}",
            describe(BackendKind::Auto, residence)
        ),
        None => println!("auto, sdpa bench: cpu, because there is no CUDA device"),
    }

    match std::env::var(BACKEND_ENV) {
        Ok(value) => match BackendKind::from_env() {
            Ok(Some(kind)) => println!(
                "{BACKEND_ENV}={value:?}, host tensors: {}",
                describe(kind, Residence::Host)
            ),
            Ok(None) => println!("{BACKEND_ENV}={value:?}: empty, so auto applies"),
            Err(e) => println!("{BACKEND_ENV}={value:?}: {e}"),
        },
        Err(_) => println!("{BACKEND_ENV}: not set, so auto applies unless --backend is given"),
    }
    println!("cpu threads: {} (rayon)", rayon::current_num_threads());
    Ok(())
}

/// "cpu, because ..." for a request on tensors at `residence`, or why it
/// cannot run.
fn describe(request: BackendKind, residence: Residence) -> String {
    match select(request, residence) {
        Ok(s) => format!("{}, because {}", s.backend, s.reason),
        Err(e) => format!("cannot run: {e}"),
    }
}

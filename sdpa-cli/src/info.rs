//! `sdpa info`: what this binary was compiled with and where it would run.

use sdpa_runtime::prelude::*;
use sdpa_runtime::{
    cuda, probe_cuda, select, CudaProbe, KernelFamily, Residence, Target, Variant, BACKEND_ENV,
};

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

    // The capability of device 0, where `sdpa bench` puts its tensors.
    let mut capability = None;
    let device = match probe_cuda() {
        CudaProbe::Present { devices } => {
            println!("cuda: driver present, {devices} device(s)");
            match cuda::devices() {
                Ok(list) => {
                    capability = list.first().map(|d| d.compute_capability);
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

    kernels_here(table.variants(), capability);
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

/// Variants by dtype and causal flag (`bf16 causal`), with their head sizes.
type Kinds = Vec<(String, Vec<usize>)>;

/// Prints which kernel family each variant runs here
/// ([`Variant::kernel_family`]): the CPU kernel without a CUDA device, else
/// the first of its GPU kernels that device 0 runs. Variants are grouped by
/// family, then by dtype and causal flag, with their head sizes.
fn kernels_here(variants: &[Variant], capability: Option<(i32, i32)>) {
    let env = std::env::var(cuda::KERNEL_ENV).ok();
    // The runtime refuses other values of SDPA_CUDA_KERNEL at the first
    // call; only `sm80` changes the choice.
    let portable_only = env.as_deref() == Some("sm80");
    match capability {
        None => println!("kernel per variant here (no CUDA device): the CPU kernel"),
        Some((major, minor)) => println!(
            "kernel per variant on device 0 (compute capability {major}.{minor}{}), the \
             first of its GPU kernels the device runs (a call it cannot run runs the next):",
            match env.as_deref() {
                Some(v) if !v.is_empty() => format!(", {}={v}", cuda::KERNEL_ENV),
                _ => String::new(),
            }
        ),
    }
    // family -> (dtype and causal, head sizes), in order of first appearance.
    let mut families: Vec<(Option<KernelFamily>, Kinds)> = Vec::new();
    for v in variants {
        let family = v.kernel_family(capability, portable_only);
        let spec = v.spec();
        let kind = format!("{}{}", spec.dtype, if spec.causal { " causal" } else { "" });
        let i = match families.iter().position(|(f, _)| *f == family) {
            Some(i) => i,
            None => {
                families.push((family, Vec::new()));
                families.len() - 1
            }
        };
        let kinds = &mut families[i].1;
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, sizes)) => sizes.push(spec.head_size),
            None => kinds.push((kind, vec![spec.head_size])),
        }
    }
    for (family, kinds) in families {
        let count: usize = kinds.iter().map(|(_, sizes)| sizes.len()).sum();
        let name = match family {
            Some(f) => f.to_string(),
            None => "none (the device runs none of their GPU kernels)".to_owned(),
        };
        println!("  {name}: {count} variant(s)");
        // Kinds with the same head sizes share a line.
        let mut lines: Vec<(Vec<String>, Vec<usize>)> = Vec::new();
        for (kind, sizes) in kinds {
            match lines.iter_mut().find(|(_, s)| *s == sizes) {
                Some((names, _)) => names.push(kind),
                None => lines.push((vec![kind], sizes)),
            }
        }
        for (names, sizes) in lines {
            let sizes: Vec<String> = sizes.iter().map(usize::to_string).collect();
            println!("    {}: head sizes {}", names.join(", "), sizes.join(", "));
        }
    }
}

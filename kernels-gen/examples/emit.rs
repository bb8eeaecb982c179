//! Prints the sm_80 PTX of one variant, for reading or for `ptxas`:
//!
//! `cargo run -p kernels-gen --example emit -- 128 causal bf16 > k.ptx`

use kernels_gen::ptx::Target;
use kernels_gen::{gpu, DType, VariantSpec};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: emit HEAD_SIZE [causal] f32|f16|bf16";
    let head_size: usize = args.first().and_then(|s| s.parse().ok()).expect(usage);
    let causal = args.iter().any(|a| a == "causal");
    let dtype = args.iter().find_map(|a| DType::from_name(a)).expect(usage);
    let spec = VariantSpec::new(head_size, causal, dtype).unwrap_or_else(|e| panic!("{e}"));
    let k = gpu::generate(&spec, Target::Sm80);
    eprintln!(
        "{}: block_m {} threads {} smem {} B",
        k.entry, k.block_m, k.threads, k.smem_bytes
    );
    print!("{}", k.ptx);
}

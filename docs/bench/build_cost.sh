#!/usr/bin/env bash
# What declaring 8 variants adds to a consumer's release build: two throwaway
# consumers of sdpa-runtime (by path), one with no variants and one with 8,
# built once to fetch and build the dependencies, then rebuilt after touching
# main.rs, ROUNDS times each. Prints the times and the stripped binary sizes.
#
#   docs/bench/build_cost.sh [ROUNDS] [WORKDIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
rounds=${1:-3}
work=${2:-$(mktemp -d)}
export CARGO_TARGET_DIR=$work/target
for n in zero eight; do
  mkdir -p "$work/$n/src"
  cat > "$work/$n/Cargo.toml" <<TOML
[package]
name = "consumer-$n"
version = "0.1.0"
edition = "2021"
[dependencies]
sdpa-runtime = { path = "$root/sdpa-runtime" }
[profile.release]
strip = true
TOML
done
cat > "$work/zero/src/main.rs" <<'RS'
//! Baseline: the runtime linked, one CPU kernel called directly, no variants declared.
use sdpa_runtime::prelude::*;
fn main() -> Result<(), SdpaError> {
    let d = vec![0.5f32; 4 * 64];
    let t = TensorView::from_slice(&d, [1, 4, 1, 64])?;
    let p = sdpa_runtime::Problem::new(t, t, t, None, 0.125)?;
    let mut o = vec![0.0f32; 4 * 64];
    let mut ov = TensorViewMut::from_slice(&mut o, [1, 4, 1, 64])?;
    sdpa_runtime::cpu::attention::<64, false, f32>(&p, &mut ov)?;
    println!("{}", o[0]);
    Ok(())
}
RS
cat > "$work/eight/src/main.rs" <<'RS'
//! Eight variants declared, each run once through the backend trait.
use sdpa_runtime::prelude::*;
#[sdpa_variants(head_sizes = [64, 128], causal = [false, true], dtypes = [bf16, f16])]
pub struct ModelAttention;
fn main() -> Result<(), SdpaError> {
    for d in [64, 128] {
        for causal in [false, true] {
            let layer = ModelAttention.build_impl(AttentionParams::new(1, d).causal(causal))?;
            let b = vec![bf16::from_f32(0.5); 4 * d];
            let t = TensorView::from_slice(&b, [1, 4, 1, d])?;
            println!("{:?}", layer.forward(&t, &t, &t, &AttentionMetadata::default())?.shape());
            let h = vec![f16::from_f32(0.5); 4 * d];
            let t = TensorView::from_slice(&h, [1, 4, 1, d])?;
            println!("{:?}", layer.forward(&t, &t, &t, &AttentionMetadata::default())?.shape());
        }
    }
    Ok(())
}
RS
for n in zero eight; do (cd "$work/$n" && cargo build --release -q); done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
for _ in $(seq "$rounds"); do
  for n in zero eight; do
    touch "$work/$n/src/main.rs"
    s=$(date +%s.%N); (cd "$work/$n" && cargo build --release -q); e=$(date +%s.%N)
    printf '%-6s rebuild %.2f s\n' "$n" "$(echo "$e - $s" | bc)"
  done
done
ls -l "$CARGO_TARGET_DIR/release/consumer-zero" "$CARGO_TARGET_DIR/release/consumer-eight" | awk '{print $5, $9}'

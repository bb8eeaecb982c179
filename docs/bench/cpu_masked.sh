#!/usr/bin/env bash
# CPU masks and packed batches against unmasked calls (docs/benchmarks.md,
# "Masks and variable-length batches"): `sdpa bench --backend cpu` on one
# shape without a mask, with each `--mask`, and a `--varlen` batch, rounds
# alternating the cases, then the median GFLOP/s per useful FLOP of each
# and its ratio to the unmasked median.
#
#   docs/bench/cpu_masked.sh [ROUNDS] [OUT_DIR]
#
# SDPA (default: a release build made here) is the `sdpa` binary to time.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-5}
out=${2:-/tmp/sdpa-cpu-masked}
mkdir -p "$out"
if [ -z "${SDPA:-}" ]; then
  cargo build --release -q -p sdpa-cli
  target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  SDPA="$target_dir/release/sdpa"
fi
{
  date -u +"date %Y-%m-%dT%H:%MZ"
  lscpu | grep -E "^(Model name|CPU\(s\))" || true
  git log -1 --format="commit %h %s"
} | tee "$out/machine.txt"

# One shape: 1x8x2048x2048x128; the packed batch has 8 sequences of mixed
# lengths (512..2048 tokens), its useful FLOPs ~0.8 of the shape's.
shape=(--batch 1 --heads 8 --seq-q 2048 --head-size 128)
varlen=(--heads 8 --head-size 128 --varlen 512,1536,1024,2048,768,1280,640,1792)
cases=(plain key-padding:0.9 bool additive varlen)
for dtype in f32 bf16; do
  for r in $(seq 1 "$rounds"); do
    for c in "${cases[@]}"; do
      case $c in
        plain) args=("${shape[@]}") ;;
        varlen) args=("${varlen[@]}") ;;
        *) args=("${shape[@]}" --mask "$c") ;;
      esac
      "$SDPA" bench --backend cpu "${args[@]}" --dtype "$dtype" --warmup 2 --iters 7 \
        --json "$out/${dtype}_${c}_$r.json" >/dev/null
    done
  done
done

python3 - "$out" "$rounds" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
cases = ["plain", "key-padding:0.9", "bool", "additive", "varlen"]
print(f"{'dtype':5s} {'case':16s} {'GFLOP/s':>8s} {'ratio':>6s}  (median of {rounds} rounds, useful FLOPs)")
for dtype in ["f32", "bf16"]:
    med = {}
    for c in cases:
        runs = [json.load(open(f"{out}/{dtype}_{c}_{r}.json"))[0]["tflops"] * 1e3
                for r in range(1, rounds + 1)]
        med[c] = statistics.median(runs)
    for c in cases:
        print(f"{dtype:5s} {c:16s} {med[c]:8.1f} {med[c] / med['plain']:6.3f}")
EOF

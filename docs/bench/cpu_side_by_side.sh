#!/usr/bin/env bash
# CPU figures of docs/benchmarks.md: our `sdpa bench`, PyTorch's CPU SDPA and
# the FMA peak probe, back to back in each round, on the same machine.
#
#   docs/bench/cpu_side_by_side.sh [ROUNDS] [OUT_DIR]
#
# Needs: a release build of the `sdpa` command (built here), gcc with
# OpenMP, and torch in a throwaway virtual environment given by TORCH_PY
# (default /tmp/torchenv/bin/python; see docs/benchmarks.md to make one).
# Prints the table (medians over the rounds) at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
out=${2:-/tmp/sdpa-cpu-bench}
py=${TORCH_PY:-/tmp/torchenv/bin/python}
# The FMA peak probe, cpu_fma_peak.c, is not in this repository: ANCHORS
# names the folder that holds it.
anchors=${ANCHORS:?set ANCHORS to the folder holding cpu_fma_peak.c (the FMA peak probe)}
mkdir -p "$out"

cargo build --release -q -p sdpa-cli
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
sdpa="$target_dir/release/sdpa"
gcc -O2 -mavx512f -fopenmp "$anchors/cpu_fma_peak.c" -o "$out/fma_peak"

{
  date -u +"date %Y-%m-%dT%H:%MZ"
  uname -srm
  lscpu | grep -E "^(Model name|CPU\(s\)|Thread|L1d|L2|L3)" || true
  "$py" -c 'import torch; print("torch", torch.__version__, "threads", torch.get_num_threads())'
  git log -1 --format="commit %h %s"
} > "$out/machine.txt"
cat "$out/machine.txt"

# Waits (up to QUIET_WAIT seconds, default 60) until the rest of the machine
# uses less than a quarter of a core, measured over one second: on a shared
# build machine, other people's compiles otherwise take the cores mid-run.
wait_quiet() {
  local i a b busy
  for i in $(seq 1 "${QUIET_WAIT:-60}"); do
    a=($(head -1 /proc/stat)); sleep 1; b=($(head -1 /proc/stat))
    busy=$(( (b[1]+b[2]+b[3]+b[6]+b[7]+b[8]) - (a[1]+a[2]+a[3]+a[6]+a[7]+a[8]) ))
    # busy is in jiffies (1/100 s) over 1 s, summed over the CPUs.
    [ "$busy" -lt 25 ] && return 0
  done
  echo "(still busy after ${QUIET_WAIT:-60} s: measuring anyway)"
}

# Each round: the peak probe, then for every shape and dtype our bench and
# torch's right after it (so that both see the same load), then the probe.
for r in $(seq 1 "$rounds"); do
  echo "== round $r, $(uptime)"
  wait_quiet
  "$out/fma_peak" | tee "$out/peak-$r.txt"
  for preset in anchor anchor-4k anchor-causal clip decode; do
    for dtype in f32 bf16 f16; do
      wait_quiet
      "$sdpa" bench --backend cpu --preset "$preset" --dtype "$dtype" \
        --json "$out/ours-$r-$preset-$dtype.json" | tail -1
      "$py" docs/bench/torch_cpu_sdpa.py "$out/torch-$r-$preset-$dtype.json" "$dtype" "$preset" | grep -v '^#'
    done
  done
  wait_quiet
  "$out/fma_peak" | tee -a "$out/peak-$r.txt"
done
python3 docs/bench/summarize.py "$out" "$rounds"

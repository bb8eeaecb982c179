#!/usr/bin/env bash
# ptx-snapshot.sh OUT: writes the PTX that kernels-gen emits for every variant
# a declaration can name (head sizes 8..256, causal or not, every dtype): the
# portable sm_80 kernels into OUT/sm80 and the Hopper ones into OUT/sm90, each
# with the emitter's manifest.json. A restructuring that must not change the
# kernels diffs two snapshots: `diff -r BEFORE AFTER`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/ptx-snapshot.sh OUT}
sizes=$(seq 8 8 256)
# shellcheck disable=SC2086
cargo run -q --release -p kernels-gen --example emit -- --dir "$out/sm80" $sizes
# shellcheck disable=SC2086
cargo run -q --release -p kernels-gen --example emit -- --sm90 --dir "$out/sm90" $sizes
echo "ptx-snapshot: $(find "$out" -name '*.ptx' | wc -l) kernels in $out"

#!/usr/bin/env bash
# ptxas-compare.sh BEFORE AFTER [ARCH]: assembles every BEFORE/*.ptx and its
# namesake in AFTER with ptxas (-arch=ARCH, default sm_90a; `$SDPA_PTXAS`, else
# ptxas on the PATH) and compares what ptxas makes of them: registers, spill
# stores and loads, shared memory, the serialised-wgmma warning (C7512), and,
# where nvdisasm is found (`$NVDISASM`, else on the PATH), the SASS itself.
# For a change to the PTX that must not change the kernels in substance
# (dead instructions removed, registers renumbered): one line per kernel, then
# a summary. Exits 1 where a kernel is missing, its usage differs, or it
# spills or serialises its wgmma; a SASS difference is reported, not failed.
set -euo pipefail
before=${1:?usage: scripts/ptxas-compare.sh BEFORE AFTER [ARCH]}
after=${2:?usage: scripts/ptxas-compare.sh BEFORE AFTER [ARCH]}
arch=${3:-sm_90a}
ptxas=${SDPA_PTXAS:-ptxas}
nvdisasm=${NVDISASM:-$(command -v nvdisasm || true)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# usage line of `ptxas -v`: "Used N registers, used B barriers, S bytes smem, ..."
stats() {
    local log=$1
    local regs smem stores loads warn
    regs=$(grep -o 'Used [0-9]* registers' "$log" | grep -o '[0-9]*' | head -1 || true)
    smem=$(grep -o '[0-9]* bytes smem' "$log" | grep -o '^[0-9]*' | head -1 || true)
    stores=$(grep -o '[0-9]* bytes spill stores' "$log" | grep -o '^[0-9]*' | head -1 || true)
    loads=$(grep -o '[0-9]* bytes spill loads' "$log" | grep -o '^[0-9]*' | head -1 || true)
    warn=$(grep -c -e C7512 -e serialized "$log" || true)
    echo "regs=${regs:-?} spill=${stores:-?}/${loads:-?} smem=${smem:-0} wgmma_warn=$warn"
}

differ=0
same_sass=0
n=0
for b in "$before"/*.ptx; do
    name=$(basename "$b" .ptx)
    a="$after/$name.ptx"
    if [[ ! -f $a ]]; then
        echo "$name: missing in $after"
        differ=1
        continue
    fi
    n=$((n + 1))
    for side in before after; do
        src=$b
        [[ $side == after ]] && src=$a
        "$ptxas" -arch="$arch" -v -o "$work/$side.cubin" "$src" >"$work/$side.log" 2>&1
    done
    sb=$(stats "$work/before.log")
    sa=$(stats "$work/after.log")
    sass=""
    if [[ -n $nvdisasm ]]; then
        "$nvdisasm" "$work/before.cubin" >"$work/before.sass"
        "$nvdisasm" "$work/after.cubin" >"$work/after.sass"
        if cmp -s "$work/before.sass" "$work/after.sass"; then
            sass="sass identical"
            same_sass=$((same_sass + 1))
        else
            sass="sass DIFFERS ($(grep -c ';' "$work/before.sass") vs $(grep -c ';' "$work/after.sass") instructions)"
        fi
    else
        sass="cubin $(stat -c %s "$work/before.cubin") vs $(stat -c %s "$work/after.cubin") bytes"
    fi
    if [[ $sb == "$sa" ]]; then
        echo "$name: $sa; $sass"
    else
        echo "$name: DIFFERS before $sb, after $sa; $sass"
        differ=1
    fi
    if [[ $sa != *"spill=0/0"* || $sa != *"wgmma_warn=0"* ]]; then
        differ=1
    fi
done
echo "ptxas-compare: $n kernels; ptxas usage identical: $([[ $differ == 0 ]] && echo all || echo NO)" \
    "${nvdisasm:+; SASS identical: $same_sass of $n}"
exit "$differ"

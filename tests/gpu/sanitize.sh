#!/usr/bin/env bash
# sanitize.sh [DIR] [TOOL ...]: run the ragged-shape GPU tests (the
# `sanitize_ragged_*` tests of tests/tests/gpu_reliability.rs: every kernel
# family, every head size, dtype and causal flag of their declaration, on
# sequence lengths that are multiples of no tile, with masks and strides)
# under compute-sanitizer, one tool at a time.
#
#   DIR    the packed test binaries (default .gpu-bin, as scripts/gpu-pack makes
#          them); the binary run is DIR/gpu_reliability.test
#   TOOL   any of memcheck racecheck initcheck synccheck (default: all four)
#
# Prints each tool's ERROR SUMMARY line and the test harness's result line,
# and exits non-zero when any tool reports an error, a test fails, or a tool
# could not check anything (no device, no test run). The full output of each
# tool is kept in $SANITIZE_LOGS (default DIR/sanitize-logs).
#
# Environment:
#   COMPUTE_SANITIZER  the compute-sanitizer executable (default: PATH, then
#                      /usr/local/cuda*/bin and /opt/nvidia)
#   SANITIZE_FILTER    the test name filter (default sanitize_ragged_)
#   SANITIZE_ARGS      more compute-sanitizer arguments, e.g. "--print-limit 20"
#   SANITIZE_LOGS      where the logs go
#
# Run from the repository root on the GPU host, e.g.
#   tests/gpu/sanitize.sh                      # all four tools
#   tests/gpu/sanitize.sh .gpu-bin racecheck   # one tool
set -uo pipefail

dir=${1:-.gpu-bin}
[ $# -gt 0 ] && shift
tools=("$@")
[ ${#tools[@]} -eq 0 ] && tools=(memcheck racecheck initcheck synccheck)
filter=${SANITIZE_FILTER:-sanitize_ragged_}
bin="$dir/gpu_reliability.test"
logs=${SANITIZE_LOGS:-$dir/sanitize-logs}

if [ ! -x "$bin" ]; then
  echo "sanitize.sh: no test binary $bin; build it with scripts/gpu-pack" >&2
  exit 2
fi

find_sanitizer() {
  if [ -n "${COMPUTE_SANITIZER:-}" ]; then
    echo "$COMPUTE_SANITIZER"
    return
  fi
  if command -v compute-sanitizer >/dev/null 2>&1; then
    command -v compute-sanitizer
    return
  fi
  local c
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
    /usr/local/cuda/compute-sanitizer/compute-sanitizer /opt/nvidia/*/compute-sanitizer \
    /opt/nvidia/compute-sanitizer/compute-sanitizer; do
    if [ -x "$c" ]; then
      echo "$c"
      return
    fi
  done
}
sanitizer=$(find_sanitizer)
if [ -z "$sanitizer" ] || [ ! -x "$sanitizer" ]; then
  echo "sanitize.sh: compute-sanitizer not found; set COMPUTE_SANITIZER to its path" >&2
  exit 2
fi
mkdir -p "$logs"
echo "sanitize.sh: $("$sanitizer" --version 2>/dev/null | grep -m1 -i version || echo "$sanitizer")"
echo "sanitize.sh: $bin, tests matching '$filter', logs in $logs"

# The exit code compute-sanitizer gives when it found errors.
found=86
failed=()
for tool in "${tools[@]}"; do
  case $tool in
    memcheck | racecheck | initcheck | synccheck) ;;
    *)
      echo "sanitize.sh: unknown tool '$tool' (memcheck, racecheck, initcheck, synccheck)" >&2
      exit 2
      ;;
  esac
  log="$logs/$tool.log"
  start=$(date +%s)
  # shellcheck disable=SC2086 # SANITIZE_ARGS is a list of words
  "$sanitizer" --tool "$tool" --error-exitcode "$found" ${SANITIZE_ARGS:-} \
    "$bin" "$filter" --test-threads=1 >"$log" 2>&1
  rc=$?
  secs=$(($(date +%s) - start))
  # racecheck ends with "RACECHECK SUMMARY: N hazards displayed (E errors,
  # W warnings)" instead of the other tools' "ERROR SUMMARY: E errors".
  summary=$(grep -E '(ERROR|RACECHECK) SUMMARY' "$log" | tail -n 1)
  result=$(grep -E '^test result:' "$log" | tail -n 1)
  errors=$(printf '%s\n' "$summary" | grep -oE 'ERROR SUMMARY: [0-9]+|\([0-9]+ errors' | grep -oE '[0-9]+')
  passed=$(printf '%s\n' "$result" | grep -oE '[0-9]+ passed' | grep -oE '^[0-9]+')
  skipped=$(grep -c 'skipping GPU test' "$log")
  echo "== $tool (${secs}s, exit $rc)"
  echo "   ${summary:-no ERROR SUMMARY line}"
  echo "   ${result:-no test result line}"

  why=""
  if [ -z "$summary" ]; then
    why="compute-sanitizer printed no ERROR SUMMARY (it did not run the program to its end)"
  elif [ "${errors:-1}" != 0 ]; then
    why="$errors error(s) reported"
  elif [ "$rc" = "$found" ]; then
    why="compute-sanitizer reported errors"
  elif [ "$rc" != 0 ]; then
    why="the tests failed (exit $rc)"
  elif [ "${passed:-0}" = 0 ]; then
    why="no test matched '$filter'"
  elif [ "$skipped" != 0 ]; then
    why="the tests saw no GPU and skipped"
  fi
  if [ -n "$why" ]; then
    echo "   FAILED: $why; first lines of the report ($log):"
    grep -E '^=========' "$log" | grep -vE 'ERROR SUMMARY|COMPUTE-SANITIZER' | head -n 40 | sed 's/^/   /'
    grep -E 'panicked|^failures:|FAILED' "$log" | head -n 10 | sed 's/^/   /'
    failed+=("$tool")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "sanitize.sh: FAILED: ${failed[*]}"
  exit 1
fi
echo "sanitize.sh: clean: ${tools[*]}"

#!/usr/bin/env bash
# Runs the tests whose names match FILTER (a nextest filter expression's test() pattern, e.g.
# `straggler` or `seed_3_`) RUNS times under added CPU load, and prints each test's pass rate;
# every failing run's output is kept.
#   scripts/flake-hunt.sh [--runs N] [--hogs N] [--keep DIR] FILTER
# --hogs starts that many busy processes beside the tests (default 2: the 2-core machine's
# cores both taken). The tests run as CI runs them (release, the cuda feature, nextest).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=20 hogs=2 keep="" filter=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --hogs) hogs="$2"; shift 2 ;;
        --keep) keep="$2"; shift 2 ;;
        -*) echo "flake-hunt: unknown flag $1" >&2; exit 2 ;;
        *) filter="$1"; shift ;;
    esac
done
[[ -n "$filter" ]] || { echo "usage: scripts/flake-hunt.sh [--runs N] [--hogs N] [--keep DIR] FILTER" >&2; exit 2; }
keep="${keep:-$(mktemp -d -t flake-hunt.XXXX)}"
mkdir -p "$keep"

tools="${MARATHON_TOOLS:-$HOME/.cache/marathon/tools}"
export LD_LIBRARY_PATH="$tools/nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$tools/python${PYTHONPATH:+:$PYTHONPATH}"
nextest=(cargo nextest run --workspace --release --locked --features marathon/cuda)
"${nextest[@]}" --no-run
nextest+=(--no-fail-fast --failure-output final -E "test(/$filter/)")

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
for _ in $(seq 1 "$hogs"); do
    sh -c 'while :; do :; done' &
    pids+=($!)
done

declare -A pass fail
for i in $(seq 1 "$runs"); do
    log="$keep/run-$i.log"
    "${nextest[@]}" >"$log" 2>&1 || true
    # Each test's verdict once per run (nextest repeats failures in its summary).
    while read -r verdict name; do
        if [[ $verdict == PASS ]]; then pass[$name]=$(( ${pass[$name]:-0} + 1 ))
        else fail[$name]=$(( ${fail[$name]:-0} + 1 )); fi
    done < <(awk '($1 == "PASS" || $1 == "FAIL" || $1 == "TIMEOUT") && $2 ~ /^\[/ {
                 print $1, $(NF-1) "::" $NF }' "$log" | sort -u)
    grep -qE '^ *(FAIL|TIMEOUT) ' "$log" || rm -f "$log"
    echo "run $i of $runs done"
done

echo
echo "pass rate over $runs runs with $hogs busy processes beside them (failing runs' logs in $keep):"
for name in $(printf '%s\n' "${!pass[@]}" "${!fail[@]}" | sort -u); do
    printf '  %3d/%d  %s\n' "${pass[$name]:-0}" "$runs" "$name"
done

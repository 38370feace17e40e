#!/usr/bin/env bash
# All-reduce bus bandwidth of marathon's process groups, on shared memory and on TCP, beside
# PyTorch's gloo backend and this machine's memcpy, for the same ranks and sizes, in one run:
# `marathon bench comm` (ranks on threads) then ops/bench/gloo_allreduce.py (ranks as processes).
# Prints each tool's output, then one table of them side by side. Needs PyTorch (`pip install
# torch`, or set PYTHON to an interpreter that has it).
#   scripts/bench-comm-vs-gloo.sh [--ranks 2,4,8] [--min-kib 64] [--max-mib 256]
set -euo pipefail
cd "$(dirname "$0")/.."

ranks=2,4,8 min_kib=64 max_mib=256
while [[ $# -gt 0 ]]; do
    case "$1" in
        --ranks) ranks="$2"; shift 2 ;;
        --min-kib) min_kib="$2"; shift 2 ;;
        --max-mib) max_mib="$2"; shift 2 ;;
        *) echo "bench-comm-vs-gloo: unknown argument $1" >&2; exit 2 ;;
    esac
done
python="${PYTHON:-python3}"
"$python" -c "import torch" 2>/dev/null || {
    echo "bench-comm-vs-gloo: $python cannot import torch; pip install torch, or set PYTHON" >&2
    exit 1
}
cargo build --release --locked -p marathon >&2

work="$(mktemp -d -t bench-comm.XXXX)"
trap 'rm -rf "$work"' EXIT
args=(--ranks "$ranks" --min-kib "$min_kib" --max-mib "$max_mib")
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), load average $(cut -d' ' -f1-3 /proc/loadavg) at the start"
echo
echo "\$ marathon bench comm ${args[*]}"
target/release/marathon bench comm "${args[@]}" 2>"$work/marathon.log"
echo
echo "\$ $python ops/bench/gloo_allreduce.py ${args[*]}"
"$python" ops/bench/gloo_allreduce.py "${args[@]}" 2>"$work/gloo.log"
echo
"$python" - "$work/marathon.log" "$work/gloo.log" <<'PY'
import json, sys
rows = {}
memcpy = None
for path in sys.argv[1:]:
    for line in open(path):
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        rows[(r["ranks"], r["bytes"], r["transport"])] = r["busbw_gbs"]
        memcpy = r.get("memcpy_gbs", memcpy)
print(f"bus bandwidth in GB/s; memcpy {memcpy:.2f} GB/s")
print(f"{'ranks':>6} {'bytes':>12} {'shm':>9} {'tcp':>9} {'gloo':>9} {'shm/gloo':>9} {'shm/memcpy':>11}")
for (p, b) in sorted({(p, b) for (p, b, _) in rows}):
    shm, tcp, gloo = (rows.get((p, b, t)) for t in ("shm", "tcp", "gloo"))
    cell = lambda v: f"{v:>9.3f}" if v is not None else f"{'-':>9}"
    ratio = f"{shm / gloo:>8.1f}x" if shm and gloo else f"{'-':>9}"
    frac = f"{100 * shm / memcpy:>10.1f}%" if shm else f"{'-':>11}"
    print(f"{p:>6} {b:>12} {cell(shm)} {cell(tcp)} {cell(gloo)} {ratio} {frac}")
PY

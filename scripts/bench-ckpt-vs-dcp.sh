#!/usr/bin/env bash
# What a checkpoint of GPT-2 124M with its AdamW state costs in marathon and in PyTorch's
# Distributed Checkpoint (DCP), on the same disk in one sitting: `marathon bench ckpt` (stall,
# persist and load beside the disk), then ops/bench/dcp_checkpoint.py (async_save's stall, save,
# load warm and cold) on the same tensors in the same directory, then the two side by side.
# Needs PyTorch (`pip install torch`, or set PYTHON to an interpreter that has it).
#   scripts/bench-ckpt-vs-dcp.sh [dir]      (MARATHON_BIN: the binary, built if unset)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="$(realpath "${1:-.}")"
python="${PYTHON:-python3}"
"$python" -c "import torch" 2>/dev/null || {
    echo "bench-ckpt-vs-dcp: $python cannot import torch; pip install torch, or set PYTHON" >&2
    exit 1
}
if [[ -z "${MARATHON_BIN:-}" ]]; then
    cargo build --release --locked -p marathon >&2
fi
bin="$(realpath "${MARATHON_BIN:-target/release/marathon}")"
work="$(mktemp -d -t bench-dcp.XXXX)"
trap 'rm -rf "$work"' EXIT
echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (uncommitted changes)'), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(date -u +%F), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "\$ marathon bench ckpt --config configs/gpt2-124m.toml --root $dir"
"$bin" bench ckpt --config configs/gpt2-124m.toml --root "$dir" | tee "$work/marathon.txt"
echo
echo "\$ $python ops/bench/dcp_checkpoint.py --dir $dir"
"$python" ops/bench/dcp_checkpoint.py --dir "$dir" | tee "$work/dcp.txt"
echo
"$python" - "$work/marathon.txt" "$work/dcp.txt" <<'PY'
import json, sys
ours = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
dcp = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
none = ours["codecs"]["none"]
rows = [
    ("state", f"{ours['state_bytes'] / 1e6:.1f} MB", f"{dcp['state_bytes'] / 1e6:.1f} MB", ""),
    ("training stalled by a checkpoint", f"{none['stall_ms']:.1f} ms", f"{dcp['async_save_stall_ms']:.1f} ms (async_save)",
     f"{dcp['async_save_stall_ms'] / none['stall_ms']:.2f}x"),
    ("persist, fsync'd", f"{none['persist_s']:.2f} s ({none['persist_gbs']:.2f} GB/s)", f"{dcp['save_s']:.2f} s ({dcp['save_gbs']:.2f} GB/s)",
     f"{dcp['save_s'] / none['persist_s']:.2f}x"),
    ("load from the page cache", f"{ours['resharded_load']['same_layout_s']:.2f} s", f"{dcp['load_warm_s']:.2f} s",
     f"{dcp['load_warm_s'] / ours['resharded_load']['same_layout_s']:.2f}x"),
    ("load cold (marathon verifies every chunk)", f"{none['load_s']:.2f} s ({none['load_gbs']:.2f} GB/s)", f"{dcp['load_cold_s']:.2f} s ({dcp['load_cold_gbs']:.2f} GB/s)",
     f"{dcp['load_cold_s'] / none['load_s']:.2f}x"),
]
print("| figure | marathon (uncompressed) | DCP | DCP's time / marathon's |")
print("|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
PY

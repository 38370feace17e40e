#!/usr/bin/env bash
# `marathon bench recovery` three times against a private etcd on free loopback ports: a tp 2 x
# dp 4 job (8 worker processes) of a small GPT (2 layers, hidden 32, batch 16 x 32 tokens) on
# README and ARCHITECTURE, one worker SIGKILLed after step 12; the elastic job without and with
# the distributed optimizer beside the fail-stop baseline, in each run. Prints the machine and
# the commit first, for docs/figures.
#   scripts/bench-recovery.sh [runs]        (MARATHON_BIN: the binary; ETCD_BIN: etcd)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
bin="$(realpath "${MARATHON_BIN:-target/release/marathon}")"
etcd="$(realpath "${ETCD_BIN:-$(command -v etcd)}")"
echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (uncommitted changes)'), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)"
source scripts/private-etcd.sh
dir="$(mktemp -d)"
etcd_pid=""
trap 'kill -9 $etcd_pid 2>/dev/null || true; rm -rf "$dir"' EXIT
repo="$PWD"
cd "$dir"
start_private_etcd "$etcd"
"$bin" data prepare --out corpus --val-fraction 0.2 --input "$repo/README.md" "$repo/ARCHITECTURE.md" >/dev/null
cat >c.toml <<TOML
[model]
vocab_size = 50257
seq_len = 32
n_layer = 2
n_head = 2
n_embd = 32
[data]
train = "corpus/train.bin"
[batch]
micro_batch = 2
global_batch = 16
seq_len = 32
[optim]
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
weight_decay = 0.1
grad_clip = 1.0
init_std = 0.02
[optim.lr]
peak_lr = 1e-3
warmup_tokens = 256
decay_tokens = 40960
[train]
steps = 40
TOML
for i in $(seq 1 "$runs"); do
    echo "run $i"
    "$bin" bench recovery --etcd "$etcd_url" --config c.toml --tp 2 --dp 4 2>/dev/null
done

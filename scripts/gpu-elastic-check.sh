#!/usr/bin/env bash
# The elastic GPU check: a dp2 job on a private etcd with both workers on this machine's GPU (one
# GPU: the workers share it, host-staged), one worker SIGKILLed after step 12. The survivor
# must continue from memory (nothing read from storage, though the job has a checkpoint root),
# the job must grow back to dp2, and every step's loss must be within bf16 tolerance (2e-3
# relative) of the same job run fault-free by `marathon train` on the GPU.
#   scripts/gpu-elastic-check.sh            (MARATHON_BIN: the binary; ETCD_BIN: etcd)
# MARATHON_DEVICE=cpu runs the same check on the CPU (what CI can run), at 1e-4.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(realpath "${MARATHON_BIN:-target/release/marathon}")"
etcd="${ETCD_BIN:-$(command -v etcd || echo .devbin/etcd)}"
[[ -x "$etcd" ]] || { echo "gpu-elastic-check: no etcd (give ETCD_BIN)" >&2; exit 2; }
etcd="$(realpath "$etcd")"
device="${MARATHON_DEVICE:-cuda}"
tolerance=2e-3
[[ $device == cpu ]] && tolerance=1e-4
source scripts/private-etcd.sh
dir="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
cd "$dir"
start_private_etcd "$etcd"
pids+=("$etcd_pid")
url="$etcd_url"

"$bin" data prepare --out corpus --val-fraction 0.1 --input "$OLDPWD/README.md" "$OLDPWD/ARCHITECTURE.md" >/dev/null
cat >c.toml <<EOF
[model]
vocab_size = 50257
seq_len = 64
n_layer = 2
n_head = 4
n_embd = 128
[data]
train = "corpus/train.bin"
[batch]
micro_batch = 4
global_batch = 16
seq_len = 64
[optim]
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
weight_decay = 0.1
grad_clip = 1.0
init_std = 0.02
[optim.lr]
peak_lr = 1e-3
warmup_tokens = 1024
decay_tokens = 200000
[train]
steps = 60
device = "$device"
metrics = "metrics.jsonl"
samples_log = "samples.jsonl"
[checkpoint]
root = "ckpt"
every_steps = 20
EOF
sed 's/metrics.jsonl/ref-metrics.jsonl/; s/samples.jsonl/ref-samples.jsonl/; s/"ckpt"/"ref-ckpt"/' c.toml >ref.toml

# The fault-free run: two worker processes, no etcd.
"$bin" train --config ref.toml --dp 2 >ref.log 2>&1 || { cat ref.log; exit 1; }

"$bin" train --config c.toml --dp 2 --etcd "$url" --job gpu-elastic --cooldown-ms 3000 \
    --group-timeout-ms 60000 >job.out 2>job.log &
job=$!
pids+=($job)
victim=""
for _ in $(seq 1 600); do
    victim="$(sed -n 's/^agent node-1: slot 0: worker pid \([0-9]*\)$/\1/p' job.log | head -1)"
    reached="$(sed -n 's#^step \([0-9]*\)/.*#\1#p' job.log | tail -1)"
    [[ -n "$victim" && "${reached:-0}" -ge 12 ]] && break
    sleep 0.2
done
[[ -n "$victim" ]] || { cat job.log; echo "gpu-elastic-check: the job never reached step 12"; exit 1; }
kill -9 "$victim"
echo "killed worker $victim of node-1 at step $reached"
wait "$job" || { cat job.log; echo "gpu-elastic-check: the job failed"; exit 1; }

python3 - "$tolerance" <<'PY'
import json, re, sys
tol = float(sys.argv[1])
def losses(path):
    out = {}
    for line in open(path):
        r = json.loads(line)
        if r.get("kind") == "step":
            out[r["data"]["step"]] = r["data"]["loss"]
    return out
got, want = losses("metrics.jsonl"), losses("ref-metrics.jsonl")
worst = max(abs(got[s] - w) / abs(w) for s, w in want.items() if s in got)
missing = sorted(set(want) - set(got))
log = open("job.log").read()
dps = [int(m) for m in re.findall(r"planned generation \d+: dp (\d+)", log)]
reads = [int(m) for g, m in re.findall(r"generation (\d+) as rank .* (\d+) bytes read from storage", log) if int(g) > 1]
print(f"elastic dp2 on one GPU, one worker killed: plans dp {dps}, worst step-loss difference "
      f"{worst:.1e} relative to the fault-free run (tolerance {tol:.0e}), steps missing {missing}, "
      f"bytes read from storage after the first generation {reads}")
ok = not missing and worst <= tol and dps == [2, 1, 2] and reads and all(r == 0 for r in reads)
print("gpu-elastic-check:", "ok" if ok else "FAILED")
sys.exit(0 if ok else 1)
PY

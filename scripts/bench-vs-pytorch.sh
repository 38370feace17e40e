#!/usr/bin/env bash
# Times marathon's CPU training step against PyTorch's eager fp32 step for the same model, batch
# and thread count, in one run, for GPT-2 124M (batch 4 x 256) and the small shape (4 layers,
# hidden 256, 4 heads, batch 8 x 128). Needs PyTorch (`pip install torch`) and a prepared corpus
# at data/repo (scripts/main-job.sh makes one). Usage: scripts/bench-vs-pytorch.sh [steps]
# MARATHON_BIN times that binary (another commit's, say) instead of building this one.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-5}
threads=$(nproc)
python3 -c "import torch" 2>/dev/null || { echo "bench: PyTorch is not installed; pip install torch" >&2; exit 1; }
[ -f data/repo/train.bin ] || { echo "bench: no corpus at data/repo; run scripts/main-job.sh or marathon data prepare first" >&2; exit 1; }
bin=${MARATHON_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --locked -p marathon >&2
  bin=target/release/marathon
fi
run() { # name config batch seq layers heads hidden
  local ours theirs
  ours=$(RAYON_NUM_THREADS=$threads "$bin" bench train --config "$2" --batch "$3" --seq "$4" --steps "$steps" | tail -n 1)
  theirs=$(python3 ops/bench/pytorch_step.py --n-layer "$5" --n-head "$6" --n-embd "$7" --batch "$3" --seq "$4" --threads "$threads" --steps "$steps")
  python3 - "$1" "$ours" "$theirs" <<'PY'
import json, sys
name, ours, theirs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"{name}: marathon {ours['ms_per_step']:.0f} ms/step, {ours['tokens_per_s']:.0f} tokens/s, "
      f"{ours['achieved_gflops']:.1f} GFLOP/s = {100 * ours['fraction_of_gemm_limit']:.0f}% of the GEMM limit "
      f"({ours['gemm_gflops']:.1f} GFLOP/s); PyTorch {theirs['ms_per_step']:.0f} ms/step, "
      f"{theirs['tokens_per_s']:.0f} tokens/s; marathon is {theirs['ms_per_step'] / ours['ms_per_step']:.2f}x PyTorch's speed")
PY
}
run gpt2-124m configs/gpt2-124m.toml 4 256 12 12 768
run small configs/small.toml 8 128 4 4 256

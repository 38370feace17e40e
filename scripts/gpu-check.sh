#!/usr/bin/env bash
# Every GPU check and the GPU bench in one run, for a machine with an NVIDIA GPU:
#   scripts/gpu-check.sh [--torch] [--compile] [--no-layouts] [--no-elastic] [bench gpu flags...]
# Builds marathon with the cuda feature (or uses $MARATHON_BIN, a binary built elsewhere), finds
# the CUDA libraries (NVRTC, cuBLASLt, NCCL) in the CUDA toolkit or in Python's nvidia-* packages,
# runs `marathon bench gpu` (kernels; training, a GPU checkpoint and a tp2 one resumed on the
# CPU; tp2, pp2, dp2 with the distributed optimizer and tp2 x pp2 x dp2 as worker processes on
# this GPU against the one-GPU run; NCCL with abort and deadline; GPT-2 124M timing), then
# `marathon bench train --device cuda` for each layout of GPT-2 124M on this GPU (tokens/s, the
# share in collectives, the host-staged all-reduce beside the pinned copy), the elastic check
# (scripts/gpu-elastic-check.sh: a dp2 job on a private etcd, a worker killed; it needs etcd in
# PATH or ETCD_BIN, or .devbin/etcd), and with --torch
# times PyTorch's step on the same GPU (--compile adds torch.compile). Ends with the tables;
# exits non-zero if a check failed.
set -euo pipefail
cd "$(dirname "$0")/.."

torch=0 compile=0 layouts=1 elastic=1 args=()
for a in "$@"; do
    case "$a" in
        --torch) torch=1 ;;
        --compile) torch=1 compile=1 ;;
        --no-layouts) layouts=0 ;;
        --no-elastic) elastic=0 ;;
        *) args+=("$a") ;;
    esac
done

bin="${MARATHON_BIN:-}"
if [[ -z "$bin" ]]; then
    cargo build --release --features cuda -p marathon
    bin=target/release/marathon
fi

# cudarc opens libnvrtc.so.13, libcublasLt.so.13 and libnccl.so by name; link whichever copies
# this machine has into one folder on the library path.
libs="$(mktemp -d)"
trap 'rm -rf "$libs"' EXIT
search=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu)
while IFS= read -r d; do search+=("$d"); done < <(python3 - <<'PY' 2>/dev/null || true
import glob, site, sys
for base in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
    for d in glob.glob(base + "/nvidia/*/lib") + glob.glob(base + "/nvidia/cu*/lib"):
        print(d)
PY
)
for name in libnvrtc.so.13 libnvrtc-builtins.so.13.0 libcublasLt.so.13 libcublas.so.13 libnccl.so.2; do
    for d in "${search[@]}"; do
        if [[ -e "$d/$name" ]]; then ln -sf "$d/$name" "$libs/$name"; break; fi
    done
done
[[ -e "$libs/libnccl.so.2" ]] && ln -sf "$libs/libnccl.so.2" "$libs/libnccl.so"
for d in "${search[@]}"; do
    # NVRTC loads its builtins from beside itself or from the library path.
    compgen -G "$d/libnvrtc-builtins.so*" >/dev/null && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
echo "libraries: $(ls "$libs" | tr '\n' ' ')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

status=0
started=$SECONDS
"$bin" bench gpu "${args[@]}" || status=$?
echo "bench gpu: $((SECONDS - started)) s"
if [[ $layouts == 1 ]]; then
    # GPT-2 124M in each layout on this one GPU: every rank a thread sharing it, host-staged.
    data="$(mktemp -d)"
    "$bin" data prepare --out "$data" --input README.md ARCHITECTURE.md docs configs model runtime ops storage elastic chaos-tests >/dev/null
    cfg="$data/gpt2.toml"
    sed "s#^train = .*#train = \"$data/train.bin\"#; s#^val = .*#val = \"$data/val.bin\"#" configs/gpt2-124m.toml >"$cfg"
    for layout in "1 1 1" "2 1 1" "1 2 1" "1 1 2" "2 2 2"; do
        read -r tp pp dp <<<"$layout"
        echo
        "$bin" bench train --device cuda --config "$cfg" --batch 8 --global-batch 32 --seq 512 \
            --tp "$tp" --pp "$pp" --dp "$dp" --steps 4 --warmup 2 || status=$?
    done
    rm -rf "$data"
fi
if [[ $elastic == 1 ]]; then
    echo
    started=$SECONDS
    MARATHON_BIN="$bin" scripts/gpu-elastic-check.sh || status=$?
    echo "elastic check: $((SECONDS - started)) s"
fi
if [[ $torch == 1 ]]; then
    echo
    flag=()
    [[ $compile == 1 ]] && flag=(--compile)
    python3 scripts/gpu/torch_gpt2.py "${flag[@]}" || status=$?
fi
exit $status

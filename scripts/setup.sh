#!/usr/bin/env bash
# Installs what marathon's build needs on a fresh Debian or Ubuntu machine that has a Rust
# toolchain, and with --test-servers also the servers the tests start (etcd, and Garage, an
# S3-API store), Prometheus, which scrapes an elastic job in the metrics test, and Chromium,
# which loads the run report headless in the report test.
# Idempotent: anything already present is left alone. Says what it installs and fails with a
# clear message where it cannot.
set -euo pipefail

say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

command -v cargo >/dev/null 2>&1 || die "cargo not found; install a Rust toolchain first (https://rustup.rs), then rerun"

# System packages, as "command:package" pairs, or "/file:package" where the package brings files
# rather than a command: protoc builds etcd's gRPC client, and needs protobuf's own .proto files
# (descriptor.proto, which etcd's protocol imports) from libprotobuf-dev; the tests also start
# private etcd servers.
needs=("protoc:protobuf-compiler" "/usr/include/google/protobuf/descriptor.proto:libprotobuf-dev")
[ "${1:-}" = "--test-servers" ] && needs+=("etcd:etcd-server" "prometheus:prometheus" "chromium:chromium")
apt_packages=()
for need in "${needs[@]}"; do
  what="${need%%:*}"
  case "$what" in
    /*) [ -e "$what" ] || apt_packages+=("${need#*:}") ;;
    *) command -v "$what" >/dev/null 2>&1 || apt_packages+=("${need#*:}") ;;
  esac
done

if [ ${#apt_packages[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || die "missing ${apt_packages[*]} and no apt-get here; install them with your package manager"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "installing ${apt_packages[*]} needs root; rerun as root or install sudo"
    sudo="sudo"
  fi
  say "installing ${apt_packages[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq || die "apt-get update failed; check the network or the apt sources"
  $sudo apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null \
    || die "apt-get install ${apt_packages[*]} failed"
fi
say "system packages ready"
[ "${1:-}" = "--test-servers" ] || exit 0

# Garage, the S3-API object store the checkpoint tests start privately. It builds from crates.io
# (about 15 minutes on 2 cores), so it is installed once into a tools folder that is kept
# between runs: MARATHON_TOOLS, by default ~/.cache/marathon/tools.
tools="${MARATHON_TOOLS:-$HOME/.cache/marathon/tools}"
garage_version=2.5.0
if [ -x "$tools/bin/garage" ] && "$tools/bin/garage" --version 2>/dev/null | grep -q "$garage_version"; then
  say "garage $garage_version ready in $tools/bin"
else
  say "building garage $garage_version into $tools (once; about 15 minutes on 2 cores)"
  mkdir -p "$tools"
  log="$tools/garage-install.log"
  cargo install garage --locked --version "$garage_version" --root "$tools" >"$log" 2>&1 \
    || die "cargo install garage $garage_version failed; see $log"
  say "garage $garage_version installed in $tools/bin"
fi

# NVRTC, CUDA's run-time compiler, from PyPI: the tests compile every kernel to PTX with it, which
# needs no GPU. Installed once into the tools folder; scripts/test.sh puts it on the library path.
nvrtc_version=13.0.88
nvrtc="$tools/nvrtc"
if [ -e "$nvrtc/nvidia/cu13/lib/libnvrtc.so.13" ] && [ -e "$nvrtc/version-$nvrtc_version" ]; then
  say "nvrtc $nvrtc_version ready in $nvrtc"
else
  say "installing nvrtc $nvrtc_version into $nvrtc (pip, about 60 MB)"
  rm -rf "$nvrtc"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$nvrtc" \
    "nvidia-cuda-nvrtc==$nvrtc_version" || die "pip install nvidia-cuda-nvrtc==$nvrtc_version failed"
  touch "$nvrtc/version-$nvrtc_version"
  say "nvrtc $nvrtc_version installed in $nvrtc"
fi

# numpy and safetensors, for the independent check of Hugging Face exports
# (ops/tests/fixtures/hf_gpt2_numpy.py), and kubernetes-validate (with PyYAML), which checks the
# Kubernetes example under deploy/ against the API's schema; scripts/test.sh puts them on
# PYTHONPATH.
py="$tools/python"
py_packages="numpy==2.2.6 safetensors==0.5.3 kubernetes-validate==1.37.0"
if [ -e "$py/packages-$(echo "$py_packages" | tr ' =' '_-')" ]; then
  say "python packages ready in $py"
else
  say "installing $py_packages into $py (pip)"
  rm -rf "$py"
  # shellcheck disable=SC2086
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$py" $py_packages \
    || die "pip install $py_packages failed"
  touch "$py/packages-$(echo "$py_packages" | tr ' =' '_-')"
  say "python packages installed in $py"
fi

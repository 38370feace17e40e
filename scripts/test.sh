#!/usr/bin/env bash
# Runs every test of the workspace: installs what the tests need (the S3-API server included),
# checks formatting and lints where rustfmt and clippy are installed, builds once in release mode
# (tests and the main job share the build), and runs the suite with cargo-nextest when it is
# installed, else cargo test. The suite runs with the `cuda` feature, which builds without CUDA:
# its tests compile every kernel with NVRTC (installed by setup.sh) and check that a machine
# without a GPU gets a clear error; the default build is linted as well.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test-servers
tools="${MARATHON_TOOLS:-$HOME/.cache/marathon/tools}"
export LD_LIBRARY_PATH="$tools/nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$tools/python${PYTHONPATH:+:$PYTHONPATH}"
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check || { echo "test: code is not formatted; run cargo fmt --all" >&2; exit 1; }
fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --workspace --all-targets --release --locked -- -D warnings
  cargo clippy --workspace --all-targets --release --locked --features marathon/cuda -- -D warnings
fi
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --release --locked --features marathon/cuda --no-fail-fast "$@"
else
  printf 'test: cargo-nextest not installed; running cargo test (install it with `cargo install cargo-nextest --locked` for parallel runs)\n' >&2
  cargo test --workspace --release --locked --features marathon/cuda --no-fail-fast "$@"
fi

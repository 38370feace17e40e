#!/usr/bin/env bash
# Runs every test of the workspace: installs what the tests need (the S3-API server included),
# checks formatting and lints where rustfmt and clippy are installed, builds once in release mode
# (tests and the main job share the build), and runs the suite with cargo-nextest when it is
# installed, else cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test-servers
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check || { echo "test: code is not formatted; run cargo fmt --all" >&2; exit 1; }
fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --workspace --all-targets --release --locked -- -D warnings
fi
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --release --locked --no-fail-fast "$@"
else
  printf 'test: cargo-nextest not installed; running cargo test (install it with `cargo install cargo-nextest --locked` for parallel runs)\n' >&2
  cargo test --workspace --release --locked --no-fail-fast "$@"
fi

#!/usr/bin/env bash
# The main job, offline on defaults: prepare a corpus from this repository's own text and train
# a small GPT-2 on it on the CPU. Nothing else has to run. Extra arguments go to `marathon train`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -p marathon
bin=target/release/marathon
# Every clone has these files, so the default job needs nothing from outside the repository.
$bin data prepare --out data/repo --input README.md ARCHITECTURE.md configs model runtime ops storage elastic chaos-tests
$bin train --config configs/small.toml "$@"

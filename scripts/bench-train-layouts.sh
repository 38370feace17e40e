#!/usr/bin/env bash
# `marathon bench train` for several layouts of one configuration, each binary in turn per
# layout so they share the machine's state, for a before/after comparison in one run:
#   scripts/bench-train-layouts.sh CONFIG BINARY [BINARY...] -- [bench train flags...]
# Layouts: tp x pp x dp of 1x1x1, 1x1x2, 2x1x1, 1x2x1 and 2x2x1 (override with LAYOUTS="2 1 1;...").
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 CONFIG BINARY [BINARY...] -- [flags]" >&2; exit 2; }
config=$1; shift
bins=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do bins+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
IFS=';' read -r -a layouts <<<"${LAYOUTS:-1 1 1;1 1 2;2 1 1;1 2 1;2 2 1}"
for layout in "${layouts[@]}"; do
    read -r tp pp dp <<<"$layout"
    for bin in "${bins[@]}"; do
        echo "== $bin: tp $tp x pp $pp x dp $dp"
        "$bin" bench train --config "$config" --tp "$tp" --pp "$pp" --dp "$dp" "$@" | awk 'NR <= 3'
    done
done

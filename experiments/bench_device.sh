#!/usr/bin/env bash
# The accelerator benchmark, one command:
#
#   experiments/bench_device.sh OUT_DIR [--budget_s 450] [--item_budget_s 150] [--smoke] ...
#
# Runs experiments/bench_device.py: our step at T = 1, 2, 5 with and without remat, the
# scratch step, the 224-px ImageNet-family step, the authors' loop on the same GPU (where
# torch with CUDA and their code are found), peak device memory, and the meta-gradient under
# the default matmul precision against "highest". Writes OUT_DIR/bench_device.json and
# OUT_DIR/bench_device.md (rewritten after each measurement) and OUT_DIR/logs/.
#
# Environment: PYTHON (default: python), BENCH_BUDGET_S (total seconds, default 450),
# BENCH_ITEM_BUDGET_S (per measurement, default 150), BENCH_SMOKE=1 (tiny networks, the CPU
# test), L2T_OFFICIAL_DIR (the authors' checkout). The code measured is this checkout's.
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: $0 OUT_DIR [bench_device.py flags]" >&2
    exit 2
fi
out=$1
shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$out"
exec "${PYTHON:-python}" "$here/bench_device.py" --out "$out" "$@"

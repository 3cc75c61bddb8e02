#!/bin/bash
# Regenerates the offline study (docs/study/): every grid of configs/study.py, one process
# per core (one XLA thread each, a shard of the cells: l2t_jax/tools/runner.py), then the
# report. Hours on a 2-core machine; finished runs are skipped, so it resumes.
#
#   L2T_RELEASE_DIR=DIR experiments/study.sh runs/study    # DIR: the authors' released files
#   cp runs/study/report/* docs/study/
#
# The command of each unfinished run alone (a cluster's job list): the same call of
# l2t_jax.main with --config.dry_run=True.
#
# The committed report was made grid by grid in this order (each a call of `launch`):
#   recipe; main --sources=demo_resnet20; meta_batch,every_k; main --sources=released_resnet32;
#   sensitivity.
set -euo pipefail
workdir=${1:?usage: experiments/study.sh WORKDIR}
: "${L2T_RELEASE_DIR:?set L2T_RELEASE_DIR to the directory of the authors' release}"
export L2T_RELEASE_DIR
# One thread per process: two single-threaded runs use the two cores better than one run
# with two threads, and a run's numbers depend on its thread count (rerun a cell the same way).
export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
cores=$(nproc)

launch() {   # launch GRIDS [overrides...]: every core a shard of the grids' cells
  local grids=$1; shift
  local pids=()
  for ((i = 0; i < cores; i++)); do
    taskset -c "$i" python -m l2t_jax.main --config=study --workdir="$workdir" \
      --config.grids="$grids" --config.shard="$i/$cores" "$@" > "$workdir/shard$i.log" 2>&1 &
    pids+=($!)
    sleep 20   # the first shard writes the data and pre-trains the demo source (the
               # others wait on its lock)
  done
  wait "${pids[@]}"
}

mkdir -p "$workdir"
launch '("recipe",)'
launch '("main",)' --config.sources='("demo_resnet20",)'
launch '("meta_batch","every_k")'
launch '("main",)' --config.sources='("released_resnet32",)'
launch '("sensitivity",)'
python -m l2t_jax.main --config=study --workdir="$workdir"     # the report of every grid

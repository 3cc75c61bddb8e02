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
# The committed report (docs/study/) is the main grid's at budgets 2, 5 and 10, the meta
# objectives' screen at seed 100 and their grid at the same budgets (docs/study/commands.txt):
#   launch '("main",)' --config.examples_per_class='(2,5,10)'
#   launch '("meta_screen",)' --config.screen_seeds='(100,)'
#   launch '("meta_objective",)' --config.examples_per_class='(2,5,10)'
#   python -m l2t_jax.main --config=study --workdir=WORKDIR
#     '--config.grids=("main","meta_screen","meta_objective")'
#     --config.examples_per_class='(2,5,10)' --config.screen_seeds='(100,)'   (one line)
# The meta objectives' rates (configs/study.py) are the screen's choice: on other data,
# run the screen first and set them from its report.
# The earlier 150-step recipe's report (docs/study/150-steps/) also has the recipe,
# meta_batch, every_k and sensitivity grids.
set -euo pipefail
workdir=${1:?usage: experiments/study.sh WORKDIR}
: "${L2T_RELEASE_DIR:?set L2T_RELEASE_DIR to the directory of the released files}"
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
launch '("main",)'
launch '("recipe","meta_batch","every_k","sensitivity","meta_screen","meta_objective")'
python -m l2t_jax.main --config=study --workdir="$workdir"     # the report of every grid

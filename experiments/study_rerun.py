"""Re-runs one cell of the offline study and compares it with the recorded run, bit for bit.

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
      L2T_RELEASE_DIR=DIR taskset -c 0 \
      python experiments/study_rerun.py --workdir=runs/study \
      --cell=demo_resnet20/l2t_ww-all_to_all/epc5/learning_rate=0.02/seed0

Run it as experiments/study.sh ran the cell (one XLA thread; the same machine kind): a
run's numbers are a function of its config, the code and the device, and the thread count
is part of the device here. Prints the comparison; exits 1 if any logged number or the
reported accuracy differs.

``--set KEY=VALUE`` (repeatable) re-runs the cell with run-config keys changed, e.g.
``--set semckd_weight=40``, and prints its accuracies beside the recorded run's instead of
comparing the logs.
"""
import argparse
import ast
import json
import os
import sys
import tempfile

from l2t_jax.tools import digits, study
from l2t_jax.training import compile_cache, logs, train
from l2t_jax.training import workdir as workdir_files
from l2t_jax.configs import study as study_config


def records(workdir):
    """The run's logged numbers: every metrics.jsonl record but the run metadata."""
    return [r for r in workdir_files.read_metrics(workdir_files.path(workdir,
                                                                    workdir_files.METRICS))
            if "run" not in r]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the study's workdir")
    parser.add_argument("--cell", required=True, help="a run directory under WORKDIR/runs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config key to change (a Python literal or a string)")
    args = parser.parse_args(argv)
    logs.configure()
    compile_cache.enable()
    config = study_config.get_config()
    cells = {os.path.normpath(c.directory): c for c in study.all_cells(config)}
    cell = cells.get(os.path.normpath(args.cell))
    if cell is None:
        sys.exit(f"error: {args.cell} is not a cell of configs/study.py")
    wanted = os.path.join(args.workdir, "runs", cell.directory)
    prepared = digits.prepare(config, args.workdir, (cell.source,))
    run_config = study.cell_config(config, prepared.data_dir,
                                   prepared.checkpoints[cell.source], cell)
    for item in args.set:
        key, _, text = item.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        run_config[key] = value          # an unknown key fails here, naming it
    with tempfile.TemporaryDirectory() as rerun:
        result = train.train_and_evaluate(run_config, rerun)
        again = records(rerun)
    with open(os.path.join(wanted, "result.json")) as f:
        recorded = json.load(f)
    if args.set:
        print(f"recorded:        test {recorded['test_last']} at the last epoch (val "
              f"{recorded['val_last']})")
        print(f"with {' '.join(args.set)}: test {result['test_last']} at the last epoch (val "
              f"{result['val_last']})")
        return
    before = records(wanted)
    same_log = before == again
    same_result = all(recorded[k] == result[k] for k in ("test_at_best_val", "best_val",
                                                         "best_epoch"))
    print(f"recorded: test {recorded['test_at_best_val']} (val {recorded['best_val']}, epoch "
          f"{recorded['best_epoch']}; commit {recorded['run']['git']})")
    print(f"rerun:    test {result['test_at_best_val']} (val {result['best_val']}, epoch "
          f"{result['best_epoch']}; commit {result['run']['git']})")
    print(f"{len(before)} logged records: {'identical' if same_log else 'DIFFERENT'}")
    sys.exit(0 if same_log and same_result else 1)


if __name__ == "__main__":
    main()

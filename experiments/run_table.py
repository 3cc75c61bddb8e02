"""Runs (or prints) the grid of one of the paper's tables; the grids are l2t_jax.tools.tables',
the runner l2t_jax.tools.runner's.

    python experiments/run_table.py --table=main --root=runs --seeds=0,1,2
    python experiments/run_table.py --table=main --root=runs --seeds=0 --targets=cifar100,stl10 \
        --methods=scratch,fm-one_to_one,l2t_ww --dry_run > jobs.txt   # one command per line
    python experiments/run_table.py --table=main --root=runs --seeds=0 --shard=0/2 &   # one
    python experiments/run_table.py --table=main --root=runs --seeds=0 --shard=1/2 &   # per core
    python experiments/run_table.py --table=multisource --root=runs --seeds=0,1,2
    python experiments/run_table.py --table=limited --root=runs --seeds=0,1,2 \
        --targets=stl10 --examples_per_class=25,50,100,250

Runs go one after another; workdirs that already hold result.json are skipped, so the same
command continues an interrupted grid (the interrupted run resumes from its checkpoint).
The first failing run stops the grid with exit code 1.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from l2t_jax.tools import runner, tables  # noqa: E402
from l2t_jax.training import logs  # noqa: E402


def _list(text):
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=tables.TABLES, default="main")
    parser.add_argument("--root", required=True, help="directory for the runs' workdirs")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--targets", default=None,
                        help="main/limited: " + ",".join(tables.TARGET_CONFIGS)
                        + " (or any shipped config, or a config file); multisource: "
                        + ",".join(tables.MULTI_SOURCE_CONFIGS) + ". Default: the table's")
    parser.add_argument("--methods", default=None,
                        help="rows by method (fm), method-scheme (fm-one_to_one) or label")
    parser.add_argument("--examples_per_class", default=None,
                        help="e.g. 25,50,100,250 (limited table; default that list)")
    parser.add_argument("--override", action="append", default=[],
                        help="config override added to every run, key=value (repeatable)")
    parser.add_argument("--shard", default="",
                        help="i/n: make every n-th run from the i-th (one process per core)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print one command per unfinished run and run nothing")
    args = parser.parse_args(argv)
    # Progress lines on stderr; a dry run's commands alone on stdout.
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logs.configure()
    try:
        seeds = [int(s) for s in _list(args.seeds) or []]
        sizes = _list(args.examples_per_class)
        runs = tables.table_runs(
            args.table, args.root, seeds, targets=_list(args.targets),
            methods=_list(args.methods),
            examples_per_class=None if sizes is None else [int(n) for n in sizes],
            extra_overrides=args.override)
        runs = runner.select(runs, shard=args.shard)
    except ValueError as e:
        parser.error(str(e))
    if not args.dry_run:
        print(f"{args.table} table: {len(runs)} runs under {args.root}", flush=True)
    try:
        report = runner.run_grid(runs, args.root, execute=runner.as_subprocess,
                                 dry_run=args.dry_run)
    except runner.GridError as e:
        sys.exit(f"error: {e}")
    if not args.dry_run:
        print(f"done: {len(report['ran'])} ran, {len(report['skipped'])} already finished")


if __name__ == "__main__":
    main()

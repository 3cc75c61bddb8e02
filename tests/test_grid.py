"""l2t_jax.tools.tables (no JAX): the tables' grids, their commands, the runner on fake workdirs,
and the run_table script."""
import os

import pytest

from helpers import load_script, write_run
from l2t_jax.tools import paper, tables
from l2t_jax.training.workdir import is_finished


def test_grid_sizes():
    main = tables.table_runs("main", "runs", seeds=[0, 1], targets=["cifar100"])
    assert len(main) == 9 * 2
    assert [r.label for r in main[:9]] == list(paper.PAPER_ROWS)
    assert len(tables.table_runs("main", "runs", seeds=[0, 1, 2])) == 9 * 6 * 3
    assert len(tables.table_runs("multisource", "runs", seeds=[0, 1, 2])) == 4 * 2 * 3
    limited = tables.table_runs("limited", "runs", seeds=[0, 1, 2])
    assert len(limited) == 3 * 4 * 3
    assert {r.examples_per_class for r in limited} == {25, 50, 100, 250}
    assert len(tables.table_runs("limited", "runs", seeds=[0], targets=["stl10", "cifar100"],
                               examples_per_class=[10, 20])) == 3 * 2 * 2
    # Every workdir distinct, and seed-major: all seed-0 runs come first.
    assert len({r.workdir for r in limited}) == len(limited)
    assert [r.seed for r in main] == [0] * 9 + [1] * 9


def test_method_selection():
    def rows(methods, table="main"):
        return [r.label for r in tables.table_runs(table, "runs", [0], ["stl10"]
                                                 if table != "multisource" else None,
                                                 methods=methods)]
    assert rows(["fm"]) == ["FM (single)", "FM (one-to-one)"]
    assert rows(["l2t_ww", "fm-one_to_one"]) == ["FM (one-to-one)", "L2T-ww (all-to-all)"]
    assert rows(["Scratch"]) == ["Scratch"]
    with pytest.raises(ValueError, match="not a row of the limited table"):
        rows(["lwf"], "limited")
    with pytest.raises(ValueError, match="unknown target"):
        tables.table_runs("main", "runs", [0], targets=["imagenet"])
    with pytest.raises(ValueError, match="unknown second source"):
        tables.table_runs("multisource", "runs", [0], targets=["plus_vgg"])
    with pytest.raises(ValueError, match="> 0 for the limited"):
        tables.table_runs("limited", "runs", [0], examples_per_class=[0, 25])
    with pytest.raises(ValueError, match="unknown table"):
        tables.table_runs("ablation", "runs", [0])


def test_command_is_exact():
    run = [r for r in tables.table_runs("main", "runs", seeds=[1], targets=["stl10"])
           if r.label == "FM (one-to-one)"][0]
    assert tables.command(run) == (
        "python -m l2t_jax.main --config=stl10 "
        "--workdir=runs/main/stl10/fm-one_to_one/epc_all/seed1 "
        "--config.method=fm --config.pairs=one_to_one --config.seed=1")
    scratch = tables.table_runs("limited", "runs", seeds=[0], methods=["scratch"],
                              examples_per_class=[25], extra_overrides=["epochs=2"])[0]
    assert tables.command(scratch) == (
        "python -m l2t_jax.main --config=stl10 "
        "--workdir=runs/limited/stl10/scratch/epc25/seed0 --config.method=scratch "
        "--config.seed=0 --config.data.train_examples_per_class=25 --config.epochs=2")
    multi = tables.table_runs("multisource", "runs", seeds=[2], methods=["l2t_ww"],
                            targets=["plus_cifar10_resnet32"])[0]
    assert tables.command(multi) == (
        "python -m l2t_jax.main --config=stl10:plus_cifar10_resnet32 "
        "--workdir=runs/multisource/stl10-plus_cifar10_resnet32/l2t_ww-all_to_all/epc_all/seed2 "
        "--config.method=l2t_ww --config.pairs=all_to_all --config.seed=2")


def test_run_grid_skips_finished_runs_and_stops_on_failure(tmp_path, capsys):
    runs = tables.table_runs("main", str(tmp_path), seeds=[0], targets=["cifar100"],
                           methods=["scratch", "lwf", "fm"])
    assert len(runs) == 4
    write_run(tmp_path, os.path.relpath(runs[1].workdir, tmp_path), "lwf", None, "cifar100",
              0, 69.0)
    called = []

    def runner(args):   # stands in for the training program
        called.append(args)
        workdir = next(a.split("=", 1)[1] for a in args if a.startswith("--workdir="))
        if len(called) == 3:
            return 1
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "result.json"), "w") as f:
            f.write("{}")
        return 0

    with pytest.raises(tables.GridError, match=r"run 4/4 failed with exit code 1"):
        tables.run_grid(runs, runner=runner)
    out = capsys.readouterr().out
    assert f"[2/4] skip (finished, has result.json): {runs[1].workdir}" in out
    assert "run 1/4 (" in out and f"\n  {tables.command(runs[0])}" in out
    assert "run 3/4 (" in out and "ETA" in out.split("run 3/4 (")[1].splitlines()[0]
    assert len(called) == 3
    assert called[0][1:3] == ["-m", "l2t_jax.main"]
    assert called[0][3] == "--config=cifar100"
    assert called[0][4] == f"--workdir={os.path.abspath(runs[0].workdir)}"
    assert called[0][5:] == ["--config.method=scratch", "--config.seed=0"]
    assert [is_finished(r.workdir) for r in runs] == [True, True, True, False]

    # Again: the three finished runs are skipped, the failed one runs.
    called.clear()
    report = tables.run_grid(runs, runner=lambda args: called.append(args) or 0)
    assert len(called) == 1 and len(report["skipped"]) == 3 and report["ran"] == [runs[3]]


def test_run_grid_dry_run_prints_commands(tmp_path, capsys):
    runs = tables.table_runs("main", str(tmp_path), seeds=[0, 1], targets=["stl10"],
                           methods=["l2t_ww"])
    write_run(tmp_path, os.path.relpath(runs[0].workdir, tmp_path), "l2t_ww", "all_to_all",
              "stl10", 0, 78.0)
    report = tables.run_grid(runs, dry_run=True,
                           runner=lambda args: pytest.fail("dry run ran something"))
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [tables.command(runs[1])]
    assert "skip" in captured.err and report["pending"] == [runs[1]]


def test_run_table_script_dry_run(tmp_path, capsys):
    load_script("run_table").main(["--table=main", f"--root={tmp_path}", "--seeds=0,1",
                                   "--targets=cifar100", "--dry_run"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 18 and all(line.startswith("python -m l2t_jax.main") for line in lines)

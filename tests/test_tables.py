"""l2t_jax.tools.tables (no JAX): the tables' grids in the runner's directory scheme, their
commands, and the run_table script (runs as subprocesses, a dry run, shards)."""
import os

import pytest

from helpers import load_script, write_run
from l2t_jax.tools import paper, runner, tables


def test_grid_sizes():
    main = tables.table_runs("main", "runs", seeds=[0, 1], targets=["cifar100"])
    assert len(main) == 9 * 2
    assert [r.label.split(",")[0] for r in main[:9]] == list(paper.PAPER_ROWS)
    assert len(tables.table_runs("main", "runs", seeds=[0, 1, 2])) == 9 * 6 * 3
    assert len(tables.table_runs("multisource", "runs", seeds=[0, 1, 2])) == 4 * 2 * 3
    limited = tables.table_runs("limited", "runs", seeds=[0, 1, 2])
    assert len(limited) == 3 * 4 * 3
    assert {r.directory.split(os.sep)[3] for r in limited} == {
        "epc25", "epc50", "epc100", "epc250"}
    assert len(tables.table_runs("limited", "runs", seeds=[0], targets=["stl10", "cifar100"],
                                 examples_per_class=[10, 20])) == 3 * 2 * 2
    # Every directory distinct, and seed-major: all seed-0 runs come first.
    assert len({r.directory for r in limited}) == len(limited)
    assert [r.directory.rsplit("seed", 1)[1] for r in main] == ["0"] * 9 + ["1"] * 9


def test_method_selection():
    def rows(methods, table="main"):
        return [r.label.split(",")[0] for r in tables.table_runs(
            table, "runs", [0], ["stl10"] if table != "multisource" else None, methods=methods)]
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


def test_directories_and_commands_are_exact():
    run = [r for r in tables.table_runs("main", "runs", seeds=[1], targets=["stl10"])
           if r.label.startswith("FM (one-to-one)")][0]
    assert run.directory == "main/stl10/fm-one_to_one/epc_all/seed1"
    assert run.command_line() == (
        "python -m l2t_jax.main --config=stl10 "
        "--workdir=runs/main/stl10/fm-one_to_one/epc_all/seed1 "
        "--config.method=fm --config.pairs=one_to_one --config.seed=1")
    scratch = tables.table_runs("limited", "runs", seeds=[0], methods=["scratch"],
                                examples_per_class=[25], extra_overrides=["epochs=2"])[0]
    assert scratch.command_line() == (
        "python -m l2t_jax.main --config=stl10 "
        "--workdir=runs/limited/stl10/scratch/epc25/seed0 --config.method=scratch "
        "--config.seed=0 --config.data.train_examples_per_class=25 --config.epochs=2")
    multi = tables.table_runs("multisource", "runs", seeds=[2], methods=["l2t_ww"],
                              targets=["plus_cifar10_resnet32"])[0]
    assert multi.command_line() == (
        "python -m l2t_jax.main --config=stl10:plus_cifar10_resnet32 "
        "--workdir=runs/multisource/stl10-plus_cifar10_resnet32/l2t_ww-all_to_all/epc_all/seed2 "
        "--config.method=l2t_ww --config.pairs=all_to_all --config.seed=2")


def test_a_table_runs_as_subprocesses_of_its_commands(tmp_path, monkeypatch):
    """runner.as_subprocess executes a run's own command with this interpreter (a fake
    subprocess.run stands in for the training program)."""
    runs = tables.table_runs("main", str(tmp_path), seeds=[0], targets=["cifar100"],
                             methods=["scratch", "lwf"])
    write_run(tmp_path, runs[1].directory, "lwf", None, "cifar100", 0, 69.0)
    called = []

    class Finished:
        returncode = 0

    def fake_run(args, check):
        called.append(args)
        write_run(tmp_path, runs[0].directory, "scratch", None, "cifar100", 0, 60.0)
        return Finished()

    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    outcome = runner.run_grid(runs, str(tmp_path), execute=runner.as_subprocess)
    assert outcome["ran"] == [runs[0]] and outcome["skipped"] == [runs[1]]
    import sys
    assert called == [[sys.executable, *runs[0].command[1:]]]
    assert called[0][1:5] == ["-m", "l2t_jax.main", "--config=cifar100",
                              f"--workdir={tmp_path / runs[0].directory}"]


def test_run_table_script_dry_run_and_shards(tmp_path, capsys):
    script = load_script("run_table")
    script.main(["--table=main", f"--root={tmp_path}", "--seeds=0,1", "--targets=cifar100",
                 "--dry_run"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 18 and all(line.startswith("python -m l2t_jax.main") for line in lines)
    shards = []
    for i in range(2):
        script.main(["--table=main", f"--root={tmp_path}", "--seeds=0,1",
                     "--targets=cifar100", "--dry_run", f"--shard={i}/2"])
        shards.append(capsys.readouterr().out.splitlines())
    assert shards == [lines[0::2], lines[1::2]]
    with pytest.raises(SystemExit):
        script.main(["--table=main", f"--root={tmp_path}", "--seeds=0", "--shard=2/2"])
    assert "expected 'i/n'" in capsys.readouterr().err

"""l2t_jax.tools.runner (no JAX): the one directory scheme, the commands that make a run
alone (a program's run reproduces its config from the command line), and run_grid on fake
runs: skipping finished runs, stopping on a failure and resuming, the dry run, ``only``,
shards, and the progress lines."""
import logging
import os
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from helpers import write_run
from l2t_jax import configs
from l2t_jax.configs import demo as demo_config, study as study_config
from l2t_jax.tools import runner


def test_one_directory_scheme():
    assert runner.run_directory("fm:one_to_one", 5, 2) == "fm-one_to_one/epc5/seed2"
    assert runner.run_directory("scratch", 0, 0, context=("main", "stl10")) == (
        "main/stl10/scratch/epc_all/seed0")
    assert runner.run_directory(
        "l2t_ww:all_to_all", 5, 3, context=("demo_resnet20",),
        settings=(("learning_rate", 0.02), ("meta_update_every", 2))) == (
        "demo_resnet20/l2t_ww-all_to_all/epc5/learning_rate=0.02_meta_update_every=2/seed3")


def _parse(command, monkeypatch):
    """The config that ``python -m l2t_jax.main`` builds from ``command``'s flags (the
    config flag reads its overrides from sys.argv)."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values)
    argv = ["main"] + [a if not a.startswith("--config=") else
                       "--config=" + configs.resolve(a[len("--config="):])
                       for a in command[3:] if not a.startswith("--workdir=")]
    monkeypatch.setattr(sys, "argv", argv)
    values(argv)
    return values.config


@pytest.mark.parametrize("name, variant", [("study", "smoke"), ("demo", None)])
def test_a_programs_run_command_rebuilds_its_config(name, variant, monkeypatch):
    module = {"study": study_config, "demo": demo_config}[name]
    config = module.get_config(variant)
    config.seeds = (3,)
    config.methods = ("l2t_ww:all_to_all", "fm:all_to_all")
    config.learning_rate = 0.05
    config.source_specs.demo_resnet20.widths = (4, 8, 8)
    config.shard = "1/2"                       # chooses runs: not part of a run's command
    command = runner.program_command(config, "W", "some/run")
    spec = f"{name}:{variant}" if variant else name
    assert command[:5] == ("python", "-m", "l2t_jax.main", f"--config={spec}", "--workdir=W")
    assert command[-1] == "--config.only=some/run"
    assert not any(a.startswith("--config.shard") for a in command)
    rebuilt = _parse(command, monkeypatch)
    assert rebuilt.only == "some/run"
    rebuilt.only, rebuilt.shard = config.only, config.shard
    assert rebuilt.to_dict() == config.to_dict()
    # The preset alone: no overrides.
    assert runner.program_command(module.get_config(variant), "W", "r")[5:] == (
        "--config.only=r",)


def _grid(tmp_path, n=4):
    return [runner.Run(f"m{i}/epc5/seed0", ("python", "-m", "l2t_jax.main", f"--run={i}"),
                       f"run {i}") for i in range(n)]


def _finish(root, run, test=70.0):
    write_run(root, run.directory, "scratch", None, "digits", 0, test)


def test_run_grid_skips_finished_runs_stops_on_failure_and_resumes(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="l2t_jax")
    runs = _grid(tmp_path)
    _finish(tmp_path, runs[1])
    made = []

    def execute(run, workdir):        # stands in for the training program
        made.append(run)
        if len(made) == 3:
            return 1
        assert workdir == os.path.join(str(tmp_path), run.directory)
        _finish(tmp_path, run, 71.5)
        return 0

    with pytest.raises(runner.GridError, match=r"run 4/4 failed with exit code 1"):
        runner.run_grid(runs, str(tmp_path), execute=execute)
    log = caplog.text
    assert f"run 2/4 (run 1): finished earlier, skipped ({tmp_path / runs[1].directory})" in log
    assert "run 1/4 (run 0) | elapsed" in log and f"\n  {runs[0].command_line()}" in log
    assert "ETA" in log.split("run 3/4 (")[1].splitlines()[0]
    assert "test accuracy at best val: 71.50%" in log
    assert made == [runs[0], runs[2], runs[3]]

    made.clear()                     # again: the three finished runs are skipped
    outcome = runner.run_grid(runs, str(tmp_path), execute=execute)
    assert made == [runs[3]] and outcome["ran"] == [runs[3]] and len(outcome["skipped"]) == 3


def test_dry_run_prints_the_unfinished_runs_commands(tmp_path, capsys):
    runs = _grid(tmp_path, 3)
    _finish(tmp_path, runs[0])
    outcome = runner.run_grid(runs, str(tmp_path), dry_run=True,
                              execute=lambda run, w: pytest.fail("a dry run made a run"))
    assert capsys.readouterr().out.splitlines() == [r.command_line() for r in runs[1:]]
    assert outcome["pending"] == runs[1:] and outcome["skipped"] == runs[:1]


def test_only_and_shards_choose_the_runs(tmp_path):
    runs = _grid(tmp_path, 5)
    assert runner.select(runs, shard="1/2") == runs[1::2]
    assert runner.select(runs, shard="0/1") == runs
    assert runner.select(runs, only="m3/epc5/seed0/") == [runs[3]]
    assert runner.select(runs, only="m3/epc5/seed0", shard="1/2") == []
    made = []
    runner.run_grid(runs, str(tmp_path), only="m2/epc5/seed0",
                    execute=lambda run, w: made.append(run) or 0)
    assert made == [runs[2]]
    with pytest.raises(ValueError, match="expected 'i/n'"):
        runner.select(runs, shard="2/2")
    with pytest.raises(ValueError, match="expected 'i/n'"):
        runner.select(runs, shard="1")
    with pytest.raises(ValueError, match=r"only='m9' is not the directory of a run .*m0/"):
        runner.select(runs, only="m9")


def test_grid_progress(monkeypatch):
    clock = iter([0.0, 0.0, 60.0])
    monkeypatch.setattr(runner.time, "time", lambda: next(clock))
    progress = runner.GridProgress(4)
    assert progress.line(1, "scratch") == "run 1/4 (scratch) | elapsed 0.0 s"
    progress.finished(skipped=True)     # finished before: counts as done, takes no time
    progress.finished()
    assert progress.line(3, "fm") == "run 3/4 (fm) | elapsed 1 min 00 s, ETA 2 min 00 s"

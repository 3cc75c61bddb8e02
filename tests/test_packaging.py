"""The package as a user gets it: a wheel installed outside the checkout trains a shipped
config, and a run prints the program's own lines (libraries' only with --log_libraries).
(Each mistake a newcomer makes is a one-line error that names the fix: test_main.py for
config names and variants, test_configs.py for short names, test_data.py for a missing
TFDS data_dir, test_convert.py and test_build.py for PyTorch files.)"""
import json
import os
import subprocess
import sys
import zipfile

import pytest

from helpers import REPO_ROOT, write_npz_splits

# A shipped config (read from the installed package, not from configs/), shrunk to two
# steps of a method without a source on small arrays.
TINY_OVERRIDES = ("--config.method=scratch", "--config.data.kind=npz",
                  "--config.data.name=arrays", "--config.data.official_split=",
                  "--config.data.num_classes=3", "--config.epochs=1",
                  "--config.steps_per_epoch=2")


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory):
    """The wheel built from this checkout, installed with ``pip --target`` into a directory
    outside it (the dependencies are this environment's): (site directory, outside dir)."""
    root = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                            "-w", str(root / "dist"), REPO_ROOT],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("l2t_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "l2t_jax/configs/default.py" in names and "l2t_jax/configs/cifar100.py" in names
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                                "--target", str(root / "site"), str(wheel)],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    outside = root / "elsewhere"
    write_npz_splits(outside / "data")
    return root / "site", outside


def _run_installed(site, cwd, *args):
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def installed_run(wheel_install):
    """``python -m l2t_jax.main --config=cifar100:tiny`` from the installed wheel, run from
    a directory outside the checkout: (completed process, workdir)."""
    site, outside = wheel_install
    workdir = outside / "run"
    finished = _run_installed(site, outside, "-m", "l2t_jax.main", "--config=cifar100:tiny",
                              f"--workdir={workdir}", f"--config.data.data_dir={outside / 'data'}",
                              *TINY_OVERRIDES)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished, workdir


def test_wheel_installed_outside_the_checkout_trains_a_shipped_config(wheel_install,
                                                                      installed_run):
    site, outside = wheel_install
    where = _run_installed(site, outside, "-c", "import l2t_jax; print(l2t_jax.__file__)")
    assert where.stdout.strip().startswith(str(site)), where.stdout
    _, workdir = installed_run
    with open(workdir / "result.json") as f:
        result = json.load(f)
    assert result["steps"] == 2 and 0 <= result["test_at_best_val"] <= 100
    assert result["run"]["git"] is None      # not a checkout: the wheel's own files


def test_a_run_prints_its_own_lines_and_no_library_info(installed_run):
    finished, _ = installed_run
    log = finished.stderr
    assert "compiling the training step (scratch)..." in log
    assert "compiled the training step (scratch) in" in log
    assert "step 2/2 (epoch 0)" in log and "ETA" in log
    assert "test accuracy" in log and "result.json" in log
    assert "orbax" not in log and "checkpoint_manager.py" not in log
    assert "Unable to initialize backend" not in log        # absl/jax platform probing
    assert len(log.splitlines()) < 25, log


def test_log_libraries_brings_the_library_lines_back(wheel_install, installed_run):
    site, outside = wheel_install
    _, workdir = installed_run
    # The finished run again: it restores the last checkpoint, which orbax logs at INFO.
    again = _run_installed(site, outside, "-m", "l2t_jax.main", "--config=cifar100:tiny",
                           f"--workdir={workdir}", f"--config.data.data_dir={outside / 'data'}",
                           *TINY_OVERRIDES, "--log_libraries")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoint_manager.py" in again.stderr
    assert "resumed from step 2" in again.stderr

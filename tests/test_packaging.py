"""The package as a user gets it: a wheel installed outside the checkout trains a shipped
config, a run prints the program's own lines (libraries' only with --log_libraries), and
each mistake a newcomer makes is a one-line error that names the fix."""
import json
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO_ROOT
from l2t_jax import configs, convert, data, train
from test_train import tiny_config, write_npz_splits

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


def _main(*args, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, "-m", "l2t_jax.main", *args], cwd=cwd,
                          capture_output=True, text=True)


def _one_line_error(completed) -> str:
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr and "flags:" not in completed.stderr
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, completed.stderr[-3000:]
    return errors[0]


def test_config_name_and_variant_mistakes_are_one_line(tmp_path):
    typo = _one_line_error(_main("--config=configs/cifar100.py:tyni", f"--workdir={tmp_path}"))
    assert "unknown variant 'tyni' of cifar100; valid: tiny" in typo
    unknown = _one_line_error(_main("--config=cifar10", f"--workdir={tmp_path}", cwd=tmp_path))
    assert "'cifar10' is not a shipped config" in unknown and "cifar100, cub200" in unknown


def test_short_config_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
    shipped = os.path.join(configs.CONFIG_DIR, "stl10.py")
    monkeypatch.chdir(REPO_ROOT)            # a file that exists is taken as given
    assert configs.resolve("configs/stl10.py:tiny") == "configs/stl10.py:tiny"
    monkeypatch.chdir(tmp_path)             # elsewhere the same words name the shipped file
    assert configs.resolve("configs/stl10.py:tiny") == shipped + ":tiny"
    assert configs.resolve("stl10") == shipped
    assert configs.resolve("stl10.py:plus_resnet20,tiny") == shipped + ":plus_resnet20,tiny"
    with pytest.raises(FileNotFoundError, match="the shipped config 'cifar100' is "
                                                "--config=cifar100:tiny"):
        configs.resolve("nowhere/cifar100.py:tiny")
    with pytest.raises(FileNotFoundError, match="shipped: cifar100, cub200"):
        configs.resolve("cifar10")
    assert configs.resolve("./configs/stl10.py") == shipped


def test_missing_tfds_data_dir_says_so_and_how_to_prepare(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(data.DataError) as error:
        data.TfdsSource("cifar100", "train", str(missing))
    message = str(error.value)
    assert f"config.data.data_dir='{missing}' does not exist" in message
    assert "tfds build cifar100 --file_format=array_record" in message
    assert "TFRECORD" not in message and "already prepared" not in message
    line = _one_line_error(_main("--config=cifar100:tiny", f"--workdir={tmp_path / 'run'}",
                                 f"--config.data.data_dir={missing}"))
    assert "does not exist" in line


def test_a_pytorch_file_without_torch_names_the_extra(tmp_path, monkeypatch):
    checkpoint = tmp_path / "model.pth"
    checkpoint.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)      # `import torch` raises ImportError
    with pytest.raises(ImportError, match=r"model\.pth needs torch, which is not installed: "
                                          r"pip install 'l2t-jax\[convert\]'"):
        convert.read_torch_checkpoint(str(checkpoint))


def test_a_pytorch_file_as_source_says_to_convert_it(tmp_path):
    checkpoint = tmp_path / "resnet20.pth"
    checkpoint.write_bytes(b"not read")
    write_npz_splits(tmp_path / "data")
    config = tiny_config(tmp_path / "data", checkpoint)
    with pytest.raises(ValueError, match=r"is a file; the source must be converted once: "
                                         r"python -m l2t_jax.convert --model resnet20"):
        train.train_and_evaluate(config, str(tmp_path / "run"))

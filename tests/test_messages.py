"""What a user's common mistakes print, run as the user runs them (``python -m ...``): one
short line on stderr that names the problem and the fix, and nothing before it (no
traceback, no library warning, no log line).

Each test would fail on the message the mistake printed before: a raw ``AttributeError``
repr listing every key of the default config, a blame on "overrides given: none", a
suggestion of ``--allow_pickle`` for a file that is not a checkpoint, "config.json does not
exist", "no readable images" without the accepted types, a compilation-cache line and a
TFDS warning before the missing-data message, a ``--help`` without the configs.
"""
import os
import subprocess
import sys

import pytest

from helpers import REPO_ROOT, run_main
from l2t_jax import configs, data


def only_line(completed, most: int = 250, tmp_path=None) -> str:
    """The whole stderr of a failed command: exit status 1, one line starting ``error: ``
    of at most ``most`` characters, each occurrence of ``tmp_path`` counted as 3."""
    assert completed.returncode == 1, completed.stderr[-3000:]
    stderr = completed.stderr.strip()
    assert "\n" not in stderr, stderr[-3000:]
    length = len(stderr.replace(str(tmp_path), "DIR") if tmp_path else stderr)
    assert stderr.startswith("error: ") and length <= most, stderr
    return stderr


def run_module(module, *args, env=None, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, env=env)


def test_a_mistyped_override_names_the_key_and_its_nearest(tmp_path):
    line = only_line(run_main("--config=cifar100", f"--workdir={tmp_path}",
                              "--config.batchsize=64"), most=160, tmp_path=tmp_path)
    assert "unknown key batchsize; did you mean batch_size" in line
    assert "\\n" not in line and "AttributeError" not in line
    assert "meta_weight_decay" not in line           # no list of every key
    assert "--show_config" in line                   # ... which is there on request
    nested = only_line(run_main("--config=cifar100", f"--workdir={tmp_path}",
                                "--config.data.dta_dir=x"), most=160, tmp_path=tmp_path)
    assert "unknown key data.dta_dir; did you mean data.data_dir?" in nested


def test_an_override_of_the_demo_is_checked_against_the_demo_config(tmp_path):
    line = only_line(run_main("--config=demo", f"--workdir={tmp_path}", "--config.seed=1"),
                     most=160, tmp_path=tmp_path)
    assert "unknown key seed; did you mean seeds?" in line and "--config=demo" in line
    shown = run_main("--config=demo", "--show_config")
    assert shown.returncode == 0, shown.stderr[-2000:]
    keys = {line.split(":")[0] for line in shown.stdout.splitlines() if ":" in line
            and not line.startswith(" ")}
    assert {"methods", "seeds", "examples_per_class", "source"} <= keys
    assert not keys & {"seed", "meta_weight_decay", "pairs"}     # the training config's
    # A number where the demo expects method names (the override parses as a tuple of ints).
    methods_line = only_line(run_main("--config=demo", f"--workdir={tmp_path}",
                                      "--config.methods=3", "--config.dry_run=True"),
                             tmp_path=tmp_path)
    assert "config.methods: 3 is not a method" in methods_line and "l2t_ww" in methods_line


def test_a_config_file_without_get_config_says_what_it_needs(tmp_path):
    config_file = tmp_path / "mine.py"
    config_file.write_text("batch_size = 64\n")
    line = only_line(run_main(f"--config={config_file}", f"--workdir={tmp_path / 'run'}"),
                     tmp_path=tmp_path)
    assert f"{config_file} defines no get_config()" in line
    assert "get_config(variant=None) returns an ml_collections.ConfigDict" in line
    assert "overrides" not in line


def test_a_file_that_is_not_a_checkpoint_is_not_sent_to_allow_pickle(tmp_path):
    pytest.importorskip("torch")
    garbage = tmp_path / "model.pth"          # e.g. the error page of a failed download
    garbage.write_bytes(b"<!DOCTYPE html><title>404 Not Found</title>".ljust(3000))
    for extra in ((), ("--allow_pickle",)):
        line = only_line(run_module("l2t_jax.convert", "--model", "resnet20", "--checkpoint",
                                    str(garbage), "--output", str(tmp_path / "out"), *extra),
                         tmp_path=tmp_path)
        assert f"{garbage} is not a PyTorch checkpoint (3,000 bytes;" in line
        assert "download finished" in line and "allow_pickle" not in line


def test_a_checkpoint_cut_short_says_so(tmp_path, released_resnet32_path):
    pytest.importorskip("torch")
    cut = tmp_path / "model.pth.tar"
    with open(released_resnet32_path, "rb") as f:
        cut.write_bytes(f.read()[:100_000])
    line = only_line(run_module("l2t_jax.convert", "--model", "resnet32", "--checkpoint",
                                str(cut), "--output", str(tmp_path / "out")),
                     tmp_path=tmp_path)
    assert f"{cut} (100,000 bytes) starts as a PyTorch checkpoint but cannot be read" in line
    assert "cut short or damaged" in line and "allow_pickle" not in line


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_evaluate_and_export_outside_a_run_say_no_run_here(command, tmp_path):
    if command == "export":
        pytest.importorskip("torch")
    output = () if command == "evaluate" else ("--output", str(tmp_path / "m.pth"))
    empty = tmp_path / "empty"
    empty.mkdir()
    line = only_line(run_module(f"l2t_jax.{command}", "--workdir", str(empty), *output),
                     tmp_path=tmp_path)
    assert line == (f"error: no run here: {empty} has no config.json (a run's workdir is the "
                    "--workdir of python -m l2t_jax.main)")
    line = only_line(run_module(f"l2t_jax.{command}", "--workdir", str(tmp_path / "nowhere"),
                                *output), tmp_path=tmp_path)
    assert f"no run here: {tmp_path / 'nowhere'} does not exist" in line
    # The demo's or the study's directory: the runs are below it.
    run = tmp_path / "demo" / "runs" / "scratch" / "epc5" / "seed0"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    line = only_line(run_module(f"l2t_jax.{command}", "--workdir", str(tmp_path / "demo"),
                                *output), tmp_path=tmp_path)
    assert line.endswith(f"; a run below it: {run}")


def test_a_folder_without_images_names_the_accepted_suffixes(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "data" / split / "cats").mkdir(parents=True)
        (tmp_path / "data" / split / "cats" / "notes.txt").write_text("not an image")
    line = only_line(run_main("--config=image_folder:small,tiny", f"--workdir={tmp_path / 'r'}",
                              f"--config.data.data_dir={tmp_path / 'data'}"),
                     tmp_path=tmp_path)
    assert f"{tmp_path / 'data' / 'train'} has no images" in line
    assert ", ".join(data.IMAGE_SUFFIXES) in line and "cats/notes.txt" in line


def test_missing_tfds_data_prints_the_message_alone(tmp_path):
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"),
               L2T_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)       # the user's default cache
    line = only_line(run_module("l2t_jax.main", "--config=cifar100",
                                f"--workdir={tmp_path / 'run'}", env=env),
                     tmp_path=tmp_path)
    assert line.startswith(f"error: TFDS data set 'cifar100' is not prepared in "
                           f"{tmp_path / 'tfds'}")
    assert "tfds build cifar100 --file_format=array_record" in line


def test_help_lists_the_shipped_configs_and_their_variants():
    shown = run_main("--help")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "python -m l2t_jax.main --config=NAME[:VARIANT] --workdir=DIR" in shown.stdout
    for name in configs.names():
        variants = configs.variants(name)
        if variants is None:
            assert f"  {name} (variants: see l2t_jax/configs/{name}.py)" in shown.stdout
        else:
            assert f"  {name} (variants: {', '.join(variants)})" in shown.stdout
        assert configs.summary(name) in shown.stdout
    assert "--workdir" in shown.stdout and "--show_config" in shown.stdout

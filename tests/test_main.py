"""python -m l2t_jax.main: config mistakes on the command line (an unknown override, a bad
value, a misspelt config name or variant) are one-line errors. (What each fault of a run
becomes in main: test_faults.test_main_reports_each_fault_in_one_line.)"""
import subprocess
import sys

from helpers import REPO_ROOT, one_line_error, run_main


def test_command_line_config_mistakes_are_one_line_errors(tmp_path):
    command = [sys.executable, "-m", "l2t_jax.main", "--config=configs/cifar100.py",
               f"--workdir={tmp_path}"]
    unknown = subprocess.run(command + ["--config.lr=3"], cwd=REPO_ROOT, capture_output=True,
                             text=True)
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr
    assert "unknown key lr; did you mean learning_rate?" in unknown.stderr
    bad_model = subprocess.run(command + ["--config.target_model=vgg11"], cwd=REPO_ROOT,
                               capture_output=True, text=True)
    assert bad_model.returncode != 0 and "Traceback" not in bad_model.stderr
    assert "'vgg11' is not a model; valid: resnet20" in bad_model.stderr


def test_config_name_and_variant_mistakes_are_one_line(tmp_path):
    typo = one_line_error(run_main("--config=configs/cifar100.py:tyni", f"--workdir={tmp_path}"))
    assert "unknown variant 'tyni' of cifar100; valid: tiny" in typo
    unknown = one_line_error(run_main("--config=cifar10", f"--workdir={tmp_path}", cwd=tmp_path))
    assert "'cifar10' is not a shipped config" in unknown and "cifar100, cub200" in unknown

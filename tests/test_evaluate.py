"""A tiny finished run of configs/image_folder.py on a digits folder without val/, then
l2t_jax.evaluate on it (top-1 equal to what training recorded, per-class counts, the
confusion matrix and its picture, the command line) and l2t_jax.export of its last
checkpoint, loaded into PyTorch (the Flax logits within 1e-4 on the run's own images)."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as ref
from helpers import REPO_ROOT, load_config, nchw
from l2t_jax import data, evaluate, export, models
from l2t_jax.tools import digits
from l2t_jax.training import build, checkpoints, train
from l2t_jax.training.config import read_run_config

CLASSES = ["one", "two", "zero"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Scratch (no source: the cheapest step to compile; the folder config with L2T-ww and
    a source is the README's own-data run) for 2 epochs of 3 steps."""
    root = tmp_path_factory.mktemp("evaluate")
    folder = str(root / "digits")
    digits.write_digits_image_folder(folder, digits=(0, 1, 2), train_per_class=12,
                                   test_per_class=4)
    config = load_config("image_folder", "small,tiny")
    config.data.data_dir = folder
    config.data.hflip = False
    config.method = "scratch"
    config.epochs, config.steps_per_epoch = 2, 3
    workdir = str(root / "run")
    result = train.train_and_evaluate(config, workdir)
    return workdir, result


def test_evaluate_reproduces_the_recorded_accuracies_and_writes_the_report(finished_run):
    workdir, result = finished_run
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["data"]["classes"] == CLASSES and saved["data"]["num_classes"] == 3
    test = evaluate.evaluate_run(workdir, "test")
    # best/ on test is the number training reported at the best val accuracy.
    assert test["top1"] == pytest.approx(result["test_at_best_val"], abs=0.01)
    assert evaluate.evaluate_run(workdir, "val")["top1"] == pytest.approx(result["best_val"],
                                                                          abs=0.01)
    assert test["images"] == 12 and test["classes"] == CLASSES
    confusion = np.asarray(test["confusion"])
    assert confusion.shape == (3, 3) and confusion.sum(axis=1).tolist() == [4, 4, 4]
    assert [row["correct"] for row in test["per_class"]] == np.diag(confusion).tolist()
    assert [row["accuracy"] for row in test["per_class"]] == [
        round(100 * c / 4, 2) for c in np.diag(confusion)]
    assert os.path.basename(test["picture"]) == "confusion_test_best.png"
    with open(test["picture"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    written = json.load(open(os.path.join(workdir, "eval_test_best.json")))
    assert written["top1"] == test["top1"] and written["confusion"] == test["confusion"]
    text = evaluate.format_report(test)
    assert f"top-1 {test['top1']:.2f}%" in text and "zero" in text
    # The train split is the run's: the carved val images are not in it.
    assert evaluate.evaluate_run(workdir, "train", "last")["images"] == 33


def test_summary_of_a_known_confusion_matrix():
    report = evaluate.summarize(evaluate.confusion_matrix([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 0, 2],
                                                          4), ["a", "b", "c", "d"])
    assert report["top1"] == pytest.approx(66.67) and report["images"] == 6
    assert [r["accuracy"] for r in report["per_class"]] == [50.0, pytest.approx(66.67), 100.0,
                                                            None]
    assert report["most_confused"] == [{"true": "a", "predicted": "b", "images": 1},
                                       {"true": "b", "predicted": "a", "images": 1}]


def test_the_command_line_prints_a_table(finished_run):
    workdir, _ = finished_run
    completed = subprocess.run([sys.executable, "-m", "l2t_jax.evaluate", "--workdir", workdir,
                                "--split", "test", "--which", "last"], cwd=REPO_ROOT,
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    assert lines[0].startswith(f"test split of {workdir} (last, step 6 target, 12 images): "
                               "top-1 ")
    assert lines[1].split() == ["class", "images", "correct", "accuracy"]
    assert [line.split()[0] for line in lines[2:5]] == CLASSES
    assert os.path.isfile(os.path.join(workdir, "confusion_test_last.png"))
    completed = subprocess.run([sys.executable, "-m", "l2t_jax.evaluate", "--workdir",
                                workdir + "-missing"], cwd=REPO_ROOT, capture_output=True,
                               text=True)
    assert completed.returncode == 1 and completed.stderr.startswith("error: ")
    assert "Traceback" not in completed.stderr


def test_export_of_the_last_checkpoint_runs_in_pytorch(finished_run, tmp_path):
    workdir, _ = finished_run
    output = str(tmp_path / "target.pth")
    export.export(workdir, output, which="last")
    config = read_run_config(workdir)
    model = build.target_model(config)
    variables, step = checkpoints.restore_target(workdir, model, "last")
    assert step == 6
    torch_model = ref.VGG9BN(num_classes=3, widths=models.tiny_overrides("vgg9_bn")["widths"])
    torch_model.load_state_dict(torch.load(output, weights_only=True), strict=True)
    test = build.load_splits(config)["test"]
    examples = data.eval_examples(test, 32)
    images = np.stack([examples[i][0] for i in range(len(test))])
    with torch.no_grad():
        torch_logits = torch_model.eval()(torch.from_numpy(nchw(images)))[0].numpy()
    logits = np.asarray(evaluate.logits_of(model, variables, jnp.asarray(images)))
    np.testing.assert_allclose(torch_logits, logits, rtol=0, atol=1e-4)
    description = json.load(open(str(tmp_path / "target.json")))
    assert description["classes"] == CLASSES and description["weights"]["step"] == 6
    assert description["input"]["size"] == [32, 32]
    assert description["eval_resize"] == "resize to 32x32 (bilinear)"

"""A run's target on any split of its data: top-1, per-class accuracy, confusion matrix.

    python -m l2t_jax.evaluate --workdir RUN [--split test] [--which best|last]

reads the run's config.json (:func:`l2t_jax.training.config.read_run_config`: the data are
the run's, the same folder, the same carved validation split, the same limited train
subset; the network is the run's, :func:`l2t_jax.training.build.target_model`), restores
the target (``best/``, the target at the best val accuracy, or the newest checkpoint),
predicts every image of the split with the evaluation transform of training, and writes
into the workdir ``eval_<split>_<which>.json`` (top-1, per class: images, correct,
accuracy; the confusion matrix, rows = true class) and ``confusion_<split>_<which>.png``
(:mod:`l2t_jax.tools.metric_plots`). It prints the same as a table. One process, the default
device.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from l2t_jax.training import workdir as workdir_files


def run_config(workdir: str):
    """The config of the run in ``workdir`` (:func:`l2t_jax.training.config.read_run_config`).

    Raises:
      FileNotFoundError: "no run here" when ``workdir`` does not exist or holds no
        config.json, which every run of ``python -m l2t_jax.main`` writes first.
    """
    from l2t_jax.training.config import read_run_config
    if not os.path.isfile(workdir_files.path(workdir, workdir_files.CONFIG)):
        what = "does not exist" if not os.path.exists(workdir) else (
            f"has no {workdir_files.CONFIG}")
        below = _a_run_below(workdir)
        hint = f"; a run below it: {below}" if below else ""
        raise FileNotFoundError(f"no run here: {workdir} {what} (a run's workdir is the "
                                f"--workdir of python -m l2t_jax.main){hint}")
    return read_run_config(workdir)


def _a_run_below(directory: str, depth: int = 4) -> str | None:
    """The first workdir (a directory with config.json) under ``directory``, at most
    ``depth`` levels down, in sorted order: the demo's and the study's runs sit under
    ``DIR/runs/<method>/<budget>/<seed>``."""
    if depth == 0 or not os.path.isdir(directory):
        return None
    for name in sorted(os.listdir(directory)):
        child = os.path.join(directory, name)
        if os.path.isfile(workdir_files.path(child, workdir_files.CONFIG)):
            return child
        found = _a_run_below(child, depth - 1)
        if found:
            return found
    return None


def class_names(config) -> list[str]:
    """The class names of the run's data (config.data.classes), else "0" ... "K-1"."""
    classes = list(config.data.classes or ())
    return classes or [str(i) for i in range(config.data.num_classes)]


def logits_of(model, variables, images):
    """The network's logits (eval-mode BN); ``model`` a
    :class:`~l2t_jax.models.taps.TappedNetwork`."""
    return model.module.apply(variables, images, train=False)


def predict(model, variables, source, image_size: int, batch_size: int = 64
            ) -> tuple[np.ndarray, np.ndarray]:
    """(predicted classes, labels) of every example of ``source``, in its order, with the
    training program's evaluation transform. One compiled program: the last batch is
    padded."""
    import jax
    import jax.numpy as jnp

    from l2t_jax import data
    forward = jax.jit(lambda variables, images: jnp.argmax(
        logits_of(model, variables, images), axis=-1))
    predictions, labels = [], []
    for images, batch_labels, rows in data.eval_batches(source, image_size, batch_size):
        predictions.append(np.asarray(forward(variables, images))[:rows])
        labels.append(batch_labels[:rows])
    return np.concatenate(predictions), np.concatenate(labels)


def confusion_matrix(labels: Sequence[int], predictions: Sequence[int],
                     num_classes: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


def summarize(confusion: np.ndarray, classes: Sequence[str]) -> dict:
    """Top-1 (%), per-class images / correct / accuracy (%, None for a class without
    images), and the largest off-diagonal cells (``most_confused``)."""
    confusion = np.asarray(confusion)
    totals, correct = confusion.sum(axis=1), np.diag(confusion)
    per_class = [{"class": str(name), "images": int(n), "correct": int(c),
                  "accuracy": round(100.0 * c / n, 2) if n else None}
                 for name, n, c in zip(classes, totals, correct)]
    off = confusion - np.diag(correct)
    order = np.argsort(-off, axis=None, kind="stable")[:5]
    confused = [{"true": str(classes[r]), "predicted": str(classes[c]), "images": int(off[r, c])}
                for r, c in (np.unravel_index(i, off.shape) for i in order) if off[r, c]]
    return {"images": int(totals.sum()),
            "top1": round(100.0 * correct.sum() / max(totals.sum(), 1), 2),
            "per_class": per_class, "most_confused": confused,
            "confusion": confusion.tolist()}


def evaluate_run(workdir: str, split: str = "test", which: str = "best",
                 batch_size: int = 64, out_dir: Optional[str] = None) -> dict:
    """Evaluates the run's target on ``split`` and writes the JSON report and the picture
    into ``out_dir`` (default: the workdir). Returns the report (:func:`summarize` plus
    split, which, step, classes and the paths written).

    Raises:
      FileNotFoundError, ValueError (also data.DataError): naming the file, split or key.
    """
    from l2t_jax.tools import metric_plots
    from l2t_jax.training import build, checkpoints
    config = run_config(workdir)
    known = ("train",) + tuple(config.data.eval_splits)
    if split not in ("train", "val", "test"):
        raise ValueError(f"--split={split!r}; valid: train, val, test (this run evaluated "
                         f"{', '.join(config.data.eval_splits)})")
    if split not in known:
        config.data.eval_splits = tuple(config.data.eval_splits) + (split,)
    source = build.load_splits(config)[split]
    model = build.target_model(config)
    variables, step = checkpoints.restore_target(workdir, model, which)
    predictions, labels = predict(model, variables, source, config.data.image_size,
                                  batch_size)
    classes = class_names(config)
    report = summarize(confusion_matrix(labels, predictions, len(classes)), classes)
    report.update(split=split, which=which, step=step, workdir=os.path.abspath(workdir),
                  dataset=config.data.name, classes=classes)
    out_dir = out_dir or workdir
    json_name, png_name = workdir_files.evaluation_files(split, which)
    report["picture"] = metric_plots.plot_confusion_matrix(
        np.asarray(report["confusion"]), classes, os.path.join(out_dir, png_name),
        f"{config.data.name}, {split} split, {which} target: top-1 {report['top1']:.2f}%")
    report["report"] = os.path.join(out_dir, json_name)
    with open(report["report"], "w") as f:
        json.dump(report, f, indent=1)
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """The report as the command prints it: top-1, a per-class table, the most confused
    pairs, and the files written."""
    which = report["which"] + ("" if report.get("step") is None else f", step {report['step']}")
    lines = [f"{report['split']} split of {report['workdir']} ({which} target, "
             f"{report['images']} images): top-1 {report['top1']:.2f}%"]
    width = max([len("class")] + [len(row["class"]) for row in report["per_class"]])
    lines.append(f"  {'class':<{width}}  images  correct  accuracy")
    for row in report["per_class"]:
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.2f}"
        lines.append(f"  {row['class']:<{width}}  {row['images']:>6}  {row['correct']:>7}  "
                     f"{accuracy:>8}")
    if report["most_confused"]:
        lines.append("most confused (true -> predicted): " + ", ".join(
            f"{c['true']} -> {c['predicted']} ({c['images']})" for c in report["most_confused"]))
    lines.append(f"wrote {report['report']} and {report['picture']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from l2t_jax.training import checkpoints, converted, logs
    parser = argparse.ArgumentParser(
        prog="python -m l2t_jax.evaluate",
        description="Top-1 and per-class accuracy and a confusion-matrix picture of a run's "
                    "target on a split of its data (written into the workdir).")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--which", default="best", choices=checkpoints.WHICH,
                        help="best: the target at the best val accuracy; last: the newest "
                             "checkpoint")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--out", default=None, help="output directory (default: WORKDIR)")
    args = parser.parse_args(argv)
    logs.configure()
    try:
        report = evaluate_run(args.workdir, args.split, args.which, args.batch_size, args.out)
    except (FileNotFoundError, ValueError, converted.TorchMissingError) as e:
        sys.exit(f"error: {e}")
    print(format_report(report))


if __name__ == "__main__":
    main()

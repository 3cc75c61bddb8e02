"""Pictures of how runs went and what they reached, from their logged metrics and
results:

- :func:`plot_learning_curves`: test (or val) accuracy per epoch and train CE per step for
  several runs, each label's seeds shown as mean and a ±1 sample-std band.
- :func:`plot_train_metric`: one logged train metric (``train/meta_grad_norm``) per step
  for several runs, each label's seeds shown as mean and band.
- :func:`plot_limited_data`: accuracy against training examples per class over a grid's
  runs (the limited-data table, summarised by :mod:`l2t_jax.tools.summaries`).
- :func:`plot_confusion_matrix`: true class x predicted class of one split
  (:mod:`l2t_jax.evaluate` draws it).

metrics.jsonl is read through :mod:`l2t_jax.training.workdir`; methods are named and
coloured by :mod:`l2t_jax.transfer.methods` (:func:`label_color`); figures are saved by
:func:`l2t_jax.tools.figures.save`.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from l2t_jax.tools import figures, summaries
from l2t_jax.transfer import methods
from l2t_jax.training import workdir as wd  # `workdir` is an argument here


def label_color(label: str, index: int) -> str:
    """The colour of a row label: its method's (:attr:`l2t_jax.transfer.methods.Method.color`) when
    the label is the method's main row (``"FM (one-to-one)"``, ``"Scratch"``), so a method
    looks the same in every figure; otherwise (``"FM (single)"``, a label of one's own)
    matplotlib's default cycle, ``C<index>``."""
    for method in methods.METHODS.values():
        if method.color and label == method.label(method.scheme):
            return method.color
    return f"C{index}"


# -------------------------------------------------------------------- learning curves
def _mean_band(series: Sequence[tuple[np.ndarray, np.ndarray]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Aligns runs on the union of their x values; returns x, mean, sample std (NaN where
    fewer than 2 runs have x) and the count per x."""
    xs = np.array(sorted(set().union(*(set(x.tolist()) for x, _ in series))), dtype=float)
    table = np.full((len(series), len(xs)), np.nan)
    for row, (x, y) in enumerate(series):
        table[row, np.searchsorted(xs, x)] = y
    count = np.sum(np.isfinite(table), axis=0)
    mean = np.nanmean(table, axis=0)
    std = np.full(len(xs), np.nan)
    several = count >= 2
    if several.any():
        std[several] = np.nanstd(table[:, several], axis=0, ddof=1)
    return xs, mean, std, count


def plot_learning_curves(workdirs: Mapping[str, str | Sequence[str]], path: str) -> str:
    """PNG: left, test accuracy (%) against epoch (val where a run evaluates no test
    split); right, train cross-entropy against step. ``workdirs`` maps a legend label
    (``"Scratch"``) to one workdir or several (seeds): several are shown as their mean
    with a ±1 sample-std band. The epoch of an eval line is its step divided by the step of
    the run's first eval line, since train.py evaluates once at the end of every epoch.
    Returns ``path``."""
    if not workdirs:
        raise ValueError("plot_learning_curves needs at least one workdir")
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    accuracy_ax, ce_ax = fig.subplots(1, 2)
    eval_names = set()
    plotted, most_runs = 0, 1
    for i, (label, dirs) in enumerate(workdirs.items()):
        dirs = [dirs] if isinstance(dirs, str) else list(dirs)
        color = label_color(label, i)
        accuracy, ce = [], []
        for workdir in dirs:
            records = wd.read_metrics(os.path.join(workdir, wd.METRICS))
            for split in ("eval/test", "eval/val"):
                steps, values = figures.metric_series(records, split)
                if len(steps):
                    accuracy.append((steps / steps[0], values))
                    eval_names.add(split.split("/")[1])
                    break
            steps, values = figures.metric_series(records, "train/ce")
            if len(steps):
                ce.append((steps.astype(float), values))
        most_runs = max(most_runs, len(accuracy), len(ce))
        for ax, series in ((accuracy_ax, accuracy), (ce_ax, ce)):
            if not series:
                continue
            x, mean, std, _ = _mean_band(series)
            ax.plot(x, mean, color=color, lw=1.8, label=f"{label} (n={len(series)})",
                    marker="o" if ax is accuracy_ax and len(x) <= 30 else None, ms=3)
            if len(series) > 1:
                ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0)
            plotted += 1
    if not plotted:
        raise ValueError("no eval/test, eval/val or train/ce values in the metrics.jsonl of "
                         f"{', '.join(str(v) for v in workdirs.values())}")
    split_text = " / ".join(sorted(eval_names, reverse=True)) or "test"
    accuracy_ax.set_xlabel("epoch")
    accuracy_ax.set_ylabel(f"{split_text} accuracy (%)")
    accuracy_ax.set_title(f"{split_text.capitalize()} accuracy per epoch"
                          + (" (mean ± sample std over seeds)" if most_runs > 1 else ""))
    ce_ax.set_xlabel("training step")
    ce_ax.set_ylabel("train cross-entropy")
    ce_ax.set_title("Train cross-entropy (logged batches)")
    for ax in (accuracy_ax, ce_ax):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    return figures.save(fig, path)


def plot_train_metric(workdirs: Mapping[str, Sequence[str]], key: str, path: str,
                      ylabel: str, log_y: bool = False) -> str:
    """PNG: the logged train metric ``key`` (``train/meta_grad_norm``) against the step, one
    line per label: the mean over its workdirs (seeds) with a ±1 sample-std band. With
    ``log_y`` the mean and the std are of log10 of the positive values (a geometric mean
    and a band of its spread), since a mean ± std band of values spread over decades
    dips below zero, which a log axis cannot show. Returns ``path``; raises ValueError
    when no workdir logged ``key``."""
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.subplots()
    plotted = []
    for i, (label, dirs) in enumerate(workdirs.items()):
        series = [figures.metric_series(wd.read_metrics(os.path.join(d, wd.METRICS)), key)
                  for d in dirs]
        series = [(x.astype(float), y) for x, y in series if len(x)]
        if log_y:
            series = [(x[y > 0], np.log10(y[y > 0])) for x, y in series if np.any(y > 0)]
        if not series:
            continue
        x, mean, std, _ = _mean_band(series)
        lower, upper = mean - std, mean + std
        if log_y:
            mean, lower, upper = 10 ** mean, 10 ** lower, 10 ** upper
        color = label_color(label, i)
        ax.plot(x, mean, color=color, lw=1.8, label=f"{label} (n={len(series)})")
        if len(series) > 1:
            ax.fill_between(x, lower, upper, color=color, alpha=0.2, lw=0)
        plotted.append(mean)
    if not plotted:
        raise ValueError(f"no {key} in the metrics.jsonl of {list(workdirs.values())}")
    if log_y:
        figures.readable_log_y(ax, plotted)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} (" + ("geometric mean over seeds, ± 1 sample std of log10"
                                  if log_y else "mean ± sample std over seeds") + ")")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    return figures.save(fig, path)


# ---------------------------------------------------------------------- limited data
def plot_limited_data(results: Iterable[dict[str, Any]], path: str,
                      accuracy: str = "test") -> str:
    """PNG: test accuracy (%) against training examples per class, one line per method
    (mean over seeds, error bars = sample std), log-scale x with a tick per size; and a
    second panel with each method's relative gain over Scratch, (acc - scratch) / scratch
    in %, the quantity the paper says grows as data shrinks. One row of panels per data
    set. ``results`` are :func:`l2t_jax.tools.summaries.collect_results` dicts; those with
    examples_per_class 0 are left out. ``accuracy``: which test accuracy
    (:data:`l2t_jax.tools.summaries.ACCURACIES`: at the best val, or at the last epoch).
    Returns ``path``."""
    from matplotlib.ticker import FixedLocator, NullLocator

    cells = summaries.summarize(summaries.select_table(results, "limited"),
                                by=("row", "column", "examples_per_class"),
                                accuracy=accuracy)
    if not cells:
        raise ValueError("no results with train_examples_per_class > 0 to plot")
    datasets = []
    for cell in cells:
        if cell["column"] not in datasets:
            datasets.append(cell["column"])
    fig = Figure(figsize=(12, 4.6 * len(datasets)), layout="constrained")
    axes = fig.subplots(len(datasets), 2, squeeze=False)
    for (accuracy_ax, gain_ax), dataset in zip(axes, datasets):
        mine = [c for c in cells if c["column"] == dataset]
        sizes = sorted({c["examples_per_class"] for c in mine})
        labels = []
        for c in mine:
            if c["row"] not in labels:
                labels.append(c["row"])
        scratch = {c["examples_per_class"]: c["mean"] for c in mine if c["row"] == "Scratch"}
        for i, label in enumerate(labels):
            line = sorted((c for c in mine if c["row"] == label),
                          key=lambda c: c["examples_per_class"])
            x = [c["examples_per_class"] for c in line]
            color = label_color(label, i)
            n_runs = "/".join(sorted({str(c["n"]) for c in line}))
            accuracy_ax.errorbar(x, [c["mean"] for c in line], yerr=[c["std"] for c in line],
                                 marker="o", capsize=4, color=color,
                                 label=f"{label} (n={n_runs})")
            if label != "Scratch" and scratch:
                gains = [(c["examples_per_class"],
                          100.0 * (c["mean"] - scratch[c["examples_per_class"]])
                          / scratch[c["examples_per_class"]])
                         for c in line if c["examples_per_class"] in scratch]
                if gains:
                    gain_ax.plot(*zip(*gains), marker="o", color=color, label=label)
        for ax in (accuracy_ax, gain_ax):
            if len(sizes) > 1 and sizes[-1] / sizes[0] >= 4:   # log-x spreads 25..250 evenly
                ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator(sizes))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(s) for s in sizes])
            ax.set_xlabel("training examples per class")
            ax.grid(True, alpha=0.3)
        accuracy_ax.set_ylabel("test accuracy at best val (%)" if accuracy == "test" else
                               "test accuracy at the last epoch (%)")
        accuracy_ax.set_title(f"{dataset}: accuracy vs. training-set size\n"
                              "(mean ± sample std over seeds)")
        accuracy_ax.legend(loc="lower right", fontsize=9)
        gain_ax.set_ylabel("relative gain over Scratch (%)")
        gain_ax.set_title(f"{dataset}: (accuracy − Scratch) / Scratch")
        if scratch and len(labels) > 1:
            gain_ax.axhline(0.0, color=methods.METHODS["scratch"].color, lw=1, ls="--")
            gain_ax.legend(loc="upper right", fontsize=9)
        else:
            gain_ax.text(0.5, 0.5, "no Scratch runs to compare with", ha="center",
                         va="center", transform=gain_ax.transAxes)
    return figures.save(fig, path)


# ------------------------------------------------------------------- confusion matrix
def plot_confusion_matrix(confusion: np.ndarray, classes: Sequence[str], path: str,
                          title: str = "") -> str:
    """PNG: true class (rows) x predicted class (columns). Colour: the share of the row's
    images (so each row's diagonal cell is that class's accuracy); with at most 30 classes
    the counts are written in the cells and every class is named."""
    confusion = np.asarray(confusion)
    k = len(classes)
    if confusion.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {confusion.shape} for {k} classes")
    totals = confusion.sum(axis=1, keepdims=True)
    shares = np.divide(confusion, totals, out=np.zeros(confusion.shape, float),
                       where=totals > 0)
    side = min(max(4.5, 0.45 * k + 2.5), 16.0)
    fig = Figure(figsize=(side + 1.2, side), constrained_layout=True)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="equal")
    if k <= 30:
        for r in range(k):
            for c in range(k):
                if confusion[r, c]:
                    ax.text(c, r, str(int(confusion[r, c])), ha="center", va="center",
                            fontsize=8, color="white" if shares[r, c] > 0.6 else "black")
        ax.set_xticks(range(k), [str(c) for c in classes], rotation=90, fontsize=8)
        ax.set_yticks(range(k), [str(c) for c in classes], fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="share of the true class's images", shrink=0.8)
    return figures.save(fig, path)

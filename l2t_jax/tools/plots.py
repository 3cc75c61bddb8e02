"""Pictures of training workdirs: where transfer happens, what is transferred, how training
went, and how accuracy grows with the training set.

    python -m l2t_jax.tools.plots --workdir=DIR [--out=DIR] [--compare=LABEL=DIR[,DIR...] ...]

This module owns the figures made from workdirs' files (written by
:mod:`l2t_jax.training.train`):

- :func:`plot_pair_weights` ("where"): what the run learned per pair as a source-tap x
  target-tap heat map (``transfer_weights.json``; :func:`pair_weight_grid`,
  :func:`draw_pair_weight_heat_map`), beside the same per pair over training
  (``metrics.jsonl``): L2T-ww's pair weights lambda (``train/pair_weights/<i>``), or the
  attention of AFD and SemCKD (``train/pair_attention/<i>``), with its normalisation
  (:func:`where_of`) in the titles.
- :func:`plot_where_compare`: those heat maps of several runs side by side (L2T-ww's
  lambda beside AFD's and SemCKD's attention), each label's seeds averaged.
- :func:`plot_channel_weights` ("what"): each pair's channel weights sorted in decreasing
  order against the uniform 1/C (``transfer_weights.json``), beside the channel-weight
  entropy per pair over training, divided by log C so that 1.0 is uniform
  (``train/channel_weight_entropy/<i>``).
- :func:`plot_learning_curves`: test (or val) accuracy per epoch and train CE per step for
  several runs, each label's seeds shown as mean and a ±1 sample-std band.
- :func:`plot_workdir`: every picture the workdir's files allow; the command line calls it.
- :func:`plot_limited_data`: accuracy against training examples per class over a grid's
  runs (the limited-data table, summarised by :mod:`l2t_jax.tools.summaries`).
- :func:`plot_confusion_matrix`: true class x predicted class of one split
  (:mod:`l2t_jax.evaluate` draws it).

Files are read through :mod:`l2t_jax.training.workdir`; methods are named and coloured by
:mod:`l2t_jax.transfer.methods` (:func:`label_color`).

Figures are ``matplotlib.figure.Figure`` objects saved directly (the Agg canvas), without
pyplot, so nothing here changes matplotlib's global backend or leaks open figures. Missing
or malformed files raise FileNotFoundError / ValueError naming the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from l2t_jax.tools import summaries
from l2t_jax.transfer import methods
from l2t_jax.training import workdir as wd  # `workdir` is an argument here


# The per-pair quantities of transfer_weights.json: L2T-ww's lambda, AFD's / SemCKD's
# attention (l2t_jax.training.results.transfer_weights).
PER_PAIR_KEYS = ("pair_weights", "pair_attention")
# ``where.normalised_over`` -> how the heat map (rows: source taps, columns: target taps)
# reads: what its weights sum to one over.
NORMALISATIONS = {
    None: "not normalised",
    "target_taps": "normalised over target taps: each source tap's row sums to 1",
    "source_taps": "normalised over source taps: each target tap's column sums to 1",
    "unknown": "normalisation not recorded",
}
# How figures name each per-pair quantity.
QUANTITY_NAMES = {"pair_weights": "pair weight λ", "pair_attention": "attention"}


# ---------------------------------------------------------------------- reading files
def load_transfer_weights(workdir: str) -> dict[str, Any]:
    """``transfer_weights.json``, checked: ``pairs`` [[m, n], ...], ``source_taps`` and
    ``target_taps`` (channels per tap), ``pair_weights`` (one mean lambda per pair, or None),
    ``pair_attention`` (one mean attention per pair, or None), ``channel_weights`` (per pair
    a list of C_m mean weights, or None) and ``where`` (which of the per-pair keys the run
    learned and how it is normalised; files written before it lack it). ValueError names
    the file and what is wrong."""
    path = os.path.join(workdir, wd.TRANSFER_WEIGHTS)
    weights = wd.read_json(path)

    def fail(what):
        raise ValueError(f"{path}: {what}")

    if not isinstance(weights, dict):
        fail("not a JSON object")
    for key in ("pairs", "source_taps", "target_taps"):
        if not isinstance(weights.get(key), list):
            fail(f"missing or non-list {key!r}")
    pairs = weights["pairs"]
    source_taps, target_taps = weights["source_taps"], weights["target_taps"]
    for pair in pairs:
        if (not isinstance(pair, list) or len(pair) != 2
                or not 0 <= pair[0] < len(source_taps) or not 0 <= pair[1] < len(target_taps)):
            fail(f"pair {pair} is not [m, n] with m < {len(source_taps)} source taps and "
                 f"n < {len(target_taps)} target taps")
    for key in PER_PAIR_KEYS:
        values = weights.get(key)
        if values is not None:
            if len(values) != len(pairs):
                fail(f"{len(values)} {key} for {len(pairs)} pairs")
            if not all(isinstance(w, (int, float)) for w in values):
                fail(f"{key} must be one number per pair")
    where = weights.get("where")
    if where is not None:
        if (not isinstance(where, dict) or where.get("key") not in PER_PAIR_KEYS
                or weights.get(where["key"]) is None):
            fail(f"'where' must name a per-pair key the file holds ({', '.join(PER_PAIR_KEYS)})"
                 f", got {where!r}")
        if where.get("normalised_over") not in NORMALISATIONS:
            fail(f"where.normalised_over must be one of {list(NORMALISATIONS)}, got "
                 f"{where.get('normalised_over')!r}")
    channel_weights = weights.get("channel_weights")
    if channel_weights is not None:
        if len(channel_weights) != len(pairs):
            fail(f"{len(channel_weights)} channel_weights lists for {len(pairs)} pairs")
        for (m, n), channels in zip(pairs, channel_weights):
            if len(channels) != source_taps[m]:
                fail(f"pair {m}-{n}: {len(channels)} channel weights, but source tap {m} has "
                     f"{source_taps[m]} channels")
    return weights


def _workdir_method(workdir: str) -> str | None:
    """The run's method from result.json or config.json, None if neither says."""
    for name in (wd.RESULT, wd.CONFIG):
        path = os.path.join(workdir, name)
        if os.path.isfile(path):
            content = wd.read_json(path)
            if isinstance(content, dict) and content.get("method"):
                return content["method"]
    return None


def _workdir_label(workdir: str) -> str:
    """Row label (``L2T-ww (all-to-all)``) of a workdir, or its directory name."""
    for name in (wd.RESULT, wd.CONFIG):
        path = os.path.join(workdir, name)
        if os.path.isfile(path):
            content = wd.read_json(path)
            if isinstance(content, dict) and content.get("method"):
                return methods.row_label(content["method"],
                                         content.get("scheme", content.get("pairs")))
    return os.path.basename(os.path.normpath(workdir))


def where_of(weights: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a run learned per pair: ``{"key": "pair_weights" | "pair_attention",
    "normalised_over": None | "target_taps" | "source_taps", ...}`` from the file's
    ``where``; for a file written before ``where`` existed, L2T-ww's unnormalised
    ``pair_weights`` if it has them; None when it holds no per-pair weights (L2T-w)."""
    if weights.get("where") is not None:
        return dict(weights["where"])
    if weights.get("pair_weights") is not None:
        return {"key": "pair_weights", "normalised_over": None}
    return None


def metric_series(records: Sequence[Mapping[str, Any]], key: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``key`` in metrics.jsonl records, sorted by step. A step logged
    twice (a run resumed from a checkpoint older than its last log line) keeps the last."""
    by_step = {int(r["step"]): float(r[key]) for r in records if key in r}
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def _indexed_keys(records: Sequence[Mapping[str, Any]], prefix: str) -> list[int]:
    """Indices i of the keys ``<prefix>/<i>`` present in any record, sorted."""
    indices = set()
    for record in records:
        for key in record:
            if key.startswith(prefix + "/") and key[len(prefix) + 1:].isdigit():
                indices.add(int(key[len(prefix) + 1:]))
    return sorted(indices)


def label_color(label: str, index: int) -> str:
    """The colour of a row label: its method's (:attr:`l2t_jax.transfer.methods.Method.color`) when
    the label is the method's main row (``"FM (one-to-one)"``, ``"Scratch"``), so a method
    looks the same in every figure; otherwise (``"FM (single)"``, a label of one's own)
    matplotlib's default cycle, ``C<index>``."""
    for method in methods.METHODS.values():
        if method.color and label == method.label(method.scheme):
            return method.color
    return f"C{index}"


def _save(fig: Figure, path: str) -> str:
    """Raises workdir.RunFileError naming ``path`` when it cannot be written."""
    with wd.writing(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
    return path


def _pair_text(pair: Sequence[int]) -> str:
    return f"S{pair[0]}→T{pair[1]}"


_LINESTYLES = ("-", "--", ":", "-.")


def _pair_styles(pairs: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
    """Line style per pair that can be read off a 15-line plot: the colour names the
    target tap, the dash pattern the source tap (an all-to-all grid has few of each)."""
    from matplotlib import colormaps
    sources = sorted({m for m, _ in pairs})
    cmap = colormaps["tab10"]
    return [{"color": cmap(n % cmap.N), "ls": _LINESTYLES[sources.index(m) % len(_LINESTYLES)]}
            for m, n in pairs]


def _readable_log_y(ax, values: Sequence[np.ndarray]) -> None:
    """Log y with plain numbers (0.5, 1, 2 rather than 5 x 10^-1); 1-2-5 ticks when the data
    spans less than two decades, one tick per decade otherwise."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    positive = np.concatenate([v[v > 0] for v in values])
    ax.set_yscale("log")
    span = positive.max() / positive.min() if positive.size else 10.0
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if span < 100 else (1.0,)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


# ---------------------------------------------------------------------- pair weights
@dataclasses.dataclass
class PairWeightGrid:
    """The heat map's data.

    matrix: (len(source_rows), len(target_taps)) the per-pair value (mean lambda, or mean
      attention), NaN where no pair exists.
    source_rows: source tap index of each row (the taps that appear in pairs, ascending).
    row_labels / col_labels: ``"S4 (16 ch)"`` / ``"T0 (64 ch)"``.
    """

    matrix: np.ndarray
    source_rows: list[int]
    row_labels: list[str]
    col_labels: list[str]

    def value(self, m: int, n: int) -> float:
        """The value of pair (m, n); NaN if (m, n) is not a pair."""
        if m not in self.source_rows:
            return float("nan")
        return float(self.matrix[self.source_rows.index(m), n])


def pair_weight_grid(weights: Mapping[str, Any], key: str = "pair_weights") -> PairWeightGrid:
    """Lays ``transfer_weights.json``'s per-pair ``key`` (L2T-ww's ``pair_weights``, or
    ``pair_attention``) out as a source x target grid."""
    if weights.get(key) is None:
        raise ValueError(f"these transfer weights have no {key} (the method learns no "
                         "such 'where' weights)")
    pairs = [tuple(p) for p in weights["pairs"]]
    source_rows = sorted({m for m, _ in pairs})
    matrix = np.full((len(source_rows), len(weights["target_taps"])), np.nan)
    for (m, n), value in zip(pairs, weights[key]):
        matrix[source_rows.index(m), n] = value
    return PairWeightGrid(
        matrix=matrix, source_rows=source_rows,
        row_labels=[f"S{m} ({weights['source_taps'][m]} ch)" for m in source_rows],
        col_labels=[f"T{n} ({c} ch)" for n, c in enumerate(weights["target_taps"])])


def draw_pair_weight_heat_map(ax, grid: PairWeightGrid,
                              title: str = "Where: mean pair weight λ at the end of training"):
    """Draws ``grid`` on ``ax``: cell (r, c) = the value of pair (source_rows[r], c), written
    in it, grey "no pair" cells, tap labels on both axes, ``title``. Returns the AxesImage
    (its ``get_array()`` is the masked matrix) for a colour bar."""
    from matplotlib import colormaps
    cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9")   # grey: cells without a pair
    finite = grid.matrix[np.isfinite(grid.matrix)]
    vmax = max(float(finite.max()), 1e-6) if finite.size else 1.0
    image = ax.imshow(np.ma.masked_invalid(grid.matrix), cmap=cmap, vmin=0.0, vmax=vmax,
                      aspect="auto")
    for r in range(grid.matrix.shape[0]):
        for c in range(grid.matrix.shape[1]):
            value = grid.matrix[r, c]
            if np.isfinite(value):
                # Dark text on the bright (high) end of viridis, white on the dark end.
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=10,
                        color="black" if value / vmax > 0.6 else "white")
            else:
                ax.text(c, r, "no pair", ha="center", va="center", fontsize=8,
                        color="#666666")
    # Two-line tick labels: five "T3 (512 ch)" side by side would run into each other.
    ax.set_xticks(range(len(grid.col_labels)),
                  [label.replace(" (", "\n(") for label in grid.col_labels])
    ax.set_yticks(range(len(grid.row_labels)), grid.row_labels)
    ax.set_xlabel("target tap")
    ax.set_ylabel("source tap")
    ax.set_title(title)
    return image


def plot_pair_weights(workdir: str, path: str) -> str:
    """PNG of :func:`pair_weights_figure`; returns ``path``."""
    return _save(pair_weights_figure(workdir), path)


def pair_weights_figure(workdir: str) -> Figure:
    """"Where". Left: heat map of what the run learned per pair at the end of training
    (transfer_weights.json, the key :func:`where_of` names: L2T-ww's mean pair weight
    lambda, or AFD's / SemCKD's mean attention; :func:`draw_pair_weight_heat_map`), rows =
    source taps in pairs, columns = target taps, grey = no such pair, values written in the
    cells, its normalisation in the title. Right (if metrics.jsonl has them): the same per
    pair against training step (``train/<key>/<i>``, means over the logged training
    batches). ValueError if the file has no per-pair weights."""
    weights = load_transfer_weights(workdir)
    where = where_of(weights)
    if where is None:
        raise ValueError(f"{os.path.join(workdir, wd.TRANSFER_WEIGHTS)} has no per-pair "
                         f"weights ({', '.join(PER_PAIR_KEYS)}): the method learns none")
    key, name = where["key"], QUANTITY_NAMES[where["key"]]
    grid = pair_weight_grid(weights, key)
    metrics_path = os.path.join(workdir, wd.METRICS)
    records = wd.read_metrics(metrics_path) if os.path.isfile(metrics_path) else []
    indices = _indexed_keys(records, f"train/{key}")
    normalisation = NORMALISATIONS[where["normalised_over"]]

    fig = Figure(figsize=(13 if indices else 7, 4.8), layout="constrained")
    heat_ax, *rest = fig.subplots(1, 2 if indices else 1, squeeze=False)[0]
    image = draw_pair_weight_heat_map(
        heat_ax, grid, f"Where: mean {name} at the end of training\n({normalisation})")
    fig.colorbar(image, ax=heat_ax, label=f"{name} (mean over evaluation images)")

    if indices:
        ax = rest[0]
        pairs = weights["pairs"]
        styles = _pair_styles(pairs)
        for i in indices:
            steps, values = metric_series(records, f"train/{key}/{i}")
            if i < len(pairs):
                ax.plot(steps, values, label=_pair_text(pairs[i]), lw=1.6, **styles[i])
            else:
                ax.plot(steps, values, label=f"pair {i}", lw=1.6)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{name} (mean over the training batch)")
        ax.set_title(f"Where: {name} during training\n({normalisation})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, ncol=2 if len(indices) > 8 else 1, loc="center left",
                  bbox_to_anchor=(1.01, 0.5))
    return fig


@dataclasses.dataclass
class WherePanel:
    """One panel of :func:`plot_where_compare`: a label's grid (the mean over its runs of
    each pair's value), what it is (:func:`where_of`) and how many runs it averages."""

    label: str
    grid: PairWeightGrid
    where: dict[str, Any]
    runs: int


def where_panels(workdirs: Mapping[str, str | Sequence[str]]) -> list[WherePanel]:
    """The panels of :func:`plot_where_compare`, in the order of ``workdirs`` (label -> one
    workdir or several seeds). A label's runs must agree on the pairs, taps and quantity;
    their grids are averaged cell by cell. Labels whose runs have no per-pair weights, or
    no transfer_weights.json (methods that learn none, unfinished runs), are left out with
    a note on stdout."""
    panels = []
    for label, dirs in workdirs.items():
        dirs = [dirs] if isinstance(dirs, str) else list(dirs)
        missing = [d for d in dirs if not os.path.isfile(os.path.join(d, wd.TRANSFER_WEIGHTS))]
        if missing:
            print(f"note: {label}: no {wd.TRANSFER_WEIGHTS} in {', '.join(missing)} (written "
                  "at the end of training, by methods that learn where to transfer): left "
                  "out of the comparison")
            continue
        runs = [load_transfer_weights(d) for d in dirs]
        wheres = [where_of(w) for w in runs]
        if any(w is None for w in wheres):
            print(f"note: {label}: no per-pair weights in {wd.TRANSFER_WEIGHTS} (the method "
                  "learns none): left out of the comparison")
            continue
        layout = {(str(w["pairs"]), str(w["source_taps"]), str(w["target_taps"]),
                   where["key"], where["normalised_over"]) for w, where in zip(runs, wheres)}
        if len(layout) > 1:
            raise ValueError(f"{label}: its runs {dirs} differ in pairs, taps or what they "
                             "learned; give them separate labels")
        grids = [pair_weight_grid(w, where["key"]) for w, where in zip(runs, wheres)]
        grid = dataclasses.replace(grids[0],
                                   matrix=np.mean([g.matrix for g in grids], axis=0))
        panels.append(WherePanel(label, grid, wheres[0], len(runs)))
    return panels


def plot_where_compare(workdirs: Mapping[str, str | Sequence[str]], path: str) -> str:
    """PNG: where each run transfers, side by side: one heat map per label
    (:func:`where_panels`; L2T-ww's pair weights lambda, AFD's and SemCKD's attention, each
    in its own colour scale, its normalisation in its title), rows = source taps, columns =
    target taps. Returns ``path``; ValueError when no label has per-pair weights."""
    return _save(where_compare_figure(where_panels(workdirs)), path)


def where_compare_figure(panels: Sequence[WherePanel]) -> Figure:
    """:func:`plot_where_compare`'s figure from its panels (:func:`where_panels`)."""
    if not panels:
        raise ValueError("none of the runs to compare has per-pair weights in "
                         f"{wd.TRANSFER_WEIGHTS}")
    fig = Figure(figsize=(6.2 * len(panels), 5.0), layout="constrained")
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        seeds = f", mean of {panel.runs} runs" if panel.runs > 1 else ""
        name = QUANTITY_NAMES[panel.where["key"]]
        image = draw_pair_weight_heat_map(
            ax, panel.grid, f"{panel.label}: {name}{seeds}\n"
                            f"({NORMALISATIONS[panel.where['normalised_over']]})")
        fig.colorbar(image, ax=ax, label=name, shrink=0.85)
    fig.suptitle("Where each method transfers at the end of training (rows: source taps, "
                 "columns: target taps)")
    return fig


# -------------------------------------------------------------------- channel weights
def plot_channel_weights(workdir: str, path: str) -> str:
    """PNG: "what". Left (from transfer_weights.json, if it has channel_weights): per pair,
    the mean channel weights sorted in decreasing order, times C so that the uniform 1/C is
    the line y = 1 for every pair (log y). Right (from metrics.jsonl, if it logs
    ``train/channel_weight_entropy/<i>``): entropy per pair against step, divided by log C
    (1.0 = uniform) when C is known from transfer_weights.json, else in nats.
    Returns ``path``; ValueError if neither source has channel weights."""
    weights_path = os.path.join(workdir, wd.TRANSFER_WEIGHTS)
    weights = load_transfer_weights(workdir) if os.path.isfile(weights_path) else None
    metrics_path = os.path.join(workdir, wd.METRICS)
    records = wd.read_metrics(metrics_path) if os.path.isfile(metrics_path) else []
    entropy_indices = _indexed_keys(records, "train/channel_weight_entropy")
    has_final = weights is not None and weights.get("channel_weights") is not None
    if not has_final and not entropy_indices:
        raise ValueError(f"no channel weights to plot: {weights_path} has none (or is "
                         f"missing) and {metrics_path} logs no train/channel_weight_entropy")
    pairs = weights["pairs"] if weights is not None else None

    panels = int(has_final) + int(bool(entropy_indices))
    fig = Figure(figsize=(7.5 * panels + 1.5, 4.8), layout="constrained")
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    if has_final:
        ax = axes.pop(0)
        channel_weights = weights["channel_weights"]
        for (m, n), values, style in zip(pairs, channel_weights, _pair_styles(pairs)):
            ordered = np.sort(np.asarray(values, dtype=np.float64))[::-1]
            ax.plot(np.arange(1, len(ordered) + 1), ordered * len(ordered), lw=1.6,
                    label=f"{_pair_text((m, n))} ({len(ordered)} ch)", **style)
        ax.axhline(1.0, color="black", ls="--", lw=1, label="uniform (1/C)")
        _readable_log_y(ax, [np.asarray(v, dtype=np.float64) * len(v)
                             for v in channel_weights] + [np.ones(1)])
        ax.set_xlabel("channel rank (1 = largest weight)")
        ax.set_ylabel("channel weight × C (1 = uniform)")
        ax.set_title("What: channel weights at the end of training, sorted")
        ax.grid(True, which="both", alpha=0.3)
        if not entropy_indices:   # otherwise the entropy panel's legend serves both
            ax.legend(fontsize=8, ncol=2 if len(channel_weights) > 8 else 1,
                      loc="center left", bbox_to_anchor=(1.01, 0.5))
    if entropy_indices:
        ax = axes.pop(0)
        normalised = pairs is not None
        styles = _pair_styles(pairs) if normalised else []
        for i in entropy_indices:
            steps, values = metric_series(records, f"train/channel_weight_entropy/{i}")
            if normalised and i < len(pairs):
                channels = weights["source_taps"][pairs[i][0]]
                values = values / math.log(channels) if channels > 1 else values
                ax.plot(steps, values, lw=1.6, label=f"{_pair_text(pairs[i])} ({channels} ch)",
                        **styles[i])
            else:
                ax.plot(steps, values, lw=1.6, label=f"pair {i}", color=f"C{i % 10}")
        if normalised:
            ax.axhline(1.0, color="black", ls="--", lw=1, label="uniform")
            ax.set_ylabel("entropy / log C (1 = uniform)")
        else:
            ax.set_ylabel(f"entropy (nats; C unknown without {wd.TRANSFER_WEIGHTS})")
        ax.set_xlabel("training step")
        ax.set_title("What: channel-weight entropy during training"
                     + ("\n(legend: both panels)" if has_final else ""))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, ncol=2 if len(entropy_indices) > 8 else 1, loc="center left",
                  bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


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
                steps, values = metric_series(records, split)
                if len(steps):
                    accuracy.append((steps / steps[0], values))
                    eval_names.add(split.split("/")[1])
                    break
            steps, values = metric_series(records, "train/ce")
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
    return _save(fig, path)


def plot_train_metric(workdirs: Mapping[str, Sequence[str]], key: str, path: str,
                      ylabel: str, log_y: bool = False) -> str:
    """PNG: the logged train metric ``key`` (``train/meta_grad_norm``) against the step, one
    line per label: the mean over its workdirs (seeds) with a ±1 sample-std band. Returns
    ``path``; raises ValueError when no workdir logged ``key``."""
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.subplots()
    plotted = []
    for i, (label, dirs) in enumerate(workdirs.items()):
        series = [metric_series(wd.read_metrics(os.path.join(d, wd.METRICS)), key)
                  for d in dirs]
        series = [(x.astype(float), y) for x, y in series if len(x)]
        if not series:
            continue
        x, mean, std, _ = _mean_band(series)
        color = label_color(label, i)
        ax.plot(x, mean, color=color, lw=1.8, label=f"{label} (n={len(series)})")
        if len(series) > 1:
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0)
        plotted.append(mean)
    if not plotted:
        raise ValueError(f"no {key} in the metrics.jsonl of {list(workdirs.values())}")
    if log_y:
        _readable_log_y(ax, plotted)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} (mean ± sample std over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


# ----------------------------------------------------------------------- one workdir
def plot_workdir(workdir: str, out_dir: str) -> list[str]:
    """Writes every picture the workdir's files allow into ``out_dir``:
    ``learning_curves.png`` always (metrics.jsonl is required); for methods that learn
    where to transfer, the heat map of :func:`plot_pair_weights` (needs
    transfer_weights.json): ``pair_weights.png`` for L2T-ww's lambda,
    ``pair_attention.png`` for AFD's and SemCKD's attention; and for methods with
    meta-networks (L2T-w, L2T-ww) ``channel_weights.png`` (channel weights or their
    entropy). Skipped pictures are noted on stdout. Returns the paths written."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} is not a directory")
    metrics_path = os.path.join(workdir, wd.METRICS)
    records = wd.read_metrics(metrics_path)   # raises, naming the file, when missing
    written = [plot_learning_curves({_workdir_label(workdir): workdir},
                                    os.path.join(out_dir, "learning_curves.png"))]
    method = _workdir_method(workdir)
    weights_path = os.path.join(workdir, wd.TRANSFER_WEIGHTS)
    has_weights_file = os.path.isfile(weights_path)
    if (method is not None and not has_weights_file
            and not _indexed_keys(records, "train/pair_attention")
            and (method not in methods.METHODS or not methods.METHODS[method].meta_networks)):
        print(f"note: method {method!r} has no meta-networks and learns no attention over "
              "pairs: no pair- or channel-weight pictures")
        return written
    if method is None and not has_weights_file and not _indexed_keys(
            records, "train/channel_weight_entropy"):
        print(f"note: no method in {wd.CONFIG}/{wd.RESULT} and no {wd.TRANSFER_WEIGHTS}: "
              "no weight pictures")
        return written
    weights = load_transfer_weights(workdir) if has_weights_file else None
    where = where_of(weights) if weights is not None else None
    if where is not None:
        written.append(plot_pair_weights(workdir, os.path.join(out_dir,
                                                               f"{where['key']}.png")))
    elif weights is None:
        print(f"note: {weights_path} not found (written at the end of training): no "
              "pair-weight heat map")
    else:
        print(f"note: {weights_path} has no pair weights (method {method or '?'} learns "
              "none): no pair-weight heat map")
    if ((weights is not None and weights.get("channel_weights") is not None)
            or _indexed_keys(records, "train/channel_weight_entropy")):
        written.append(plot_channel_weights(workdir,
                                            os.path.join(out_dir, "channel_weights.png")))
    elif method is None or method not in methods.METHODS or methods.METHODS[
            method].meta_networks:   # (AFD and SemCKD weight no channels: nothing to say)
        print("note: no channel weights or channel-weight entropies: no channel-weight "
              "picture")
    return written


def _parse_compare(text: str) -> tuple[str, list[str]]:
    label, sep, dirs = text.partition("=")
    if not sep or not label or not dirs:
        raise argparse.ArgumentTypeError(f"--compare {text!r}: expected LABEL=DIR[,DIR...]")
    return label, [d for d in dirs.split(",") if d]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m l2t_jax.tools.plots",
        description="Pictures of a training workdir: learning curves; for L2T-ww the "
                    "learned pair weights and for AFD and SemCKD their attention per pair "
                    "(where); for L2T-w/L2T-ww the channel weights (what).")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default=None, help="output directory (default: WORKDIR/plots)")
    parser.add_argument("--compare", action="append", type=_parse_compare, default=[],
                        metavar="LABEL=DIR[,DIR...]",
                        help="also draw learning_curves_compare.png with these runs (several "
                             "dirs = seeds, shown as mean and band), and where_compare.png: "
                             "the per-pair weights of those that learn them (L2T-ww's "
                             "lambda, AFD's and SemCKD's attention) side by side, seeds "
                             "averaged; repeatable")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.workdir, "plots")
    try:
        written = plot_workdir(args.workdir, out)
        if args.compare:
            compare = dict(args.compare)
            written.append(plot_learning_curves(
                compare, os.path.join(out, "learning_curves_compare.png")))
            panels = where_panels(compare)
            if panels:
                written.append(_save(where_compare_figure(panels),
                                     os.path.join(out, "where_compare.png")))
            else:
                print("note: no run to compare has per-pair weights: no where_compare.png")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()

"""Pictures of what a run learned about where and what to transfer, from its workdir's
``transfer_weights.json`` (written by :mod:`l2t_jax.training.train`, the record of
:func:`l2t_jax.training.results.transfer_weights`) and the per-pair series of its
``metrics.jsonl``:

- :func:`load_transfer_weights`: the file, checked; :func:`where_of`: which per-pair
  quantity it holds and how that is normalised.
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

Files are read through :mod:`l2t_jax.training.workdir`, figures saved by
:func:`l2t_jax.tools.figures.save`. Missing or malformed files raise FileNotFoundError /
ValueError naming the file.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from l2t_jax.tools import figures
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


# -------------------------------------------------------------- transfer_weights.json
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
    return figures.save(pair_weights_figure(workdir), path)


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
    indices = figures.indexed_keys(records, f"train/{key}")
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
            steps, values = figures.metric_series(records, f"train/{key}/{i}")
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
    return figures.save(where_compare_figure(where_panels(workdirs)), path)


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
    entropy_indices = figures.indexed_keys(records, "train/channel_weight_entropy")
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
        figures.readable_log_y(ax, [np.asarray(v, dtype=np.float64) * len(v)
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
            steps, values = figures.metric_series(records, f"train/channel_weight_entropy/{i}")
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
    return figures.save(fig, path)

"""What the picture modules (:mod:`l2t_jax.tools.weight_plots`,
:mod:`l2t_jax.tools.metric_plots` and :mod:`l2t_jax.tools.plots`) share: saving a figure,
the series logged in metrics.jsonl records, and a log axis that reads as plain numbers.

Figures are ``matplotlib.figure.Figure`` objects saved directly (the Agg canvas), without
pyplot, so nothing here changes matplotlib's global backend or leaks open figures.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from l2t_jax.training import workdir as wd


def metric_series(records: Sequence[Mapping[str, Any]], key: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``key`` in metrics.jsonl records, sorted by step. A step logged
    twice (a run resumed from a checkpoint older than its last log line) keeps the last."""
    by_step = {int(r["step"]): float(r[key]) for r in records if key in r}
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def indexed_keys(records: Sequence[Mapping[str, Any]], prefix: str) -> list[int]:
    """Indices i of the keys ``<prefix>/<i>`` present in any record, sorted."""
    indices = set()
    for record in records:
        for key in record:
            if key.startswith(prefix + "/") and key[len(prefix) + 1:].isdigit():
                indices.add(int(key[len(prefix) + 1:]))
    return sorted(indices)


def save(fig: Figure, path: str) -> str:
    """Raises workdir.RunFileError naming ``path`` when it cannot be written."""
    with wd.writing(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
    return path


def readable_log_y(ax, values: Sequence[np.ndarray]) -> None:
    """Log y with plain numbers (0.5, 1, 2 rather than 5 x 10^-1); 1-2-5 ticks when the data
    spans less than two decades, one tick per decade otherwise."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    positive = np.concatenate([v[v > 0] for v in values])
    ax.set_yscale("log")
    span = positive.max() / positive.min() if positive.size else 10.0
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if span < 100 else (1.0,)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())

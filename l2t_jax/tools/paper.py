"""The paper's numbers and names as data.

This module owns:

- **The paper's numbers** (docs/semantics.md, "Reported results"): :data:`PAPER_RESULTS`
  (main table: row label -> column -> (mean, std), top-1 %) and :data:`PAPER_MULTI_SOURCE`
  (STL-10 target; row label -> second source -> (mean, None): the paper gives no std there);
  :func:`paper_result` looks one cell up.
- **Its names**: the rows (:data:`PAPER_ROWS`, the labels
  :func:`l2t_jax.transfer.methods.row_label` gives), the columns (:data:`PAPER_COLUMNS`, :data:`MULTI_SOURCE_COLUMNS`),
  :func:`dataset_column` (``config.data.name`` -> the paper's column; unknown names such
  as the offline demo's ``digits`` are their own column), :func:`source_name` and
  :func:`second_source_label` (multi-source columns).
Plain data: nothing here imports JAX (:func:`source_name` reads the model families' display
names when called).
"""
from __future__ import annotations

from typing import Any, Sequence

# ------------------------------------------------------------------ the paper's numbers
PAPER_COLUMNS = ("CIFAR-100", "STL-10", "CUB200", "MIT67", "Stanford40", "Stanford Dogs")
# (mean, std) per column, in PAPER_COLUMNS order; top-1 %, docs/semantics.md "Reported results".
_PAPER_MAIN = {
    "Scratch": ((67.69, 0.22), (65.18, 0.91), (42.15, 0.75), (48.91, 0.53), (36.93, 0.68),
                (58.08, 0.26)),
    "LwF": ((69.23, 0.09), (68.64, 0.58), (45.52, 0.66), (53.73, 2.14), (39.73, 1.63),
            (66.33, 0.45)),
    "AT (one-to-one)": ((67.54, 0.40), (74.19, 0.22), (57.74, 1.17), (59.18, 1.57),
                        (59.29, 0.91), (69.70, 0.08)),
    "LwF+AT (one-to-one)": ((68.75, 0.09), (75.06, 0.57), (58.90, 1.32), (61.42, 1.68),
                            (60.20, 1.34), (72.67, 0.26)),
    "FM (single)": ((69.40, 0.67), (75.00, 0.34), (47.60, 0.31), (55.15, 0.93), (42.93, 1.48),
                    (66.05, 0.76)),
    "FM (one-to-one)": ((69.97, 0.24), (76.38, 1.18), (48.93, 0.40), (54.88, 1.24),
                        (44.50, 0.96), (67.25, 0.88)),
    "L2T-w (single)": ((70.27, 0.09), (74.35, 0.92), (51.95, 0.83), (60.41, 0.37),
                       (46.25, 3.66), (69.16, 0.70)),
    "L2T-w (one-to-one)": ((70.02, 0.19), (76.42, 0.52), (56.61, 0.20), (59.78, 1.90),
                           (48.19, 1.42), (69.84, 1.45)),
    "L2T-ww (all-to-all)": ((70.96, 0.61), (78.31, 0.21), (65.05, 1.19), (64.85, 2.75),
                            (63.08, 0.88), (78.08, 0.96)),
}
PAPER_ROWS = tuple(_PAPER_MAIN)
PAPER_RESULTS: dict[str, dict[str, tuple[float, float]]] = {
    row: dict(zip(PAPER_COLUMNS, values)) for row, values in _PAPER_MAIN.items()}

# Multi-source (STL-10 target; the first source is always the TinyImageNet ResNet-32).
# Columns name the second source; the paper reports means only, so std is None.
MULTI_SOURCE_COLUMNS = ("none", "+ TinyImageNet ResNet-20", "+ TinyImageNet ResNet-32",
                        "+ CIFAR-10 ResNet-32")
PAPER_MULTI_SOURCE: dict[str, dict[str, tuple[float, None]]] = {
    "FM (one-to-one)": dict(zip(MULTI_SOURCE_COLUMNS,
                                ((76.38, None), (77.45, None), (77.69, None), (77.15, None)))),
    "L2T-ww (all-to-all)": dict(zip(MULTI_SOURCE_COLUMNS,
                                    ((78.31, None), (79.35, None), (79.80, None),
                                     (80.52, None)))),
}

# ---------------------------------------------------------------------------- naming
# config.data.name -> the paper's column. Both the TFDS names and the config-file names.
DATASET_COLUMNS = {
    "cifar100": "CIFAR-100", "stl10": "STL-10", "caltech_birds2011": "CUB200",
    "cub200": "CUB200", "mit67": "MIT67", "stanford40": "Stanford40",
    "stanford_dogs": "Stanford Dogs", "dogs": "Stanford Dogs",
}
# Source data set by the source's class count, for the multi-source column labels.
_SOURCE_DATASETS = {200: "TinyImageNet", 10: "CIFAR-10", 100: "CIFAR-100", 1000: "ImageNet"}

def dataset_column(dataset: str) -> str:
    """``config.data.name`` -> the paper's column (``caltech_birds2011 -> CUB200``); names
    the paper does not have (the offline demo's ``digits``) are their own column."""
    return DATASET_COLUMNS.get(dataset, dataset)


def source_name(model: str, num_classes: int | None = None) -> str:
    """``("resnet32", 10) -> "CIFAR-10 ResNet-32"``; the data set is guessed from the class
    count (200 TinyImageNet, 10 CIFAR-10, 100 CIFAR-100, 1000 ImageNet) and left out when
    unknown."""
    from l2t_jax.models import registry      # the family's display name (loads JAX)
    pretty = registry.display_name(model)
    dataset = _SOURCE_DATASETS.get(num_classes) if num_classes is not None else None
    return f"{dataset} {pretty}" if dataset else pretty


def second_source_label(extra_sources: Sequence[Any]) -> str:
    """Multi-source column: ``[] -> "none"``, ``[{"model": "resnet20", "num_classes": 200}]
    -> "+ TinyImageNet ResNet-20"`` (:data:`MULTI_SOURCE_COLUMNS`). Entries are config dicts
    or bare model names (result.json only keeps names, so CIFAR-10 and TinyImageNet
    ResNet-32 cannot be told apart without config.json)."""
    if not extra_sources:
        return "none"
    names = []
    for extra in extra_sources:
        if isinstance(extra, str):
            names.append(source_name(extra))
        else:
            names.append(source_name(extra.get("model", "?"), extra.get("num_classes")))
    return " ".join(f"+ {name}" for name in names)


def paper_result(row: str, column: str, second_source: str = "none",
                 examples_per_class: int = 0) -> tuple[float, float | None] | None:
    """The paper's (mean, std) for a cell, or None where the paper has no number (limited
    data, unknown rows or columns). Multi-source cells have std None."""
    if examples_per_class:
        return None
    if second_source != "none":
        if column != "STL-10":
            return None
        return PAPER_MULTI_SOURCE.get(row, {}).get(second_source)
    return PAPER_RESULTS.get(row, {}).get(column)

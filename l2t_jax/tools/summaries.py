"""Collecting finished runs and summarising them against the paper's numbers.

This module owns:

- **Collecting**: :func:`load_result` (one finished workdir as a flat dict,
  :data:`RESULT_FIELDS`, read through :mod:`l2t_jax.training.workdir`) and :func:`collect_results`
  (every ``result.json`` under a root).
- **Summarising**: :func:`select_table` (the results of one table of
  :mod:`l2t_jax.tools.tables`), :func:`summarize` (n, mean, sample std, the paper's number and our
  difference per cell; :data:`TABLE_GROUPING` has each table's grouping), :func:`mean_std`.
- **Writing the summary**: :func:`to_markdown` (the paper's layout; :func:`format_cell`),
  :func:`to_csv` / :func:`read_csv`.

Row labels come from :func:`l2t_jax.transfer.methods.row_label`, the paper's numbers and columns
from :mod:`l2t_jax.tools.paper`; the limited-data figure is
:func:`l2t_jax.tools.metric_plots.plot_limited_data`. Nothing here imports JAX.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Any, Iterable, Sequence

from l2t_jax.transfer import methods
from l2t_jax.training import workdir as wd  # `workdir` is an argument here
from l2t_jax.tools.tables import TABLE_METHODS, TABLES
from l2t_jax.tools.paper import MULTI_SOURCE_COLUMNS, PAPER_COLUMNS, PAPER_ROWS, dataset_column, paper_result, second_source_label

RESULT_FIELDS = ("workdir", "method", "scheme", "row", "dataset", "column", "seed",
                 "examples_per_class", "extra_sources", "second_source", "test", "best_val",
                 "best_epoch", "test_last", "val_last", "steps", "wall_seconds")
# The accuracies a summary may average (a field of RESULT_FIELDS), and what each is: the
# paper's tables report "test"; the offline demo and study "test_last".
ACCURACIES = {"test": "the test accuracy (%) at the best validation accuracy",
              "test_last": "the test accuracy (%) at the last epoch"}


def load_result(workdir: str) -> dict[str, Any]:
    """One finished run as a flat dict (:data:`RESULT_FIELDS`).

    ``test`` is result.json's ``test_at_best_val`` (%), ``test_last`` / ``val_last`` its
    last epoch's accuracies (None for a run written before they were recorded). Fields
    missing from result.json come from config.json beside it. A run with no ``method`` in
    either predates the ``method`` key, when the trainer always ran L2T-ww, so it counts
    as ``l2t_ww``.
    """
    result_path = os.path.join(workdir, wd.RESULT)
    result = wd.read_json(result_path)
    config_path = os.path.join(workdir, wd.CONFIG)
    config = wd.read_json(config_path) if os.path.isfile(config_path) else {}
    if not isinstance(result, dict) or not isinstance(config, dict):
        raise ValueError(f"{result_path} or {config_path} is not a JSON object")
    if "test_at_best_val" not in result:
        raise ValueError(f"{result_path} has no 'test_at_best_val'")
    data_config = config.get("data") or {}
    method = result.get("method") or config.get("method") or "l2t_ww"
    scheme = result.get("scheme", config.get("pairs"))
    if method in methods.METHODS and not methods.METHODS[method].uses_pairs:
        scheme = None   # no feature matching: the scheme means nothing (scratch, LwF)
    dataset = result.get("dataset") or data_config.get("name")
    if dataset is None:
        raise ValueError(f"{result_path} has no 'dataset' and {config_path} no data.name")
    # config.json keeps each extra source's class count (which tells CIFAR-10 from
    # TinyImageNet sources); result.json only the model names.
    extra = config.get("extra_sources")
    if extra is None:
        extra = result.get("extra_sources") or []
    names = [e if isinstance(e, str) else e.get("model", "?") for e in extra]
    examples = result.get("train_examples_per_class",
                          data_config.get("train_examples_per_class", 0)) or 0
    seed = result.get("seed", config.get("seed"))
    return {
        "workdir": workdir, "method": method, "scheme": scheme,
        "row": methods.row_label(method, scheme), "dataset": dataset,
        "column": dataset_column(dataset), "seed": None if seed is None else int(seed),
        "examples_per_class": int(examples), "extra_sources": names,
        "second_source": second_source_label(extra), "test": float(result["test_at_best_val"]),
        "best_val": result.get("best_val"), "best_epoch": result.get("best_epoch"),
        "test_last": result.get("test_last"), "val_last": result.get("val_last"),
        "steps": result.get("steps"), "wall_seconds": result.get("wall_seconds"),
    }


# Subdirectories of a workdir that never hold result.json and can be large.
_SKIP_DIRS = {wd.CHECKPOINTS, wd.BEST, wd.TENSORBOARD, "plots"}


def collect_results(root: str) -> list[dict[str, Any]]:
    """Every finished run (a directory with result.json) under ``root``, recursively, as
    :func:`load_result` dicts, in path order."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"results root {root} is not a directory")
    results = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS)
        if wd.RESULT in files:
            results.append(load_result(directory))
    return results


def select_table(results: Iterable[dict[str, Any]], table: str) -> list[dict[str, Any]]:
    """The results that belong in ``table``: ``main``: single source, whole training set;
    ``multisource``: whole training set, the table's rows (FM one-to-one, L2T-ww
    all-to-all) or any run with extra sources; ``limited``: examples per class > 0."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; valid: {', '.join(TABLES)}")
    results = list(results)
    if table == "main":
        return [r for r in results
                if r["second_source"] == "none" and r["examples_per_class"] == 0]
    if table == "multisource":
        rows = {m.label for m in TABLE_METHODS["multisource"]}
        return [r for r in results if r["examples_per_class"] == 0
                and (r["row"] in rows or r["second_source"] != "none")]
    return [r for r in results if r["examples_per_class"] > 0]


TABLE_GROUPING = {
    "main": ("row", "column"),
    "multisource": ("row", "column", "second_source"),
    "limited": ("row", "column", "examples_per_class"),
}
# Settings that must not be averaged together unknowingly.
_SETTING_FIELDS = ("column", "second_source", "examples_per_class")
STAT_FIELDS = ("n", "mean", "std", "paper_mean", "paper_std", "diff", "seeds")


def _order(value: str, order: Sequence[str]) -> tuple[int, str]:
    return (order.index(value), "") if value in order else (len(order), str(value))


def _sort_key(group: dict[str, Any]) -> tuple:
    return (_order(group.get("row", ""), PAPER_ROWS),
            _order(group.get("column", ""), PAPER_COLUMNS),
            _order(group.get("second_source", "none"), MULTI_SOURCE_COLUMNS),
            group.get("examples_per_class", 0))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof = 1, as papers report over seeds); std is 0.0 for a single
    value, where the sample std is undefined."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarize(results: Iterable[dict[str, Any]], by: Sequence[str] | None = None,
              accuracy: str = "test") -> list[dict[str, Any]]:
    """Groups results by the fields ``by`` (:data:`TABLE_GROUPING` has each table's) and
    averages the field ``accuracy`` (:data:`ACCURACIES`) of each group.

    ``by=None``: ``("row", "column")`` plus ``second_source`` and/or ``examples_per_class``
    when the results hold more than one value of them, so no two settings are ever averaged
    together (the offline demo's grid over label budgets summarizes as the limited table).

    Returns one dict per group, in the paper's order, with the ``by`` fields plus ``n``,
    ``mean`` and ``std`` of ``accuracy`` (%; std = sample std, ddof = 1, and 0.0 when
    n == 1), ``paper_mean`` / ``paper_std`` (None where the paper has no number or no std),
    ``diff`` = mean - paper_mean (None without a paper number), and ``seeds`` (sorted;
    a repeated seed means the same setting was run twice under the root).

    Raises ValueError if a group would mix data sets, second sources or training-set sizes
    that an explicit ``by`` does not separate (use :func:`select_table` or a finer ``by``),
    or if a result lacks ``accuracy`` (a run written before it was recorded), naming it.
    """
    if accuracy not in ACCURACIES:
        raise ValueError(f"accuracy={accuracy!r}; valid: {', '.join(ACCURACIES)}")
    results = list(results)
    lacking = [r.get("workdir") for r in results if r.get(accuracy) is None]
    if lacking:
        raise ValueError(f"{len(lacking)} run(s) have no {accuracy} in their result.json "
                         f"(written before it was recorded), e.g. {lacking[0]}")
    if by is None:
        by = ("row", "column") + tuple(
            field for field in ("second_source", "examples_per_class")
            if len({r[field] for r in results}) > 1)
    by = tuple(by)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault(tuple(result[k] for k in by), []).append(result)
    rows = []
    for key, members in groups.items():
        group = dict(zip(by, key))
        for field in _SETTING_FIELDS:
            values = {m[field] for m in members}
            if field not in by and len(values) > 1:
                raise ValueError(
                    f"the group {group} mixes runs with different {field} "
                    f"({', '.join(map(str, sorted(values, key=str)))}); add {field!r} to by= "
                    "or select one table first (select_table)")
        accuracies = [m[accuracy] for m in members]
        mean, std = mean_std(accuracies)
        paper = paper_result(group.get("row", members[0]["row"]),
                             group.get("column", members[0]["column"]),
                             group.get("second_source", members[0]["second_source"]),
                             group.get("examples_per_class", members[0]["examples_per_class"]))
        rows.append({**group, "n": len(members), "mean": mean, "std": std,
                     "paper_mean": paper[0] if paper else None,
                     "paper_std": paper[1] if paper else None,
                     "diff": mean - paper[0] if paper else None,
                     "seeds": sorted(m["seed"] for m in members if m["seed"] is not None)})
    return sorted(rows, key=_sort_key)


def _key_fields(rows: Sequence[dict[str, Any]]) -> list[str]:
    present = {k for row in rows for k in row if k not in STAT_FIELDS}
    ordered = [k for k in ("row", "column", "second_source", "examples_per_class")
               if k in present]
    return ordered + sorted(present - set(ordered))


def _examples_text(n: int) -> str:
    return "all" if not n else f"{n} / class"


def format_cell(row: dict[str, Any]) -> str:
    """``"72.00 ± 2.00 (3) [paper 70.96; Δ +1.04]"``; without a paper number only the
    first part."""
    cell = f"{row['mean']:.2f} ± {row['std']:.2f} ({row['n']})"
    if row.get("paper_mean") is not None:
        cell += f" [paper {row['paper_mean']:.2f}; Δ {row['diff']:+.2f}]"
    return cell


def to_markdown(rows: Sequence[dict[str, Any]], title: str | None = None,
                accuracy: str = "test") -> str:
    """The summary in the paper's layout: one line per method (the paper's row order, rows
    the paper does not have after them), one column per data set (paper order; unknown data
    sets such as ``digits`` after), or per second source / training-set size when ``rows``
    are grouped by those. Cells: :func:`format_cell`; ``-`` where nothing ran; the caption
    names ``accuracy``, the field :func:`summarize` averaged (:data:`ACCURACIES`)."""
    rows = list(rows)
    if not rows:
        return (f"## {title}\n\n" if title else "") + "(no finished runs)\n"
    fields = _key_fields(rows)
    if "row" not in fields:
        raise ValueError("to_markdown needs rows grouped by 'row' (and columns)")
    column_fields = [f for f in fields if f != "row"]
    caption = []
    # A data set shared by every cell goes into the caption instead of every header.
    if "column" in column_fields and len(column_fields) > 1 and len(
            {r["column"] for r in rows}) == 1:
        caption.append(f"Target data set: {rows[0]['column']}.")
        column_fields.remove("column")
    if "second_source" in column_fields:
        caption.append("Columns: the second source network (the first is the TinyImageNet "
                       "ResNet-32).")
    if "examples_per_class" in column_fields:
        caption.append("Columns: training examples per class.")

    def column_key(row):
        return tuple(row[f] for f in column_fields)

    def header(key):
        parts = []
        for field, value in zip(column_fields, key):
            parts.append(_examples_text(value) if field == "examples_per_class" else str(value))
        return ", ".join(parts) or "accuracy"

    columns = []
    for row in sorted(rows, key=lambda r: _sort_key({k: r[k] for k in column_fields})):
        if column_key(row) not in columns:
            columns.append(column_key(row))
    labels = []
    for row in rows:   # already in the paper's row order (summarize sorts)
        if row["row"] not in labels:
            labels.append(row["row"])
    labels.sort(key=lambda label: _order(label, PAPER_ROWS))
    cells = {(r["row"], column_key(r)): format_cell(r) for r in rows}

    lines = [f"## {title}", ""] if title else []
    lines.append("| method | " + " | ".join(header(c) for c in columns) + " |")
    lines.append("|---" * (len(columns) + 1) + "|")
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(cells.get((label, c), "-")
                                                  for c in columns) + " |")
    lines.append("")
    caption.append(f"Cells: mean ± sample std (number of runs) of {ACCURACIES[accuracy]}; "
                   "std is 0.00 for a single run.")
    if any(r.get("paper_mean") is not None for r in rows):
        caption.append("[paper: the paper's mean; Δ: ours minus the paper's.]")
    lines.append(" ".join(caption))
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict[str, Any]], path: str) -> str:
    """Writes the summary rows as CSV (floats exactly, ``seeds`` space-separated, empty
    cells for None); :func:`read_csv` reads it back. Returns ``path``."""
    rows = list(rows)
    fields = _key_fields(rows) + list(STAT_FIELDS)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            out = {}
            for field in fields:
                value = row.get(field)
                if value is None:
                    out[field] = ""
                elif field == "seeds":
                    out[field] = " ".join(str(s) for s in value)
                elif isinstance(value, float):
                    out[field] = repr(value)   # repr round-trips a float exactly
                else:
                    out[field] = value
            writer.writerow(out)
    return path


def read_csv(path: str) -> list[dict[str, Any]]:
    """Inverse of :func:`to_csv`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    floats = ("mean", "std", "paper_mean", "paper_std", "diff")
    ints = ("n", "examples_per_class")
    rows = []
    with open(path, newline="") as f:
        for line in csv.DictReader(f):
            row: dict[str, Any] = {}
            for field, text in line.items():
                if field == "seeds":
                    row[field] = [int(s) for s in text.split()]
                elif text == "":
                    row[field] = None
                elif field in floats:
                    row[field] = float(text)
                elif field in ints:
                    row[field] = int(text)
                else:
                    row[field] = text
            rows.append(row)
    return rows

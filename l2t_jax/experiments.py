"""The paper's tables as experiment grids, and our results laid out against the paper's.

This module owns:

- **The paper's numbers as data** (SPEC.md, "Reported results"): :data:`PAPER_RESULTS`
  (main table: row label -> column -> (mean, std), top-1 %) and :data:`PAPER_MULTI_SOURCE`
  (STL-10 target; row label -> second source -> (mean, None): the paper gives no std there).
- **Naming**: :func:`row_label` (result.json ``method`` + ``scheme`` -> the paper's row,
  e.g. ``("fm", "one_to_one") -> "FM (one-to-one)"``), :func:`dataset_column`
  (``config.data.name`` -> the paper's column; unknown names such as the offline demo's
  ``digits`` are their own column) and :func:`second_source_label` (multi-source columns).
- **Grids**: :func:`table_runs` lists the runs of a table (``main``, ``multisource``,
  ``limited``) as :class:`Run` objects with deterministic workdirs
  ``<root>/<table>/<target>/<method[-scheme]>/epc<N|_all>/seed<S>``; :func:`command` is the
  shell command of one run; :func:`run_grid` runs them one after another (finished
  workdirs, those with ``result.json``, are skipped) or prints the commands.
- **Summaries**: :func:`collect_results` (every ``result.json`` under a root),
  :func:`select_table`, :func:`summarize` (n, mean, sample std, the paper's number and our
  difference per cell), :func:`to_markdown` (the paper's layout), :func:`to_csv` /
  :func:`read_csv`, and :func:`plot_limited_data` (accuracy vs. training examples per
  class).
- **Reading a workdir's JSON files** (:func:`read_json`, :func:`read_metrics`) with errors
  that name the file; :mod:`l2t_jax.plots` uses them.

Nothing here imports JAX; matplotlib is imported only by :func:`plot_limited_data`, so the
grid and table code runs anywhere Python does.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
from typing import Any, Callable, Iterable, Sequence

from l2t_jax import logs

# ------------------------------------------------------------------ the paper's numbers
PAPER_COLUMNS = ("CIFAR-100", "STL-10", "CUB200", "MIT67", "Stanford40", "Stanford Dogs")
# (mean, std) per column, in PAPER_COLUMNS order; top-1 %, SPEC.md "Reported results".
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
METHOD_NAMES = {"scratch": "Scratch", "lwf": "LwF", "at": "AT", "lwf_at": "LwF+AT",
                "fm": "FM", "l2t_w": "L2T-w", "l2t_ww": "L2T-ww"}
SCHEME_NAMES = {"single": "single", "one_to_one": "one-to-one", "all_to_all": "all-to-all"}
# Methods whose loss has no feature matching, so the pair scheme means nothing for them.
METHODS_WITHOUT_PAIRS = ("scratch", "lwf")
# Methods with meta-networks (learned channel and/or pair weights).
METHODS_WITH_META = ("l2t_w", "l2t_ww")

# config.data.name -> the paper's column. Both the TFDS names and the config-file names.
DATASET_COLUMNS = {
    "cifar100": "CIFAR-100", "stl10": "STL-10", "caltech_birds2011": "CUB200",
    "cub200": "CUB200", "mit67": "MIT67", "stanford40": "Stanford40",
    "stanford_dogs": "Stanford Dogs", "dogs": "Stanford Dogs",
}
# Source data set by the source's class count, for the multi-source column labels.
_SOURCE_DATASETS = {200: "TinyImageNet", 10: "CIFAR-10", 100: "CIFAR-100", 1000: "ImageNet"}
_MODEL_NAMES = {"resnet20": "ResNet-20", "resnet32": "ResNet-32", "resnet56": "ResNet-56",
                "resnet18": "ResNet-18", "resnet34": "ResNet-34", "vgg9_bn": "VGG-9-BN"}


def scheme_text(scheme: Any) -> str:
    """A pair scheme as text: ``"one_to_one"`` -> ``"one-to-one"``; an explicit list
    (``"4-0,9-1"`` or ``[[4, 0], [9, 1]]``) -> ``"4-0,9-1"``, or ``"15 pairs"`` when long."""
    if scheme is None or scheme == "":
        return ""
    if isinstance(scheme, str) and scheme in SCHEME_NAMES:
        return SCHEME_NAMES[scheme]
    if isinstance(scheme, str):
        pairs = [p.strip() for p in scheme.split(",") if p.strip()]
    else:
        pairs = [f"{m}-{n}" for m, n in scheme]
    return ",".join(pairs) if len(pairs) <= 3 else f"{len(pairs)} pairs"


def row_label(method: str, scheme: Any = None) -> str:
    """result.json ``method`` + ``scheme`` -> the paper's row label.

    ``("scratch", anything) -> "Scratch"``, ``("lwf", ...) -> "LwF"`` (no matching, so the
    scheme is dropped), ``("at", "one_to_one") -> "AT (one-to-one)"``, ``("fm", "all_to_all")
    -> "FM (all-to-all)"`` (not in the paper, but named the same way), ``("l2t_ww",
    "4-0,9-1") -> "L2T-ww (4-0,9-1)"``. Unknown methods keep their own name.
    """
    name = METHOD_NAMES.get(method, method)
    if method in METHODS_WITHOUT_PAIRS:
        return name
    text = scheme_text(scheme)
    return f"{name} ({text})" if text else name


def dataset_column(dataset: str) -> str:
    """``config.data.name`` -> the paper's column (``caltech_birds2011 -> CUB200``); names
    the paper does not have (the offline demo's ``digits``) are their own column."""
    return DATASET_COLUMNS.get(dataset, dataset)


def source_name(model: str, num_classes: int | None = None) -> str:
    """``("resnet32", 10) -> "CIFAR-10 ResNet-32"``; the data set is guessed from the class
    count (200 TinyImageNet, 10 CIFAR-10, 100 CIFAR-100, 1000 ImageNet) and left out when
    unknown."""
    pretty = _MODEL_NAMES.get(model, model)
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


# ----------------------------------------------------------------------------- grids
@dataclasses.dataclass(frozen=True)
class Method:
    """One row of a table: a method and its pair scheme (None for scratch and LwF)."""

    method: str
    scheme: str | None = None

    @property
    def label(self) -> str:
        return row_label(self.method, self.scheme)

    @property
    def slug(self) -> str:
        """Directory name: ``fm-one_to_one``, ``scratch``."""
        return self.method if self.scheme is None else f"{self.method}-{self.scheme}"


PAPER_METHODS = (
    Method("scratch"), Method("lwf"), Method("at", "one_to_one"),
    Method("lwf_at", "one_to_one"), Method("fm", "single"), Method("fm", "one_to_one"),
    Method("l2t_w", "single"), Method("l2t_w", "one_to_one"), Method("l2t_ww", "all_to_all"),
)
assert tuple(m.label for m in PAPER_METHODS) == PAPER_ROWS

TABLES = ("main", "multisource", "limited")
TABLE_METHODS = {
    "main": PAPER_METHODS,
    "multisource": (Method("fm", "one_to_one"), Method("l2t_ww", "all_to_all")),
    "limited": (Method("scratch"), Method("fm", "one_to_one"), Method("l2t_ww", "all_to_all")),
}
# Target name -> shipped config (l2t_jax/configs; the paper's column order).
TARGET_CONFIGS = {name: name for name in
                  ("cifar100", "stl10", "cub200", "mit67", "stanford40", "dogs")}
# The multi-source table's "targets": STL-10 with each second source (config variants).
MULTI_SOURCE_CONFIGS = {
    "none": "stl10",
    "plus_resnet20": "stl10:plus_resnet20",
    "plus_resnet32": "stl10:plus_resnet32",
    "plus_cifar10_resnet32": "stl10:plus_cifar10_resnet32",
}
# Default grid of the limited-data table: STL-10 has 500 training images per class
# (CIFAR-100 too), so these sizes are 5% to 50% of it.
LIMITED_DEFAULT_TARGETS = ("stl10",)
LIMITED_DEFAULT_EXAMPLES = (25, 50, 100, 250)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a grid.

    ``config`` is a shipped config's name or a config file, optionally with ``:variant``;
    ``examples_per_class`` 0 means the whole training set; ``extra_overrides`` are full
    ``--config.key=value`` flags appended last (so they win over the grid's own).
    """

    table: str
    target: str
    config: str
    method: Method
    seed: int
    examples_per_class: int
    workdir: str
    extra_overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.method.label

    def overrides(self) -> list[str]:
        """The ``--config.*`` flags of this run, in a fixed order."""
        flags = [f"--config.method={self.method.method}"]
        if self.method.scheme is not None:
            flags.append(f"--config.pairs={self.method.scheme}")
        flags.append(f"--config.seed={self.seed}")
        if self.examples_per_class:
            flags.append(f"--config.data.train_examples_per_class={self.examples_per_class}")
        return flags + list(self.extra_overrides)


def _normalize_override(flag: str) -> str:
    """``"epochs=2"`` or ``"--config.epochs=2"`` -> ``"--config.epochs=2"``."""
    flag = flag.strip()
    if flag.startswith("--config."):
        body = flag
    elif flag.startswith("-"):
        raise ValueError(f"override {flag!r}: only config overrides (--config.key=value or "
                         "key=value) can be added to a grid")
    else:
        body = f"--config.{flag}"
    if "=" not in body:
        raise ValueError(f"override {flag!r} has no '=value'")
    return body


def _select_methods(table: str, tokens: Iterable[str] | None) -> tuple[Method, ...]:
    """Rows of ``table`` picked by method name (``fm``: all its schemes), slug
    (``fm-one_to_one``) or row label (``FM (one-to-one)``)."""
    rows = TABLE_METHODS[table]
    if tokens is None:
        return rows
    tokens = [t.strip() for t in tokens if t.strip()]
    chosen = []
    for token in tokens:
        matches = [m for m in rows if token in (m.method, m.slug, m.label)]
        if not matches:
            valid = ", ".join(sorted({m.method for m in rows} | {m.slug for m in rows}))
            raise ValueError(f"method {token!r} is not a row of the {table} table; "
                             f"valid: {valid}")
        chosen.extend(m for m in matches if m not in chosen)
    return tuple(m for m in rows if m in chosen)   # the table's order, not the caller's


def _target_config(target: str) -> str:
    """Config of a target: one of the paper's six, any other shipped config
    (:func:`l2t_jax.configs.names`, e.g. the offline demo's), or a config file."""
    from l2t_jax import configs
    if target in TARGET_CONFIGS or target in configs.names() or os.path.isfile(target):
        return TARGET_CONFIGS.get(target, target)
    raise ValueError(f"unknown target {target!r}: neither a config file nor a shipped config; "
                     f"shipped: {', '.join(configs.names())}")


def run_workdir(root: str, table: str, target: str, method: Method, seed: int,
                examples_per_class: int) -> str:
    """``<root>/<table>/<target>/<method[-scheme]>/epc<N>/seed<S>`` (``epc_all`` for the
    whole training set)."""
    epc = f"epc{examples_per_class}" if examples_per_class else "epc_all"
    # A target given as a config file is named by its file name (configs/foo.py -> foo).
    target = os.path.splitext(os.path.basename(target.partition(":")[0]))[0] or target
    return os.path.join(root, table, target, method.slug, epc, f"seed{seed}")


def table_runs(table: str, root: str, seeds: Iterable[int],
               targets: Iterable[str] | None = None, methods: Iterable[str] | None = None,
               examples_per_class: Iterable[int] | None = None,
               extra_overrides: Iterable[str] = ()) -> list[Run]:
    """The runs of one table.

    Args:
      table: ``main`` (9 paper rows x targets x seeds), ``multisource`` (STL-10 with each
        second source x {FM one-to-one, L2T-ww all-to-all} x seeds) or ``limited`` (scratch,
        FM one-to-one, L2T-ww all-to-all x examples per class x targets x seeds).
      root: directory under which the workdirs go.
      seeds: e.g. ``(0, 1, 2)``.
      targets: main/limited: names of :data:`TARGET_CONFIGS` (default: all six for main,
        ``stl10`` for limited), any other shipped config or a config file; multisource: keys of
        :data:`MULTI_SOURCE_CONFIGS` (default: all four).
      methods: a subset of the table's rows, by method (``fm``), slug (``fm-one_to_one``)
        or label; default all.
      examples_per_class: training examples per class; default ``(0,)`` (all) for main and
        multisource, :data:`LIMITED_DEFAULT_EXAMPLES` for limited (which needs values > 0).
      extra_overrides: config overrides added to every run, ``key=value`` or
        ``--config.key=value``.

    Returns:
      Runs ordered seed-major (every cell's seed 0 before any seed 1), so a grid stopped
      halfway already gives a complete table with n = 1.
    """
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; valid: {', '.join(TABLES)}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds given")
    rows = _select_methods(table, methods)
    extra = tuple(_normalize_override(f) for f in extra_overrides)

    if table == "multisource":
        names = list(MULTI_SOURCE_CONFIGS) if targets is None else [
            t.strip() for t in targets if t.strip()]
        for name in names:
            if name not in MULTI_SOURCE_CONFIGS:
                raise ValueError(f"unknown second source {name!r} for the multisource table; "
                                 f"valid: {', '.join(MULTI_SOURCE_CONFIGS)}")
        target_configs = [(f"stl10-{name}", MULTI_SOURCE_CONFIGS[name]) for name in names]
    else:
        default = TARGET_CONFIGS if table == "main" else LIMITED_DEFAULT_TARGETS
        names = list(default) if targets is None else [t.strip() for t in targets if t.strip()]
        target_configs = [(name, _target_config(name)) for name in names]
    if not target_configs:
        raise ValueError("no targets given")

    if examples_per_class is None:
        sizes = list(LIMITED_DEFAULT_EXAMPLES) if table == "limited" else [0]
    else:
        sizes = [int(n) for n in examples_per_class]
    if any(n < 0 for n in sizes) or (table == "limited" and any(n == 0 for n in sizes)):
        raise ValueError(f"examples per class {sizes}: must be >= 0, and > 0 for the limited "
                         "table (the whole training set is the main table)")

    runs = []
    for seed in seeds:
        for target, config in target_configs:
            for size in sizes:
                for method in rows:
                    runs.append(Run(table, target, config, method, seed, size,
                                    run_workdir(root, table, target, method, seed, size),
                                    extra))
    return runs


def command(run: Run) -> str:
    """The shell command of ``run``, to be started from the repository root::

        python -m l2t_jax.main --config=stl10 \\
            --workdir=runs/main/stl10/fm-one_to_one/epc_all/seed1 \\
            --config.method=fm --config.pairs=one_to_one --config.seed=1

    (returned as one line).
    """
    args = ["python", "-m", "l2t_jax.main", f"--config={run.config}",
            f"--workdir={run.workdir}", *run.overrides()]
    return " ".join(shlex.quote(a) for a in args)


def _subprocess_args(run: Run) -> list[str]:
    """What :func:`run_grid` executes: this interpreter and an absolute workdir, so it works
    from any current directory (shipped configs are found by name)."""
    return [sys.executable, "-m", "l2t_jax.main", f"--config={run.config}",
            f"--workdir={os.path.abspath(run.workdir)}", *run.overrides()]


def is_finished(workdir: str) -> bool:
    """A run is finished when its workdir has result.json (train.py writes it last)."""
    return os.path.isfile(os.path.join(workdir, "result.json"))


class GridError(RuntimeError):
    """A run of :func:`run_grid` failed; the message says which and how to continue."""


def _default_runner(args: list[str]) -> int:
    return subprocess.run(args, check=False).returncode


def run_grid(runs: Sequence[Run], dry_run: bool = False,
             runner: Callable[[list[str]], int] | None = None) -> dict[str, list[Run]]:
    """Runs ``runs`` one after another, skipping finished workdirs.

    Args:
      runs: from :func:`table_runs`.
      dry_run: print one :func:`command` per unfinished run on stdout (the skipped ones are
        noted on stderr, so stdout can go straight to a cluster's job list) and run nothing.
      runner: ``runner(args) -> exit code``; default: ``subprocess.run`` of
        ``python -m l2t_jax.main ...`` with this interpreter (tests pass a fake).

    Returns:
      ``{"skipped": [...], "ran": [...], "pending": [...]}`` (pending: the dry run's).

    Raises:
      GridError: on the first run that exits non-zero. Finished runs are left alone; the
      same call again skips them and resumes the failed run from its last checkpoint.
    """
    runner = runner or _default_runner
    report: dict[str, list[Run]] = {"skipped": [], "ran": [], "pending": []}
    total = len(runs)
    progress = logs.GridProgress(total)
    for i, run in enumerate(runs, 1):
        if is_finished(run.workdir):
            report["skipped"].append(run)
            progress.finished(skipped=True)
            print(f"[{i}/{total}] skip (finished, has result.json): {run.workdir}",
                  file=sys.stderr if dry_run else sys.stdout, flush=True)
            continue
        if dry_run:
            report["pending"].append(run)
            print(command(run), flush=True)
            continue
        print(f"{progress.line(i, run.label)}\n  {command(run)}", flush=True)
        code = runner(_subprocess_args(run))
        progress.finished()
        if code != 0:
            raise GridError(
                f"run {i}/{total} failed with exit code {code}: {command(run)}\n"
                f"{len(report['ran'])} run(s) finished in this call and "
                f"{len(report['skipped'])} earlier are kept. Run the same command again to "
                "continue: finished runs are skipped and this one resumes from its last "
                "checkpoint.")
        report["ran"].append(run)
    return report


# --------------------------------------------------------------------- reading files
def read_json(path: str) -> Any:
    """A JSON file; FileNotFoundError / ValueError name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def read_metrics(path: str) -> list[dict[str, float]]:
    """metrics.jsonl -> one dict per line (each has ``step``).

    A malformed final line without a newline is skipped: a run killed while writing leaves
    one. A malformed line anywhere else raises ValueError with the file and line number.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path) as f:
        text = f.read()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not an object with a 'step' key")
        except ValueError as e:
            if number == len(lines) and not text.endswith("\n"):
                print(f"note: {path}: skipping the unfinished last line {number}",
                      file=sys.stderr)
                continue
            raise ValueError(f"{path}, line {number}: malformed metrics line ({e})") from None
        records.append(record)
    return records


# ------------------------------------------------------------------------- summaries
RESULT_FIELDS = ("workdir", "method", "scheme", "row", "dataset", "column", "seed",
                 "examples_per_class", "extra_sources", "second_source", "test", "best_val",
                 "best_epoch", "steps", "wall_seconds")


def load_result(workdir: str) -> dict[str, Any]:
    """One finished run as a flat dict (:data:`RESULT_FIELDS`).

    ``test`` is result.json's ``test_at_best_val`` (%). Fields missing from result.json
    come from config.json beside it. A run with no ``method`` in either predates the
    ``method`` key, when the trainer always ran L2T-ww, so it counts as ``l2t_ww``.
    """
    result_path = os.path.join(workdir, "result.json")
    result = read_json(result_path)
    config_path = os.path.join(workdir, "config.json")
    config = read_json(config_path) if os.path.isfile(config_path) else {}
    if not isinstance(result, dict) or not isinstance(config, dict):
        raise ValueError(f"{result_path} or {config_path} is not a JSON object")
    if "test_at_best_val" not in result:
        raise ValueError(f"{result_path} has no 'test_at_best_val'")
    data_config = config.get("data") or {}
    method = result.get("method") or config.get("method") or "l2t_ww"
    scheme = result.get("scheme", config.get("pairs"))
    if method in METHODS_WITHOUT_PAIRS:
        scheme = None
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
        "row": row_label(method, scheme), "dataset": dataset,
        "column": dataset_column(dataset), "seed": None if seed is None else int(seed),
        "examples_per_class": int(examples), "extra_sources": names,
        "second_source": second_source_label(extra), "test": float(result["test_at_best_val"]),
        "best_val": result.get("best_val"), "best_epoch": result.get("best_epoch"),
        "steps": result.get("steps"), "wall_seconds": result.get("wall_seconds"),
    }


# Subdirectories of a workdir that never hold result.json and can be large.
_SKIP_DIRS = {"checkpoints", "best", "tensorboard", "plots"}


def collect_results(root: str) -> list[dict[str, Any]]:
    """Every finished run (a directory with result.json) under ``root``, recursively, as
    :func:`load_result` dicts, in path order."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"results root {root} is not a directory")
    results = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS)
        if "result.json" in files:
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


def summarize(results: Iterable[dict[str, Any]],
              by: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Groups results by the fields ``by`` (:data:`TABLE_GROUPING` has each table's).

    ``by=None``: ``("row", "column")`` plus ``second_source`` and/or ``examples_per_class``
    when the results hold more than one value of them, so no two settings are ever averaged
    together (the offline demo's grid over label budgets summarizes as the limited table).

    Returns one dict per group, in the paper's order, with the ``by`` fields plus ``n``,
    ``mean`` and ``std`` of the test accuracy (%; std = sample std, ddof = 1, and 0.0 when
    n == 1), ``paper_mean`` / ``paper_std`` (None where the paper has no number or no std),
    ``diff`` = mean - paper_mean (None without a paper number), and ``seeds`` (sorted;
    a repeated seed means the same setting was run twice under the root).

    Raises ValueError if a group would mix data sets, second sources or training-set sizes
    that an explicit ``by`` does not separate (use :func:`select_table` or a finer ``by``).
    """
    results = list(results)
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
        accuracies = [m["test"] for m in members]
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


def to_markdown(rows: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """The summary in the paper's layout: one line per method (the paper's row order, rows
    the paper does not have after them), one column per data set (paper order; unknown data
    sets such as ``digits`` after), or per second source / training-set size when ``rows``
    are grouped by those. Cells: :func:`format_cell`; ``-`` where nothing ran."""
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
    caption.append("Cells: mean ± sample std (number of runs) of the test accuracy (%) at the "
                   "best validation accuracy; std is 0.00 for a single run.")
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


# Fixed colours so Scratch / FM / L2T-ww look the same in every figure.
METHOD_COLORS = {"Scratch": "#7f7f7f", "FM (one-to-one)": "#1f77b4",
                 "L2T-ww (all-to-all)": "#d62728", "LwF": "#9467bd", "FM (single)": "#17becf",
                 "AT (one-to-one)": "#8c564b", "LwF+AT (one-to-one)": "#e377c2",
                 "L2T-w (single)": "#bcbd22", "L2T-w (one-to-one)": "#ff7f0e"}


def plot_limited_data(results: Iterable[dict[str, Any]], path: str) -> str:
    """PNG: test accuracy (%) against training examples per class, one line per method
    (mean over seeds, error bars = sample std), log-scale x with a tick per size; and a
    second panel with each method's relative gain over Scratch, (acc - scratch) / scratch
    in %, the quantity the paper says grows as data shrinks. One row of panels per data
    set. ``results`` are :func:`collect_results` dicts; those with examples_per_class 0
    are left out. Returns ``path``."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    cells = summarize(select_table(results, "limited"),
                      by=("row", "column", "examples_per_class"))
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
            color = METHOD_COLORS.get(label, f"C{i}")
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
        accuracy_ax.set_ylabel("test accuracy at best val (%)")
        accuracy_ax.set_title(f"{dataset}: accuracy vs. training-set size\n"
                              "(mean ± sample std over seeds)")
        accuracy_ax.legend(loc="lower right", fontsize=9)
        gain_ax.set_ylabel("relative gain over Scratch (%)")
        gain_ax.set_title(f"{dataset}: (accuracy − Scratch) / Scratch")
        if scratch and len(labels) > 1:
            gain_ax.axhline(0.0, color=METHOD_COLORS["Scratch"], lw=1, ls="--")
            gain_ax.legend(loc="upper right", fontsize=9)
        else:
            gain_ax.text(0.5, 0.5, "no Scratch runs to compare with", ha="center",
                         va="center", transform=gain_ax.transAxes)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path

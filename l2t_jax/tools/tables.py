"""The paper's tables as experiment grids (the runner, :mod:`l2t_jax.tools.runner`, makes them).

This module owns:

- **The tables' rows**: :class:`TableRow` (a method and its pair scheme; the label is
  :func:`l2t_jax.transfer.methods.row_label`), :data:`PAPER_METHODS` (the main table's nine, in the
  paper's order) and :data:`TABLE_METHODS` per table (:data:`TABLES`: ``main``,
  ``multisource``, ``limited``); the targets (:data:`TARGET_CONFIGS`,
  :data:`MULTI_SOURCE_CONFIGS`, :data:`LIMITED_DEFAULT_TARGETS`,
  :data:`LIMITED_DEFAULT_EXAMPLES`).
- **Grids**: :func:`table_runs` lists the runs of a table as
  :class:`l2t_jax.tools.runner.Run` objects in the runner's directory scheme,
  ``<table>/<target>/<method[-scheme]>/epc<N|_all>/seed<S>`` under the grid's root; each
  one's command is an ordinary ``python -m l2t_jax.main --config=<target>
  --workdir=<root>/<directory> --config.method=...``, which
  :func:`l2t_jax.tools.runner.run_grid` runs as a subprocess
  (:func:`l2t_jax.tools.runner.as_subprocess`).

Nothing here imports JAX.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable

from l2t_jax.transfer import methods as method_table  # `methods` is table_runs' argument
from l2t_jax.tools import runner
from l2t_jax.tools.paper import PAPER_ROWS


# ------------------------------------------------------------------ the tables' rows
@dataclasses.dataclass(frozen=True)
class TableRow:
    """One row of a table: a method (a :data:`l2t_jax.transfer.methods.METHODS` name) and its pair
    scheme (None for scratch and LwF)."""

    method: str
    scheme: str | None = None

    @property
    def label(self) -> str:
        """The paper's row label (:func:`l2t_jax.transfer.methods.row_label`)."""
        return method_table.row_label(self.method, self.scheme)

    @property
    def entry(self) -> str:
        """``method[:scheme]``, as grids name methods: ``fm:one_to_one``, ``scratch``."""
        return self.method if self.scheme is None else f"{self.method}:{self.scheme}"

    @property
    def slug(self) -> str:
        """Its directory name (:func:`l2t_jax.tools.runner.run_directory`):
        ``fm-one_to_one``, ``scratch``."""
        return self.entry.replace(":", "-")


PAPER_METHODS = (
    TableRow("scratch"), TableRow("lwf"), TableRow("at", "one_to_one"),
    TableRow("lwf_at", "one_to_one"), TableRow("fm", "single"), TableRow("fm", "one_to_one"),
    TableRow("l2t_w", "single"), TableRow("l2t_w", "one_to_one"),
    TableRow("l2t_ww", "all_to_all"),
)
assert tuple(m.label for m in PAPER_METHODS) == PAPER_ROWS

TABLES = ("main", "multisource", "limited")
TABLE_METHODS = {
    "main": PAPER_METHODS,
    "multisource": (TableRow("fm", "one_to_one"), TableRow("l2t_ww", "all_to_all")),
    "limited": (TableRow("scratch"), TableRow("fm", "one_to_one"),
                TableRow("l2t_ww", "all_to_all")),
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


# ----------------------------------------------------------------------------- grids
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


def _select_methods(table: str, tokens: Iterable[str] | None) -> tuple[TableRow, ...]:
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


def _overrides(method: TableRow, seed: int, examples_per_class: int) -> list[str]:
    """The ``--config.*`` flags of one run of a table, in a fixed order."""
    flags = [f"--config.method={method.method}"]
    if method.scheme is not None:
        flags.append(f"--config.pairs={method.scheme}")
    flags.append(f"--config.seed={seed}")
    if examples_per_class:
        flags.append(f"--config.data.train_examples_per_class={examples_per_class}")
    return flags


def table_runs(table: str, root: str, seeds: Iterable[int],
               targets: Iterable[str] | None = None, methods: Iterable[str] | None = None,
               examples_per_class: Iterable[int] | None = None,
               extra_overrides: Iterable[str] = ()) -> list[runner.Run]:
    """The runs of one table, as the runner's runs (module docstring).

    Args:
      table: ``main`` (9 paper rows x targets x seeds), ``multisource`` (STL-10 with each
        second source x {FM one-to-one, L2T-ww all-to-all} x seeds) or ``limited`` (scratch,
        FM one-to-one, L2T-ww all-to-all x examples per class x targets x seeds).
      root: the grid's root; the commands name ``<root>/<directory>`` as the workdir.
      seeds: e.g. ``(0, 1, 2)``.
      targets: main/limited: names of :data:`TARGET_CONFIGS` (default: all six for main,
        ``stl10`` for limited), any other shipped config or a config file; multisource: keys of
        :data:`MULTI_SOURCE_CONFIGS` (default: all four).
      methods: a subset of the table's rows, by method (``fm``), slug (``fm-one_to_one``)
        or label; default all.
      examples_per_class: training examples per class; default ``(0,)`` (all) for main and
        multisource, :data:`LIMITED_DEFAULT_EXAMPLES` for limited (which needs values > 0).
      extra_overrides: config overrides added to every run, ``key=value`` or
        ``--config.key=value``; last in each command, so they win over the grid's own.

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
            # A target given as a config file is named by its file name (configs/foo.py: foo).
            name = os.path.splitext(os.path.basename(target.partition(":")[0]))[0] or target
            for size in sizes:
                for method in rows:
                    directory = runner.run_directory(method.entry, size, seed,
                                                     context=(table, name))
                    command = runner.main_command(
                        f"--config={config}", f"--workdir={os.path.join(root, directory)}",
                        *_overrides(method, seed, size), *extra)
                    what = f"{size} per class" if size else "all images"
                    runs.append(runner.Run(directory, command,
                                           f"{method.label}, {name}, {what}, seed {seed}"))
    return runs



"""The offline study of the paper's claims: when does L2T-ww pay off (configs/study.py).

``python -m l2t_jax.main --config=study --workdir=DIR`` runs it; this module owns its grids
and their cells. The tasks, the data, the sources and the runs' configs are the digits
tasks' (:mod:`l2t_jax.tools.digits`: digits 0-4 -> 5-9, a VGG-9-BN target, 25 val and 100
test images per class); every run is an ordinary workdir of the training program under
``DIR/runs``, made by the grid runner (:mod:`l2t_jax.tools.runner`); the report is
:mod:`l2t_jax.tools.study_report`'s.

Grids (``config.grids``), each a list of :class:`Cell`:

- ``recipe``: Scratch and FM at the smallest and largest budgets over theta's learning
  rates: the shared recipe's rate is chosen here, on val accuracy, before any L2T-ww run.
- ``main``: sources x methods x label budgets x seeds. A seed draws the labelled subset
  (:func:`l2t_jax.data.per_class_subset`), the same for every method, so differences
  between methods are paired over seeds.
- ``meta_batch``: L2T-ww with the meta loss on held-out labelled images
  (``config.meta_loss_batch='held_out'``) against the paper's same batch.
- ``every_k``: L2T-ww with phi updated every k-th iteration (``config.meta_update_every``).
- ``sensitivity``: L2T-ww over meta learning rate x T.
- ``meta_screen``: L2T-ww with each meta objective (``config.meta_objectives``: which meta
  loss, how phi is scheduled) over meta learning rates, at budgets and seeds of its own:
  each objective's rate is chosen on val accuracy.
- ``meta_objective``: L2T-ww with the chosen objectives at their rates, on the main grid's
  sources, budgets and seeds (paired with its runs).

A cell whose settings equal the main grid's is the main grid's run (one directory), so
grids share runs. ``config.shard='i/n'`` makes cells i, i+n, ... (one process per core),
``config.only`` the cell of one directory, ``config.dry_run`` none (it prints their
commands); a process that made every cell writes the report (``DIR/report``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import sys
import time

import ml_collections

from l2t_jax.tools import digits, runner, study_report
from l2t_jax.training import compile_cache
from l2t_jax.training.config import default_config

logger = logging.getLogger(__name__)

# The settings a cell may change from the shared recipe, and the recipe's config key.
SETTINGS = ("learning_rate", "meta_loss_batch", "meta_update_every", "meta_learning_rate",
            "T", "meta_gradient_batches", "meta_temperature", "meta_freeze_after")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run: ``entry`` is ``method[:scheme]``; ``settings`` sorted (key, value) pairs of
    run-config keys (:func:`cell_settings`); ``objective`` names the meta objective of the
    meta grids' cells (``config.meta_objectives``), a label that the run's identity (its
    settings) does not depend on."""

    source: str
    entry: str
    examples_per_class: int
    seed: int
    settings: tuple = ()
    objective: str = dataclasses.field(default="", compare=False)

    @property
    def directory(self) -> str:
        """``<source>/<method[-scheme]>/epc<k>/<settings>/seed<s>`` under ``DIR/runs``
        (:func:`l2t_jax.tools.runner.run_directory`)."""
        return runner.run_directory(self.entry, self.examples_per_class, self.seed,
                                    context=(self.source,), settings=self.settings)


def recipe(config) -> dict:
    """The shared recipe's value of every key of :data:`SETTINGS`: the study config's where
    it sets the key, else the training config's default (the paper's rule)."""
    defaults = default_config()
    return {key: config[key] if key in config else defaults[key] for key in SETTINGS}


def cell_settings(config, **values) -> tuple:
    """A cell's settings: theta's learning rate always (so a directory keeps its meaning
    when the recipe's rate changes), the other ``values`` where they differ from the
    shared recipe."""
    shared = recipe(config)
    values = {"learning_rate": config.learning_rate, **values}
    return tuple(sorted((k, v) for k, v in values.items()
                        if k == "learning_rate" or shared[k] != v))


def held_out_per_class(config, k: int) -> int:
    """m of the k labelled images per class that score the meta loss (held-out grid)."""
    return max(1, round(config.meta_held_out_fraction * k))


def budgets(config, source: str) -> tuple[int, ...]:
    """The main grid's label budgets for ``source`` (its own, else the study's)."""
    return tuple(config.source_specs[source].examples_per_class or config.examples_per_class)


GRIDS = ("recipe", "main", "meta_batch", "every_k", "sensitivity", "meta_screen",
         "meta_objective")


def objective_cell(config, source: str, objective: str, k: int, seed: int,
                   meta_learning_rate: float) -> Cell:
    """L2T-ww (all-to-all) with meta objective ``objective`` (``config.meta_objectives``)
    at ``meta_learning_rate``."""
    settings = dict(config.meta_objectives[objective])
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"config.meta_objectives.{objective}: {unknown} are not settings a "
                         f"study cell may change; valid: {', '.join(SETTINGS)}")
    return Cell(source, "l2t_ww:all_to_all", k, seed,
                cell_settings(config, **settings, meta_learning_rate=meta_learning_rate),
                objective)


def grid_cells(config, grid: str) -> list[Cell]:
    """The cells of ``grid`` (module docstring), in run order."""
    probe = (config.probe_source, "l2t_ww:all_to_all", config.probe_examples_per_class)
    if grid == "recipe":
        return [Cell(config.probe_source, entry, k, seed,
                     cell_settings(config, learning_rate=lr))
                for lr in config.recipe_learning_rates for k in config.recipe_examples_per_class
                for entry in config.recipe_methods for seed in config.recipe_seeds]
    if grid == "main":
        return [Cell(source, entry, k, seed, cell_settings(config)) for source in config.sources
                for k in budgets(config, source) for entry in config.methods
                for seed in config.seeds]
    if grid == "meta_batch":
        return [Cell(config.probe_source, "l2t_ww:all_to_all", k, seed,
                     cell_settings(config, meta_loss_batch=batch))
                for k in config.meta_batch_examples_per_class for batch in ("same", "held_out")
                for seed in config.seeds]
    if grid == "every_k":
        return [Cell(*probe, seed, cell_settings(config, meta_update_every=every))
                for every in config.every_k for seed in config.seeds]
    if grid == "sensitivity":
        return [Cell(*probe, seed, cell_settings(config, meta_learning_rate=rate, T=steps))
                for rate in config.sensitivity_meta_learning_rates
                for steps in config.sensitivity_T for seed in config.sensitivity_seeds]
    if grid == "meta_screen":
        return [objective_cell(config, config.probe_source, objective, k, seed, rate)
                for k in config.screen_examples_per_class
                for objective in config.screen_objectives
                for rate in config.screen_meta_learning_rates
                for seed in config.screen_seeds]
    if grid == "meta_objective":
        return [objective_cell(config, source, objective, k, seed, rate)
                for source in config.sources for k in budgets(config, source)
                for objective, rate in config.meta_objective_learning_rates.items()
                for seed in config.seeds]
    raise ValueError(f"config.grids: unknown grid {grid!r}; valid: {', '.join(GRIDS)}")


def all_cells(config) -> list[Cell]:
    """Every grid's cells, each run once (grids share cells)."""
    cells: list[Cell] = []
    for grid in config.grids:
        cells.extend(c for c in grid_cells(config, grid) if c not in cells)
    return cells


def cell_config(config, data_dir: str, source_checkpoint: str, cell: Cell):
    """The training program's config for ``cell``: the digits target run
    (:func:`l2t_jax.tools.digits.target_run_config`) with the cell's source and settings,
    and for a held-out meta loss its share of the budget."""
    run = digits.target_run_config(config, data_dir, config.source_specs[cell.source],
                                   source_checkpoint, cell.entry, cell.examples_per_class,
                                   cell.seed, cell.settings)
    if run.get("meta_loss_batch") == "held_out":
        run.data.meta_held_out_per_class = held_out_per_class(config, cell.examples_per_class)
    return run


def runs(config, workdir: str, prepared: digits.Prepared | None = None) -> list[runner.Run]:
    """:func:`all_cells` as the runner's runs. Their configs need the data and the sources
    (``prepared``; None for a dry run, which builds none)."""
    def build(cell):
        return lambda: cell_config(config, prepared.data_dir,
                                   prepared.checkpoints[cell.source], cell)

    return [runner.Run(cell.directory, runner.program_command(config, workdir, cell.directory),
                       f"{cell.source} {cell.entry}, {cell.examples_per_class} per class, "
                       f"seed {cell.seed}" + (f" {dict(cell.settings)}" if cell.settings
                                               else ""),
                       build(cell) if prepared else None)
            for cell in all_cells(config)]


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Makes the study's cells in ``workdir`` (those ``config.only`` / ``config.shard``
    choose; none for ``config.dry_run``, which prints their commands); a process that made
    every cell also writes the report. Returns {'cells': number of cells made or found,
    'report': path or None}."""
    for grid in config.grids:
        grid_cells(config, grid)          # an unknown grid fails before any work
    runs_root = os.path.join(workdir, "runs")
    selection = dict(only=config.only, shard=config.shard)
    if config.dry_run:
        outcome = runner.run_grid(runs(config, workdir), runs_root, dry_run=True, **selection)
        return {"cells": sum(map(len, outcome.values())), "report": None}
    if not compile_cache.configured():
        compile_cache.enable()
    prepared = digits.prepare(config, workdir, config.sources)
    _record_command(workdir)
    outcome = runner.run_grid(runs(config, workdir, prepared), runs_root, **selection)
    everything = not (config.only or config.shard)
    report = study_report.write_report(config, load_records(config, workdir),
                                       os.path.join(workdir, "report")) if everything else None
    return {"cells": sum(map(len, outcome.values())), "report": report}


def load_records(config, workdir: str) -> list[dict]:
    """One record per cell of each grid of ``config.grids`` (a cell two grids share is in
    both), in grid order: ``grid``, ``source``, ``entry``, ``examples_per_class``,
    ``seed``, ``objective`` (the meta grids' objective name, else ""), the value of every
    key of :data:`SETTINGS` (the recipe's where the cell keeps
    it), ``directory`` (absolute) and ``result``: the finished run's
    :func:`l2t_jax.tools.summaries.load_result` plus its run metadata (``run``) and logged
    records (``history``), None while unfinished. The report's input."""
    from l2t_jax.tools import summaries
    from l2t_jax.training import workdir as workdir_files
    runs_root = os.path.join(workdir, "runs")
    loaded: dict[Cell, dict | None] = {}
    records = []
    for grid in config.grids:
        for cell in grid_cells(config, grid):
            directory = os.path.abspath(os.path.join(runs_root, cell.directory))
            if cell not in loaded:
                result = None
                if workdir_files.is_finished(directory):
                    result = summaries.load_result(directory)
                    result["run"] = runner.read_result(directory)["run"]
                    result["history"] = workdir_files.read_metrics(
                        workdir_files.path(directory, workdir_files.METRICS))
                loaded[cell] = result
            records.append({"grid": grid, "source": cell.source, "entry": cell.entry,
                            "examples_per_class": cell.examples_per_class, "seed": cell.seed,
                            "objective": cell.objective,
                            **recipe(config), **dict(cell.settings), "directory": directory,
                            "result": loaded[cell]})
    return records


def _record_command(workdir: str) -> None:
    """Appends this process's command line to ``workdir/commands.txt`` (the report's
    record of how the runs were made)."""
    line = " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), "-m",
                                             "l2t_jax.main", *sys.argv[1:]])
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ("XLA_FLAGS", "L2T_RELEASE_DIR")
                   if os.environ.get(k))
    with open(os.path.join(workdir, "commands.txt"), "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {env + ' ' if env else ''}{line}\n")

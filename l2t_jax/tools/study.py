"""The offline study of the paper's claims: when does L2T-ww pay off (configs/study.py).

``python -m l2t_jax.main --config=study --workdir=DIR`` runs it; this module owns the grids,
the runs' configs, and the report. The data and the demo source are the demo's
(:mod:`l2t_jax.tools.demo`: digits 0-4 -> 5-9, a VGG-9-BN target, 25 val and 100 test images per
class); every run is an ordinary workdir of the training program under ``DIR/runs``.

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

A cell whose settings equal the main grid's is the main grid's run (one directory), so
grids share runs. ``config.shard='i/n'`` runs cells i, i+n, ... (one process per core);
without a shard the run ends by writing the report (:func:`write_report`): ``study.md``
(every table, with the commit and command of the runs), ``main.csv``, ``paired.csv``,
``limited_data.png`` and ``learning_curves_*.png``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import shlex
import sys
import time
from typing import Any, Sequence

import ml_collections

from l2t_jax.tools import demo
from l2t_jax.training import compile_cache, logs

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run: ``entry`` is ``method[:scheme]``; ``settings`` sorted (key, value) pairs of
    run-config keys (:func:`_settings`)."""

    source: str
    entry: str
    examples_per_class: int
    seed: int
    settings: tuple = ()

    def directory(self, runs_root: str) -> str:
        tag = "_".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in self.settings)
        return os.path.join(runs_root, self.source, self.entry.replace(":", "-"),
                            f"epc{self.examples_per_class}", tag, f"seed{self.seed}")


def _settings(config, **values) -> tuple:
    """A cell's settings: theta's learning rate always (so a directory keeps its meaning
    when the recipe's rate changes), the other ``values`` where they differ from the
    shared recipe."""
    recipe = {"meta_loss_batch": "same", "meta_update_every": 1,
              "meta_learning_rate": config.meta_learning_rate, "T": config.T}
    values = {"learning_rate": config.learning_rate, **values}
    return tuple(sorted((k, v) for k, v in values.items()
                        if k == "learning_rate" or recipe[k] != v))


def held_out_per_class(config, k: int) -> int:
    """m of the k labelled images per class that score the meta loss (held-out grid)."""
    return max(1, round(config.meta_held_out_fraction * k))


def budgets(config, source: str) -> tuple[int, ...]:
    """The main grid's label budgets for ``source`` (its own, else the study's)."""
    return tuple(config.source_specs[source].examples_per_class or config.examples_per_class)


def grid_cells(config, grid: str) -> list[Cell]:
    """The cells of ``grid`` (module docstring), in run order."""
    probe = (config.probe_source, "l2t_ww:all_to_all", config.probe_examples_per_class)
    if grid == "recipe":
        return [Cell(config.probe_source, entry, k, seed, _settings(config, learning_rate=lr))
                for lr in config.recipe_learning_rates for k in config.recipe_examples_per_class
                for entry in config.recipe_methods for seed in config.recipe_seeds]
    if grid == "main":
        return [Cell(source, entry, k, seed, _settings(config)) for source in config.sources
                for k in budgets(config, source) for entry in config.methods
                for seed in config.seeds]
    if grid == "meta_batch":
        return [Cell(config.probe_source, "l2t_ww:all_to_all", k, seed,
                     _settings(config, meta_loss_batch=batch))
                for k in config.meta_batch_examples_per_class for batch in ("same", "held_out")
                for seed in config.seeds]
    if grid == "every_k":
        return [Cell(*probe, seed, _settings(config, meta_update_every=every))
                for every in config.every_k for seed in config.seeds]
    if grid == "sensitivity":
        return [Cell(*probe, seed, _settings(config, meta_learning_rate=rate, T=steps))
                for rate in config.sensitivity_meta_learning_rates
                for steps in config.sensitivity_T for seed in config.sensitivity_seeds]
    raise ValueError(f"config.grids: unknown grid {grid!r}; valid: recipe, main, "
                     "meta_batch, every_k, sensitivity")


def all_cells(config) -> list[Cell]:
    """Every grid's cells, each run once (grids share cells)."""
    cells: list[Cell] = []
    for grid in config.grids:
        cells.extend(c for c in grid_cells(config, grid) if c not in cells)
    return cells


def _demo_like(config) -> ml_collections.ConfigDict:
    """The demo-config view of the study that :mod:`l2t_jax.tools.demo`'s run builders read."""
    view = ml_collections.ConfigDict({
        key: config[key] for key in (
            "image_size", "crop_padding", "target_model", "target_widths", "conv_impl",
            "batch_size", "epochs", "steps_per_epoch", "learning_rate", "meta_learning_rate",
            "T", "beta", "split_seed", "source_epochs", "source_batch_size")})
    # The source the demo pre-trains (cell_config replaces it per cell).
    spec = config.source_specs["demo_resnet20"]
    view.source_model, view.source_widths = spec.model, tuple(spec.widths)
    return view


def cell_config(config, data_dir: str, source_checkpoint: str, cell: Cell):
    """The training program's config for ``cell`` (the demo's target run, the study's
    source and settings)."""
    method, scheme = demo.parse_method(cell.entry)
    run = demo.target_config(_demo_like(config), data_dir, source_checkpoint, method, scheme,
                             cell.examples_per_class, cell.seed)
    spec = config.source_specs[cell.source]
    run.source_model = spec.model
    run.source_num_classes = spec.num_classes
    if spec.widths:
        run.model_overrides.source = ml_collections.ConfigDict({"widths": tuple(spec.widths)})
    else:
        del run.model_overrides["source"]
    for key, value in cell.settings:
        run[key] = value
    if run.get("meta_loss_batch") == "held_out":
        run.data.meta_held_out_per_class = held_out_per_class(config, cell.examples_per_class)
    return run


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock file: the shards of a study share the source run."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_sources(config, workdir: str, data_dir: str) -> dict[str, str]:
    """{source name: converted checkpoint directory}: the demo's source is pre-trained
    once in ``workdir/source_run`` (as the demo does), released ones resolved
    (:func:`l2t_jax.training.assets.resolve_source_checkpoint`: checked and converted once)."""
    from l2t_jax.training import assets
    checkpoints = {}
    with _locked(os.path.join(workdir, "sources.lock")):
        # Written once: a shard may be reading them (they are a function of split_seed).
        marker = os.path.join(data_dir, "written.json")
        if not os.path.isfile(marker):
            sizes = demo.write_digits_data(data_dir, config.split_seed)
            with open(marker, "w") as f:
                json.dump({"split_seed": config.split_seed, "sizes": sizes}, f)
        with open(marker) as f:
            if json.load(f)["split_seed"] != config.split_seed:
                raise ValueError(f"{data_dir} holds the split of another config.split_seed; "
                                 "use a new workdir")
        for name in config.sources:
            spec = config.source_specs[name]
            if spec.checkpoint:
                checkpoints[name] = assets.resolve_source_checkpoint(spec.checkpoint)
                continue
            source_dir = os.path.join(workdir, "source_run")
            result, _ = demo._run_if_unfinished(demo.source_config(_demo_like(config),
                                                                   data_dir), source_dir)
            logger.info("%s on digits 0-4: val accuracy %.2f%%", name, result["best_val"])
            checkpoints[name] = os.path.join(source_dir, "source")
    return checkpoints


def _shard(cells: list[Cell], shard: str) -> list[Cell]:
    if not shard:
        return cells
    try:
        index, count = (int(part) for part in shard.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise ValueError(f"config.shard={shard!r}: expected 'i/n' with 0 <= i < n") from None
    return cells[index::count]


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the study's cells in ``workdir`` (this shard's, or all); without a shard also
    writes the report. Returns {'cells': number run or found, 'report': path or None}."""
    for grid in config.grids:
        grid_cells(config, grid)          # an unknown grid fails before any work
    if not compile_cache.configured():
        compile_cache.enable()
    os.makedirs(workdir, exist_ok=True)
    data_dir = os.path.join(workdir, "data")
    sources = prepare_sources(config, workdir, data_dir)
    cells = _shard(all_cells(config), config.shard)
    runs_root = os.path.join(workdir, "runs")
    _record_command(workdir)
    progress = logs.GridProgress(len(cells))
    for i, cell in enumerate(cells):
        logger.info("study %s", progress.line(i + 1, f"{cell.source} {cell.entry}, "
                                              f"{cell.examples_per_class} per class, seed "
                                              f"{cell.seed} {dict(cell.settings) or ''}"))
        result, before = demo._run_if_unfinished(
            cell_config(config, data_dir, sources[cell.source], cell),
            cell.directory(runs_root))
        progress.finished(skipped=before)
        logger.info("  test accuracy at best val: %.2f%%", result["test_at_best_val"])
    report = None if config.shard else write_report(config, workdir)
    return {"cells": len(cells), "report": report}


def _record_command(workdir: str) -> None:
    """Appends this process's command line to ``workdir/commands.txt`` (the report's
    record of how the runs were made)."""
    line = " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), "-m",
                                             "l2t_jax.main", *sys.argv[1:]])
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ("XLA_FLAGS", "L2T_RELEASE_DIR")
                   if os.environ.get(k))
    with open(os.path.join(workdir, "commands.txt"), "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {env + ' ' if env else ''}{line}\n")


# ------------------------------------------------------------------------------ report
def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """a - b paired by position (the same seed): n, mean, sample std and the 95% t
    interval of the mean difference (Student's t, n - 1 degrees of freedom)."""
    from scipy import stats

    from l2t_jax.tools import summaries
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_difference needs two equal lists of >= 2 values, got "
                         f"{len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean, std = summaries.mean_std(diffs)
    half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half}


def _load(runs_root: str, cell: Cell) -> dict | None:
    """A finished cell's :func:`l2t_jax.tools.summaries.load_result` dict plus its run metadata
    (``run``) and logged records (``history``); None when not finished."""
    from l2t_jax.tools import summaries
    from l2t_jax.training import workdir as workdir_files
    directory = cell.directory(runs_root)
    if not workdir_files.is_finished(directory):
        return None
    result = summaries.load_result(directory)
    result["run"] = workdir_files.read_json(
        workdir_files.path(directory, workdir_files.RESULT))["run"]
    result["history"] = workdir_files.read_metrics(
        workdir_files.path(directory, workdir_files.METRICS))
    return result


def _stats(values: Sequence[float]) -> str:
    from l2t_jax.tools import summaries
    if not values:
        return "-"
    mean, std = summaries.mean_std(values)
    return f"{mean:.2f} ± {std:.2f} ({len(values)})"


def _final(history: list[dict], key: str, last: int = 10) -> float | None:
    """Mean of the last ``last`` logged values of ``key`` (the end of training)."""
    values = [r[key] for r in history if key in r][-last:]
    return sum(values) / len(values) if values else None


def write_report(config, workdir: str) -> str:
    """Writes ``workdir/report/``: study.md and its CSVs and pictures (module docstring)
    from the finished runs; cells not finished show as ``-``. Returns study.md's path."""
    report = _Report(config, workdir)
    found, loaded = report.found, report.loaded
    lines = ["# The offline study: when does L2T-ww pay off?", "",
             f"{len(found)} of {len(loaded)} runs finished. Digits 0-4 -> 5-9 "
             f"({config.target_model} target, widths {tuple(config.target_widths)}), "
             f"batch {config.batch_size}, {config.epochs * config.steps_per_epoch} steps, "
             f"theta's learning rate {config.learning_rate:g} (cosine), meta learning rate "
             f"{config.meta_learning_rate:g}, T = {config.T}, beta = {config.beta:g}. Test "
             "accuracy (%) at the best val accuracy: mean ± sample std (seeds).", ""]
    lines += _records(found.values())
    sections = {"recipe": report.recipe, "main": report.main, "meta_batch": report.meta_batch,
                "every_k": report.every_k, "sensitivity": report.sensitivity}
    for grid in sections:
        if grid in config.grids:
            lines += sections[grid]()
    path = os.path.join(report.out, "study.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    logger.info("study report: %s (%d of %d runs)", path, len(found), len(loaded))
    return path


class _Report:
    """The finished runs of a study workdir and one method per grid's section of study.md
    (each returns its markdown lines and writes its CSVs and pictures into ``out``)."""

    def __init__(self, config, workdir: str):
        self.config = config
        self.runs_root = os.path.join(workdir, "runs")
        self.out = os.path.join(workdir, "report")
        os.makedirs(self.out, exist_ok=True)
        self.loaded = {cell: _load(self.runs_root, cell) for cell in all_cells(config)}
        self.found = {cell: r for cell, r in self.loaded.items() if r is not None}
        self.probe = (config.probe_source, "l2t_ww:all_to_all", config.probe_examples_per_class)

    def values(self, cells) -> list[float]:
        """Test accuracies of the finished ``cells``."""
        return [self.found[c]["test"] for c in cells if c in self.found]

    @staticmethod
    def label(entry: str) -> str:
        from l2t_jax.transfer import methods
        return methods.row_label(*demo.parse_method(entry))

    def recipe(self) -> list[str]:
        """The recipe grid: theta's learning rate, chosen on val."""
        config, found = self.config, self.found
        values, label = self.values, self.label
        lines = []
        lines += ["## Recipe: theta's learning rate (Scratch and FM; chosen on val)", "",
                  "| method | per class | " + " | ".join(f"lr {lr:g}" for lr in
                                                         config.recipe_learning_rates) + " |",
                  "|---" * (2 + len(config.recipe_learning_rates)) + "|"]
        for entry in config.recipe_methods:
            for k in config.recipe_examples_per_class:
                row = []
                for lr in config.recipe_learning_rates:
                    cells = [Cell(config.probe_source, entry, k, s,
                                  _settings(config, learning_rate=lr))
                             for s in config.recipe_seeds]
                    val = [found[c]["best_val"] for c in cells if c in found]
                    row.append(f"val {_stats(val)}, test {_stats(values(cells))}")
                lines.append(f"| {label(entry)} | {k} | " + " | ".join(row) + " |")
        mean_val = {}
        for lr in config.recipe_learning_rates:
            val = [found[c]["best_val"] for c in grid_cells(config, "recipe")
                   if c in found and dict(c.settings)["learning_rate"] == lr]
            if val:
                mean_val[lr] = sum(val) / len(val)
        if mean_val:
            best = max(mean_val, key=mean_val.get)
            lines += ["", "Mean val accuracy over these rows: " + ", ".join(
                f"{v:.2f}% at {lr:g}" for lr, v in mean_val.items())
                + f". The best is {best:g}; the study's recipe uses "
                f"{config.learning_rate:g}."]
        lines.append("")
        return lines

    def main(self) -> list[str]:
        """Per source: the table, the paired differences, main.csv / paired.csv, the
        budget plot, what phi did, learning curves and weight pictures."""
        from l2t_jax.tools import plots, summaries
        config, found, runs_root, out = self.config, self.found, self.runs_root, self.out
        values, label = self.values, self.label
        lines = []
        main_rows, paired_rows = [], []
        for source in config.sources:
            lines += [f"## Main: source {source}", "",
                      "| method | " + " | ".join(f"{k} / class" for k in
                                                 budgets(config, source))
                      + " | seconds per run |", "|---" * (2 + len(budgets(config, source)))
                      + "|"]
            for entry in config.methods:
                cells_row, seconds = [], []
                for k in budgets(config, source):
                    cells = [Cell(source, entry, k, s, _settings(config)) for s in config.seeds]
                    cells_row.append(_stats(values(cells)))
                    seconds += [found[c]["wall_seconds"] for c in cells if c in found]
                    if values(cells):
                        mean, std = summaries.mean_std(values(cells))
                        main_rows.append({"source": source, "method": label(entry),
                                          "examples_per_class": k, "n": len(values(cells)),
                                          "mean": mean, "std": std})
                lines.append(f"| {label(entry)} | " + " | ".join(cells_row) + " | "
                             + (f"{sum(seconds) / len(seconds):.0f}" if seconds else "-")
                             + " |")
            lines += ["", "Paired differences over seeds (same labelled subsets), mean "
                      "[95% t interval]:", "",
                      "| difference | " + " | ".join(f"{k} / class" for k in
                                                     budgets(config, source)) + " |",
                      "|---" * (1 + len(budgets(config, source))) + "|"]
            for a, b in (("l2t_ww:all_to_all", "fm:one_to_one"),
                         ("l2t_ww:all_to_all", "fm:all_to_all"),
                         ("l2t_w:one_to_one", "fm:one_to_one"),
                         ("fm:one_to_one", "scratch"), ("l2t_ww:all_to_all", "scratch")):
                if a not in config.methods or b not in config.methods:
                    continue
                row = []
                for k in budgets(config, source):
                    pairs = [(found.get(Cell(source, a, k, s, _settings(config))),
                              found.get(Cell(source, b, k, s, _settings(config))))
                             for s in config.seeds]
                    pairs = [(x["test"], y["test"]) for x, y in pairs if x and y]
                    if len(pairs) < 2:
                        row.append("-")
                        continue
                    d = paired_difference(*zip(*pairs))
                    paired_rows.append({"source": source, "a": label(a), "b": label(b),
                                        "examples_per_class": k, **d})
                    row.append(f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]")
                lines.append(f"| {label(a)} − {label(b)} | " + " | ".join(row) + " |")
            lines.append("")
        _write_csv(os.path.join(out, "main.csv"), main_rows)
        _write_csv(os.path.join(out, "paired.csv"), paired_rows)
        results = [dict(r, column=f"digits, {cell.source}") for cell, r in found.items()
                   if cell in set(grid_cells(config, "main"))]
        if results:
            plots.plot_limited_data(results, os.path.join(out, "limited_data.png"))
            lines += ["![accuracy against label budget](limited_data.png)", ""]
        lines += _dynamics(config, found)
        lines += _learning_curves(config, found, runs_root, out)
        return lines

    def meta_batch(self) -> list[str]:
        """Held-out against same-batch meta loss, paired, with the meta-gradient norms."""
        from l2t_jax.tools import plots
        config, found, runs_root, out = self.config, self.found, self.runs_root, self.out
        values = self.values
        lines = []
        pictures = []
        lines += [f"## Meta loss on held-out labelled images (L2T-ww, {config.probe_source})",
                  "", "held_out: m = max(1, round("
                  f"{config.meta_held_out_fraction:g} k)) of the k images per class score "
                  "the adapted parameters (the target trains on k - m); same: the paper's "
                  "meta loss on the training batch. Paired differences over seeds.", "",
                  "| per class | same | held_out | held_out − same | final meta-grad norm "
                  "(same / held_out) |", "|---|---|---|---|---|"]
        for k in config.meta_batch_examples_per_class:
            same = [Cell(config.probe_source, "l2t_ww:all_to_all", k, s, _settings(config))
                    for s in config.seeds]
            held = [Cell(config.probe_source, "l2t_ww:all_to_all", k, s,
                         _settings(config, meta_loss_batch="held_out")) for s in config.seeds]
            pairs = [(found[h]["test"], found[c]["test"]) for h, c in zip(held, same)
                     if h in found and c in found]
            d = (paired_difference(*zip(*pairs)) if len(pairs) >= 2 else None)
            norms = [_mean([_final(found[c]["history"], "train/meta_grad_norm")
                            for c in group if c in found]) for group in (same, held)]
            lines.append(f"| {k} | {_stats(values(same))} | {_stats(values(held))} | "
                         + (f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" if d
                            else "-") + " | "
                         + " / ".join("-" if v is None else f"{v:.3f}" for v in norms) + " |")
            groups = {f"{name} meta loss": [c.directory(runs_root) for c in group if c in found]
                      for name, group in (("same-batch", same), ("held-out", held))}
            if all(groups.values()):
                name = f"meta_grad_norm_epc{k}.png"
                plots.plot_train_metric(groups, "train/meta_grad_norm", os.path.join(out, name),
                                        "meta-gradient norm", log_y=True)
                pictures.append(f"![meta-gradient norm, {k} per class]({name})")
        lines += ["", *pictures, ""]
        return lines

    def every_k(self) -> list[str]:
        """Accuracy and seconds per run against k (phi every k-th iteration), paired
        against k = 1 (the paper's rule)."""
        config, found = self.config, self.found
        values, probe = self.values, self.probe
        fm_probe = [Cell(config.probe_source, "fm:one_to_one", config.probe_examples_per_class,
                         s, _settings(config)) for s in config.seeds]
        lines = [f"## phi every k-th iteration (L2T-ww, {config.probe_source}, "
                 f"{config.probe_examples_per_class} per class)", "",
                 f"FM (one-to-one) at this budget: {_stats(values(fm_probe))}. Seconds: the "
                 "training loop's wall time (result.json: loading the compiled step from the "
                 "cache, the steps, the evaluations; not the start-up before it).", "",
                 "| k | test accuracy | k − (k = 1), paired | seconds per run | time / k = 1 |",
                 "|---|---|---|---|---|"]
        every_step = [Cell(*probe, s, _settings(config)) for s in config.seeds]
        base = _mean([found[c]["wall_seconds"] for c in every_step if c in found])
        for every in config.every_k:
            cells = [Cell(*probe, s, _settings(config, meta_update_every=every))
                     for s in config.seeds]
            pairs = [(found[c]["test"], found[b]["test"]) for c, b in zip(cells, every_step)
                     if c in found and b in found]
            d = paired_difference(*zip(*pairs)) if every != 1 and len(pairs) >= 2 else None
            seconds = _mean([found[c]["wall_seconds"] for c in cells if c in found])
            lines.append(f"| {every} | {_stats(values(cells))} | "
                         + (f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" if d
                            else "-") + " | "
                         + (f"{seconds:.0f}" if seconds else "-") + " | "
                         + (f"{seconds / base:.2f}" if seconds and base else "-") + " |")
        lines.append("")
        return lines

    def sensitivity(self) -> list[str]:
        """L2T-ww over meta learning rate x T."""
        config = self.config
        values, probe = self.values, self.probe
        lines = []
        lines += [f"## Sensitivity (L2T-ww, {config.probe_source}, "
                  f"{config.probe_examples_per_class} per class)", "",
                  "| meta learning rate | " + " | ".join(f"T = {t}" for t in
                                                        config.sensitivity_T) + " |",
                  "|---" * (1 + len(config.sensitivity_T)) + "|"]
        for rate in config.sensitivity_meta_learning_rates:
            row = [_stats(values([Cell(*probe, s, _settings(config, meta_learning_rate=rate,
                                                               T=steps))
                                  for s in config.sensitivity_seeds]))
                   for steps in config.sensitivity_T]
            lines.append(f"| {rate:g} | " + " | ".join(row) + " |")
        lines.append("")
        return lines

def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _records(results) -> list[str]:
    """Which commits, machines and commands made the runs (the reproducibility record)."""
    commits: dict[str, int] = {}
    machines: dict[str, int] = {}
    for r in results:
        git = r["run"].get("git") or {}
        key = (git.get("commit", "?")[:7] + (" (dirty)" if git.get("dirty") else "")
               if git else "not a checkout")
        commits[key] = commits.get(key, 0) + 1
        machine = f"{r['run'].get('cpu')}, jax {r['run']['versions'].get('jax')}, " \
                  f"XLA_FLAGS '{r['run'].get('xla_flags', '')}'"
        machines[machine] = machines.get(machine, 0) + 1
    lines = ["Made by: " + "; ".join(f"commit {c} ({n} runs)" for c, n in commits.items())
             + ". Machines: " + "; ".join(f"{m} ({n} runs)" for m, n in machines.items())
             + ". Commands: `commands.txt`.", ""]
    return lines


def _dynamics(config, found: dict) -> list[str]:
    """What phi did in the main grid's L2T-ww runs: the end-of-training meta-gradient norm,
    channel-weight entropy (fraction of log C) and the number of pairs with lambda > 0.1."""
    lines = ["### What L2T-ww's meta-networks did (main grid, mean over seeds, last 10 "
             "logged steps)", "", "| source | per class | meta-grad norm, first / last | "
             "pairs with mean lambda > 0.1 |", "|---|---|---|---|"]
    for source in config.sources:
        for k in budgets(config, source):
            cells = [c for c in (Cell(source, "l2t_ww:all_to_all", k, s, _settings(config))
                                 for s in config.seeds) if c in found]
            if not cells:
                continue
            first = _mean([next((r["train/meta_grad_norm"] for r in found[c]["history"]
                                 if "train/meta_grad_norm" in r), None) for c in cells])
            last = _mean([_final(found[c]["history"], "train/meta_grad_norm") for c in cells])
            active = []
            for c in cells:
                keys = sorted({key for r in found[c]["history"] for key in r
                               if key.startswith("train/pair_weights/")})
                active.append(sum(1 for key in keys
                                  if (_final(found[c]["history"], key) or 0) > 0.1))
            lines.append(f"| {source} | {k} | {first:.3f} / {last:.3f} | "
                         f"{_mean(active):.1f} of {len(keys)} |")
    return lines + [""]


def _learning_curves(config, found: dict, runs_root: str, out: str) -> list[str]:
    """Learning curves of every method at each source's smallest and largest budgets (that
    the runs converge), and the pair- and channel-weight pictures of one L2T-ww run (the
    probe budget, the first seed)."""
    from l2t_jax.tools import plots
    from l2t_jax.transfer import methods
    lines = []
    for source in config.sources:
        for k in sorted({min(budgets(config, source)), max(budgets(config, source))}):
            curves = {}
            for entry in config.methods:
                cells = [Cell(source, entry, k, s, _settings(config)) for s in config.seeds]
                dirs = [c.directory(runs_root) for c in cells if c in found]
                if dirs:
                    curves[methods.row_label(*demo.parse_method(entry))] = dirs
            if curves:
                name = f"learning_curves_{source}_epc{k}.png"
                plots.plot_learning_curves(curves, os.path.join(out, name))
                lines.append(f"![learning curves, {source}, {k} per class]({name})")
    example = Cell(config.probe_source, "l2t_ww:all_to_all", config.probe_examples_per_class,
                   config.seeds[0], _settings(config))
    if example in found:
        for name, draw in (("pair_weights.png", plots.plot_pair_weights),
                           ("channel_weights.png", plots.plot_channel_weights)):
            draw(example.directory(runs_root), os.path.join(out, name))
            lines.append(f"![{name[:-4].replace('_', ' ')}, {config.probe_source}, "
                         f"{example.examples_per_class} per class, seed {example.seed}]({name})")
    return lines + [""]


def _write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    import csv
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

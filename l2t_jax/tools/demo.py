"""The offline demo: L2T-ww on real handwritten digits that ship with scikit-learn.

``python -m l2t_jax.main --config=demo --workdir=DIR`` runs it (configs/demo.py); this
module owns its grid, its table and its pictures. The tasks, the data and the runs' configs
are the digits tasks' (:mod:`l2t_jax.tools.digits`: a source pre-trained on digits 0-4, a
VGG-9-BN target learning digits 5-9 from ``k`` labelled images per class); every run is an
ordinary workdir of the training program, made by the grid runner
(:mod:`l2t_jax.tools.runner`).

The grid: every method of ``config.methods`` x every budget x every seed, each in
``DIR/runs/<method[-scheme]>/epc<k>/seed<s>``; finished runs are skipped when the demo is
started again, so an interrupted demo resumes. A process that made the whole grid (no
``shard``, ``only`` or ``dry_run``) writes into DIR: ``results.md`` / ``results.csv`` (mean
+- std over seeds of the test accuracy at the last epoch, as the study reports),
``pair_weights.png``, ``channel_weights.png``, ``learning_curves_epc<k>.png`` and
``demo.json``.
"""
from __future__ import annotations

import json
import logging
import os
import time

import ml_collections

from l2t_jax.tools import digits, runner
from l2t_jax.training import compile_cache, workdir as workdir_files

logger = logging.getLogger(__name__)


def runs(config: ml_collections.ConfigDict, workdir: str,
         prepared: digits.Prepared | None = None) -> list[runner.Run]:
    """The demo's runs, budget by budget, then method, then seed. Their configs need the
    data and the source (``prepared``; None for a dry run, which builds none)."""
    source = config.source_specs[config.source]

    def build(entry, k, seed):
        return lambda: digits.target_run_config(
            config, prepared.data_dir, source, prepared.checkpoints[config.source], entry, k,
            seed)

    grid = []
    for k in config.examples_per_class:
        for entry in config.methods:
            for seed in config.seeds:
                directory = runner.run_directory(entry, k, seed)
                grid.append(runner.Run(
                    directory, runner.program_command(config, workdir, directory),
                    f"{entry}, {k} per class, seed {seed}",
                    build(entry, k, seed) if prepared else None))
    return grid


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Makes the demo's runs in ``workdir`` (those ``config.only`` / ``config.shard``
    choose; none for ``config.dry_run``, which prints their commands); a process that made
    the whole grid writes the table and the pictures. Returns {'table': markdown or None,
    'pictures': paths}."""
    validate_demo_config(config)
    runs_root = os.path.join(workdir, "runs")
    selection = dict(only=config.only, shard=config.shard)
    if config.dry_run:
        runner.run_grid(runs(config, workdir), runs_root, dry_run=True, **selection)
        return {"table": None, "pictures": []}
    # Every seed and budget of a method compiles to the same program: the persistent cache
    # compiles it once per method (and once per machine across demo runs).
    if not compile_cache.configured():
        compile_cache.enable()
    started = time.time()
    prepared = digits.prepare(config, workdir, (config.source,))
    runner.run_grid(runs(config, workdir, prepared), runs_root, **selection)
    if config.only or config.shard:
        return {"table": None, "pictures": []}
    table = write_table(config, workdir)
    pictures = draw_pictures(config, runs_root, workdir)
    path = os.path.join(workdir, "demo.json")
    with workdir_files.writing(path), open(path, "w") as f:
        json.dump({"data": prepared.sizes,
                   "source_val_accuracy": prepared.source_val_accuracy.get(config.source),
                   "wall_seconds": round(time.time() - started, 1),
                   "pictures": [os.path.basename(p) for p in pictures]}, f, indent=1)
    logger.info("demo finished in %.1f min: %s", (time.time() - started) / 60,
                ", ".join(os.path.basename(p) for p in pictures))
    return {"table": table, "pictures": pictures}


def write_table(config, workdir: str) -> str:
    """``results.md`` and ``results.csv``: test accuracy at the last epoch (result.json's
    ``test_last``, the study's number: no selection on val), mean and sample std over
    seeds, per method and budget (:mod:`l2t_jax.tools.summaries`). Prints and returns the
    markdown table."""
    from l2t_jax.models import registry
    from l2t_jax.tools import summaries
    rows = summaries.summarize(summaries.collect_results(os.path.join(workdir, "runs")),
                               accuracy="test_last")
    table = summaries.to_markdown(rows, accuracy="test_last")
    source = registry.display_name(config.source_specs[config.source].model)
    header = (f"Offline demo: digits 0-4 -> 5-9, {source} source -> "
              f"{registry.display_name(config.target_model)} target, {len(config.seeds)} "
              "seeds; test accuracy (%) at the last epoch.\n\n")
    path = os.path.join(workdir, "results.md")
    with workdir_files.writing(path), open(path, "w") as f:
        f.write(header + table + "\n")
    with workdir_files.writing(os.path.join(workdir, "results.csv")):
        summaries.to_csv(rows, os.path.join(workdir, "results.csv"))
    print(header + table)
    return table


def draw_pictures(config, runs_root: str, out: str) -> list[str]:
    """What phi learned in the last meta-network method's first run at the largest budget
    (``pair_weights.png``, ``channel_weights.png``), and every method's learning curves per
    budget (``learning_curves_epc<k>.png``). Returns the pictures' paths."""
    from l2t_jax.tools import metric_plots, weight_plots
    from l2t_jax.transfer import methods

    def seeds(entry, k):
        return [os.path.join(runs_root, runner.run_directory(entry, k, seed))
                for seed in config.seeds]

    pictures = []
    meta_entries = [e for e in config.methods
                    if methods.get_method(digits.parse_entry(e)[0]).meta_networks]
    if meta_entries:
        example = seeds(meta_entries[-1], max(config.examples_per_class))[0]
        pictures.append(weight_plots.plot_pair_weights(
            example, os.path.join(out, "pair_weights.png")))
        pictures.append(weight_plots.plot_channel_weights(
            example, os.path.join(out, "channel_weights.png")))
    for k in config.examples_per_class:
        curves = {methods.row_label(*digits.parse_entry(entry)): seeds(entry, k)
                  for entry in config.methods}
        pictures.append(metric_plots.plot_learning_curves(
            curves, os.path.join(out, f"learning_curves_epc{k}.png")))
    return pictures


def validate_demo_config(config) -> None:
    """Raises ValueError naming the key for bad demo settings (before any compilation)."""
    from l2t_jax.transfer import methods
    for entry in config.methods:
        if not isinstance(entry, str):
            raise ValueError(f"config.methods: {entry!r} is not a method; write names as "
                             "\"--config.methods=('scratch','l2t_ww:all_to_all')\" (valid: "
                             f"{', '.join(methods.METHODS)})")
        methods.get_method(digits.parse_entry(entry)[0])
    if config.source not in config.source_specs:
        raise ValueError(f"config.source={config.source!r}; valid: "
                         f"{', '.join(config.source_specs)}")
    pool = digits.target_train_pool()
    for k in config.examples_per_class:
        if not 1 <= k <= pool:
            raise ValueError(f"config.examples_per_class: {k} is outside 1..{pool} (the "
                             "smallest target class's train pool)")
    if not config.seeds:
        raise ValueError("config.seeds is empty")

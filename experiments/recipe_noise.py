"""Where the seed-to-seed spread of the offline study comes from, and which recipe shrinks it.

Trains cells of the offline study (configs/study.py: digits 0-4 -> 5-9, the demo's ResNet-20
source, a VGG-9-BN target) with the library's own step (:func:`l2t_jax.transfer.bilevel.
train_step`, the study's batches and schedule), with two changes that the training program
cannot make:

- the labelled subset's seed (``subset``) is apart from the training seed (``train``: the
  initialisation and the batch order). With ``train == subset`` a run is the study's cell
  (the first run of a cell checks that its accuracies equal the study's ``result.json``
  when ``--check`` names the study's runs); with another ``train`` seed the same images
  train from another start, so the spread over ``train`` at a fixed ``subset`` is the
  recipe's own noise and the spread over ``subset`` the data's;
- every epoch end records val and test accuracy and cross-entropy twice: with the running
  BN statistics (what the training program evaluates with) and with the statistics
  recomputed on the train images ("recomputed BN": one train-mode pass over 256 augmented
  crops of the train split, the population mean and unbiased variance of that pass, as
  PreciseBN in Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021).

Model-selection rules (best val accuracy as the study, the last epoch, best val CE) are
then compared after the fact from the same runs (``--summarize``). Run on one core:

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
      L2T_RELEASE_DIR=DIR taskset -c 1 python experiments/recipe_noise.py \\
      --study-workdir=runs/study --out=runs/recipe_noise --tag=base \\
      --methods scratch fm:one_to_one --budgets 2 10 --subsets 0 1 2 3 4 \\
      [--train-offsets 0 100] [--learning-rate 0.02] [--epochs 15] [--steps-per-epoch 10] \\
      [--batch-size 16] [--check runs/study/runs]
    python experiments/recipe_noise.py --out=runs/recipe_noise --summarize

``--study-workdir`` is a study workdir whose data and demo source are written
(``python -m l2t_jax.main --config=study --workdir=DIR`` with any grid does it). Each run
writes ``OUT/TAG/<method>/epc<k>/subset<s>_train<t>.json``; finished runs are skipped.
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from l2t_jax import data
from l2t_jax.configs import study as study_config
from l2t_jax.tools import study
from l2t_jax.training import build, compile_cache
from l2t_jax.transfer import bilevel

CALIBRATION_IMAGES = 256      # augmented train crops for the recomputed BN statistics


def run_config(args, entry: str, k: int, subset: int):
    """The study's config for the cell (method ``entry``, k per class, seed ``subset``),
    with the recipe overrides of ``args``."""
    config = study_config.get_config()
    for key in ("learning_rate", "epochs", "steps_per_epoch", "batch_size"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    cell = study.Cell("demo_resnet20", entry, k, subset, study.cell_settings(config))
    run = study.cell_config(config, os.path.join(args.study_workdir, "data"),
                            os.path.join(args.study_workdir, "source_run", "source"), cell)
    return run, cell


def eval_arrays(source, image_size: int):
    """All of ``source`` as (images (N, S, S, 3) f32, labels (N,) i32), the eval transform."""
    images, labels = [], []
    for batch_images, batch_labels, real in data.eval_batches(source, image_size, 256):
        images.append(np.asarray(batch_images)[:real])
        labels.append(np.asarray(batch_labels)[:real])
    return np.concatenate(images), np.concatenate(labels)


class Evaluator:
    """Accuracy (%) and mean CE of the target on val and test, with the running BN
    statistics and with statistics recomputed on augmented train crops."""

    def __init__(self, model, splits, run):
        size = run.data.image_size
        self.sets = {split: eval_arrays(splits[split], size) for split in ("val", "test")}
        calibration = data.train_batches(splits["train"], CALIBRATION_IMAGES, size,
                                         seed=run.seed + 7919, epoch=0, hflip=run.data.hflip,
                                         crop_padding=run.data.crop_padding, min_batches=1)
        self.calibration = np.asarray(calibration[0][0])

        @jax.jit
        def scores(variables, images, labels):
            logits, _ = model.apply(variables, images, train=False)
            log_probs = jax.nn.log_softmax(logits)
            correct = jnp.sum(jnp.argmax(logits, -1) == labels)
            ce = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
            return correct, ce

        @jax.jit
        def recomputed_stats(params, batch_stats, images):
            # Running statistics start at zero: one update with momentum 0.1 leaves 0.1 x
            # the pass's (mean, unbiased variance) (models/layers.py BatchNorm).
            zeros = jax.tree.map(jnp.zeros_like, batch_stats)
            _, updated = model.apply({"params": params, "batch_stats": zeros}, images,
                                     train=True, mutable=["batch_stats"])
            return jax.tree.map(lambda s: s / 0.1, updated["batch_stats"])

        self.scores, self.recomputed_stats = scores, recomputed_stats

    def __call__(self, state) -> dict:
        params = state.target_params["model"]
        stats = {"running": state.batch_stats,
                 "recomputed": self.recomputed_stats(params, state.batch_stats,
                                                     self.calibration)}
        record = {}
        for bn, batch_stats in stats.items():
            for split, (images, labels) in self.sets.items():
                correct, ce = self.scores({"params": params, "batch_stats": batch_stats},
                                          images, labels)
                record[f"{split}_acc_{bn}"] = 100.0 * int(correct) / len(labels)
                record[f"{split}_ce_{bn}"] = float(ce)
        return record


def train_cell(run, subset: int, train_seed: int, steps: dict) -> dict:
    """One run: the cell's labelled subset (seed ``subset``) trained from seed
    ``train_seed``; returns the per-epoch records. ``steps`` caches compiled programs."""
    run = run.copy_and_resolve_references()
    splits = build.load_splits(run)          # run.seed == subset: the study's subset
    run.seed = train_seed
    transfer = build.build_transfer(run)
    source_variables = build.load_source_variables(run, transfer)
    steps_per_epoch = build.steps_per_epoch(run, len(splits["train"]))
    total = steps_per_epoch * run.epochs
    key = (run.method, run.pairs, run.learning_rate, run.epochs, steps_per_epoch,
           run.batch_size)
    if key not in steps:
        schedule = build.learning_rate_schedule(run, steps_per_epoch)
        steps[key] = jax.jit(functools.partial(bilevel.train_step, transfer, schedule),
                             donate_argnums=0)
    step = steps[key]
    size = run.data.image_size
    state = bilevel.init_state(transfer, jax.random.key(run.seed), (size, size, 3),
                               jit=run.jit_init)
    evaluate = Evaluator(transfer.target_model, splits, run)
    batches = data.step_batches(splits["train"], range(total), steps_per_epoch=steps_per_epoch,
                                batch_size=run.batch_size, rows=slice(0, run.batch_size),
                                image_size=size, seed=run.seed, hflip=run.data.hflip,
                                crop_padding=run.data.crop_padding, threads=0,
                                prefetch_batches=0)
    records, ce = [], []
    for done, (images, labels) in enumerate(batches, start=1):
        state, metrics = step(state, source_variables, images, labels)
        ce.append(metrics["ce"])
        if done % steps_per_epoch == 0:
            record = {"epoch": done // steps_per_epoch - 1, "step": done,
                      "train_ce": float(np.mean(jax.device_get(ce)))}
            ce = []
            record.update(evaluate(state))
            records.append(record)
    return {"records": records, "train_examples": len(splits["train"])}


def study_result(runs_root: str, cell) -> dict | None:
    path = os.path.join(cell.directory(runs_root), "result.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def select(epochs: list[dict], rule: str, bn: str) -> dict:
    """The epoch a selection rule picks: ``best_val`` (the first epoch of the highest val
    accuracy, as the training program), ``best_val_ce`` (the lowest val CE), ``last``."""
    if rule == "last":
        return epochs[-1]
    if rule == "best_val":
        best = max(e[f"val_acc_{bn}"] for e in epochs)
        return next(e for e in epochs if e[f"val_acc_{bn}"] == best)
    if rule == "best_val_ce":
        return min(epochs, key=lambda e: e[f"val_ce_{bn}"])
    raise ValueError(rule)


def run_grid(args) -> None:
    if not compile_cache.configured():
        compile_cache.enable()
    steps = {}
    # The study's directories name theta's rate but not the run length or the batch: only
    # runs of the study's length and batch are compared with its result.json.
    comparable = args.check and all(getattr(args, key) is None
                                    for key in ("epochs", "steps_per_epoch", "batch_size"))
    for entry in args.methods:
        for k in args.budgets:
            for subset in args.subsets:
                for offset in args.train_offsets:
                    train_seed = subset + offset
                    out = os.path.join(args.out, args.tag, entry.replace(":", "-"), f"epc{k}",
                                       f"subset{subset}_train{train_seed}.json")
                    if os.path.isfile(out):
                        continue
                    run, cell = run_config(args, entry, k, subset)
                    started = time.time()
                    result = train_cell(run, subset, train_seed, steps)
                    result.update(method=entry, examples_per_class=k, subset=subset,
                                  train_seed=train_seed, learning_rate=run.learning_rate,
                                  epochs=run.epochs, steps_per_epoch=run.steps_per_epoch,
                                  batch_size=run.batch_size,
                                  seconds=round(time.time() - started, 1))
                    chosen = select(result["records"], "best_val", "running")
                    line = (f"{args.tag} {entry} k={k} subset={subset} train={train_seed}: "
                            f"test {chosen['test_acc_running']:.2f} at val "
                            f"{chosen['val_acc_running']:.2f} ({result['seconds']} s)")
                    if comparable and train_seed == subset:
                        recorded = study_result(args.check, cell)
                        if recorded is not None:
                            same = (recorded["test_at_best_val"] == chosen["test_acc_running"]
                                    and recorded["best_val"] == chosen["val_acc_running"])
                            line += (" | study's run: test "
                                     f"{recorded['test_at_best_val']:.2f} at val "
                                     f"{recorded['best_val']:.2f}: "
                                     + ("same" if same else "DIFFERENT"))
                    print(line, flush=True)
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    with open(out, "w") as f:
                        json.dump(result, f)


# ------------------------------------------------------------------------------ summary
RULES = (("best_val", "running"), ("best_val", "recomputed"), ("last", "running"),
         ("last", "recomputed"), ("best_val_ce", "running"), ("best_val_ce", "recomputed"))


def _std(values):
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def _stats(values) -> str:
    return f"{statistics.mean(values):.2f} ± {_std(values):.2f}" if values else "-"


def _pooled_std(groups: dict) -> float | None:
    """The std within groups (e.g. over train seeds at each subset), pooled."""
    within = [v for v in groups.values() if len(v) > 1]
    if not within:
        return None
    return math.sqrt(sum((len(v) - 1) * _std(v) ** 2 for v in within)
                     / sum(len(v) - 1 for v in within))


def summarize(args) -> None:
    """Per recipe tag, budget and method: val accuracy at the last epoch (the recipe is
    chosen on it: no selection bias), and test accuracy under each selection rule and BN
    mode, mean ± std over subsets (train seed = subset); then per rule the paired
    difference of the other method minus Scratch (mean ± std over subsets), and where
    other train seeds ran, each method's std over train seeds at a fixed subset (pooled):
    the recipe's own noise."""
    runs = []
    for path in glob.glob(os.path.join(args.out, "*", "*", "epc*", "*.json")):
        with open(path) as f:
            result = json.load(f)
        result["tag"] = path.split(os.sep)[-4]
        runs.append(result)
    tags = sorted({r["tag"] for r in runs})
    print("| recipe | per class | method | val, last epoch (running BN) | val, last epoch "
          "(recomputed BN) | " + " | ".join(f"test, {rule} ({bn} BN)" for rule, bn in RULES)
          + " |")
    print("|---" * (5 + len(RULES)) + "|")
    notes = []
    for tag in tags:
        for k in sorted({r["examples_per_class"] for r in runs if r["tag"] == tag}):
            cells = [r for r in runs if r["tag"] == tag and r["examples_per_class"] == k]
            # Scratch first: the difference is the other method minus Scratch.
            methods = sorted({r["method"] for r in cells}, key=lambda m: (m != "scratch", m))
            for method in methods:
                own = [r for r in cells if r["method"] == method
                       and r["train_seed"] == r["subset"]]
                row = [_stats([r["records"][-1][f"val_acc_{bn}"] for r in own])
                       for bn in ("running", "recomputed")]
                row += [_stats([select(r["records"], rule, bn)[f"test_acc_{bn}"] for r in own])
                        for rule, bn in RULES]
                print(f"| {tag} | {k} | {method} ({len(own)}) | " + " | ".join(row) + " |")
            lines = []
            for rule, bn in RULES:
                parts = []
                by = {(r["method"], r["subset"]): r for r in cells
                      if r["train_seed"] == r["subset"]}
                if len(methods) == 2:
                    diffs = [select(by[(methods[1], s)]["records"], rule, bn)[f"test_acc_{bn}"]
                             - select(by[(methods[0], s)]["records"], rule, bn)[f"test_acc_{bn}"]
                             for s in sorted({s for _, s in by})
                             if (methods[0], s) in by and (methods[1], s) in by]
                    if len(diffs) > 1:
                        parts.append(f"paired {methods[1]} - {methods[0]}: {_stats(diffs)} "
                                     f"({len(diffs)})")
                for method in methods:
                    for split in ("test", "val"):
                        groups = {}
                        for r in cells:
                            if r["method"] == method:
                                chosen = (select(r["records"], rule, bn) if split == "test"
                                          else r["records"][-1])
                                groups.setdefault(r["subset"], []).append(
                                    chosen[f"{split}_acc_{bn}"])
                        pooled = _pooled_std(groups)
                        if pooled is not None:
                            parts.append(f"{method} {split}{' (last)' if split == 'val' else ''}"
                                         f" std over train seeds: {pooled:.2f}")
                if parts:
                    lines.append(f"  - {rule} ({bn} BN): " + "; ".join(parts))
            if lines:
                notes.append(f"{tag}, {k} per class:\n" + "\n".join(lines))
    print("\n" + "\n\n".join(notes))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study-workdir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tag", default="base", help="the recipe's name (a folder of OUT)")
    parser.add_argument("--methods", nargs="+", default=["scratch", "fm:one_to_one"])
    parser.add_argument("--budgets", nargs="+", type=int, default=[2, 10])
    parser.add_argument("--subsets", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--train-offsets", nargs="+", type=int, default=[0],
                        help="train seed = subset + offset (0: the study's cell)")
    parser.add_argument("--learning-rate", dest="learning_rate", type=float)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--steps-per-epoch", dest="steps_per_epoch", type=int)
    parser.add_argument("--batch-size", dest="batch_size", type=int)
    parser.add_argument("--check", help="the study's runs directory (DIR/runs): compare "
                        "runs of the study's length and batch with it")
    parser.add_argument("--summarize", action="store_true")
    args = parser.parse_args(argv)
    if args.summarize:
        summarize(args)
    else:
        if not args.study_workdir:
            parser.error("--study-workdir is required to run cells")
        run_grid(args)


if __name__ == "__main__":
    main()

"""The offline demo: L2T-ww on real handwritten digits that ship with scikit-learn.

``python -m l2t_jax.main --config=demo --workdir=DIR`` runs it; this module
owns it: the data design, the source pre-training, the grid of target runs, the table and
the pictures. Every run goes through the ordinary training program
(:func:`l2t_jax.training.train.train_and_evaluate`), so each run directory is a normal workdir.

Data design (``sklearn.datasets.load_digits``: 1,797 real 8x8 scans of 10 digits, 0-16
grey levels, nothing downloaded). The two tasks use disjoint classes, like TinyImageNet ->
CIFAR-100 in the paper:

- source task: digits 0-4, all their images but 20 per class (val), about 800 images; the
  demo pre-trains a CIFAR-style ResNet-20 on it (cross-entropy, the authors' step
  schedule) and exports it as the source checkpoint (``source_run/source``).
- target task: digits 5-9, relabelled 0-4, learned by a VGG-9-BN (another architecture,
  as in the paper) from only ``k`` labelled images per class, ``k`` in
  ``config.examples_per_class``, sampled per seed from a train pool; 25 images per class
  are the validation set (model selection) and 100 per class the test set, fixed by
  ``config.split_seed``.
- images are grey levels scaled to 0-255, copied to 3 channels and up-sampled (bilinear)
  to ``config.image_size``; training crops with a small zero padding and never flips
  (a mirrored digit is another symbol).

The grid: every method of ``config.methods`` x every budget x every seed, each in
``runs/<method>/epc<k>/seed<s>``; finished runs are skipped when the demo is started again,
so an interrupted demo resumes. Outputs in the workdir: ``results.md`` / ``results.csv``
(mean +- std over seeds), ``pair_weights.png``, ``channel_weights.png``,
``learning_curves_epc<k>.png``.
"""
from __future__ import annotations

import json
import logging
import os
import time

import ml_collections
import numpy as np

from l2t_jax.training import compile_cache, logs

logger = logging.getLogger(__name__)

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
SOURCE_VAL_PER_CLASS = 20
TARGET_VAL_PER_CLASS = 25
TARGET_TEST_PER_CLASS = 100


def write_digits_data(directory: str, split_seed: int) -> dict:
    """Writes ``source/{train,val}.npz`` and ``target/{train,val,test}.npz`` (8x8x3 uint8)
    under ``directory``; returns the number of images per split."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)      # (N, 8, 8)
    images = np.repeat(grey[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(split_seed)
    splits = {"source": {"train": [], "val": []},
              "target": {"train": [], "val": [], "test": []}}
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(labels == label))
        if label in SOURCE_CLASSES:
            splits["source"]["val"].append(indices[:SOURCE_VAL_PER_CLASS])
            splits["source"]["train"].append(indices[SOURCE_VAL_PER_CLASS:])
        else:
            val_end = TARGET_VAL_PER_CLASS
            test_end = val_end + TARGET_TEST_PER_CLASS
            splits["target"]["val"].append(indices[:val_end])
            splits["target"]["test"].append(indices[val_end:test_end])
            splits["target"]["train"].append(indices[test_end:])
    sizes = {}
    for task, task_splits in splits.items():
        offset = 0 if task == "source" else TARGET_CLASSES[0]
        os.makedirs(os.path.join(directory, task), exist_ok=True)
        for split, parts in task_splits.items():
            chosen = np.sort(np.concatenate(parts))
            np.savez(os.path.join(directory, task, f"{split}.npz"), images=images[chosen],
                     labels=labels[chosen] - offset)
            sizes[f"{task}/{split}"] = int(len(chosen))
    return sizes


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# How write_digits_image_folder stores the k-th image of a class: PIL modes and (height,
# width) in turn, so that a folder has grayscale, RGB and RGBA files of several sizes.
FOLDER_MODES = ("L", "RGB", "RGBA")
FOLDER_SIZES = ((8, 8), (16, 16), (20, 28), (32, 32), (12, 10))


def write_digits_image_folder(root: str, digits=tuple(range(10)), train_per_class: int = 30,
                              test_per_class: int = 20, val_per_class: int = 0,
                              seed: int = 0) -> dict:
    """sklearn's digits as an image folder ``root/{train,[val],test}/<name>/<k>.png``, the
    layout of one's own data (``configs/image_folder.py``): class folders named ``zero`` ...
    ``nine`` (so the sorted class order is not the digits' order), images plotted without
    replacement per class by ``seed``, and stored in turn as grayscale, RGB and RGBA PNGs
    (:data:`FOLDER_MODES`) of several sizes (:data:`FOLDER_SIZES`, bilinear from the 8x8
    scans). RGBA files carry an alpha channel that RGB conversion drops. No ``val/`` with
    ``val_per_class=0``. Returns the number of images per split.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    loaded = load_digits()
    grey = np.round(loaded.images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(seed)
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    written = {split: 0 for split, n in counts.items() if n}
    for digit in digits:
        members = rng.permutation(np.flatnonzero(loaded.target == digit))
        needed = sum(counts.values())
        if needed > len(members):
            raise ValueError(f"digit {digit} has {len(members)} images, {needed} were asked")
        start = 0
        for split, n in counts.items():
            if not n:
                continue
            directory = os.path.join(root, split, DIGIT_NAMES[digit])
            os.makedirs(directory, exist_ok=True)
            for k, index in enumerate(members[start:start + n]):
                height, width = FOLDER_SIZES[k % len(FOLDER_SIZES)]
                image = Image.fromarray(grey[index]).resize((width, height), Image.BILINEAR)
                mode = FOLDER_MODES[k % len(FOLDER_MODES)]
                if mode == "RGB":
                    image = image.convert("RGB")
                elif mode == "RGBA":
                    image = image.convert("RGBA")
                    image.putalpha(Image.fromarray(np.full((height, width), 200, np.uint8)))
                image.save(os.path.join(directory, f"{k:03d}.png"))
            written[split] += n
            start += n
    return written


def _base_config(config, data_dir: str, name: str):
    """Settings shared by the source and the target runs."""
    from l2t_jax.training.config import default_config
    run = default_config()
    run.data.kind = "npz"
    run.data.name = name
    run.data.data_dir = data_dir
    run.data.official_split = ""
    run.data.num_classes = len(SOURCE_CLASSES)
    run.data.image_size = config.image_size
    run.data.hflip = False
    run.data.crop_padding = config.crop_padding
    run.eval_batch_size = 256
    run.lr_reference_batch_size = 0            # the demo's rates are for its own batches
    run.checkpoint_every_steps = 10_000        # runs are short: checkpoint at epoch ends
    run.source_model = config.source_model
    run.source_num_classes = len(SOURCE_CLASSES)
    run.conv_impl = config.conv_impl
    run.model_overrides = ml_collections.ConfigDict({
        "source": {"widths": tuple(config.source_widths)},
        "target": {"widths": tuple(config.target_widths)}})
    return run


def source_config(config, data_dir: str):
    """The source pre-training run: ResNet-20 on digits 0-4, exported as a source."""
    run = _base_config(config, os.path.join(data_dir, "source"), "digits-source")
    run.method = "scratch"
    run.target_model = config.source_model
    run.model_overrides.target = ml_collections.ConfigDict(
        {"widths": tuple(config.source_widths)})
    run.data.eval_splits = ("val",)
    run.seed = config.split_seed
    run.batch_size = config.source_batch_size
    run.epochs = config.source_epochs
    run.lr_schedule = "step"
    run.log_every_steps = 25
    run.export_source = True
    return run


def target_config(config, data_dir: str, source_checkpoint: str, method: str, scheme: str,
                  examples_per_class: int, seed: int):
    """One target run: ``method`` with matching ``scheme`` on k images per class."""
    run = _base_config(config, os.path.join(data_dir, "target"), "digits")
    run.method = method
    run.pairs = scheme or "single"
    run.source_checkpoint = source_checkpoint
    run.target_model = config.target_model
    run.data.train_examples_per_class = examples_per_class
    run.seed = seed
    run.batch_size = config.batch_size
    run.epochs = config.epochs
    run.steps_per_epoch = config.steps_per_epoch
    run.log_every_steps = config.steps_per_epoch
    run.learning_rate = config.learning_rate
    run.meta_learning_rate = config.meta_learning_rate
    run.T = config.T
    run.beta = config.beta
    # One compiled program for init, loaded from the persistent cache by every later run
    # (op by op, init costs about 10 s per run here, and a run is a minute).
    run.jit_init = True
    return run


def parse_method(entry: str) -> tuple[str, str]:
    """``'fm:one_to_one'`` -> ('fm', 'one_to_one'); ``'scratch'`` -> ('scratch', '')."""
    method, _, scheme = entry.partition(":")
    return method, scheme


def _run_if_unfinished(run_config, workdir: str) -> tuple[dict, bool]:
    """(result, whether it had finished before): a finished run is read, not rerun."""
    from l2t_jax.training import train, workdir as workdir_files
    if workdir_files.is_finished(workdir):
        return workdir_files.read_json(workdir_files.path(workdir, workdir_files.RESULT)), True
    return train.train_and_evaluate(run_config, workdir), False


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the whole demo in ``workdir``; returns {'table': markdown, 'pictures': paths}."""
    from l2t_jax.tools import plots, summaries
    from l2t_jax.transfer import methods
    from l2t_jax.training import workdir as workdir_files
    validate_demo_config(config)
    os.makedirs(workdir, exist_ok=True)
    # Every seed and budget of a method compiles to the same program: the persistent cache
    # compiles it once per method (and once per machine across demo runs).
    if not compile_cache.configured():
        compile_cache.enable()
    started = time.time()
    data_dir = os.path.join(workdir, "data")
    sizes = write_digits_data(data_dir, config.split_seed)
    logger.info("digits data: %s", sizes)

    source_dir = os.path.join(workdir, "source_run")
    source_result, _ = _run_if_unfinished(source_config(config, data_dir), source_dir)
    logger.info("source ResNet-20 on digits 0-4: val accuracy %.2f%%",
                source_result["best_val"])
    source_checkpoint = os.path.join(source_dir, "source")

    runs_root = os.path.join(workdir, "runs")
    run_dirs: dict[tuple[str, int], list[str]] = {}
    grid = [(entry, k, seed) for k in config.examples_per_class for entry in config.methods
            for seed in config.seeds]
    progress = logs.GridProgress(len(grid))
    for i, (entry, k, seed) in enumerate(grid):
        method, scheme = parse_method(entry)
        run_dir = os.path.join(runs_root, entry.replace(":", "-"), f"epc{k}", f"seed{seed}")
        logger.info("demo %s", progress.line(i + 1, f"{entry}, {k} per class, seed {seed}"))
        result, finished_before = _run_if_unfinished(
            target_config(config, data_dir, source_checkpoint, method, scheme, k, seed),
            run_dir)
        progress.finished(skipped=finished_before)
        logger.info("  test accuracy at best val: %.2f%%%s", result["test_at_best_val"],
                    " (finished earlier)" if finished_before else "")
        run_dirs.setdefault((entry, k), []).append(run_dir)

    results = summaries.collect_results(runs_root)
    rows = summaries.summarize(results)
    table = summaries.to_markdown(rows)
    header = (f"Offline demo: digits 0-4 -> 5-9, ResNet-20 source -> VGG-9-BN target, "
              f"{len(config.seeds)} seeds; test accuracy (%) at the best val accuracy.\n\n")
    with workdir_files.writing(os.path.join(workdir, "results.md")):
        with open(os.path.join(workdir, "results.md"), "w") as f:
            f.write(header + table + "\n")
    with workdir_files.writing(os.path.join(workdir, "results.csv")):
        summaries.to_csv(rows, os.path.join(workdir, "results.csv"))
    print(header + table)

    pictures = []
    largest = max(config.examples_per_class)
    meta_entries = [e for e in config.methods
                    if methods.get_method(parse_method(e)[0]).meta_networks]
    if meta_entries:
        example = run_dirs[(meta_entries[-1], largest)][0]
        pictures.append(plots.plot_pair_weights(example, os.path.join(workdir,
                                                                      "pair_weights.png")))
        pictures.append(plots.plot_channel_weights(
            example, os.path.join(workdir, "channel_weights.png")))
    for k in config.examples_per_class:
        curves = {methods.row_label(*parse_method(entry)): run_dirs[(entry, k)]
                  for entry in config.methods}
        pictures.append(plots.plot_learning_curves(
            curves, os.path.join(workdir, f"learning_curves_epc{k}.png")))
    with workdir_files.writing(os.path.join(workdir, "demo.json")), \
            open(os.path.join(workdir, "demo.json"), "w") as f:
        json.dump({"data": sizes, "source_val_accuracy": source_result["best_val"],
                   "wall_seconds": round(time.time() - started, 1),
                   "pictures": [os.path.basename(p) for p in pictures]}, f, indent=1)
    logger.info("demo finished in %.1f min: %s", (time.time() - started) / 60,
                 ", ".join(os.path.basename(p) for p in pictures))
    return {"table": table, "pictures": pictures}


def validate_demo_config(config) -> None:
    """Raises ValueError naming the key for bad demo settings (before any compilation)."""
    from l2t_jax.transfer import methods
    for entry in config.methods:
        method, scheme = parse_method(entry)
        methods.get_method(method)
    pool = min(np.bincount(_digit_labels())[list(TARGET_CLASSES)]) - (
        TARGET_VAL_PER_CLASS + TARGET_TEST_PER_CLASS)
    for k in config.examples_per_class:
        if not 1 <= k <= pool:
            raise ValueError(f"config.examples_per_class: {k} is outside 1..{pool} (the "
                             "smallest target class's train pool)")
    if not config.seeds:
        raise ValueError("config.seeds is empty")


def _digit_labels() -> np.ndarray:
    from sklearn.datasets import load_digits
    return load_digits().target

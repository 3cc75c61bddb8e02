"""The digits tasks of the offline demo and study: real handwritten digits that ship with
scikit-learn, nothing downloaded.

This module owns the data design, the configs of the runs on it (the source pre-training and
the target runs, :func:`source_run_config`, :func:`target_run_config`: the demo and the
study build their runs here) and what a workdir's runs share (:func:`prepare`: the data
and the sources).

Data design (``sklearn.datasets.load_digits``: 1,797 real 8x8 scans of 10 digits, 0-16 grey
levels). The two tasks use disjoint classes, like TinyImageNet -> CIFAR-100 in the paper:

- source task: digits 0-4 (:data:`SOURCE_CLASSES`), all their images but 20 per class
  (val), about 800 images; a source whose spec names no checkpoint is pre-trained on it
  (cross-entropy, the authors' step schedule) and exported as a source checkpoint.
- target task: digits 5-9 (:data:`TARGET_CLASSES`), relabelled 0-4, learned from only ``k``
  labelled images per class, sampled per seed from a train pool
  (:func:`l2t_jax.data.per_class_subset`, the same for every method); 25 images per class
  are the validation set (model selection) and 100 per class the test set, fixed by
  ``split_seed``.
- images are grey levels scaled to 0-255, copied to 3 channels and up-sampled (bilinear)
  to ``config.image_size``; training crops with a small zero padding and never flips (a
  mirrored digit is another symbol).

:func:`write_digits_image_folder` writes the same digits as an image folder, the layout of
one's own data (``configs/image_folder.py``).

The run builders read a demo or study config (``configs/demo.py``, ``configs/study.py``):
the recipe keys (``image_size``, ``crop_padding``, ``target_model``, ``target_widths``,
``conv_impl``, ``batch_size``, ``epochs``, ``steps_per_epoch``, ``learning_rate``,
``meta_learning_rate``, ``T``, ``beta``, ``meta_val_per_class``, ``split_seed``,
``source_epochs``, ``source_batch_size``) and ``source_specs`` (name -> model, classes,
widths, checkpoint).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
from typing import Sequence

import ml_collections
import numpy as np

from l2t_jax.tools import runner

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
    ``nine`` (so the sorted class order is not the digits' order), images sampled without
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


def target_train_pool() -> int:
    """Images per class in the smallest target class's train pool (the most ``k`` can be)."""
    from sklearn.datasets import load_digits
    counts = np.bincount(load_digits().target)[list(TARGET_CLASSES)]
    return int(min(counts)) - (TARGET_VAL_PER_CLASS + TARGET_TEST_PER_CLASS)


# ---------------------------------------------------------------------- the runs' configs
def _base_config(config, data_dir: str, name: str, source: ml_collections.ConfigDict):
    """Settings shared by the source and the target runs; ``source`` is a spec of
    ``config.source_specs``."""
    from l2t_jax.training import config as run_config
    run = run_config.default_config()
    run.data.kind = "npz"
    run.data.name = name
    run.data.data_dir = data_dir
    run.data.official_split = ""
    run.data.num_classes = len(SOURCE_CLASSES)
    run.data.image_size = config.image_size
    run.data.hflip = False
    run.data.crop_padding = config.crop_padding
    run.eval_batch_size = 256
    run.lr_reference_batch_size = 0            # the recipe's rates are for its own batches
    run.checkpoint_every_steps = 10_000        # runs are short: checkpoint at epoch ends
    run.source_model = source.model
    run.source_num_classes = source.num_classes
    run.conv_impl = config.conv_impl
    overrides = {"target": {"widths": tuple(config.target_widths)}}
    if source.widths:
        overrides = {"source": {"widths": tuple(source.widths)}, **overrides}
    run.model_overrides = ml_collections.ConfigDict(overrides)
    return run


def source_run_config(config, data_dir: str, source: ml_collections.ConfigDict):
    """The pre-training of ``source`` (a spec without checkpoint) on digits 0-4, exported
    as a source checkpoint (``<workdir>/source``). ``data_dir``: :func:`write_digits_data`'s."""
    run = _base_config(config, os.path.join(data_dir, "source"), "digits-source", source)
    run.method = "scratch"
    run.target_model = source.model
    if source.widths:
        run.model_overrides.target = ml_collections.ConfigDict(
            {"widths": tuple(source.widths)})
    else:
        del run.model_overrides["target"]
    run.data.eval_splits = ("val",)
    run.seed = config.split_seed
    run.batch_size = config.source_batch_size
    run.epochs = config.source_epochs
    run.lr_schedule = "step"
    run.log_every_steps = 25
    run.export_source = True
    return run


def parse_entry(entry: str) -> tuple[str, str]:
    """A grid's method entry: ``'fm:one_to_one'`` -> ('fm', 'one_to_one'); ``'scratch'`` ->
    ('scratch', '')."""
    method, _, scheme = entry.partition(":")
    return method, scheme


def target_run_config(config, data_dir: str, source: ml_collections.ConfigDict,
                      source_checkpoint: str, entry: str, examples_per_class: int, seed: int,
                      settings: Sequence[tuple[str, object]] = ()):
    """One target run: method ``entry`` (``method[:scheme]``) with ``source`` (a spec of
    ``config.source_specs``, its converted checkpoint at ``source_checkpoint``) on
    ``examples_per_class`` labelled images per class sampled with ``seed``; ``settings``
    (run-config key, value) pairs replace the recipe's."""
    method, scheme = parse_entry(entry)
    run = _base_config(config, os.path.join(data_dir, "target"), "digits", source)
    run.method = method
    run.pairs = scheme or "single"
    run.source_checkpoint = source_checkpoint
    run.target_model = config.target_model
    run.data.train_examples_per_class = examples_per_class
    run.data.meta_val_per_class = config.meta_val_per_class
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
    for key, value in settings:
        run[key] = value
    return run


# ------------------------------------------------------------- what a workdir's runs share
@dataclasses.dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` made: the data directory and its images per split, and per
    source its converted checkpoint (and, for those pre-trained here, the val accuracy)."""

    data_dir: str
    sizes: dict
    checkpoints: dict
    source_val_accuracy: dict


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock file: the shards of a grid share the data and the sources."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare(config, workdir: str, sources: Sequence[str]) -> Prepared:
    """The data and the ``sources`` (names of ``config.source_specs``) of ``workdir``'s runs,
    made once under a lock (the shards of a grid share them):

    - ``workdir/data``: :func:`write_digits_data` of ``config.split_seed``, written once
      (``written.json`` records the split; a workdir of another split is refused);
    - a source whose spec has a checkpoint is resolved
      (:func:`l2t_jax.training.assets.resolve_source_checkpoint`: checked and converted
      once); one without is pre-trained on digits 0-4 in ``workdir/sources/<name>``
      (:func:`source_run_config`; a finished one is read) and exported there as
      ``source/``.
    """
    from l2t_jax.training import assets
    data_dir = os.path.join(workdir, "data")
    checkpoints, accuracies = {}, {}
    os.makedirs(workdir, exist_ok=True)
    with _locked(os.path.join(workdir, "sources.lock")):
        # Written once: a shard may be reading them (they are a function of split_seed).
        marker = os.path.join(data_dir, "written.json")
        if not os.path.isfile(marker):
            sizes = write_digits_data(data_dir, config.split_seed)
            with open(marker, "w") as f:
                json.dump({"split_seed": config.split_seed, "sizes": sizes}, f)
        with open(marker) as f:
            written = json.load(f)
        if written["split_seed"] != config.split_seed:
            raise ValueError(f"{data_dir} holds the split of another config.split_seed; "
                             "use a new workdir")
        logger.info("digits data: %s", written["sizes"])
        for name in sources:
            spec = config.source_specs[name]
            if spec.checkpoint:
                checkpoints[name] = assets.resolve_source_checkpoint(spec.checkpoint)
                continue
            source_dir = os.path.join(workdir, "sources", name)
            result = runner.run_once(source_run_config(config, data_dir, spec), source_dir)
            logger.info("source %s on digits 0-4: val accuracy %.2f%%", name,
                        result["best_val"])
            checkpoints[name] = os.path.join(source_dir, "source")
            accuracies[name] = result["best_val"]
    return Prepared(data_dir, written["sizes"], checkpoints, accuracies)

"""The training program: config checks, data, the loop, evaluation, metrics, checkpoints.

``train_and_evaluate(config, workdir)`` runs one experiment from a config (configs/*.py):
theta by SGD-momentum on a per-epoch cosine schedule, phi by Adam, one jitted bilevel step
per batch (:mod:`l2t_jax.bilevel`), evaluation on val and test after every epoch, and the
reported number: test accuracy at the best val accuracy (``workdir/result.json``).

Everything lands in ``workdir``: ``metrics.jsonl`` (one JSON object per log line),
TensorBoard event files (tensorboardX; no TensorFlow), ``checkpoints/`` (orbax: the whole
training state plus progress, every ``checkpoint_every_steps`` and at each epoch end, the
last ``keep_checkpoints`` kept), ``best/`` (target parameters at the best val accuracy),
``config.json`` and ``result.json``. Starting again with the same workdir resumes from the
latest checkpoint; batches are a pure function of (seed, epoch, index), so the resumed run
ends with the same parameters as an uninterrupted one.

Data parallel and multi-host through :mod:`l2t_jax.parallel`: the step runs under jit on a
mesh of every device (the batch split over ``data``, state and source replicated), each
process loads only its rows of every batch, and only process 0 writes files other than
checkpoints. With one device the numbers are those of a plain ``jax.jit``.

Faults (tests/test_faults.py injects each one):

- config and data errors raise ValueError / DataError / FileNotFoundError naming the key or
  file, before anything is compiled;
- the newest checkpoint unreadable: resume from the newest readable one (logged; the bad
  ones move to ``workdir/unreadable_checkpoints/``); a save that fails raises
  :class:`CheckpointError` naming the directory, the earlier checkpoints intact;
- SIGTERM: a checkpoint at the next step boundary, then :class:`Preempted`;
- non-finite losses, meta-gradients or parameters: :class:`DivergenceError` naming the step
  and the quantity (``config.on_nonfinite='stop'``), or the batch's update dropped inside
  the step (``'skip'``). The metrics of every step are checked at log steps and before
  every save (no host round trip per step), and the state before every save: no checkpoint
  holds a non-finite parameter.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from l2t_jax import (assets, bilevel, convert, convolution, data, logs, matching, methods,
                     models, parallel, provenance)
from l2t_jax.configs import default as configs_default

logger = logging.getLogger(__name__)

PyTree = Any
# Keys that may change between a run and its resumption.
RESUMABLE_KEYS = ("epochs", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                  "eval_batch_size", "export_source", "on_nonfinite", "jit_init")


# ------------------------------------------------------------------------------ config
def default_config() -> ml_collections.ConfigDict:
    """Every config key with its default (``l2t_jax/configs/default.py``)."""
    return configs_default.get_config()


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key for unknown keys and invalid values."""
    reference = default_config()

    def check_keys(given, expected, prefix=""):
        for key in given.keys():
            if key not in expected:
                raise ValueError(f"unknown config key {prefix}{key!r}; valid keys: "
                                 f"{', '.join(sorted(expected.keys()))}")
            if isinstance(expected[key], ml_collections.ConfigDict) and key != "model_overrides":
                check_keys(given[key], expected[key], f"{prefix}{key}.")

    check_keys(config, reference)
    if config.method not in methods.METHODS:
        raise ValueError(f"config.method={config.method!r} is not a method; valid: "
                         f"{', '.join(methods.METHODS)}")
    for key in ("source_model", "target_model"):
        if config[key] not in models.MODEL_NAMES:
            raise ValueError(f"config.{key}={config[key]!r} is not a model; valid: "
                             f"{', '.join(models.MODEL_NAMES)}")
    if config.lr_schedule not in ("cosine", "step"):
        raise ValueError(f"config.lr_schedule={config.lr_schedule!r}; valid: cosine, step")
    if not all(0 < f <= 1 for f in config.lr_decay_at):
        raise ValueError(f"config.lr_decay_at={config.lr_decay_at} must be fractions of the "
                         "epochs in (0, 1]")
    if config.data.train_examples_per_class < 0:
        raise ValueError("config.data.train_examples_per_class must be >= 0 (0 keeps all), "
                         f"got {config.data.train_examples_per_class}")
    if config.data.kind not in ("tfds", "image_folder", "npz"):
        raise ValueError(f"config.data.kind={config.data.kind!r}; valid: tfds, image_folder, npz")
    positive = ("batch_size", "eval_batch_size", "epochs", "log_every_steps",
                "checkpoint_every_steps", "keep_checkpoints")
    for key in positive:
        if config[key] < 1:
            raise ValueError(f"config.{key} must be >= 1, got {config[key]}")
    if config.T < 0:
        raise ValueError(f"config.T must be >= 0, got {config.T}")
    if config.batch_size % jax.device_count():
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                         f"{jax.device_count()} devices")
    for key in ("learning_rate", "meta_learning_rate"):
        if not (config[key] > 0 and math.isfinite(config[key])):
            raise ValueError(f"config.{key} must be finite and > 0, got {config[key]}")
    if config.on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"config.on_nonfinite={config.on_nonfinite!r}; valid: stop, skip")
    if config.conv_impl not in convolution.CONV_IMPLS:
        raise ValueError(f"config.conv_impl={config.conv_impl!r}; valid: "
                         f"{', '.join(convolution.CONV_IMPLS)}")
    for key in ("num_classes", "image_size"):
        if config.data[key] < 1:
            raise ValueError(f"config.data.{key} must be >= 1, got {config.data[key]}")
    if config.source_num_classes < 1:
        raise ValueError(f"config.source_num_classes must be >= 1, got "
                         f"{config.source_num_classes}")
    if config.data.crop_padding < 0:
        raise ValueError(f"config.data.crop_padding must be >= 0, got "
                         f"{config.data.crop_padding}")
    if not config.data.eval_splits:
        raise ValueError("config.data.eval_splits is empty: name the evaluation splits, "
                         "e.g. ('val', 'test') or ('test',)")
    build_networks(config)   # models, extra sources and pairs resolve


# -------------------------------------------------------------------------------- data
def _split_source(config, split: str):
    """One split. With an official split, train and val are index lists into the data set's
    training data and test one into its test data (the release's convention)."""
    data_config = config.data
    stored_split = split
    if data_config.official_split:
        stored_split = "test" if split == "test" else "train"
    if data_config.kind == "npz":
        source = data.npz_source(data_config.data_dir, stored_split)
    elif data_config.kind == "image_folder":
        source = data.ImageFolderSource(data_config.data_dir, stored_split,
                                        skip_corrupt=data_config.skip_corrupt)
    else:
        source = data.TfdsSource(data_config.name, stored_split, data_config.data_dir)
        if data_config.official_split:
            # TFDS stores records shuffled; the split lists index the original order.
            source.use_original_order()
    if not data_config.official_split:
        return source
    indices, classes = data.official_split(assets.release_dir(), data_config.official_split,
                                           split)
    return data.Subset(source, indices, classes)


def load_splits(config) -> dict:
    """{'train', 'val', 'test'} sources (val/test as listed in config.data.eval_splits).

    With ``config.data.train_examples_per_class`` the train split keeps that many examples
    of each class, drawn from the seed.
    """
    splits = {split: _split_source(config, split)
              for split in ("train",) + tuple(config.data.eval_splits)}
    if config.data.train_examples_per_class:
        splits["train"] = data.per_class_subset(
            splits["train"], config.data.train_examples_per_class, config.seed)
    return splits


# ------------------------------------------------------------------------------ models
EXTRA_SOURCE_KEYS = ("model", "num_classes", "checkpoint", "pairs", "model_overrides")


def source_specs(config) -> list[dict]:
    """Every source as {model, num_classes, checkpoint, pairs, model_overrides}: the
    config's own first, then ``config.extra_sources``."""
    specs = [{"model": config.source_model, "num_classes": config.source_num_classes,
              "checkpoint": config.source_checkpoint, "pairs": config.pairs,
              "model_overrides": dict(config.model_overrides.get("source", {}))}]
    for i, extra in enumerate(config.extra_sources):
        extra = dict(extra)
        unknown = sorted(set(extra) - set(EXTRA_SOURCE_KEYS))
        missing = sorted(set(EXTRA_SOURCE_KEYS[:4]) - set(extra))
        if unknown or missing:
            raise ValueError(f"config.extra_sources[{i}]: unknown keys {unknown}, missing keys "
                             f"{missing}; valid: {', '.join(EXTRA_SOURCE_KEYS)}")
        if extra["model"] not in models.MODEL_NAMES:
            raise ValueError(f"config.extra_sources[{i}].model={extra['model']!r} is not a "
                             f"model; valid: {', '.join(models.MODEL_NAMES)}")
        if extra["pairs"] == "as_primary":    # the same scheme as the first source
            extra["pairs"] = config.pairs
        specs.append({"model_overrides": {}, **extra})
    return specs


def _get_model(name: str, num_classes: int, conv_impl: str, overrides: dict, where: str):
    """models.get_model, with a bad override reported as a ValueError naming ``where``."""
    widths = overrides.get("widths")
    if widths is not None and not all(isinstance(w, int) and w >= 1 for w in widths):
        raise ValueError(f"{where}.widths={tuple(widths)}: widths must be integers >= 1")
    try:
        model = models.get_model(name, num_classes, conv_impl=conv_impl, **overrides)
        model.feature_taps()          # overrides such as widths must fit the network
    except (TypeError, IndexError, ValueError) as e:
        if not overrides:
            raise
        raise ValueError(f"{where}={overrides} does not fit {name} ({type(e).__name__}: "
                         f"{e})") from None
    return model


def build_networks(config):
    """The config's networks, without weights.

    Returns (source model, target model, pairs, source specs). The source model is None for
    methods that use no source, a :class:`~l2t_jax.models.MultiSource` with extra sources
    (pairs then index the concatenated taps); pairs are resolved per source from schemes.
    """
    target = _get_model(config.target_model, config.data.num_classes, config.conv_impl,
                        dict(config.model_overrides.get("target", {})),
                        "config.model_overrides.target")
    if not methods.get_method(config.method).uses_source:
        return None, target, (), []
    specs = source_specs(config)
    sources = [_get_model(spec["model"], spec["num_classes"], config.conv_impl,
                          spec["model_overrides"],
                          "config.model_overrides.source" if i == 0 else
                          f"config.extra_sources[{i - 1}].model_overrides")
               for i, spec in enumerate(specs)]
    pairs, offset = [], 0
    for i, (spec, source) in enumerate(zip(specs, sources)):
        if methods.uses_pairs(config.method):
            where = "config.pairs" if i == 0 else f"config.extra_sources[{i - 1}].pairs"
            try:
                local = matching.resolve_pairs(spec["pairs"], source, target)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            pairs += [(m + offset, n) for m, n in local]
        offset += len(source.feature_taps())
    source = sources[0] if len(sources) == 1 else models.MultiSource(tuple(sources))
    return source, target, tuple(pairs), specs


def build_transfer(config) -> bilevel.Transfer:
    """The config's :class:`~l2t_jax.bilevel.Transfer` (method, networks, pairs, hyper)."""
    source, target, pairs, _ = build_networks(config)
    return methods.build_transfer(
        config.method, source, target, pairs,
        channel_weighting=config.channel_weighting,
        pair_weight_type=config.pair_weight_type or None,
        pair_weight_init=config.pair_weight_init, at_weight=config.at_weight,
        lwf_weight=config.lwf_weight, lwf_temperature=config.lwf_temperature,
        conv_impl=config.conv_impl, inner_steps=config.T, beta=config.beta,
        momentum=config.momentum, weight_decay=config.weight_decay,
        meta_learning_rate=config.meta_learning_rate,
        meta_weight_decay=config.meta_weight_decay, remat=config.remat,
        unroll_inner=config.unroll_inner,
        replay_bn_update=config.replay_bn_update)


def load_source_variables(config, transfer: bilevel.Transfer) -> PyTree:
    """The frozen source's variables from each source's checkpoint ({} without a source).

    ``random-init`` (smoke tests and timing only) initialises that source randomly.
    """
    if transfer.source_model is None:
        return {}
    specs = source_specs(config)
    parts = (transfer.source_model.sources if isinstance(transfer.source_model,
                                                         models.MultiSource)
             else (transfer.source_model,))
    size = config.data.image_size
    loaded = []
    for i, (spec, model) in enumerate(zip(specs, parts)):
        if spec["checkpoint"] == "random-init":
            logger.warning("source %d (%s): random-init, the source network is untrained",
                            i, spec["model"])
            loaded.append(model.init(jax.random.key(config.seed + 7 + i),
                                     jnp.zeros((1, size, size, 3)), train=False))
        else:
            path = assets.resolve_source_checkpoint(spec["checkpoint"])
            if os.path.isfile(path):
                raise ValueError(
                    f"source {i} ({spec['model']}): {path!r} is a file; the source must be "
                    "converted once: python -m l2t_jax.convert --model "
                    f"{spec['model']} --checkpoint {path} --output DIR (needs the [convert] "
                    "extra), then --config.source_checkpoint=DIR")
            if not os.path.isdir(path):
                raise FileNotFoundError(
                    f"source {i} ({spec['model']}): no checkpoint at {path!r}. Convert a "
                    "PyTorch one with python -m l2t_jax.convert, or train one with a "
                    "configs/pretrain_*.py config (it writes WORKDIR/source)")
            _, variables, _ = convert.load_converted(
                path, expect_model=spec["model"], expect_num_classes=spec["num_classes"])
            loaded.append(variables)
    if len(loaded) == 1:
        return loaded[0]
    return {collection: {f"sources_{i}": variables[collection]
                         for i, variables in enumerate(loaded)}
            for collection in ("params", "batch_stats")}


def learning_rate_schedule(config, steps_per_epoch: int):
    """theta's learning rate as a function of the step (``config.lr_schedule``)."""
    if config.lr_schedule == "step":
        return step_learning_rate(config.learning_rate, config.epochs, steps_per_epoch,
                                  config.lr_decay_at, config.lr_decay_factor)
    return cosine_learning_rate(config.learning_rate, config.epochs, steps_per_epoch)


def step_learning_rate(base: float, epochs: int, steps_per_epoch: int,
                       decay_at: tuple[float, ...], factor: float):
    """PyTorch's MultiStepLR with milestones at ``round(f * epochs)`` for f in decay_at:
    epoch e trains at base * factor ** (number of milestones <= e)."""
    milestones = jnp.asarray([round(f * epochs) for f in decay_at])

    def learning_rate(step):
        epoch = step // steps_per_epoch
        return base * factor ** jnp.sum(milestones <= epoch)
    return learning_rate


def cosine_learning_rate(base: float, epochs: int, steps_per_epoch: int):
    """The reference's CosineAnnealingLR(T_max=epochs), stepped at the start of each epoch:
    epoch e trains at base * (1 + cos(pi * (e + 1) / epochs)) / 2."""
    def learning_rate(step):
        epoch = step // steps_per_epoch
        return base * 0.5 * (1.0 + jnp.cos(jnp.pi * (epoch + 1) / epochs))
    return learning_rate


# ------------------------------------------------------------------------- bookkeeping
class DivergenceError(FloatingPointError):
    """A non-finite loss, meta-gradient or parameter with ``config.on_nonfinite='stop'``;
    the message names the step and the quantity. Nothing non-finite was checkpointed."""


class CheckpointError(OSError):
    """A checkpoint could not be written, or no checkpoint of a workdir can be read; the
    message names the directory."""


class Preempted(Exception):
    """SIGTERM (preemption) stopped the run at a step boundary after saving a checkpoint;
    running the same command again resumes from it. :mod:`l2t_jax.main` exits with
    :data:`PREEMPTED_EXIT_CODE` on it (non-zero: the run is not finished)."""

    def __init__(self, step: int, directory: str):
        super().__init__(f"stopped by SIGTERM after step {step}: saved a checkpoint of step "
                         f"{step} in {directory}; run the same command again to resume")
        self.step = step


PREEMPTED_EXIT_CODE = 128 + 15     # what a shell reports for a process ended by SIGTERM
# Per-step metrics whose non-finite value stops (or skips) a step.
WATCHED_METRICS = ("ce", "matching", "adapt_ce", "sim_matching", "meta_loss",
                   "meta_grad_norm")


class MetricLog:
    """metrics.jsonl plus TensorBoard events (tensorboardX, if installed)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        try:
            from tensorboardX import SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # pragma: no cover - optional
            self.tensorboard = None

    def write(self, step: int, values: dict) -> None:
        flat = {}
        for key, value in values.items():
            value = np.asarray(value)
            if value.ndim == 0:
                flat[key] = float(value)
            else:
                for i, v in enumerate(value.ravel()):
                    flat[f"{key}/{i}"] = float(v)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **flat}) + "\n")
        if self.tensorboard is not None:
            for key, value in flat.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()

    def write_run(self, step: int, run: dict) -> None:
        """The record that opens each start of a run: ``{"step": step, "run": run}``
        (:func:`l2t_jax.provenance.run_metadata`)."""
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "run": run}) + "\n")

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class _NoLog:
    """The metric log of processes other than 0: writes nothing."""

    def write(self, step: int, values: dict) -> None:
        pass

    def write_run(self, step: int, run: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _barrier(name: str) -> None:
    """All processes wait here (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _checkpoint_manager(workdir: str, keep: int):
    import orbax.checkpoint as ocp
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        item_names=("state", "progress"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False,
                                             # a save killed before its commit leaves a
                                             # tmp directory: removed at the next start
                                             cleanup_tmp_directories=True))


def _config_for_comparison(config) -> dict:
    values = json.loads(config.to_json())
    return {k: v for k, v in values.items() if k not in RESUMABLE_KEYS}


def _check_same_config(config, workdir: str) -> None:
    """Refuses to resume a workdir written by another config, naming the differing keys."""
    config_path = os.path.join(workdir, "config.json")
    try:
        with open(config_path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{workdir} has checkpoints but no config.json, so it cannot be "
                         "checked against this config; use a new workdir") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON ({e}); use a new workdir") from None
    current = _config_for_comparison(config)
    differing = sorted(k for k in set(saved) | set(current)
                       if k not in RESUMABLE_KEYS and saved.get(k) != current.get(k))
    if differing:
        raise ValueError(f"{workdir} holds a run with another config (keys differ: "
                         f"{', '.join(differing)}); use a new workdir")


def _restore_latest_readable(manager, abstract_state, workdir: str):
    """Restores the newest checkpoint that can be read: (state, progress).

    A checkpoint that fails to restore (truncated or corrupt files) is logged and the one
    before it tried; the unreadable ones are moved to ``workdir/unreadable_checkpoints/``
    (never deleted) so that the resumed run can save those steps again.

    Raises:
      CheckpointError: no checkpoint can be read.
    """
    import orbax.checkpoint as ocp
    directory = str(manager.directory)
    unreadable = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                progress=ocp.args.JsonRestore()))
        except Exception as e:   # orbax / tensorstore raise several types for bad files
            message = str(e).splitlines()[0][:300] if str(e) else ""
            logger.warning("checkpoint %d in %s cannot be read (%s: %s); trying the one "
                            "before it", step, directory, type(e).__name__, message)
            unreadable.append((step, f"{type(e).__name__}: {message}"))
            continue
        if unreadable:
            aside = os.path.join(os.path.abspath(workdir), "unreadable_checkpoints")
            if parallel.is_main_process():
                os.makedirs(aside, exist_ok=True)
                for bad, _ in unreadable:
                    target = os.path.join(aside, f"{bad}-{int(time.time())}")
                    os.rename(os.path.join(directory, str(bad)), target)
            _barrier("l2t_moved_unreadable_checkpoints")
            manager.reload()
            logger.warning("resumed from checkpoint %d, the newest readable one; the "
                            "unreadable checkpoints %s were moved to %s", step,
                            [bad for bad, _ in unreadable], aside)
        return restored["state"], restored["progress"]
    raise CheckpointError(f"no checkpoint in {directory} can be read: "
                          + "; ".join(f"step {s}: {why}" for s, why in unreadable)
                          + ". Move the directory away to start the run over")


def _newest_checkpoint(manager) -> str:
    step = manager.latest_step()
    if step is None:
        return f"No checkpoint was written yet (in {manager.directory})"
    return f"The newest checkpoint (step {step}, in {manager.directory}) holds finite parameters"


def _all_finite(tree: PyTree) -> jax.Array:
    """Whether every float leaf of ``tree`` is finite (a traced bool scalar)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def skip_nonfinite(step_fn: Callable) -> Callable:
    """Wraps ``step_fn(state, ...) -> (state, metrics)`` so that a step whose watched
    metrics (:data:`WATCHED_METRICS`) or new state are not all finite keeps the old state
    (only the step counter advances). Adds the metric ``skipped`` (1 if skipped, else 0).
    Inside jit: a select, no host round trip."""
    def step(state, *args):
        new_state, metrics = step_fn(state, *args)
        finite = _all_finite(([metrics[k] for k in WATCHED_METRICS if k in metrics],
                              new_state))
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        metrics = dict(metrics, skipped=jnp.logical_not(finite).astype(jnp.int32))
        return kept.replace(step=new_state.step), metrics
    return step


def _nonfinite(metrics: dict) -> list[str]:
    """Names of the watched metrics that are not finite."""
    return [k for k in WATCHED_METRICS
            if k in metrics and not np.all(np.isfinite(np.asarray(metrics[k])))]


class _StopRequest:
    """SIGTERM (preemption) -> stop at the next step boundary.

    One process: a handler that only sets a flag (restored by :meth:`close`). Several
    processes: they must stop at the same step, so jax's preemption sync point decides
    (its service catches SIGTERM in every process and agrees on a step).
    """

    def __init__(self):
        self.received = False
        self.previous = None
        self.multiprocess = jax.process_count() > 1
        if self.multiprocess:
            from jax._src import distributed
            if distributed.global_state.preemption_sync_manager is None:
                logger.warning("jax's preemption service is off: SIGTERM will not save a "
                                "checkpoint before the processes end")
                self.multiprocess = None
        elif threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if self.received:       # a second SIGTERM ends the process at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.received = True

    def requested(self, step: int) -> bool:
        if self.multiprocess:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def evaluate(eval_step, variables, source, config, mesh) -> float:
    """Top-1 accuracy (%) of the target on ``source`` (eval-mode BN).

    Batches of ``eval_batch_size`` rounded up to a multiple of the device count, split over
    the mesh; each process loads only its rows, and rows past the end of the data are
    padding (label -1, not counted). One shape for every batch: no recompilation.
    """
    batch = -(-config.eval_batch_size // mesh.size) * mesh.size
    rows = parallel.process_batch_slice(batch, mesh)
    examples = data.eval_examples(source, config.data.image_size)
    size = config.data.image_size
    counts = []
    for start in range(0, len(source), batch):
        images, labels = [], []
        for position in range(start + rows.start, start + rows.stop):
            if position < len(source):
                image, label = examples[position]
            else:
                image, label = np.zeros((size, size, 3), np.float32), -1
            images.append(image)
            labels.append(label)
        images, labels = parallel.global_batch(mesh, np.stack(images),
                                               np.asarray(labels, np.int32))
        counts.append(eval_step(variables, images, labels))
    return 100.0 * sum(int(c) for c in jax.device_get(counts)) / len(source)


def _load_rows(examples, index: int, batch_size: int, rows: slice):
    """Rows ``rows`` of global batch ``index``: the examples at positions
    ``index * batch_size + rows.start ... index * batch_size + rows.stop - 1``."""
    local = [examples[index * batch_size + r] for r in range(rows.start, rows.stop)]
    return np.stack([image for image, _ in local]), np.stack([label for _, label in local])


# ---------------------------------------------------------------------------- the loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) the experiment in ``workdir``; returns the result dict.

    Data parallel over every device of every process (:mod:`l2t_jax.parallel`): the batch
    is split over the mesh axis ``data``, the state and the source are replicated. Only
    process 0 writes metrics, logs and JSON files; every process takes part in the
    checkpoints.

    Raises:
      ValueError (also data.DataError), FileNotFoundError: config and data errors, before
        anything is compiled.
      DivergenceError: a non-finite loss, meta-gradient or parameter, with
        ``config.on_nonfinite='stop'``.
      CheckpointError: a checkpoint could not be saved (earlier ones are kept), or none of
        the workdir's can be read.
      Preempted: SIGTERM; a checkpoint was saved at the step where the run stopped.
    """
    import orbax.checkpoint as ocp
    parallel.maybe_initialize_distributed()   # a no-op unless launched as several processes
    validate_config(config)
    main_process = parallel.is_main_process()
    os.makedirs(workdir, exist_ok=True)
    splits = load_splits(config)
    if main_process:
        logger.info("data %s (%s): %s examples", config.data.name, config.data.kind,
                    ", ".join(f"{split} {len(source)}" for split, source in splits.items()))
    transfer = build_transfer(config)
    source_variables = load_source_variables(config, transfer)
    bilevel.check_source_variables(transfer, source_variables)
    if main_process:
        logger.info("%s: %s%s -> %s, %d pairs", config.method,
                    config.source_model if transfer.source_model is not None else "no source",
                    f" ({config.source_checkpoint})" if transfer.source_model is not None
                    else "", config.target_model, len(transfer.pairs))
    steps_per_epoch = (config.steps_per_epoch if config.steps_per_epoch > 0
                       else len(splits["train"]) // config.batch_size)
    if steps_per_epoch < 1:
        raise ValueError(f"the train split has {len(splits['train'])} examples, fewer than "
                         f"one batch of {config.batch_size}; set config.steps_per_epoch to "
                         "repeat the data within an epoch")
    total_steps = steps_per_epoch * config.epochs
    learning_rate_fn = learning_rate_schedule(config, steps_per_epoch)
    size, batch_size = config.data.image_size, config.batch_size
    mesh = parallel.make_mesh()
    rows = parallel.process_batch_slice(batch_size, mesh)
    logger.info("data parallel over %d devices (%d processes); process %d loads rows "
                 "%d-%d of each batch of %d", mesh.size, jax.process_count(),
                 jax.process_index(), rows.start, rows.stop - 1, batch_size)
    init = functools.partial(bilevel.init_state, transfer, jax.random.key(config.seed),
                             (size, size, 3), jit=config.jit_init)

    manager = _checkpoint_manager(workdir, config.keep_checkpoints)
    progress = {"epoch": 0, "best_val": -1.0, "test_at_best": -1.0, "best_epoch": -1,
                "wall_seconds": 0.0, "skipped_steps": 0}
    if manager.latest_step() is not None:
        _check_same_config(config, workdir)
        abstract = parallel.abstract_replicated(mesh, jax.eval_shape(init))
        state, restored_progress = _restore_latest_readable(manager, abstract, workdir)
        progress.update(restored_progress)
        logger.info("resumed from step %d", int(state.step))
    else:
        if main_process:
            logger.info("initialising the training state (seed %d)...", config.seed)
        state = parallel.replicate(mesh, init())   # the same seed in every process
        if main_process:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                json.dump(_config_for_comparison(config), f, indent=1)
    source_variables = parallel.replicate(mesh, source_variables)

    step = functools.partial(bilevel.train_step, transfer, learning_rate_fn)
    if config.on_nonfinite == "skip":
        step = skip_nonfinite(step)
    step_fn = parallel.jit_sharded_step(step, mesh)
    replicated = parallel.replicated_sharding(mesh)
    state_is_finite = jax.jit(_all_finite, out_shardings=replicated)

    def eval_fn(variables, images, labels):
        logits, _ = transfer.target_model.apply(variables, images, train=False)
        return jnp.sum((jnp.argmax(logits, -1) == labels) & (labels >= 0))
    eval_step = jax.jit(eval_fn, out_shardings=replicated,
                        in_shardings=(replicated, parallel.batch_sharding(mesh),
                                      parallel.batch_sharding(mesh)))

    pending = []     # (step, metrics on device) not yet checked for non-finite values

    def check_pending() -> list:
        """Fetches the metrics of the steps since the last check (one transfer, no sync
        per step); stops at the first non-finite one (``on_nonfinite='stop'``) or counts
        the skipped steps (``'skip'``). Returns [(step, host metrics)]."""
        checked = jax.device_get(pending)
        pending.clear()
        for done, metrics in checked:
            bad = _nonfinite(metrics)
            if config.on_nonfinite == "skip":
                progress["skipped_steps"] += int(metrics["skipped"])
            elif bad:
                values = ", ".join(f"{k}={np.ravel(metrics[k]).tolist()}" for k in bad)
                raise DivergenceError(
                    f"non-finite {', '.join(bad)} at step {done} ({values}); stopped "
                    f"(config.on_nonfinite='stop'). {_newest_checkpoint(manager)}: lower "
                    "the learning rates, or rerun with --config.on_nonfinite=skip to skip "
                    "such batches")
        return checked

    def save(state, progress):
        check_pending()
        done = int(state.step)
        if not bool(state_is_finite(state)):
            raise DivergenceError(f"non-finite parameters at step {done} although every "
                                  f"watched loss was finite; not saved. "
                                  f"{_newest_checkpoint(manager)}")
        progress["wall_seconds"] = wall_before + time.time() - started
        try:
            manager.save(done, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)),
                force=True)
            manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(
                f"could not save the checkpoint of step {done} in {manager.directory} "
                f"({type(e).__name__}: {e}). The earlier checkpoints (steps "
                f"{list(manager.all_steps())}) are intact: fix the directory (space, "
                "permissions) and run the same command again to resume") from e

    log = MetricLog(workdir) if main_process else _NoLog()
    run_info = provenance.run_metadata()
    stop = _StopRequest()
    start_step, started = int(state.step), time.time()
    log.write_run(start_step, run_info)
    wall_before = progress.get("wall_seconds", 0.0)
    examples, examples_epoch = None, None
    compiled_step, stepping_since = None, None   # the clock of the ETA starts after compiling
    try:
        for step in range(start_step, total_steps):
            epoch, index = divmod(step, steps_per_epoch)
            if examples_epoch != epoch:
                examples = data.train_examples(
                    splits["train"], size, config.seed, epoch, hflip=config.data.hflip,
                    crop_padding=config.data.crop_padding,
                    min_examples=steps_per_epoch * batch_size)
                examples_epoch = epoch
            images, labels = parallel.global_batch(
                mesh, *_load_rows(examples, index, batch_size, rows))
            if compiled_step is None:
                compiled_step = compile_with_notice(
                    f"training step ({config.method}, T={config.T})" if
                    transfer.meta_networks is not None else f"training step ({config.method})",
                    step_fn, state, source_variables, images, labels, notify=main_process)
                stepping_since = time.time()
            state, metrics = compiled_step(state, source_variables, images, labels)
            done = step + 1
            pending.append((done, metrics))
            saved = False
            if (done % config.log_every_steps == 0 or done == total_steps
                    or len(pending) >= 256):
                skipped_before = progress["skipped_steps"]
                metrics = check_pending()[-1][1]
                if done % config.log_every_steps == 0 or done == total_steps:
                    if config.on_nonfinite == "skip":
                        metrics = dict(metrics, skipped=progress["skipped_steps"] -
                                       skipped_before, skipped_total=progress["skipped_steps"])
                    log.write(done, {f"train/{k}": v for k, v in metrics.items()})
                    rate = (done - start_step) / (time.time() - stepping_since)
                    if main_process:
                        logger.info(
                            "step %d/%d (epoch %d) ce %.4f transfer %.4f%s%s | %.2f steps/s, "
                            "ETA %s", done, total_steps, epoch, metrics["ce"],
                            metrics["matching"],
                            f" meta {metrics['meta_loss']:.4f}" if "meta_loss" in metrics
                            else "",
                            f" | skipped {progress['skipped_steps']} steps"
                            if progress["skipped_steps"] else "",
                            rate, logs.duration((total_steps - done) / rate))
            if done % steps_per_epoch == 0:
                check_pending()
                variables = {"params": state.target_params["model"],
                             "batch_stats": state.batch_stats}
                accuracies = {split: evaluate(eval_step, variables, splits[split], config,
                                              mesh)
                              for split in config.data.eval_splits}
                progress["epoch"] = epoch + 1
                val = accuracies.get("val", accuracies[config.data.eval_splits[0]])
                if val > progress["best_val"]:
                    progress.update(best_val=val, test_at_best=accuracies.get("test", val),
                                    best_epoch=epoch)
                    _save_best(workdir, variables)
                log.write(done, {f"eval/{k}": v for k, v in accuracies.items()})
                if main_process:
                    logger.info("epoch %d: %s | best val %.2f (test %.2f)", epoch,
                                 " ".join(f"{k} {v:.2f}" for k, v in accuracies.items()),
                                 progress["best_val"], progress["test_at_best"])
                save(state, progress)
                saved = True
            elif done % config.checkpoint_every_steps == 0:
                save(state, progress)
                saved = True
            if done < total_steps and stop.requested(done):
                if not saved:
                    save(state, progress)
                preempted = Preempted(done, str(manager.directory))
                logger.warning("%s", preempted)
                raise preempted
    finally:
        stop.close()
        log.close()
    manager.wait_until_finished()
    if transfer.meta_networks is not None and main_process:
        _write_transfer_weights(workdir, transfer, state, source_variables,
                                splits[config.data.eval_splits[0]], config)
    if config.export_source:
        _export_source(workdir, config, mesh)
    result = {"test_at_best_val": progress["test_at_best"], "best_val": progress["best_val"],
              "best_epoch": progress["best_epoch"], "steps": total_steps,
              "dataset": config.data.name, "source": config.source_model,
              "target": config.target_model, "seed": config.seed, "method": config.method,
              "scheme": str(config.pairs), "pairs": [list(p) for p in transfer.pairs],
              "train_examples_per_class": config.data.train_examples_per_class,
              "train_examples": len(splits["train"]),
              "extra_sources": [dict(s)["model"] for s in config.extra_sources],
              "skipped_steps": progress["skipped_steps"],
              "wall_seconds": round(wall_before + time.time() - started, 1),
              "run": run_info}
    if main_process:
        path = os.path.join(workdir, "result.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        logger.info("test accuracy %.2f%% at the best val accuracy %.2f%% (epoch %d); "
                    "wrote %s", result["test_at_best_val"], result["best_val"],
                    result["best_epoch"], path)
    return result


def compile_with_notice(what: str, jitted: Callable, *args, notify: bool = True):
    """``jitted.lower(*args).compile()``, logged before and after: on a CPU the first
    compile of a step can take minutes, and a silent program looks hung."""
    if notify:
        logger.info("compiling the %s...", what)
    started = time.time()
    compiled = jitted.lower(*args).compile()
    if notify:
        logger.info("compiled the %s in %s", what, logs.duration(time.time() - started))
    return compiled


def _write_transfer_weights(workdir, transfer, state, source_variables, split, config,
                            max_batches: int = 4) -> None:
    """transfer_weights.json: what phi learned, as mean meta-network outputs over (up to
    ``max_batches``) evaluation batches: per pair the mean lambda and the mean channel
    weights, with the pairs and the taps' channel counts (for l2t_jax.plots)."""
    # Host copies of the replicated arrays: process 0 computes this alone, on its devices.
    meta_params, source_variables = jax.device_get((state.meta_params, source_variables))

    # The weights are arguments, not constants, and every batch has one shape (the last is
    # padded): one compilation per run, which the persistent compilation cache (when on, as
    # in the demo and the tests) shares between runs of the same networks.
    @jax.jit
    def weights(meta_params, source_variables, images):
        _, features = transfer.source_model.apply(source_variables, images, train=False)
        pooled = tuple(jnp.mean(f, axis=(1, 2)) for f in features)
        return transfer.meta_networks.apply({"params": meta_params}, pooled)

    sums, count = None, 0
    for b, (images, _) in enumerate(data.eval_batches(split, config.eval_batch_size,
                                                      config.data.image_size)):
        if b == max_batches:
            break
        rows = len(images)
        padded = np.zeros((config.eval_batch_size, *images.shape[1:]), images.dtype)
        padded[:rows] = images
        channel, pair = jax.device_get(weights(meta_params, source_variables, padded))
        batch_sums = jax.tree.map(lambda w: np.sum(w[:rows], axis=0), (channel, pair))
        sums = batch_sums if sums is None else jax.tree.map(np.add, sums, batch_sums)
        count += rows
    channel, pair = jax.tree.map(lambda w: (w / count).tolist(), sums)
    with open(os.path.join(workdir, "transfer_weights.json"), "w") as f:
        json.dump({"pairs": [list(p) for p in transfer.pairs],
                   "source_taps": [t.channels for t in transfer.source_model.feature_taps()],
                   "target_taps": [t.channels for t in transfer.target_model.feature_taps()],
                   "pair_weights": pair, "channel_weights": channel}, f)


def _export_source(workdir: str, config, mesh) -> None:
    """workdir/source: the best target as a source checkpoint (l2t_jax.convert's format).
    Every process takes part (orbax synchronises them)."""
    import shutil
    import orbax.checkpoint as ocp
    target = models.get_model(config.target_model, config.data.num_classes,
                              **dict(config.model_overrides.get("target", {})))
    abstract = parallel.abstract_replicated(mesh, models.abstract_variables(target))
    variables = ocp.StandardCheckpointer().restore(
        os.path.join(os.path.abspath(workdir), "best"), abstract)
    path = os.path.join(os.path.abspath(workdir), "source")
    if os.path.exists(path) and parallel.is_main_process():
        shutil.rmtree(path)
    _barrier("l2t_export_source")
    convert.save_converted(path, variables, {
        "model": config.target_model, "num_classes": config.data.num_classes,
        "source_dataset": config.data.name,
        "model_overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in
                            dict(config.model_overrides.get("target", {})).items()},
        "trained_by": "l2t_jax.train"})
    logger.info("exported the best target as a source checkpoint: %s", path)


def _save_best(workdir: str, variables: PyTree) -> None:
    """workdir/best: the target's variables (replaced). Every process calls it (orbax
    writes each replicated array once)."""
    import orbax.checkpoint as ocp
    path = os.path.join(os.path.abspath(workdir), "best")
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(path, variables, force=True)
        checkpointer.wait_until_finished()
    except Exception as e:
        raise CheckpointError(f"could not save the best target in {path} "
                              f"({type(e).__name__}: {e})") from e

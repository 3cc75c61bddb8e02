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
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from l2t_jax import assets, bilevel, convert, data, matching, methods, models

PyTree = Any
# Keys that may change between a run and its resumption.
RESUMABLE_KEYS = ("epochs", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                  "eval_batch_size", "export_source")


# ------------------------------------------------------------------------------ config
def default_config() -> ml_collections.ConfigDict:
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "default.py")
    spec = importlib.util.spec_from_file_location("l2t_default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


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
    methods.get_method(config.method)
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
        if not config[key] > 0:
            raise ValueError(f"config.{key} must be > 0, got {config[key]}")
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


def build_networks(config):
    """The config's networks, without weights.

    Returns (source model, target model, pairs, source specs). The source model is None for
    methods that use no source, a :class:`~l2t_jax.models.MultiSource` with extra sources
    (pairs then index the concatenated taps); pairs are resolved per source from schemes.
    """
    target = models.get_model(config.target_model, config.data.num_classes,
                              conv_impl=config.conv_impl,
                              **dict(config.model_overrides.get("target", {})))
    if not methods.get_method(config.method).uses_source:
        return None, target, (), []
    specs = source_specs(config)
    sources = [models.get_model(spec["model"], spec["num_classes"], conv_impl=config.conv_impl,
                                **spec["model_overrides"]) for spec in specs]
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
            logging.warning("source %d (%s): random-init, the source network is untrained",
                            i, spec["model"])
            loaded.append(model.init(jax.random.key(config.seed + 7 + i),
                                     jnp.zeros((1, size, size, 3)), train=False))
        else:
            path = assets.resolve_source_checkpoint(spec["checkpoint"])
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


def _checkpoint_manager(workdir: str, keep: int):
    import orbax.checkpoint as ocp
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        item_names=("state", "progress"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))


def _config_for_comparison(config) -> dict:
    values = json.loads(config.to_json())
    return {k: v for k, v in values.items() if k not in RESUMABLE_KEYS}


def evaluate(eval_step, variables, source, config) -> float:
    """Top-1 accuracy (%) of the target on ``source`` (eval-mode BN)."""
    correct = 0
    for images, labels in data.eval_batches(source, config.eval_batch_size,
                                            config.data.image_size):
        padded = config.eval_batch_size - len(labels)   # one shape: no recompilation
        images = np.pad(images, ((0, padded), (0, 0), (0, 0), (0, 0)))
        mask = np.arange(config.eval_batch_size) < len(labels)
        labels = np.pad(labels, (0, padded))
        correct += int(eval_step(variables, images, labels, mask))
    return 100.0 * correct / len(source)


# ---------------------------------------------------------------------------- the loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) the experiment in ``workdir``; returns the result dict."""
    import orbax.checkpoint as ocp
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    splits = load_splits(config)
    transfer = build_transfer(config)
    source_variables = load_source_variables(config, transfer)
    bilevel.check_source_variables(transfer, source_variables)
    steps_per_epoch = (config.steps_per_epoch if config.steps_per_epoch > 0
                       else len(splits["train"]) // config.batch_size)
    if steps_per_epoch < 1:
        raise ValueError(f"the train split has {len(splits['train'])} examples, fewer than "
                         f"one batch of {config.batch_size}; set config.steps_per_epoch to "
                         "repeat the data within an epoch")
    total_steps = steps_per_epoch * config.epochs
    learning_rate_fn = learning_rate_schedule(config, steps_per_epoch)
    size = config.data.image_size
    state = bilevel.init_state(transfer, jax.random.key(config.seed), (size, size, 3))

    manager = _checkpoint_manager(workdir, config.keep_checkpoints)
    config_path = os.path.join(workdir, "config.json")
    progress = {"epoch": 0, "best_val": -1.0, "test_at_best": -1.0, "best_epoch": -1,
                "wall_seconds": 0.0}
    if manager.latest_step() is not None:
        with open(config_path) as f:
            saved = json.load(f)
        current = _config_for_comparison(config)
        differing = sorted(k for k in set(saved) | set(current)
                           if k not in RESUMABLE_KEYS and saved.get(k) != current.get(k))
        if differing:
            raise ValueError(f"{workdir} holds a run with another config (keys differ: "
                             f"{', '.join(differing)}); use a new workdir")
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()))
        state, progress = restored["state"], restored["progress"]
        logging.info("resumed from step %d", int(state.step))
    else:
        with open(config_path, "w") as f:
            json.dump(_config_for_comparison(config), f, indent=1)

    def save(state, progress):
        progress["wall_seconds"] = wall_before + time.time() - started
        manager.save(int(state.step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)),
            force=True)

    step_fn = bilevel.jit_train_step(transfer, learning_rate_fn)

    @jax.jit
    def eval_step(variables, images, labels, mask):
        logits, _ = transfer.target_model.apply(variables, images, train=False)
        return jnp.sum((jnp.argmax(logits, -1) == labels) & mask)

    log = MetricLog(workdir)
    start_step, started = int(state.step), time.time()
    wall_before = progress.get("wall_seconds", 0.0)
    dataset, dataset_epoch = None, None
    for step in range(start_step, total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        if dataset_epoch != epoch:
            dataset = data.train_batches(splits["train"], config.batch_size, size,
                                         config.seed, epoch, hflip=config.data.hflip,
                                         crop_padding=config.data.crop_padding,
                                         min_batches=steps_per_epoch)
            dataset_epoch = epoch
        images, labels = dataset[index]
        state, metrics = step_fn(state, source_variables, images, labels)
        done = step + 1
        if done % config.log_every_steps == 0 or done == total_steps:
            metrics = jax.device_get(metrics)
            log.write(done, {f"train/{k}": v for k, v in metrics.items()})
            rate = (done - start_step) / (time.time() - started)
            logging.info("step %d/%d (epoch %d) ce %.4f transfer %.4f%s | %.2f steps/s, "
                         "ETA %.0f min", done, total_steps, epoch, metrics["ce"],
                         metrics["matching"],
                         f" meta {metrics['meta_loss']:.4f}" if "meta_loss" in metrics else "",
                         rate, (total_steps - done) / rate / 60)
            if not all(np.isfinite(metrics[k]) for k in ("ce", "matching", "meta_loss",
                                                          "meta_grad_norm") if k in metrics):
                raise FloatingPointError(f"non-finite loss at step {done}: "
                                         f"{ {k: float(np.ravel(v)[0]) for k, v in metrics.items()} }"
                                         "; the last checkpoint is kept")
        if done % steps_per_epoch == 0:
            variables = {"params": state.target_params["model"],
                         "batch_stats": state.batch_stats}
            accuracies = {split: evaluate(eval_step, variables, splits[split], config)
                          for split in config.data.eval_splits}
            progress["epoch"] = epoch + 1
            val = accuracies.get("val", accuracies[config.data.eval_splits[0]])
            if val > progress["best_val"]:
                progress.update(best_val=val, test_at_best=accuracies.get("test", val),
                                best_epoch=epoch)
                _save_best(workdir, variables)
            log.write(done, {f"eval/{k}": v for k, v in accuracies.items()})
            logging.info("epoch %d: %s | best val %.2f (test %.2f)", epoch,
                         " ".join(f"{k} {v:.2f}" for k, v in accuracies.items()),
                         progress["best_val"], progress["test_at_best"])
            save(state, progress)
        elif done % config.checkpoint_every_steps == 0:
            save(state, progress)
    manager.wait_until_finished()
    if transfer.meta_networks is not None:
        _write_transfer_weights(workdir, transfer, state, source_variables,
                                splits[config.data.eval_splits[0]], config)
    if config.export_source:
        _export_source(workdir, config)
    result = {"test_at_best_val": progress["test_at_best"], "best_val": progress["best_val"],
              "best_epoch": progress["best_epoch"], "steps": total_steps,
              "dataset": config.data.name, "source": config.source_model,
              "target": config.target_model, "seed": config.seed, "method": config.method,
              "scheme": str(config.pairs), "pairs": [list(p) for p in transfer.pairs],
              "train_examples_per_class": config.data.train_examples_per_class,
              "train_examples": len(splits["train"]),
              "extra_sources": [dict(s)["model"] for s in config.extra_sources],
              "wall_seconds": round(wall_before + time.time() - started, 1)}
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def _write_transfer_weights(workdir, transfer, state, source_variables, split, config,
                            max_batches: int = 4) -> None:
    """transfer_weights.json: what phi learned, as mean meta-network outputs over (up to
    ``max_batches``) evaluation batches: per pair the mean lambda and the mean channel
    weights, with the pairs and the taps' channel counts (for l2t_jax.plots)."""
    @jax.jit
    def weights(images):
        _, features = transfer.source_model.apply(source_variables, images, train=False)
        pooled = tuple(jnp.mean(f, axis=(1, 2)) for f in features)
        return transfer.meta_networks.apply({"params": state.meta_params}, pooled)

    sums, count = None, 0
    for b, (images, _) in enumerate(data.eval_batches(split, config.eval_batch_size,
                                                      config.data.image_size)):
        if b == max_batches:
            break
        channel, pair = jax.device_get(weights(images))
        batch_sums = jax.tree.map(lambda w: np.sum(w, axis=0), (channel, pair))
        sums = batch_sums if sums is None else jax.tree.map(np.add, sums, batch_sums)
        count += len(images)
    channel, pair = jax.tree.map(lambda w: (w / count).tolist(), sums)
    with open(os.path.join(workdir, "transfer_weights.json"), "w") as f:
        json.dump({"pairs": [list(p) for p in transfer.pairs],
                   "source_taps": [t.channels for t in transfer.source_model.feature_taps()],
                   "target_taps": [t.channels for t in transfer.target_model.feature_taps()],
                   "pair_weights": pair, "channel_weights": channel}, f)


def _export_source(workdir: str, config) -> None:
    """workdir/source: the best target as a source checkpoint (l2t_jax.convert's format)."""
    import shutil
    import orbax.checkpoint as ocp
    target = models.get_model(config.target_model, config.data.num_classes,
                              **dict(config.model_overrides.get("target", {})))
    abstract = models.abstract_variables(target)
    variables = ocp.StandardCheckpointer().restore(
        os.path.join(os.path.abspath(workdir), "best"), abstract)
    path = os.path.join(os.path.abspath(workdir), "source")
    if os.path.exists(path):
        shutil.rmtree(path)
    convert.save_converted(path, variables, {
        "model": config.target_model, "num_classes": config.data.num_classes,
        "source_dataset": config.data.name,
        "model_overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in
                            dict(config.model_overrides.get("target", {})).items()},
        "trained_by": "l2t_jax.train"})
    logging.info("exported the best target as a source checkpoint: %s", path)


def _save_best(workdir: str, variables: PyTree) -> None:
    import shutil
    import orbax.checkpoint as ocp
    path = os.path.join(os.path.abspath(workdir), "best")
    if os.path.exists(path):
        shutil.rmtree(path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, jax.device_get(variables))
    checkpointer.wait_until_finished()

"""From a config to the objects of a run: networks, transfer, source, data, schedule.

This module owns what a run is built from, before anything is compiled (the config itself
is checked by :func:`l2t_jax.training.config.validate_config`): :func:`build_networks` and
:func:`build_transfer` (the method's row of :mod:`l2t_jax.transfer.methods` over the
config's networks and pairs), :func:`target_model` (the one builder of a config's target
network, also for a finished run's), the source networks' variables
(:func:`load_source_variables`), the data splits (:func:`load_splits`) and theta's
learning-rate schedule (:func:`learning_rate_schedule`). Bad values raise ValueError naming
the key.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from l2t_jax import data, models
from l2t_jax.models import taps
from l2t_jax.training import assets, converted
from l2t_jax.transfer import bilevel, methods, optim, pairing, terms as loss_terms

logger = logging.getLogger(__name__)

PyTree = Any


# -------------------------------------------------------------------------------- data
def _split_source(config, split: str, stored_split: str):
    """One split, read from the data's split ``stored_split`` (a TFDS set's ``validation``
    for ``val``: :func:`l2t_jax.data.stored_split_name`). With an official split, train and
    val are index lists into the data set's training data and test one into its test data
    (the release's convention)."""
    data_config = config.data
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


def resolve_data(config) -> ml_collections.ConfigDict:
    """The config with what its data decides filled in (a copy; the rest unchanged).

    For one's own image folder (``data.kind='image_folder'`` without an official split):
    ``data.classes`` and ``data.num_classes`` from the folder's ``train/`` class folders
    (:func:`l2t_jax.data.image_folder_classes`; when given, they are checked). The training
    program calls it first, so config.json records the classes.

    Raises:
      data.DataError: no folder, or a class count or list other than the folder's.
    """
    if config.data.kind != "image_folder" or config.data.official_split:
        return config
    classes = data.image_folder_classes(config.data.data_dir, config.data.num_classes,
                                        tuple(config.data.classes))
    resolved = config.copy_and_resolve_references()
    resolved.data.classes = tuple(classes)
    resolved.data.num_classes = len(classes)
    return resolved


def load_splits(config) -> dict:
    """{'train', 'val', 'test'} sources (val/test as listed in config.data.eval_splits).

    An own image folder (``data.kind='image_folder'``, no official split) goes through
    :func:`l2t_jax.data.image_folder_splits`: the class folders are checked across splits.
    Data without an official split and without a val split of their own (an image folder
    without ``val/``, npz data without ``val.npz``, a TFDS set without a ``val`` or
    ``validation`` split) get one carved from train when ``eval_splits`` names it:
    ``data.val_fraction`` of every class, stratified, seeded by ``data.split_seed``
    (:func:`l2t_jax.data.carve_validation`).

    With ``config.data.train_examples_per_class`` the train split keeps that many examples
    of each class, sampled with the seed. With ``config.meta_loss_batch='held_out'``,
    ``data.meta_held_out_per_class`` of them per class move to a ``meta`` split (the meta
    loss's batches), also sampled with the seed.

    With ``data.meta_val_per_class`` > 0 (any method), that many val images per class leave
    the val split, sampled with ``data.split_seed`` alone, so every method and seed keeps
    the same val images; with ``config.meta_loss_batch='val'`` they are the ``meta`` split.

    Raises:
      data.DataError: a count that leaves a class no image, naming the key.
    """
    data_config = config.data
    names = ("train",) + tuple(data_config.eval_splits)
    stored_as = {}          # "val" -> the name the data hold it under (None: carve it)
    if "val" in names and not data_config.official_split:
        stored_as["val"] = data.stored_split_name(data_config.kind, data_config.data_dir,
                                                  "val", data_config.name)
    carve = "val" in stored_as and stored_as["val"] is None
    stored = tuple(split for split in names if not (carve and split == "val"))
    if data_config.kind == "image_folder" and not data_config.official_split:
        # One's own folder: classes checked across splits.
        splits = data.image_folder_splits(data_config.data_dir, stored,
                                          skip_corrupt=data_config.skip_corrupt,
                                          num_classes=data_config.num_classes)
    else:
        splits = {split: _split_source(config, split, stored_as.get(split) or split)
                  for split in stored}
    if carve:
        where = (f"the TFDS data set {data_config.name!r}" if data_config.kind == "tfds"
                 else data_config.data_dir)
        splits["train"], splits["val"] = data.carve_validation(
            splits["train"], data_config.val_fraction, data_config.split_seed, where)
    if data_config.train_examples_per_class:
        splits["train"] = data.per_class_subset(
            splits["train"], data_config.train_examples_per_class, config.seed)
    if config.meta_loss_batch == "held_out":
        splits["meta"], splits["train"] = data.split_per_class(
            splits["train"], data_config.meta_held_out_per_class, config.seed)
    if data_config.meta_val_per_class:
        meta_val, splits["val"] = data.split_per_class(
            splits["val"], data_config.meta_val_per_class, data_config.split_seed,
            key="config.data.meta_val_per_class", split="val")
        if config.meta_loss_batch == "val":
            splits["meta"] = meta_val
    return {**{split: splits[split] for split in names}, **splits}     # in eval_splits' order


# ------------------------------------------------------------------------------ models
EXTRA_SOURCE_KEYS = ("model", "num_classes", "checkpoint", "pairs", "model_overrides", "taps",
                     "candidates")


def source_specs(config) -> list[dict]:
    """Every source as {model, num_classes, checkpoint, pairs, model_overrides, taps,
    candidates}: the config's own first, then ``config.extra_sources``."""
    specs = [{"model": config.source_model, "num_classes": config.source_num_classes,
              "checkpoint": config.source_checkpoint, "pairs": config.pairs,
              "model_overrides": dict(config.model_overrides.get("source", {})),
              "taps": config.source_taps, "candidates": config.source_candidates}]
    for i, extra in enumerate(config.extra_sources):
        extra = dict(extra)
        unknown = sorted(set(extra) - set(EXTRA_SOURCE_KEYS))
        missing = sorted(set(EXTRA_SOURCE_KEYS[:4]) - set(extra))
        if unknown or missing:
            raise ValueError(f"config.extra_sources[{i}]: unknown keys {unknown}, missing keys "
                             f"{missing}; valid: {', '.join(EXTRA_SOURCE_KEYS)}")
        if not models.is_model_name(extra["model"]):
            raise ValueError(f"config.extra_sources[{i}].model={extra['model']!r} is not a "
                             f"model; valid: {', '.join(models.model_names())}, or an import "
                             "path package.module:Class")
        if extra["pairs"] == "as_primary":    # the same scheme as the first source
            extra["pairs"] = config.pairs
        specs.append({"model_overrides": {}, "taps": "", "candidates": "", **extra})
    for spec in specs:
        if not spec["taps"]:
            spec.update(_recorded_taps(spec["checkpoint"]))
    return specs


def _recorded_taps(checkpoint: str) -> dict:
    """The taps a source checkpoint records (a network trained here as a target records
    the target's), as {taps, candidates}; {} when it records none or does not exist yet.
    Released networks are registry models with their own taps."""
    if checkpoint.startswith("released:") or not os.path.isdir(checkpoint):
        return {}
    metadata = converted.read_metadata(checkpoint)
    if not metadata.get("taps"):
        return {}
    return {"taps": ",".join(metadata["taps"]),
            "candidates": ",".join(metadata.get("candidates", ()))}


def _get_model(config, spec: dict, where: tuple[str, str]) -> models.TappedNetwork:
    """models.get_model for one network spec (model, num_classes, model_overrides, taps,
    candidates), with a bad override or tap reported as a ValueError naming the key:
    ``where`` is (the overrides' key, the prefix of the taps' keys)."""
    overrides, (overrides_key, taps_key) = spec["model_overrides"], where
    widths = overrides.get("widths")
    if widths is not None and not all(isinstance(w, int) and w >= 1 for w in widths):
        raise ValueError(f"{overrides_key}.widths={tuple(widths)}: widths must be integers "
                         ">= 1")
    try:
        model = models.get_model(spec["model"], spec["num_classes"], taps=spec["taps"] or None,
                                 candidates=spec["candidates"] or None,
                                 probe_size=config.data.image_size,
                                 conv_impl=config.conv_impl, **overrides)
        model.feature_taps()          # the taps, and overrides such as widths, must fit
    except (TypeError, IndexError, ValueError) as e:
        if not (overrides or spec["taps"] or spec["candidates"]):
            raise
        given = (f"{overrides_key}={overrides}" if overrides else
                 f"{taps_key}taps={spec['taps']!r}, {taps_key}candidates="
                 f"{spec['candidates']!r}")
        raise ValueError(f"{given} does not fit {spec['model']} ({type(e).__name__}: {e})"
                         ) from None
    return model


def target_model(config) -> models.TappedNetwork:
    """The config's target network, without weights (its model, class count, overrides,
    taps, convolution implementation): the network a run trains, and the one
    :mod:`l2t_jax.evaluate` and :mod:`l2t_jax.export` restore a finished run's weights into
    (its config from :func:`l2t_jax.training.config.read_run_config`).

    Raises:
      ValueError: naming the key, for overrides or taps that do not fit the model.
    """
    return _get_model(config, {
        "model": config.target_model, "num_classes": config.data.num_classes,
        "model_overrides": dict(config.model_overrides.get("target", {})),
        "taps": config.target_taps, "candidates": config.target_candidates},
        ("config.model_overrides.target", "config.target_"))


def build_networks(config):
    """The config's networks, without weights.

    Returns (source model, target model, pairs, source specs). The source model is None for
    methods that use no source, several combined (:func:`l2t_jax.models.taps.combine`) with extra
    sources (pairs then index the concatenated taps); pairs are resolved per source from schemes.
    """
    target = target_model(config)
    method = methods.get_method(config.method)
    if not method.uses_source:
        return None, target, (), []
    specs = source_specs(config)
    sources = [_get_model(config, spec, ("config.model_overrides.source", "config.source_")
                          if i == 0 else (f"config.extra_sources[{i - 1}].model_overrides",
                                          f"config.extra_sources[{i - 1}]."))
               for i, spec in enumerate(specs)]
    pairs, offset = [], 0
    for i, (spec, source) in enumerate(zip(specs, sources)):
        if method.uses_pairs:
            where = "config.pairs" if i == 0 else f"config.extra_sources[{i - 1}].pairs"
            try:
                local = pairing.resolve_pairs(spec["pairs"], source, target)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            pairs += [(m + offset, n) for m, n in local]
        offset += len(source.feature_taps())
    source = sources[0] if len(sources) == 1 else taps.combine(sources)
    return source, target, tuple(pairs), specs


# Transfer's hyperparameters (its fields with a number, string or bool default) are set from
# the config key of the same name; only these are named otherwise in the config.
_TRANSFER_KEYS = {"inner_steps": "T"}


def build_transfer(config) -> bilevel.Transfer:
    """The config's :class:`~l2t_jax.transfer.bilevel.Transfer`: the method's row
    (:mod:`l2t_jax.transfer.methods`: its terms and meta-networks) over the config's networks and
    pairs, with every :class:`~l2t_jax.transfer.bilevel.Transfer` hyperparameter from the config key
    of the same name (or :data:`_TRANSFER_KEYS`), and the method's own settings from the
    config keys its loss terms declare (:attr:`l2t_jax.transfer.terms.LossTerm.options`): a
    new hyperparameter is a field (or an option) and a config key, nothing in between.

    Raises:
      ValueError: naming the key, for anything that does not build.
    """
    source, target, pairs, _ = build_networks(config)
    hyperparameters = {}
    for field in dataclasses.fields(bilevel.Transfer):
        key = _TRANSFER_KEYS.get(field.name, field.name)
        if isinstance(field.default, (bool, int, float, str)) and key in config:
            hyperparameters[field.name] = config[key]
    for term in loss_terms.of_method(methods.get_method(config.method)):
        hyperparameters.update({key: config[key] for key, _ in term.options})
    return method_transfer(config.method, source, target, pairs,
                           channel_weighting=config.channel_weighting,
                           pair_weight_type=config.pair_weight_type or None,
                           pair_weight_init=config.pair_weight_init,
                           conv_impl=config.conv_impl, **hyperparameters)


def method_transfer(method: str | methods.Method, source_model, target_model, pairs, *,
                    pair_weight_type: str | None = "relu6", **options) -> bilevel.Transfer:
    """A method's row (:mod:`l2t_jax.transfer.methods`) over the given networks and pairs: its loss
    terms and meta-networks (L2T-w without g), the source and pairs only where the row
    uses them.

    Args:
      method: a row or its name.
      **options: :func:`l2t_jax.transfer.bilevel.make_transfer` keywords (channel_weighting,
        pair_weight_init, conv_impl, and any Transfer hyperparameter).
    """
    row = methods.get_method(method) if isinstance(method, str) else method
    return bilevel.make_transfer(
        source_model if row.uses_source else None, target_model,
        pairs if row.uses_pairs else (), terms=loss_terms.of_method(row),
        meta_networks=row.meta_networks,
        pair_weight_type=pair_weight_type if row.learned_pair_weights else None, **options)


def load_source_variables(config, transfer: bilevel.Transfer) -> PyTree:
    """The frozen source's variables from each source's checkpoint ({} without a source).

    ``random-init`` (smoke tests and timing only) initialises that source randomly.
    """
    if transfer.source_model is None:
        return {}
    specs = source_specs(config)
    parts = transfer.source_model.parts or (transfer.source_model,)
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
            _, variables, _ = converted.load_converted(
                path, expect_model=spec["model"], expect_num_classes=spec["num_classes"])
            loaded.append(variables)
    if len(loaded) == 1:
        return loaded[0]
    return {collection: {f"sources_{i}": variables[collection]
                         for i, variables in enumerate(loaded)}
            for collection in ("params", "batch_stats")}


def base_learning_rate(config) -> float:
    """theta's learning rate at the config's batch size, before the schedule:
    ``learning_rate * batch_size / lr_reference_batch_size`` (linear scaling), or
    ``learning_rate`` itself when ``lr_reference_batch_size`` is 0."""
    if not config.lr_reference_batch_size:
        return config.learning_rate
    return config.learning_rate * config.batch_size / config.lr_reference_batch_size


def learning_rate_schedule(config, steps_per_epoch: int):
    """theta's learning rate as a function of the step (``config.lr_schedule``, from
    :func:`base_learning_rate`)."""
    base = base_learning_rate(config)
    if config.lr_schedule == "step":
        return optim.step_learning_rate(base, config.epochs, steps_per_epoch, config.lr_decay_at,
                                  config.lr_decay_factor)
    return optim.cosine_learning_rate(base, config.epochs, steps_per_epoch)


def steps_per_epoch(config, train_examples: int) -> int:
    """``config.steps_per_epoch``, or with -1 the whole batches in the train split.

    Raises:
      ValueError: the train split holds less than one batch.
    """
    steps = (config.steps_per_epoch if config.steps_per_epoch > 0
             else train_examples // config.batch_size)
    if steps < 1:
        raise ValueError(f"the train split has {train_examples} examples, fewer than one "
                         f"batch of {config.batch_size}; set config.steps_per_epoch to "
                         "repeat the data within an epoch")
    return steps

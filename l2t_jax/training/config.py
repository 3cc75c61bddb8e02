"""A run's config: its keys and defaults, its checks, and its ``config.json``.

:func:`default_config` lists every key (``l2t_jax/configs/default.py``);
:func:`validate_config` rejects unknown keys and bad values before anything is built,
naming the key (the single-key range checks are the table :data:`RANGE_CHECKS`, the checks
between keys small functions of their own). The training loop writes ``config.json``
(:func:`config_for_comparison`: every key but :data:`RESUMABLE_KEYS`), and
:func:`read_run_config` is the one reader of it, for resuming (:func:`check_resumable`),
:mod:`l2t_jax.evaluate` and :mod:`l2t_jax.export`: the file over today's defaults, a key
added since the run was written set to the value that reproduces it (:data:`ADDED_KEYS`).
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping

import jax
import ml_collections

from l2t_jax import models
from l2t_jax.configs import default as configs_default
from l2t_jax.training import build, workdir as workdir_files
from l2t_jax.transfer import methods

# Config keys that may change between a run and its resumption.
RESUMABLE_KEYS = ("epochs", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                  "eval_batch_size", "export_source", "on_nonfinite", "jit_init",
                  "preemption_grace_s", "distributed_init_timeout_s",
                  "distributed_heartbeat_timeout_s", "distributed_shutdown_timeout_s")
# Keys added since runs were first written, with the value that reproduces how a run whose
# config.json lacks them behaved (ANY: every value does, e.g. the classes an image folder
# run now records, which are what it used); such a run resumes when the config has it.
ANY = object()
ADDED_KEYS = {"lr_reference_batch_size": 0, "meta_update_every": 1, "meta_loss_batch": "same",
              "data.meta_held_out_per_class": 0, "data.meta_val_per_class": 0,
              "meta_gradient_batches": 1, "meta_temperature": 1.0,
              "meta_freeze_after": 1.0, "meta_warmup_steps": 0,
              "source_taps": "", "source_candidates": "",
              "target_taps": "", "target_candidates": "", "data.classes": ANY,
              "data.val_fraction": ANY, "data.split_seed": ANY,
              "data.read_threads": ANY, "data.prefetch_batches": ANY,
              # Only the afd and semckd methods read these; no earlier run used them.
              "afd_weight": ANY, "afd_qk_dim": ANY, "semckd_weight": ANY, "semckd_factor": ANY}


def default_config() -> ml_collections.ConfigDict:
    """Every config key with its default (``l2t_jax/configs/default.py``)."""
    return configs_default.get_config()


# ---------------------------------------------------------------------------- checks
def _is_method(name) -> bool:
    return name in methods.METHODS


def _is_model(name) -> bool:
    return models.is_model_name(name)


def _at_least(minimum: int, what: str = "") -> tuple[Callable, str]:
    """(check, message) of a number >= ``minimum``; ``what`` explains a special value."""
    return (lambda value: value >= minimum,
            f"config.{{key}} must be >= {minimum}{what}, got {{value}}")


def _one_of(*valid: str, notes: Mapping[str, str] | None = None) -> tuple[Callable, str]:
    """(check, message) of a choice among ``valid``; ``notes`` explain some of them."""
    notes = notes or {}
    return (lambda value: value in valid,
            "config.{key}={value!r}; valid: " + ", ".join(v + notes.get(v, "") for v in valid))


_MODEL = (_is_model, "config.{key}={value!r} is not a model; valid: {models}, or an import "
                     "path package.module:Class")
_POSITIVE = _at_least(1)

# (key, check(value) -> bool, message): the message is formatted with ``key``, ``value``,
# and the valid ``methods`` and ``models``. In the order they are checked.
RANGE_CHECKS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("method", _is_method, "config.method={value!r} is not a method; valid: {methods}"),
    ("source_model", *_MODEL),
    ("target_model", *_MODEL),
    ("lr_schedule", *_one_of("cosine", "step")),
    ("lr_decay_at", lambda value: all(0 < f <= 1 for f in value),
     "config.lr_decay_at={value} must be fractions of the epochs in (0, 1]"),
    ("data.train_examples_per_class", *_at_least(0, " (0 keeps all)")),
    ("data.meta_val_per_class", *_at_least(0, " (0 keeps val whole)")),
    ("data.kind", *_one_of("tfds", "image_folder", "npz")),
    ("batch_size", *_POSITIVE),
    ("eval_batch_size", *_POSITIVE),
    ("epochs", *_POSITIVE),
    ("log_every_steps", *_POSITIVE),
    ("checkpoint_every_steps", *_POSITIVE),
    ("keep_checkpoints", *_POSITIVE),
    ("distributed_init_timeout_s", *_POSITIVE),
    ("distributed_heartbeat_timeout_s", *_POSITIVE),
    ("distributed_shutdown_timeout_s", *_POSITIVE),
    ("learning_rate", lambda value: value > 0 and math.isfinite(value),
     "config.{key} must be finite and > 0, got {value}"),
    ("meta_learning_rate", lambda value: value > 0 and math.isfinite(value),
     "config.{key} must be finite and > 0, got {value}"),
    ("meta_update_every", *_at_least(1, " (1: phi at every step)")),
    ("meta_loss_batch", *_one_of("same", "held_out", "val", "augment",
                                 notes={"same": " (the paper's)"})),
    ("meta_gradient_batches", *_at_least(1, " (1: phi steps on every meta-gradient)")),
    ("meta_temperature", lambda value: value > 0 and math.isfinite(value),
     "config.{key} must be finite and > 0 (1.0: the paper's meta loss), got {value}"),
    ("meta_freeze_after", lambda value: 0 < value <= 1,
     "config.{key} must be a fraction of the steps in (0, 1] (1.0: never), got {value}"),
    ("meta_warmup_steps", *_at_least(0)),
    ("lr_reference_batch_size", *_at_least(0, " (0: no scaling)")),
    ("preemption_grace_s", lambda value: value >= 0 and math.isfinite(value),
     "config.{key} must be finite and >= 0 (seconds), got {value}"),
    ("on_nonfinite", *_one_of("stop", "skip")),
    ("data.image_size", *_POSITIVE),
    ("data.val_fraction", lambda value: 0 < value < 1,
     "config.{key} must be in (0, 1), got {value}"),
    ("source_num_classes", *_POSITIVE),
    ("data.read_threads", lambda value: value >= -1,
     "config.{key} must be -1 (one per CPU core), 0 or more, got {value}"),
    ("data.prefetch_batches", *_at_least(0)),
    ("data.crop_padding", *_at_least(0)),
    ("data.eval_splits", bool, "config.{key} is empty: name the evaluation splits, e.g. "
                               "('val', 'test') or ('test',)"),
)


def _value(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _check_keys(given, expected, prefix: str = "") -> None:
    """Every key of ``given`` is one of ``expected`` (recursively; ``model_overrides``
    holds the networks' own attributes)."""
    for key in given.keys():
        if key not in expected:
            raise ValueError(f"unknown config key {prefix}{key!r}; valid keys: "
                             f"{', '.join(sorted(expected.keys()))}")
        if isinstance(expected[key], ml_collections.ConfigDict) and key != "model_overrides":
            _check_keys(given[key], expected[key], f"{prefix}{key}.")


def _check_batch_divides_over_devices(config) -> None:
    if config.batch_size % jax.device_count():
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                         f"{jax.device_count()} devices")


def _check_meta_loss_has_meta_networks(config) -> None:
    """A meta loss other than the paper's (``meta_loss_batch`` not 'same') needs a method
    with meta-networks."""
    if (config.meta_loss_batch != "same"
            and not methods.get_method(config.method).meta_networks):
        raise ValueError(f"config.meta_loss_batch={config.meta_loss_batch!r} needs a method "
                         f"with meta-networks (l2t_w, l2t_ww); {config.method} has no meta "
                         "loss")


def _check_held_out_meta_batch(config) -> None:
    """meta_loss_batch='held_out' needs images per class to hold out that leave training
    images; the held-out count is only used with it."""
    held_out = config.data.meta_held_out_per_class
    if config.meta_loss_batch != "held_out":
        if held_out:
            raise ValueError(f"config.data.meta_held_out_per_class={held_out} is only used "
                             "with config.meta_loss_batch='held_out'")
        return
    if held_out < 1:
        raise ValueError("config.meta_loss_batch='held_out' needs "
                         "config.data.meta_held_out_per_class >= 1 (images per class for "
                         f"the meta loss), got {held_out}")
    if 0 < config.data.train_examples_per_class <= held_out:
        raise ValueError(f"config.data.meta_held_out_per_class={held_out} leaves no "
                         "training image of the config.data.train_examples_per_class="
                         f"{config.data.train_examples_per_class} per class")


def _check_val_meta_batch(config) -> None:
    """meta_loss_batch='val' needs images per class moved out of val; moving them needs a
    val split. (That they leave a val image of every class is checked on the data:
    :func:`l2t_jax.training.build.load_splits`.)"""
    moved = config.data.meta_val_per_class
    if moved and "val" not in config.data.eval_splits:
        raise ValueError(f"config.data.meta_val_per_class={moved} moves images out of the "
                         "val split, which config.data.eval_splits="
                         f"{tuple(config.data.eval_splits)} does not name")
    if config.meta_loss_batch == "val" and moved < 1:
        raise ValueError("config.meta_loss_batch='val' needs config.data.meta_val_per_class "
                         f">= 1 (val images per class for the meta loss), got {moved}")


def _check_num_classes(config) -> None:
    """At least one class; 0 (an image folder's, inferred) must have been resolved."""
    if config.data.num_classes < 1:
        raise ValueError(f"config.data.num_classes must be >= 1, got "
                         f"{config.data.num_classes}" + (
                             " (0 is inferred from an image folder by build.resolve_data, "
                             "which the training program calls first)"
                             if config.data.num_classes == 0 else ""))


CROSS_CHECKS = (_check_batch_divides_over_devices, _check_meta_loss_has_meta_networks,
                _check_held_out_meta_batch, _check_val_meta_batch, _check_num_classes)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key for unknown keys and invalid values: the keys, the
    table :data:`RANGE_CHECKS`, the :data:`CROSS_CHECKS`, then everything the transfer is
    built from (networks and their overrides, sources, pairs, terms, T, phi:
    :func:`l2t_jax.training.build.build_transfer`)."""
    _check_keys(config, default_config())
    for key, valid, message in RANGE_CHECKS:
        value = _value(config, key)
        if not valid(value):
            raise ValueError(message.format(key=key, value=value,
                                            methods=", ".join(methods.METHODS),
                                            models=", ".join(models.model_names())))
    for check in CROSS_CHECKS:
        check(config)
    build.build_transfer(config)


# ----------------------------------------------------------------------- config.json
def config_for_comparison(config) -> dict:
    """The config as written to config.json: every key but :data:`RESUMABLE_KEYS`."""
    values = json.loads(config.to_json())
    return {k: v for k, v in values.items() if k not in RESUMABLE_KEYS}


def read_run_config(workdir: str, current: ml_collections.ConfigDict | None = None
                    ) -> ml_collections.ConfigDict:
    """The config of the run in ``workdir``: its config.json over today's
    :func:`default_config`. A key the file lacks was added since the run was written: it
    takes the value that reproduces the run (:data:`ADDED_KEYS`); where every value does
    (``ANY``), ``current``'s value (the config resuming it), else today's default, as do
    the keys never written (:data:`RESUMABLE_KEYS`) and the keys added without a value in
    :data:`ADDED_KEYS` (which resuming refuses). JSON lists become tuples.

    Raises:
      FileNotFoundError: no config.json; ValueError: it is not valid JSON (both name it).
    """
    return _read_run_config(workdir, current)[0]


def _read_run_config(workdir: str, current) -> tuple[ml_collections.ConfigDict, list, list]:
    """(:func:`read_run_config`, [(added key, the value set for it)] for the keys of
    :data:`ADDED_KEYS` the file lacks whose value is not ``current``'s, [the keys it lacks
    that neither the file nor :data:`ADDED_KEYS` gives a value, dotted])."""
    saved = workdir_files.read_config(workdir)
    now = json.loads(current.to_json()) if current is not None else {}
    predates = []
    for key, reproducing in ADDED_KEYS.items():
        *parents, leaf = key.split(".")
        given, current_part = saved, now
        for part in parents:
            given, current_part = given.setdefault(part, {}), current_part.get(part, {})
        if leaf in given:
            continue
        if reproducing is not ANY:
            given[leaf] = reproducing
            if leaf in current_part and current_part[leaf] != reproducing:
                predates.append((key, reproducing))
        elif leaf in current_part:
            given[leaf] = current_part[leaf]
    defaults = default_config().to_dict()
    unknown = [key for key in _absent(defaults, saved) if key not in RESUMABLE_KEYS]
    return ml_collections.ConfigDict(_merge(defaults, saved)), predates, unknown


def _absent(defaults: dict, saved: Mapping, prefix: str = "") -> list[str]:
    """The keys of ``defaults`` (dotted, nested dicts followed) that ``saved`` lacks."""
    absent = []
    for key, value in defaults.items():
        if key not in saved:
            absent.append(prefix + key)
        elif isinstance(value, dict) and isinstance(saved[key], Mapping):
            absent += _absent(value, saved[key], f"{prefix}{key}.")
    return absent


def _merge(base: dict, saved: Mapping) -> dict:
    """``saved``'s values over ``base``'s, nested dicts merged, lists as tuples."""
    for key, value in saved.items():
        if isinstance(value, Mapping):
            base[key] = _merge(base[key] if isinstance(base.get(key), dict) else {}, value)
        else:
            base[key] = tuple(value) if isinstance(value, list) else value
    return base


def check_resumable(config, workdir: str) -> None:
    """Refuses to resume a workdir written by another config, naming the differing keys
    (and, for a run written before a key was added, the value that resumes it). A key the
    run's config.json lacks counts as differing unless :data:`ADDED_KEYS` says which value
    reproduces the run (today's default need not)."""
    config_path = workdir_files.path(workdir, workdir_files.CONFIG)
    try:
        saved, predates, unknown = _read_run_config(workdir, config)
    except FileNotFoundError:
        raise ValueError(f"{workdir} has checkpoints but no config.json, so it cannot be "
                         "checked against this config; use a new workdir") from None
    except ValueError as e:
        raise ValueError(f"{e}; use a new workdir") from None
    saved, current = config_for_comparison(saved), config_for_comparison(config)
    differing = sorted({k for k in set(saved) | set(current) if saved.get(k) != current.get(k)}
                       | {key.split(".")[0] for key in unknown})
    if differing:
        hint = (f". The run predates {', '.join(key for key, _ in predates)}: it resumes "
                "with " + " ".join(f"--config.{key}={json.dumps(value)}"
                                   for key, value in predates) if predates else "")
        raise ValueError(f"{workdir} holds a run with another config (keys differ: "
                         f"{', '.join(differing)}); use a new workdir "
                         f"(or compare with {config_path}){hint}")

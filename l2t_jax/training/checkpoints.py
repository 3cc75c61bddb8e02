"""Checkpoints of a run: the training state, resume with fallback, the best target, export.

This module owns the workdir's orbax directories (``checkpoints/``, ``best/``, ``source/``;
:mod:`l2t_jax.training.workdir` owns the names): :class:`Checkpoints` saves the whole state plus
progress and restores the newest readable one (unreadable ones are moved aside, never
deleted); :func:`check_resumable` refuses a workdir written by another config;
:func:`save_best` and :func:`export_source` write the best target, the latter in the format
``config.source_checkpoint`` reads; :func:`target_model` and :func:`restore_target` read a
finished (or running) workdir's target back, for export and evaluation. Every process takes part in every orbax call (orbax
synchronises them and writes each replicated array once).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

from l2t_jax import models
from l2t_jax.training import converted, parallel, workdir as workdir_files

logger = logging.getLogger(__name__)

PyTree = Any
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
              "data.meta_held_out_per_class": 0,
              "source_taps": "", "source_candidates": "",
              "target_taps": "", "target_candidates": "", "data.classes": ANY,
              "data.val_fraction": ANY, "data.split_seed": ANY,
              "data.read_threads": ANY, "data.prefetch_batches": ANY,
              "afd_weight": ANY, "afd_qk_dim": ANY, "semckd_weight": ANY, "semckd_factor": ANY}


class CheckpointError(OSError):
    """A checkpoint could not be written, or no checkpoint of a workdir can be read; the
    message names the directory."""


def config_for_comparison(config) -> dict:
    """The config as written to config.json: every key but :data:`RESUMABLE_KEYS`."""
    values = json.loads(config.to_json())
    return {k: v for k, v in values.items() if k not in RESUMABLE_KEYS}


def check_resumable(config, workdir: str) -> None:
    """Refuses to resume a workdir written by another config, naming the differing keys."""
    config_path = workdir_files.path(workdir, workdir_files.CONFIG)
    try:
        saved = workdir_files.read_config(workdir)
    except FileNotFoundError:
        raise ValueError(f"{workdir} has checkpoints but no config.json, so it cannot be "
                         "checked against this config; use a new workdir") from None
    except ValueError as e:
        raise ValueError(f"{e}; use a new workdir") from None
    current = config_for_comparison(config)
    predates = []          # keys added since the run, set to what it did (ADDED_KEYS)
    for key, value in ADDED_KEYS.items():
        *parent, leaf = key.split(".")
        given, now = saved, current
        for part in parent:
            given, now = given.get(part, {}), now.get(part, {})
        if leaf not in given and leaf in now:
            given[leaf] = now[leaf] if value is ANY else value
            if given[leaf] != now[leaf]:
                predates.append(f"--config.{key}={json.dumps(value)}")
    differing = sorted(k for k in set(saved) | set(current)
                       if k not in RESUMABLE_KEYS and saved.get(k) != current.get(k))
    if differing:
        hint = (f". The run predates {', '.join(p.split('=')[0][9:] for p in predates)}: it "
                f"resumes with {' '.join(predates)}" if predates else "")
        raise ValueError(f"{workdir} holds a run with another config (keys differ: "
                         f"{', '.join(differing)}); use a new workdir "
                         f"(or compare with {config_path}){hint}")


class Checkpoints:
    """``workdir/checkpoints``: orbax's CheckpointManager over items ``state`` (the
    :class:`~l2t_jax.transfer.bilevel.TrainState`) and ``progress`` (a JSON dict), the newest
    ``keep`` kept, saved synchronously."""

    def __init__(self, workdir: str, keep: int):
        import orbax.checkpoint as ocp
        self.workdir = workdir
        self.manager = ocp.CheckpointManager(
            workdir_files.path(workdir, workdir_files.CHECKPOINTS),
            item_names=("state", "progress"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False,
                                                 # a save killed before its commit leaves a
                                                 # tmp directory: removed at the next start
                                                 cleanup_tmp_directories=True))

    @property
    def directory(self) -> str:
        return str(self.manager.directory)

    def latest_step(self):
        return self.manager.latest_step()

    def describe_newest(self) -> str:
        """One sentence for error messages: which checkpoint a rerun would resume from."""
        step = self.manager.latest_step()
        if step is None:
            return f"No checkpoint was written yet (in {self.directory})"
        return (f"The newest checkpoint (step {step}, in {self.directory}) holds finite "
                "parameters")

    def save(self, step: int, state: PyTree, progress: dict) -> None:
        """Saves and waits for the save to finish.

        Raises:
          CheckpointError: naming the directory; the earlier checkpoints are intact.
        """
        import orbax.checkpoint as ocp
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)),
                force=True)
            self.manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(
                f"could not save the checkpoint of step {step} in {self.directory} "
                f"({type(e).__name__}: {e}). The earlier checkpoints (steps "
                f"{list(self.manager.all_steps())}) are intact: fix the directory (space, "
                "permissions) and run the same command again to resume") from e

    def restore_latest_readable(self, abstract_state: PyTree) -> tuple[PyTree, dict]:
        """Restores the newest checkpoint that can be read: (state, progress).

        A checkpoint that fails to restore (truncated or corrupt files) is logged and the
        one before it tried; the unreadable ones are moved to
        ``workdir/unreadable_checkpoints/`` (never deleted) so that the resumed run can save
        those steps again.

        Raises:
          CheckpointError: no checkpoint can be read.
        """
        import orbax.checkpoint as ocp
        unreadable = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    progress=ocp.args.JsonRestore()))
            except Exception as e:   # orbax / tensorstore raise several types for bad files
                message = str(e).splitlines()[0][:300] if str(e) else ""
                logger.warning("checkpoint %d in %s cannot be read (%s: %s); trying the one "
                               "before it", step, self.directory, type(e).__name__, message)
                unreadable.append((step, f"{type(e).__name__}: {message}"))
                continue
            if unreadable:
                self._move_aside([bad for bad, _ in unreadable], step)
            return restored["state"], restored["progress"]
        raise CheckpointError(f"no checkpoint in {self.directory} can be read: "
                              + "; ".join(f"step {s}: {why}" for s, why in unreadable)
                              + ". Move the directory away to start the run over")

    def _move_aside(self, steps: list[int], resumed_from: int) -> None:
        aside = workdir_files.path(self.workdir, "unreadable_checkpoints")
        if parallel.is_main_process():
            os.makedirs(aside, exist_ok=True)
            for bad in steps:
                os.rename(os.path.join(self.directory, str(bad)),
                          os.path.join(aside, f"{bad}-{int(time.time())}"))
        parallel.barrier("l2t_moved_unreadable_checkpoints")
        self.manager.reload()
        logger.warning("resumed from checkpoint %d, the newest readable one; the unreadable "
                       "checkpoints %s were moved to %s", resumed_from, steps, aside)

    def wait(self) -> None:
        self.manager.wait_until_finished()


def save_best(workdir: str, variables: PyTree) -> None:
    """workdir/best: the target's variables (replaced). Every process calls it (orbax
    writes each replicated array once).

    Raises:
      CheckpointError: naming the directory.
    """
    import orbax.checkpoint as ocp
    path = workdir_files.path(workdir, workdir_files.BEST)
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(path, variables, force=True)
        checkpointer.wait_until_finished()
    except Exception as e:
        raise CheckpointError(f"could not save the best target in {path} "
                              f"({type(e).__name__}: {e})") from e


def export_source(workdir: str, config, mesh, target: models.TappedNetwork) -> None:
    """workdir/source: the best ``target`` as a source checkpoint (l2t_jax.convert's format,
    with the target's taps). Every process takes part (orbax synchronises them)."""
    import orbax.checkpoint as ocp
    abstract = parallel.abstract_replicated(mesh, target.abstract_variables())
    variables = ocp.StandardCheckpointer().restore(
        workdir_files.path(workdir, workdir_files.BEST), abstract)
    path = workdir_files.path(workdir, workdir_files.SOURCE)
    if os.path.exists(path) and parallel.is_main_process():
        shutil.rmtree(path)
    parallel.barrier("l2t_export_source")
    converted.save_converted(path, variables, {
        "model": config.target_model, "num_classes": config.data.num_classes,
        "source_dataset": config.data.name,
        "model_overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in
                            dict(config.model_overrides.get("target", {})).items()},
        "taps": list(target.taps),
        "candidates": [target.taps[i] for i in target.candidates],
        "trained_by": "l2t_jax.training.train"})
    logger.info("exported the best target as a source checkpoint: %s", path)


# ---------------------------------------------------------------- reading a run's target
WHICH = ("best", "last")


def target_model(config: dict):
    """The run's target network, without weights, from its config.json values (a dict, or
    a ConfigDict)."""
    config = dict(config)
    overrides = dict(dict(config.get("model_overrides") or {}).get("target") or {})
    return models.get_model(config["target_model"], int(config["data"]["num_classes"]),
                            taps=config.get("target_taps") or None,
                            candidates=config.get("target_candidates") or None,
                            probe_size=int(config["data"]["image_size"]), **overrides)


def restore_target(workdir: str, model, which: str = "best") -> tuple[dict, int | None]:
    """The target's variables ``{'params', 'batch_stats'}`` of a run, as host arrays:
    ``which='best'`` from ``best/`` (the best val accuracy), ``'last'`` from the newest
    checkpoint in ``checkpoints/``. Returns (variables, the checkpoint's step, or None for
    best/). One process; any device count may have written the files.

    Raises:
      FileNotFoundError: naming the directory that is missing.
      ValueError: an unknown ``which``.
    """
    import jax
    import orbax.checkpoint as ocp
    if which not in WHICH:
        raise ValueError(f"which={which!r}; valid: {', '.join(WHICH)}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if which == "best":
        path = workdir_files.path(workdir, workdir_files.BEST)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path} does not exist: the run has not finished an "
                                    "epoch yet (best/ is written at evaluations); use "
                                    "--which last for its newest checkpoint")
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                               sharding=device),
                                model.abstract_variables())
        variables = ocp.StandardCheckpointer().restore(path, abstract)
        return jax.device_get(variables), None
    directory = workdir_files.path(workdir, workdir_files.CHECKPOINTS)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} does not exist: the run wrote no checkpoint")
    manager = ocp.CheckpointManager(directory, item_names=("state", "progress"))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{directory} holds no checkpoint")
    metadata = ocp.StandardCheckpointer().metadata(os.path.join(directory, str(step),
                                                                "state"))
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            metadata.item_metadata)
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
    state = jax.device_get(state)
    return {"params": state["target_params"]["model"],
            "batch_stats": state["batch_stats"]}, int(step)

"""The training loop: the jitted step over the data, evaluation, bookkeeping, faults.

``train_and_evaluate(config, workdir)`` runs one experiment (configs/*.py): its config is
checked by :mod:`l2t_jax.training.config`, what it is built from comes from
:mod:`l2t_jax.training.build`, the checkpoints from :mod:`l2t_jax.training.checkpoints`, the
files from :mod:`l2t_jax.training.workdir`. theta trains by SGD-momentum on a per-epoch
schedule, phi by Adam, one jitted bilevel step per batch (:func:`step_program`, the program
the benchmark times too), evaluation on the eval splits after every epoch
(:mod:`l2t_jax.training.evaluation`), and the reported numbers: test accuracy at the best
val accuracy and at the last epoch (``result.json``, :mod:`l2t_jax.training.results`).
Starting again with the same workdir resumes from the latest checkpoint; batches are a pure
function of (seed, epoch, index), so the resumed run ends with the same parameters as an
uninterrupted one.

Data parallel and multi-host through :mod:`l2t_jax.training.parallel`: the step runs under
jit on a mesh of every device (the batch split over ``data``, state and source replicated),
each process loads only its rows of every batch, and only process 0 writes files other than
checkpoints. With one device the numbers are those of a plain ``jax.jit``.

Faults (tests/test_faults.py injects each one):

- config and data errors raise ValueError / DataError / FileNotFoundError naming the key or
  file, before anything is compiled;
- the newest checkpoint unreadable: resume from the newest readable one; a save that fails
  raises :class:`~l2t_jax.training.checkpoints.CheckpointError` naming the directory;
- SIGTERM or SIGINT (Ctrl-C): a checkpoint at the next step boundary, then
  :class:`~l2t_jax.training.stopping.Preempted` (exit status 143 or 130). At most one step
  is in flight, so the run stops within one step of the signal plus one save; an epoch-end
  evaluation is cut short ``config.preemption_grace_s`` after it (and runs again on
  resume). A second signal ends the process at once;
- non-finite losses, meta-gradients or parameters: :class:`DivergenceError` naming the step
  and the quantity (``config.on_nonfinite='stop'``), or the batch's update dropped inside
  the step (``'skip'``). The metrics of every step are checked at log steps and before
  every save (no host round trip per step), and the state before every save: no checkpoint
  holds a non-finite parameter.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import signal
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from l2t_jax import data
from l2t_jax.training import (build, checkpoints, compile_cache, evaluation, logs, parallel,
                              provenance, results, stopping)
from l2t_jax.training import workdir as workdir_files
from l2t_jax.training.checkpoints import CheckpointError  # noqa: F401  (what a save raises here)
from l2t_jax.training.config import check_resumable, config_for_comparison, validate_config
from l2t_jax.transfer import bilevel

logger = logging.getLogger(__name__)

PyTree = Any


class DivergenceError(FloatingPointError):
    """A non-finite loss, meta-gradient or parameter with ``config.on_nonfinite='stop'``;
    the message names the step and the quantity. Nothing non-finite was checkpointed."""


# Per-step metrics whose non-finite value stops (or skips) a step.
WATCHED_METRICS = ("ce", "transfer", "adapt_ce", "sim_matching", "meta_loss",
                   "meta_grad_norm")


# ---------------------------------------------------------------------------- programs
def step_program(transfer: bilevel.Transfer, learning_rate_fn: Callable, mesh,
                 on_nonfinite: str = "stop", update_phi: bool = True,
                 held_out_meta: bool = False) -> Callable:
    """The jitted training step on ``mesh``: ``step(state, source_variables, images,
    labels) -> (state, metrics)``, the state donated (:func:`l2t_jax.training.parallel.
    jit_sharded_step`); with ``on_nonfinite='skip'`` a non-finite step keeps the old state
    (:func:`skip_nonfinite`); ``update_phi=False`` is the real step alone, phi fixed
    (``config.meta_update_every``); ``held_out_meta`` adds the meta loss's batch,
    ``step(state, source_variables, images, labels, meta_images, meta_labels)``
    (:func:`has_meta_batch`). The training loop runs it and the benchmark times it."""
    step = functools.partial(bilevel.train_step, transfer, learning_rate_fn,
                             update_phi=update_phi)
    if on_nonfinite == "skip":
        step = skip_nonfinite(step)
    return parallel.jit_sharded_step(step, mesh, batches=2 if held_out_meta else 1)


def has_meta_batch(config) -> bool:
    """Whether the meta loss scores a batch of its own (``config.meta_loss_batch``
    'held_out' or 'val': of its own split; 'augment': another view of the training
    batch's images) rather than the training batch itself."""
    return config.meta_loss_batch in ("held_out", "val", "augment")


def compile_with_notice(what: str, jitted: Callable, *args, notify: bool = True):
    """``jitted.lower(*args).compile()``, logged before and after: on a CPU the first
    compile of a step can take minutes, and a silent program looks hung."""
    if notify:
        logger.info("compiling the %s...", what)
    started, before = time.time(), compile_cache.saved(this_thread=True)
    compiled = jitted.lower(*args).compile()
    if notify:
        after = compile_cache.saved(this_thread=True)
        if after["hits"] > before["hits"]:
            logger.info("loaded the %s from the compilation cache in %s (saved %s of "
                        "compiling)", what, logs.duration(time.time() - started),
                        logs.duration(after["seconds"] - before["seconds"]))
        else:
            logger.info("compiled the %s in %s", what, logs.duration(time.time() - started))
    return compiled


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


@dataclasses.dataclass(frozen=True)
class PhiSchedule:
    """Which iterations (counting from 0) take the bilevel step, phi learning, and which
    the real step alone with phi fixed (a second program, ``update_phi=False``): every
    ``every``-th (``config.meta_update_every``), from iteration ``first``
    (``config.meta_warmup_steps``), before iteration ``stop`` (``config.meta_freeze_after``
    times the run's steps; None: never frozen). The default, every iteration, is the
    paper's rule, and the only one of a method without meta-networks."""

    every: int = 1
    first: int = 0
    stop: int | None = None

    @classmethod
    def of(cls, config, total_steps: int, meta_networks: bool) -> "PhiSchedule":
        """The schedule of ``config`` for a run of ``total_steps`` iterations."""
        if not meta_networks:
            return cls()
        return cls(every=config.meta_update_every, first=config.meta_warmup_steps,
                   stop=(int(config.meta_freeze_after * total_steps)
                         if config.meta_freeze_after < 1 else None))

    @property
    def fixes_phi(self) -> bool:
        """Whether some iteration takes the real step alone (two programs)."""
        return self.every > 1 or self.first > 0 or self.stop is not None

    def updates_phi(self, step: int) -> bool:
        """Whether iteration ``step`` takes the bilevel step."""
        return (step % self.every == 0 and step >= self.first
                and (self.stop is None or step < self.stop))


class _StepInputs:
    """The steps' inputs from ``start`` on, as global arrays: this process's rows of each
    train batch and, on the steps that update phi (``schedule``) with a meta loss of its
    own batch (:func:`has_meta_batch`), of the meta batch: the meta split's ('held_out',
    'val': a stream of its own, seeded apart), or another view of the train batch's own
    images ('augment'). Read ahead by :func:`l2t_jax.data.step_batches`; ``wait_s`` adds up
    the seconds the loop waited for them, ``max_wait_s`` is the longest wait of one
    step."""

    def __init__(self, config, splits: dict, mesh, steps_per_epoch: int, start: int,
                 total_steps: int, schedule: PhiSchedule):
        rows = parallel.process_batch_slice(config.batch_size, mesh)

        def stream(split: str, seed: int, steps: Sequence[int], view: int = 0):
            return iter(data.step_batches(
                splits[split], steps, steps_per_epoch=steps_per_epoch,
                batch_size=config.batch_size, rows=rows, image_size=config.data.image_size,
                seed=seed, hflip=config.data.hflip, crop_padding=config.data.crop_padding,
                threads=config.data.read_threads,
                prefetch_batches=config.data.prefetch_batches, view=view))
        self.mesh, self.schedule = mesh, schedule
        self.wait_s = self.max_wait_s = 0.0
        self.train = stream("train", config.seed, range(start, total_steps))
        self.meta = None
        if has_meta_batch(config):
            steps = [s for s in range(start, total_steps) if schedule.updates_phi(s)]
            self.meta = (stream("train", config.seed, steps, view=1)
                         if config.meta_loss_batch == "augment" else
                         stream("meta", int(np.random.SeedSequence(
                             [config.seed, 1]).generate_state(1)[0]), steps))

    def next(self, step: int) -> tuple:
        """Step ``step``'s inputs: (images, labels), then the meta batch if it has one.
        Steps are read in order, each once."""
        started = time.perf_counter()
        inputs = parallel.global_batch(self.mesh, *next(self.train))
        if self.meta is not None and self.schedule.updates_phi(step):
            inputs += parallel.global_batch(self.mesh, *next(self.meta))
        waited = time.perf_counter() - started
        self.wait_s, self.max_wait_s = self.wait_s + waited, max(self.max_wait_s, waited)
        return inputs

    def close(self) -> None:
        for iterator in (self.train, self.meta):
            if iterator is not None:
                iterator.close()


class _StepPrograms:
    """The loop's step programs, compiled once each. When phi's ``schedule``
    (:class:`PhiSchedule`) fixes phi at some iterations, they take the real step alone and
    the others the bilevel step: two programs. The first (the bilevel step) compiles in a
    thread from the arguments' shapes while the state is initialised or restored
    (:meth:`compile_ahead`; XLA's compile leaves the interpreter free); the other when first
    needed."""

    def __init__(self, config, transfer: bilevel.Transfer, learning_rate_fn: Callable, mesh,
                 schedule: PhiSchedule):
        self.config, self.transfer, self.schedule = config, transfer, schedule
        self.held_out = has_meta_batch(config)
        self.jitted = {update: step_program(transfer, learning_rate_fn, mesh,
                                            config.on_nonfinite, update_phi=update,
                                            held_out_meta=self.held_out and update)
                       for update in ((True, False) if schedule.fixes_phi else (True,))}
        self.compiled = {}              # update_phi -> its compiled program
        self.ahead = None               # the bilevel step's compile, in a thread
        self.notify = parallel.is_main_process()

    def name(self, update: bool) -> str:
        config = self.config
        return (f"training step ({config.method}, T={config.T})"
                if self.transfer.meta_networks is not None and update else
                f"training step ({config.method}"
                f"{', phi fixed' if self.schedule.fixes_phi else ''})")

    def compile_ahead(self, *abstract_arguments) -> None:
        """Starts compiling the bilevel step for ``abstract_arguments`` (shapes and
        shardings, :func:`_step_arguments`) in a thread."""
        compiling = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="l2t-compile")
        self.ahead = compiling.submit(compile_with_notice, self.name(True), self.jitted[True],
                                      *abstract_arguments, notify=self.notify)
        compiling.shutdown(wait=False)

    def for_step(self, step: int, books: "_Bookkeeping", *arguments) -> Callable:
        """Iteration ``step``'s compiled program, compiled for ``arguments`` when first
        needed (then every process waits for the others'); ``books``' clock of the ETA
        leaves the compiles out."""
        update = self.schedule.updates_phi(step)
        if update not in self.compiled:
            compile_started = time.time()
            self.compiled[update] = (
                self.ahead.result() if update and self.ahead is not None else
                compile_with_notice(self.name(update), self.jitted[update], *arguments,
                                    notify=self.notify))
            parallel.wait_for_all(f"l2t_jax/compiled/{int(update)}",
                                  self.config.distributed_init_timeout_s)
            if books.stepping_since is None:
                books.stepping_since = time.time()
            else:                              # the ETA leaves compiles out
                books.stepping_since += time.time() - compile_started
        return self.compiled[update]


class _Bookkeeping:
    """What the loop keeps besides the TrainState: the progress saved with every checkpoint
    (epoch, best val and the test accuracy there, wall seconds, skipped steps), the metrics
    of the steps not yet fetched from the device, the metric log, and the clocks.

    Metrics stay on the device until a log step, a save or 256 pending steps (no host round
    trip per step); each fetch checks them for non-finite values.
    """

    def __init__(self, config, workdir: str, saved: checkpoints.Checkpoints, mesh,
                 progress: dict, start_step: int, total_steps: int, steps_per_epoch: int):
        self.config, self.workdir, self.checkpoints = config, workdir, saved
        self.progress = progress
        self.start_step, self.total_steps = start_step, total_steps
        self.steps_per_epoch = steps_per_epoch
        self.main_process = parallel.is_main_process()
        self.log = (workdir_files.MetricLog(workdir) if self.main_process
                    else workdir_files.NoLog())
        self.pending: list = []          # (step, metrics on device)
        self.started = time.time()       # this start's wall clock (result.json, progress)
        self.wall_before = progress.get("wall_seconds", 0.0)
        self.stepping_since = None       # set after compiling: the ETA's clock
        self.logged_at, self.logged_wait_s = 0.0, 0.0      # the last log step's clocks
        self._state_is_finite = jax.jit(_all_finite,
                                        out_shardings=parallel.replicated_sharding(mesh))

    def wall_seconds(self) -> float:
        return self.wall_before + time.time() - self.started

    def check_pending(self) -> list:
        """Fetches the pending metrics (one transfer); stops at the first non-finite one
        (``on_nonfinite='stop'``) or counts the skipped steps (``'skip'``). Returns
        [(step, host metrics)]."""
        checked = jax.device_get(self.pending)
        self.pending.clear()
        for done, metrics in checked:
            bad = _nonfinite(metrics)
            if self.config.on_nonfinite == "skip":
                self.progress["skipped_steps"] += int(metrics["skipped"])
            elif bad:
                values = ", ".join(f"{k}={np.ravel(metrics[k]).tolist()}" for k in bad)
                raise DivergenceError(
                    f"non-finite {', '.join(bad)} at step {done} ({values}); stopped "
                    f"(config.on_nonfinite='stop'). {self.checkpoints.describe_newest()}: "
                    "lower the learning rates, or rerun with --config.on_nonfinite=skip to "
                    "skip such batches")
        return checked

    def step_done(self, done: int, metrics: dict, data_wait_s: float) -> None:
        """Queues step ``done``'s metrics; at log steps fetches, writes and prints them, with
        the seconds the loop waited for input since the last log step (``data_wait_s``:
        the total so far)."""
        self.pending.append((done, metrics))
        log_step = done % self.config.log_every_steps == 0 or done == self.total_steps
        if not (log_step or len(self.pending) >= 256):
            return
        skipped_before = self.progress["skipped_steps"]
        metrics = self.check_pending()[-1][1]
        if not log_step:
            return
        if self.config.on_nonfinite == "skip":
            metrics = dict(metrics, skipped=self.progress["skipped_steps"] - skipped_before,
                           skipped_total=self.progress["skipped_steps"])
        now = time.time()
        waited, self.logged_wait_s = data_wait_s - self.logged_wait_s, data_wait_s
        interval, self.logged_at = now - max(self.logged_at, self.stepping_since), now
        self.log.write(done, {f"train/{k}": v for k, v in metrics.items()})
        if self.main_process:
            rate = (done - self.start_step) / (now - self.stepping_since)
            logger.info(
                "step %d/%d (epoch %d) ce %.4f transfer %.4f%s%s | %.2f steps/s, "
                "waited for data %.0f%%, ETA %s",
                done, self.total_steps, (done - 1) // self.steps_per_epoch, metrics["ce"],
                metrics["transfer"],
                f" meta {metrics['meta_loss']:.4f}" if "meta_loss" in metrics else "",
                f" | skipped {self.progress['skipped_steps']} steps"
                if self.progress["skipped_steps"] else "",
                rate, 100 * waited / max(interval, 1e-9),
                logs.duration((self.total_steps - done) / rate))

    def epoch_done(self, done: int, epoch: int, accuracies: dict, variables) -> None:
        """Records epoch ``epoch``'s accuracies; a new best val writes ``best/``."""
        progress = self.progress
        progress["epoch"] = epoch + 1
        val = accuracies.get("val", accuracies[self.config.data.eval_splits[0]])
        if val > progress["best_val"]:
            progress.update(best_val=val, test_at_best=accuracies.get("test", val),
                            best_epoch=epoch)
            checkpoints.save_best(self.workdir, variables)
        # The last epoch's numbers (result.json's test_last / val_last): selection-free.
        progress.update(val_last=val, test_last=accuracies.get("test", val))
        self.log.write(done, {f"eval/{k}": v for k, v in accuracies.items()})
        if self.main_process:
            logger.info("epoch %d: %s | best val %.2f (test %.2f)", epoch,
                        " ".join(f"{k} {v:.2f}" for k, v in accuracies.items()),
                        progress["best_val"], progress["test_at_best"])

    def save(self, state) -> None:
        """A checkpoint of ``state``, after checking the pending metrics and the state."""
        self.check_pending()
        done = int(state.step)
        if not bool(self._state_is_finite(state)):
            raise DivergenceError(f"non-finite parameters at step {done} although every "
                                  "watched loss was finite; not saved. "
                                  f"{self.checkpoints.describe_newest()}")
        self.progress["wall_seconds"] = self.wall_seconds()
        self.checkpoints.save(done, state, self.progress)


def _init_fn(config, transfer) -> Callable[[], bilevel.TrainState]:
    """The fresh state's initialisation (config.seed, config.jit_init)."""
    return functools.partial(bilevel.init_state, transfer, jax.random.key(config.seed),
                             (config.data.image_size, config.data.image_size, 3),
                             jit=config.jit_init)


def _abstract_state(config, transfer, mesh) -> bilevel.TrainState:
    """The state's shapes, dtypes and (replicated) sharding, no compute: the restore
    target and the compile's first argument."""
    return parallel.abstract_replicated(mesh, jax.eval_shape(_init_fn(config, transfer)))


def _step_arguments(config, state, mesh, source_variables, held_out_meta: bool) -> tuple:
    """What the step program is called with, as ``jax.ShapeDtypeStruct`` s with their
    shardings: (state, source variables, images, labels[, meta images, meta labels]);
    ``state`` from :func:`_abstract_state`."""
    source = parallel.abstract_replicated(mesh, jax.eval_shape(lambda v: v, source_variables))
    size, sharding = config.data.image_size, parallel.batch_sharding(mesh)
    batch = (jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32,
                                  sharding=sharding),
             jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=sharding))
    return (state, source) + batch * (2 if held_out_meta else 1)


def _initial_state(config, workdir: str, transfer, mesh, saved: checkpoints.Checkpoints,
                   abstract: bilevel.TrainState, resuming: bool):
    """(state, progress): when ``resuming`` (the workdir has checkpoints, checked resumable
    by the caller), restored from the newest readable one into ``abstract``
    (:func:`_abstract_state`); else fresh, and then config.json is written."""
    progress = {"epoch": 0, "best_val": -1.0, "test_at_best": -1.0, "best_epoch": -1,
                "val_last": -1.0, "test_last": -1.0, "wall_seconds": 0.0, "skipped_steps": 0}
    if resuming:
        state, restored_progress = saved.restore_latest_readable(abstract)
        progress.update(restored_progress)
        logger.info("resumed from step %d", int(state.step))
        return state, progress
    if parallel.is_main_process():
        logger.info("initialising the training state (seed %d)...", config.seed)
    state = parallel.replicate(mesh, _init_fn(config, transfer)())   # one seed everywhere
    if parallel.is_main_process():
        workdir_files.write_config(workdir, config_for_comparison(config))
    return state, progress


def _describe(config, transfer, splits) -> None:
    logger.info("data %s (%s): %s examples", config.data.name, config.data.kind,
                ", ".join(f"{split} {len(source)}" for split, source in splits.items()))
    logger.info("%s: %s%s -> %s, %d pairs", config.method,
                config.source_model if transfer.source_model is not None else "no source",
                f" ({config.source_checkpoint})" if transfer.source_model is not None else "",
                config.target_model, len(transfer.pairs))
    scaled = (f" ({config.learning_rate:g} per {config.lr_reference_batch_size} examples, "
              f"batch {config.batch_size})" if config.lr_reference_batch_size
              and config.lr_reference_batch_size != config.batch_size else "")
    logger.info("theta's learning rate %g%s, %s schedule over %d epochs",
                build.base_learning_rate(config), scaled, config.lr_schedule, config.epochs)


# ---------------------------------------------------------------------------- the loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) the experiment in ``workdir``; returns the result dict.

    Data parallel over every device of every process (:mod:`l2t_jax.training.parallel`): the batch
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
      Preempted: SIGTERM or SIGINT; a checkpoint was saved at the step where the run stopped
        (within one step of the signal, plus the save; an epoch-end evaluation in progress
        is cut short ``config.preemption_grace_s`` after the signal and runs again on
        resume).
      workdir.RunFileError: a file of the run (metrics.jsonl, TensorBoard events, the JSON
        files) could not be written; the message names it and the intact checkpoints.
    """
    try:
        return _train_and_evaluate(config, workdir)
    except workdir_files.RunFileError as e:
        e.message += f". {_checkpoints_untouched(workdir)}"
        raise


def _checkpoints_untouched(workdir: str) -> str:
    """One sentence for a RunFileError: the checkpoints a rerun resumes from."""
    directory = workdir_files.path(workdir, workdir_files.CHECKPOINTS)
    steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) \
        if os.path.isdir(directory) else []
    return (f"The checkpoints in {directory} (steps {steps}) were not touched: free space "
            "or make the workdir writable, then run the same command again to resume")


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    # A no-op unless launched as several processes (and after main has started it).
    parallel.maybe_initialize_distributed(
        timeouts=parallel.DistributedTimeouts.from_config(config))
    config, splits, transfer, source_variables = _build(config, workdir)
    main_process = parallel.is_main_process()
    steps_per_epoch = build.steps_per_epoch(config, len(splits["train"]))
    total_steps = steps_per_epoch * config.epochs
    mesh = parallel.make_mesh()
    rows = parallel.process_batch_slice(config.batch_size, mesh)
    logger.info("data parallel over %d devices (%d processes); process %d loads rows "
                "%d-%d of each batch of %d", mesh.size, jax.process_count(),
                jax.process_index(), rows.start, rows.stop - 1, config.batch_size)
    saved = checkpoints.Checkpoints(workdir, config.keep_checkpoints)
    schedule = PhiSchedule.of(config, total_steps, transfer.meta_networks is not None)
    programs = _StepPrograms(config, transfer,
                             build.learning_rate_schedule(config, steps_per_epoch), mesh,
                             schedule)
    resuming_from = saved.latest_step()
    if resuming_from is not None:
        check_resumable(config, workdir)      # before anything compiles
    abstract_state = _abstract_state(config, transfer, mesh)
    if resuming_from is None or resuming_from < total_steps:   # a finished run compiles nothing
        programs.compile_ahead(*_step_arguments(config, abstract_state, mesh, source_variables,
                                                programs.held_out))
    state, progress = _initial_state(config, workdir, transfer, mesh, saved, abstract_state,
                                     resuming=resuming_from is not None)
    source_variables = parallel.replicate(mesh, source_variables)
    eval_step = evaluation.eval_program(transfer, mesh)
    books = _Bookkeeping(config, workdir, saved, mesh, progress, int(state.step), total_steps,
                         steps_per_epoch)
    run_info = provenance.run_metadata()
    books.log.write_run(books.start_step, run_info)
    stop = stopping.StopRequest()
    inputs_from = _StepInputs(config, splits, mesh, steps_per_epoch, books.start_step,
                              total_steps, schedule)

    def end_of_epoch(done: int) -> bool:
        """Evaluates the epoch that step ``done`` ends (``best/``, the log); False when a
        stop request cut the evaluation short (nothing recorded: it runs again on
        resume)."""
        books.check_pending()
        variables = {"params": state.target_params["model"],
                     "batch_stats": state.batch_stats}
        epoch = done // steps_per_epoch - 1
        accuracies = _evaluate_epoch(config, splits, eval_step, variables, mesh, stop, epoch)
        if accuracies is not None:
            books.epoch_done(done, epoch, accuracies, variables)
        return accuracies is not None

    def stopped(done: int, evaluation_cut: bool = False) -> stopping.Preempted:
        preempted = stopping.Preempted(done, saved.directory, stop.exit_signal,
                                       done // steps_per_epoch - 1 if evaluation_cut else None)
        logger.warning("%s", preempted)
        return preempted

    try:
        start = books.start_step
        if start and start % steps_per_epoch == 0 and progress["epoch"] < start // steps_per_epoch:
            # Resumed from a checkpoint whose epoch-end evaluation a stop request cut short.
            logger.info("evaluating epoch %d, cut short before the run stopped",
                        start // steps_per_epoch - 1)
            if not end_of_epoch(start):
                raise stopped(start, evaluation_cut=True)       # checkpoint `start` exists
        next_batch = inputs_from.next(start) if start < total_steps else None
        inputs_from.wait_s = inputs_from.max_wait_s = 0.0   # read while compiling: no wait
        for step in range(start, total_steps):
            inputs = next_batch
            program = programs.for_step(step, books, state, source_variables, *inputs)
            state, metrics = program(state, source_variables, *inputs)
            done = step + 1
            # The next batch is loaded while this step runs; then the loop waits for the
            # step. jax dispatches asynchronously: without the wait the loop ran ahead up to
            # the next metrics fetch (log_every_steps, up to 256 steps), and every step
            # dispatched had to run before a stop request could save. One step in flight
            # bounds that to one step, for the cost of the host's time to dispatch a step.
            next_batch = inputs_from.next(done) if done < total_steps else None
            jax.block_until_ready(metrics)
            books.step_done(done, metrics, inputs_from.wait_s)
            saved_now = done % steps_per_epoch == 0 or done % config.checkpoint_every_steps == 0
            evaluated = done % steps_per_epoch != 0 or end_of_epoch(done)
            if saved_now or not evaluated:
                books.save(state)
            if not evaluated:
                raise stopped(done, evaluation_cut=True)
            if done < total_steps and stop.requested(done):
                if not saved_now:
                    books.save(state)
                raise stopped(done)
    finally:
        inputs_from.close()
        stop.close()
        books.log.close()
    saved.wait()
    weights = results.transfer_weights(transfer, state, source_variables, splits, config,
                                       mesh)
    if weights is not None and main_process:    # None: the method learns no weights
        workdir_files.write_transfer_weights(workdir, weights)
    if config.export_source:
        checkpoints.export_source(workdir, config, mesh, transfer.target_model)
    result = results.result_record(
        config, transfer, progress, steps=total_steps, train_examples=len(splits["train"]),
        wall_seconds=books.wall_seconds(), data_wait_s=inputs_from.wait_s,
        data_wait_max_step_s=inputs_from.max_wait_s, run_info=run_info)
    if main_process:
        path = workdir_files.write_result(workdir, result)
        logger.info("test accuracy %.2f%% at the best val accuracy %.2f%% (epoch %d), "
                    "%.2f%% at the last epoch; wrote %s", result["test_at_best_val"],
                    result["best_val"], result["best_epoch"], result["test_last"], path)
    return result


def _build(config, workdir: str) -> tuple:
    """(config with its data resolved, splits, transfer, source variables), checked: config
    and data errors raise here, before anything compiles. Creates the workdir."""
    config = build.resolve_data(config)       # an image folder's classes (checked)
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    splits = build.load_splits(config)
    transfer = build.build_transfer(config)
    source_variables = build.load_source_variables(config, transfer)
    bilevel.check_source_variables(transfer, source_variables)
    if parallel.is_main_process():
        _describe(config, transfer, splits)
    return config, splits, transfer, source_variables


def _evaluate_epoch(config, splits: dict, eval_step, variables, mesh,
                    stop: stopping.StopRequest, epoch: int) -> dict | None:
    """{split: top-1 %} of the target ``variables`` on every split of
    ``config.data.eval_splits`` after epoch ``epoch``, or None when a stop request cut the
    evaluation short (``config.preemption_grace_s`` after it; logged)."""
    accuracies = {}
    for split in config.data.eval_splits:
        accuracy = evaluation.evaluate(
            eval_step, variables, splits[split], config, mesh,
            cut=lambda: stop.cut_evaluation(config.preemption_grace_s))
        if accuracy is None:
            logger.warning("evaluation of epoch %d cut short by %s, %.1f s after it "
                           "(config.preemption_grace_s=%g)", epoch,
                           signal.Signals(stop.exit_signal).name,
                           time.monotonic() - stop.received_at, config.preemption_grace_s)
            return None
        accuracies[split] = accuracy
    return accuracies

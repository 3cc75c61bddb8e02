"""The training loop: the jitted step over the data, evaluation, bookkeeping, faults.

``train_and_evaluate(config, workdir)`` runs one experiment (configs/*.py): what it is built
from comes from :mod:`l2t_jax.training.build`, the checkpoints from :mod:`l2t_jax.training.checkpoints`, the
files from :mod:`l2t_jax.training.workdir`. theta trains by SGD-momentum on a per-epoch schedule, phi
by Adam, one jitted bilevel step per batch (:func:`step_program`, the program the benchmark
times too), evaluation on val and test after every epoch, and the reported number: test
accuracy at the best val accuracy (``result.json``). Starting again with the same workdir
resumes from the latest checkpoint; batches are a pure function of (seed, epoch, index), so
the resumed run ends with the same parameters as an uninterrupted one.

Data parallel and multi-host through :mod:`l2t_jax.training.parallel`: the step runs under jit on a
mesh of every device (the batch split over ``data``, state and source replicated), each
process loads only its rows of every batch, and only process 0 writes files other than
checkpoints. With one device the numbers are those of a plain ``jax.jit``.

Faults (tests/test_faults.py injects each one):

- config and data errors raise ValueError / DataError / FileNotFoundError naming the key or
  file, before anything is compiled;
- the newest checkpoint unreadable: resume from the newest readable one; a save that fails
  raises :class:`~l2t_jax.training.checkpoints.CheckpointError` naming the directory;
- SIGTERM or SIGINT (Ctrl-C): a checkpoint at the next step boundary, then
  :class:`Preempted` (exit status 143 or 130). At most one step is in flight, so the run
  stops within one step of the signal plus one save; an epoch-end evaluation is cut short
  ``config.preemption_grace_s`` after it (and runs again on resume). A second signal ends
  the process at once;
- non-finite losses, meta-gradients or parameters: :class:`DivergenceError` naming the step
  and the quantity (``config.on_nonfinite='stop'``), or the batch's update dropped inside
  the step (``'skip'``). The metrics of every step are checked at log steps and before
  every save (no host round trip per step), and the state before every save: no checkpoint
  holds a non-finite parameter.
"""
from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from l2t_jax import data
from l2t_jax.training import build, checkpoints, compile_cache, logs, parallel, provenance
from l2t_jax.transfer import bilevel
from l2t_jax.training import workdir as workdir_files
from l2t_jax.training.checkpoints import CheckpointError  # noqa: F401  (what a save raises here)
from l2t_jax.training.config import check_resumable, config_for_comparison, validate_config

logger = logging.getLogger(__name__)

PyTree = Any


class DivergenceError(FloatingPointError):
    """A non-finite loss, meta-gradient or parameter with ``config.on_nonfinite='stop'``;
    the message names the step and the quantity. Nothing non-finite was checkpointed."""


class Preempted(Exception):
    """SIGTERM (preemption) or SIGINT (Ctrl-C) stopped the run at a step boundary after
    saving a checkpoint; running the same command again resumes from it. :mod:`l2t_jax.main`
    exits with :attr:`exit_code` on it: 143 after SIGTERM (:data:`PREEMPTED_EXIT_CODE`), 130
    after Ctrl-C (:data:`INTERRUPTED_EXIT_CODE`), as a shell reports a process ended by that
    signal (non-zero: the run is not finished)."""

    def __init__(self, step: int, directory: str, signum: int = signal.SIGTERM,
                 evaluation_cut: int | None = None):
        what = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM"
        cut = (f" (the evaluation of epoch {evaluation_cut} was cut short: it runs again on "
               "resume)" if evaluation_cut is not None else "")
        super().__init__(f"stopped by {what} after step {step}: saved a checkpoint of step "
                         f"{step} in {directory}{cut}; run the same command again to resume")
        self.step = step
        self.exit_code = 128 + int(signum)


PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM   # 143: what a shell reports after SIGTERM
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT  # 130: ... after Ctrl-C
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
    (``config.meta_loss_batch='held_out'``). The training loop runs it and the benchmark
    times it."""
    step = functools.partial(bilevel.train_step, transfer, learning_rate_fn,
                             update_phi=update_phi)
    if on_nonfinite == "skip":
        step = skip_nonfinite(step)
    return parallel.jit_sharded_step(step, mesh, batches=2 if held_out_meta else 1)


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


class _StopRequest:
    """SIGTERM (preemption) or SIGINT (Ctrl-C) -> stop at the next step boundary.

    One process: handlers that only note the signal and its time (restored by
    :meth:`close`). Several processes: they must stop at the same step, so jax's preemption
    sync point decides (its service catches SIGTERM in every process and agrees on a step);
    Ctrl-C is handed to it as SIGTERM. After the first signal the second is left to the OS
    (its default action ends the process at once, nothing saved), so that it works even
    while the main thread is inside a compiled step, where Python handlers cannot run.
    """

    def __init__(self):
        self.signum = None               # the first signal received
        self.received_at = None          # time.monotonic() of it
        self.previous = {}
        self.multiprocess = jax.process_count() > 1
        if threading.current_thread() is not threading.main_thread():
            return                       # signal handlers can only be set in the main thread
        if self.multiprocess:
            from jax._src import distributed
            if distributed.global_state.preemption_sync_manager is None:
                logger.warning("jax's preemption service is off: SIGTERM will not save a "
                               "checkpoint before the processes end")
                self.multiprocess = None
                return
            handled = (signal.SIGINT,)   # SIGTERM is the preemption service's
        else:
            handled = (signal.SIGTERM, signal.SIGINT)
        for signum in handled:
            self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:      # a second one before the first handler returned
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum, self.received_at = signum, time.monotonic()
        signal.signal(signum, signal.SIG_DFL)        # the next one ends the process
        if self.multiprocess and signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)     # to jax's preemption service

    def requested(self, step: int) -> bool:
        """Whether to stop after ``step``. Several processes: every process must call it
        at every step (the sync point is collective)."""
        if self.multiprocess:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signum is not None

    def cut_evaluation(self, grace_s: float) -> bool:
        """Whether an evaluation in progress stops now: a signal came ``grace_s`` seconds
        ago or more. One process only: several would have to agree on the batch (a
        collective per batch), so their evaluations run to the end."""
        return (not self.multiprocess and self.signum is not None
                and time.monotonic() - self.received_at >= grace_s)

    @property
    def exit_signal(self) -> int:
        return self.signum if self.signum is not None else signal.SIGTERM

    def close(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous = {}


def eval_batches(source, config, mesh):
    """The evaluation batches of ``source`` in order, as global arrays split over the mesh:
    yields (images, labels, number of real rows). Batches of ``eval_batch_size`` rounded up
    to a multiple of the device count; each process loads only its rows, and rows past the
    end of the data are padding (label -1). One shape for every batch: no recompilation."""
    batch = -(-config.eval_batch_size // mesh.size) * mesh.size
    batches = data.eval_batches(source, config.data.image_size, batch,
                                rows=parallel.process_batch_slice(batch, mesh),
                                threads=config.data.read_threads,
                                prefetch_batches=config.data.prefetch_batches)
    try:
        for images, labels, real in batches:
            yield (*parallel.global_batch(mesh, images, labels), real)
    finally:
        batches.close()


def evaluate(eval_step, variables, source, config, mesh,
             cut: Callable[[], bool] | None = None) -> float | None:
    """Top-1 accuracy (%) of the target on ``source`` (eval-mode BN; padding rows, label
    -1, are not counted), or None if ``cut()`` became true between two batches (a stop
    request past its grace period). At most one batch is in flight, so a cut takes effect
    within one batch."""
    correct, in_flight = 0, None
    for images, labels, _ in eval_batches(source, config, mesh):
        count = eval_step(variables, images, labels)
        if in_flight is not None:
            correct += int(in_flight)
        in_flight = count
        if cut is not None and cut():
            return None
    correct += int(in_flight) if in_flight is not None else 0
    return 100.0 * correct / len(source)


def transfer_weights(transfer: bilevel.Transfer, state, source_variables, source, config,
                     mesh, max_batches: int = 4) -> dict:
    """What phi learned (transfer_weights.json): the meta-networks' outputs
    (:func:`l2t_jax.transfer.bilevel.meta_weights`) averaged over the first ``max_batches``
    evaluation batches of ``source``: per pair the mean lambda and the mean channel weights,
    with the pairs and the taps' channel counts (for :mod:`l2t_jax.tools.plots`). Every process
    calls it."""
    replicated = parallel.replicated_sharding(mesh)

    @functools.partial(jax.jit, out_shardings=replicated)
    def weights(meta_params, source_variables, images):
        _, _, pooled = bilevel.source_forward(transfer, source_variables, images)
        return bilevel.meta_weights(transfer, meta_params, pooled)

    sums, count = None, 0
    for b, (images, _, rows) in enumerate(eval_batches(source, config, mesh)):
        if b == max_batches:
            break
        per_row = jax.device_get(weights(state.meta_params, source_variables, images))
        batch_sums = jax.tree.map(lambda w: np.sum(w[:rows], axis=0), per_row)
        sums = batch_sums if sums is None else jax.tree.map(np.add, sums, batch_sums)
        count += rows
    channel, pair = jax.tree.map(lambda w: (w / count).tolist(), sums)
    return {"pairs": [list(p) for p in transfer.pairs],
            "source_taps": [t.channels for t in transfer.source_model.feature_taps()],
            "target_taps": [t.channels for t in transfer.target_model.feature_taps()],
            "source_tap_names": list(transfer.source_model.taps),
            "target_tap_names": list(transfer.target_model.taps),
            "pair_weights": pair, "channel_weights": channel}


class _StepInputs:
    """The steps' inputs from ``start`` on, as global arrays: this process's rows of each
    train batch and, on the steps that update phi with the held-out meta loss, of the meta
    split's batch (a stream of its own, seeded apart). Read ahead by
    :func:`l2t_jax.data.step_batches`; ``wait_s`` adds up the seconds the loop waited for
    them, ``max_wait_s`` is the longest wait of one step."""

    def __init__(self, config, splits: dict, mesh, steps_per_epoch: int, start: int,
                 total_steps: int, meta_every: int | None):
        rows = parallel.process_batch_slice(config.batch_size, mesh)

        def stream(split: str, seed: int, steps: range):
            return iter(data.step_batches(
                splits[split], steps, steps_per_epoch=steps_per_epoch,
                batch_size=config.batch_size, rows=rows, image_size=config.data.image_size,
                seed=seed, hflip=config.data.hflip, crop_padding=config.data.crop_padding,
                threads=config.data.read_threads,
                prefetch_batches=config.data.prefetch_batches))
        self.mesh, self.meta_every = mesh, meta_every
        self.wait_s = self.max_wait_s = 0.0
        self.train = stream("train", config.seed, range(start, total_steps))
        self.meta = None
        if meta_every is not None:
            first = -(-start // meta_every) * meta_every
            self.meta = stream("meta", int(np.random.SeedSequence(
                [config.seed, 1]).generate_state(1)[0]), range(first, total_steps, meta_every))

    def next(self, step: int) -> tuple:
        """Step ``step``'s inputs: (images, labels), then the meta batch if it has one.
        Steps are read in order, each once."""
        started = time.perf_counter()
        inputs = parallel.global_batch(self.mesh, *next(self.train))
        if self.meta is not None and step % self.meta_every == 0:
            inputs += parallel.global_batch(self.mesh, *next(self.meta))
        waited = time.perf_counter() - started
        self.wait_s, self.max_wait_s = self.wait_s + waited, max(self.max_wait_s, waited)
        return inputs

    def close(self) -> None:
        for iterator in (self.train, self.meta):
            if iterator is not None:
                iterator.close()


def _eval_program(transfer: bilevel.Transfer, mesh):
    """``eval_step(variables, images, labels)``: the number of correct rows (label >= 0)."""
    replicated, batch = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)

    def correct(variables, images, labels):
        logits, _ = transfer.target_model.apply(variables, images, train=False)
        return jnp.sum((jnp.argmax(logits, -1) == labels) & (labels >= 0))
    return jax.jit(correct, out_shardings=replicated, in_shardings=(replicated, batch, batch))


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
                "wall_seconds": 0.0, "skipped_steps": 0}
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
    config = build.resolve_data(config)       # an image folder's classes (checked)
    validate_config(config)
    main_process = parallel.is_main_process()
    os.makedirs(workdir, exist_ok=True)
    splits = build.load_splits(config)
    transfer = build.build_transfer(config)
    source_variables = build.load_source_variables(config, transfer)
    bilevel.check_source_variables(transfer, source_variables)
    if main_process:
        _describe(config, transfer, splits)
    steps_per_epoch = build.steps_per_epoch(config, len(splits["train"]))
    total_steps = steps_per_epoch * config.epochs
    mesh = parallel.make_mesh()
    rows = parallel.process_batch_slice(config.batch_size, mesh)
    logger.info("data parallel over %d devices (%d processes); process %d loads rows "
                "%d-%d of each batch of %d", mesh.size, jax.process_count(),
                jax.process_index(), rows.start, rows.stop - 1, config.batch_size)
    saved = checkpoints.Checkpoints(workdir, config.keep_checkpoints)
    schedule = build.learning_rate_schedule(config, steps_per_epoch)
    # With meta_update_every = k > 1, iterations k, 2k, ... (counting from 0) take the
    # bilevel step, the others the real step with phi fixed: two programs. The first
    # (the bilevel step) compiles in a thread from the arguments' shapes while the state
    # is initialised or restored (XLA's compile leaves the interpreter free); the other
    # when first needed.
    every = config.meta_update_every if transfer.meta_networks is not None else 1
    held_out = config.meta_loss_batch == "held_out"
    programs = {update: step_program(transfer, schedule, mesh, config.on_nonfinite,
                                     update_phi=update, held_out_meta=held_out and update)
                for update in ((True, False) if every > 1 else (True,))}

    def what(update: bool) -> str:
        return (f"training step ({config.method}, T={config.T})"
                if transfer.meta_networks is not None and update else
                f"training step ({config.method}{', phi fixed' if every > 1 else ''})")
    resuming_from = saved.latest_step()
    if resuming_from is not None:
        check_resumable(config, workdir)      # before anything compiles
    abstract_state = _abstract_state(config, transfer, mesh)
    first_program = None                  # a finished run has nothing to compile
    if resuming_from is None or resuming_from < total_steps:
        compiling = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="l2t-compile")
        first_program = compiling.submit(
            compile_with_notice, what(True), programs[True],
            *_step_arguments(config, abstract_state, mesh, source_variables, held_out),
            notify=main_process)
        compiling.shutdown(wait=False)
    state, progress = _initial_state(config, workdir, transfer, mesh, saved, abstract_state,
                                     resuming=resuming_from is not None)
    source_variables = parallel.replicate(mesh, source_variables)
    eval_step = _eval_program(transfer, mesh)
    books = _Bookkeeping(config, workdir, saved, mesh, progress, int(state.step), total_steps,
                         steps_per_epoch)
    run_info = provenance.run_metadata()
    books.log.write_run(books.start_step, run_info)
    stop = _StopRequest()
    inputs_from = _StepInputs(config, splits, mesh, steps_per_epoch, books.start_step,
                              total_steps, every if held_out else None)

    def end_of_epoch(done: int) -> bool:
        """Evaluates the epoch that step ``done`` ends (``best/``, the log); False when a
        stop request cut the evaluation short (nothing recorded: it runs again on
        resume)."""
        books.check_pending()
        variables = {"params": state.target_params["model"],
                     "batch_stats": state.batch_stats}
        accuracies = {}
        for split in config.data.eval_splits:
            accuracy = evaluate(eval_step, variables, splits[split], config, mesh,
                                cut=lambda: stop.cut_evaluation(config.preemption_grace_s))
            if accuracy is None:
                logger.warning("evaluation of epoch %d cut short by %s, %.1f s after it "
                               "(config.preemption_grace_s=%g)", done // steps_per_epoch - 1,
                               signal.Signals(stop.exit_signal).name,
                               time.monotonic() - stop.received_at, config.preemption_grace_s)
                return False
            accuracies[split] = accuracy
        books.epoch_done(done, done // steps_per_epoch - 1, accuracies, variables)
        return True

    def stopped(done: int, evaluation_cut: bool = False) -> Preempted:
        preempted = Preempted(done, saved.directory, stop.exit_signal,
                              done // steps_per_epoch - 1 if evaluation_cut else None)
        logger.warning("%s", preempted)
        return preempted

    compiled = {}                        # update_phi -> its compiled program
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
            update = step % every == 0
            if update not in compiled:
                compile_started = time.time()
                compiled[update] = (
                    first_program.result() if update and first_program is not None else
                    compile_with_notice(what(update), programs[update], state,
                                        source_variables, *inputs, notify=main_process))
                parallel.wait_for_all(f"l2t_jax/compiled/{int(update)}",
                                      config.distributed_init_timeout_s)
                if books.stepping_since is None:
                    books.stepping_since = time.time()
                else:                              # the ETA leaves compiles out
                    books.stepping_since += time.time() - compile_started
            state, metrics = compiled[update](state, source_variables, *inputs)
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
    if transfer.meta_networks is not None:
        weights = transfer_weights(transfer, state, source_variables,
                                   splits[config.data.eval_splits[0]], config, mesh)
        if main_process:
            workdir_files.write_transfer_weights(workdir, weights)
    if config.export_source:
        checkpoints.export_source(workdir, config, mesh, transfer.target_model)
    result = {"test_at_best_val": progress["test_at_best"], "best_val": progress["best_val"],
              "best_epoch": progress["best_epoch"], "steps": total_steps,
              "dataset": config.data.name, "source": config.source_model,
              "target": config.target_model, "seed": config.seed, "method": config.method,
              "scheme": str(config.pairs), "pairs": [list(p) for p in transfer.pairs],
              "train_examples_per_class": config.data.train_examples_per_class,
              "train_examples": len(splits["train"]),
              "extra_sources": [dict(s)["model"] for s in config.extra_sources],
              "skipped_steps": progress["skipped_steps"],
              "learning_rate": build.base_learning_rate(config),
              "wall_seconds": round(books.wall_seconds(), 1),
              # this start's waits for input (a resumed run counts from its restart)
              "data_wait_seconds": round(inputs_from.wait_s, 3),
              "data_wait_max_step_seconds": round(inputs_from.max_wait_s, 4),
              "run": run_info}
    if main_process:
        path = workdir_files.write_result(workdir, result)
        logger.info("test accuracy %.2f%% at the best val accuracy %.2f%% (epoch %d); "
                    "wrote %s", result["test_at_best_val"], result["best_val"],
                    result["best_epoch"], path)
    return result

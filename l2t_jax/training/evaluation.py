"""Evaluation during training: the target's top-1 accuracy on a split, over the mesh.

:func:`eval_program` is the jitted count of correct rows, :func:`eval_batches` the split's
batches as global arrays (each process loads only its rows; padding rows have label -1)
and :func:`evaluate` the accuracy, which a stop request past its grace period can cut short
between two batches. :func:`l2t_jax.training.results.transfer_weights` reads the same
batches. (:mod:`l2t_jax.evaluate` evaluates a finished run's target on one device.)
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from l2t_jax import data
from l2t_jax.training import parallel
from l2t_jax.transfer import bilevel


def eval_program(transfer: bilevel.Transfer, mesh):
    """``eval_step(variables, images, labels)``: the number of correct rows (label >= 0)."""
    replicated, batch = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)

    def correct(variables, images, labels):
        logits, _ = transfer.target_model.apply(variables, images, train=False)
        return jnp.sum((jnp.argmax(logits, -1) == labels) & (labels >= 0))
    return jax.jit(correct, out_shardings=replicated, in_shardings=(replicated, batch, batch))


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

"""What a finished run reports: the result record (``result.json``) and what phi learned
(``transfer_weights.json``).

:func:`result_record` is the dict :mod:`l2t_jax.training.train` writes last (its presence
marks the run finished, :mod:`l2t_jax.training.workdir`): test accuracy at the best val
accuracy and at the last epoch, what the run was, and its timing and provenance.
:func:`transfer_weights` averages the meta-networks' outputs over a few evaluation
batches, for :mod:`l2t_jax.tools.plots`.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from l2t_jax.training import build, evaluation, parallel
from l2t_jax.transfer import bilevel


def result_record(config, transfer: bilevel.Transfer, progress: dict, *, steps: int,
                  train_examples: int, wall_seconds: float, data_wait_s: float,
                  data_wait_max_step_s: float, run_info: dict) -> dict:
    """``result.json``: the reported numbers, ``test_at_best_val`` (test accuracy, %, at the
    epoch of the best val accuracy: the paper's protocol) and ``test_last`` / ``val_last``
    (test and val accuracy, %, after the last epoch: no selection), from the loop's
    ``progress`` (-1.0 for a run resumed from a checkpoint written before they were kept
    that finished without evaluating again), what the run was (its
    ``steps``, the size of its train split), its skipped steps, its wall seconds (every
    start added up), this start's waits for input in seconds (a resumed run counts from its
    restart) and ``run_info`` (:func:`l2t_jax.training.provenance.run_metadata`)."""
    return {"test_at_best_val": progress["test_at_best"], "best_val": progress["best_val"],
            "best_epoch": progress["best_epoch"], "test_last": progress["test_last"],
            "val_last": progress["val_last"], "steps": steps,
            "dataset": config.data.name, "source": config.source_model,
            "target": config.target_model, "seed": config.seed, "method": config.method,
            "scheme": str(config.pairs), "pairs": [list(p) for p in transfer.pairs],
            "train_examples_per_class": config.data.train_examples_per_class,
            "train_examples": train_examples,
            "extra_sources": [dict(s)["model"] for s in config.extra_sources],
            "skipped_steps": progress["skipped_steps"],
            "learning_rate": build.base_learning_rate(config),
            "wall_seconds": round(wall_seconds, 1),
            "data_wait_seconds": round(data_wait_s, 3),
            "data_wait_max_step_seconds": round(data_wait_max_step_s, 4),
            "run": run_info}


def transfer_weights(transfer: bilevel.Transfer, state, source_variables, source, config,
                     mesh, max_batches: int = 4) -> dict:
    """What phi learned (transfer_weights.json): the meta-networks' outputs
    (:func:`l2t_jax.transfer.bilevel.meta_weights`) averaged over the first ``max_batches``
    evaluation batches of ``source``: per pair the mean lambda and the mean channel weights,
    with the pairs and the taps' channel counts (for :mod:`l2t_jax.tools.plots`). Every
    process calls it."""
    replicated = parallel.replicated_sharding(mesh)

    @functools.partial(jax.jit, out_shardings=replicated)
    def weights(meta_params, source_variables, images):
        _, _, pooled = bilevel.source_forward(transfer, source_variables, images)
        return bilevel.meta_weights(transfer, meta_params, pooled)

    sums, count = None, 0
    for b, (images, _, rows) in enumerate(evaluation.eval_batches(source, config, mesh)):
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

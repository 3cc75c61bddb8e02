"""What a finished run reports: the result record (``result.json``) and what it learned
about where to transfer (``transfer_weights.json``).

:func:`result_record` is the dict :mod:`l2t_jax.training.train` writes last (its presence
marks the run finished, :mod:`l2t_jax.training.workdir`): test accuracy at the best val
accuracy and at the last epoch, what the run was, and its timing and provenance.
:func:`transfer_weights` averages, over a few evaluation batches, the meta-networks' pair
and channel weights (L2T-w, L2T-ww) or the attention per pair of a method that learns it
jointly with the target (AFD, SemCKD), and says how each is normalised, for
:mod:`l2t_jax.tools.weight_plots`.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from l2t_jax import data
from l2t_jax.training import build, evaluation, parallel
from l2t_jax.transfer import bilevel, methods


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


# How each method's attention over tap pairs is normalised: the softmax axis of its module
# (l2t_jax/transfer/afd.py, semckd.py), keyed by the name of the term that reports
# ``pair_attention``: (the taps a weight sums to one over, in words). A term missing here
# is recorded as "unknown" rather than guessed.
ATTENTION_NORMALISATION = {
    "afd": ("target_taps", "a softmax over the target taps for each source tap: the "
                           "weights of one source tap's pairs sum to 1"),
    "semckd": ("source_taps", "a softmax over the source taps for each target tap: the "
                              "weights of one target tap's pairs sum to 1"),
}
UNKNOWN_NORMALISATION = ("unknown", "its normalisation is not recorded")


def transfer_weights(transfer: bilevel.Transfer, state, source_variables, splits: dict,
                     config, mesh, max_batches: int = 4) -> dict | None:
    """What the run learned about where (and what) to transfer, for
    ``transfer_weights.json`` and :mod:`l2t_jax.tools.weight_plots`; None for a method that
    learns neither (no meta-networks, no attention over pairs). Every process calls it.

    Read on the first evaluation split (``config.data.eval_splits[0]``):

    * methods with meta-networks (L2T-w, L2T-ww; :func:`_meta_weights`): per pair the mean
      lambda (``pair_weights``, None without g) and the mean channel weights;
    * methods whose term reports ``pair_attention`` (AFD, SemCKD;
      :func:`_pair_attention`): per pair the mean attention.

    The record holds the pairs, the taps' channel counts and names, and ``where``: which
    key holds the per-pair weights (``pair_weights`` or ``pair_attention``), what they sum
    to one over (``normalised_over``: ``target_taps``, ``source_taps``, None for L2T-ww's
    unnormalised lambda, ``unknown`` for a term not in :data:`ATTENTION_NORMALISATION`), a
    sentence saying so, the split and the number of images; None for L2T-w (lambda = 1).
    """
    attention_terms = [t for t in transfer.terms if "pair_attention" in t.metrics]
    if transfer.meta_networks is None and not attention_terms:
        return None
    split = config.data.eval_splits[0]
    record = {"method": config.method,
              "pairs": [list(p) for p in transfer.pairs],
              "source_taps": [t.channels for t in transfer.source_model.feature_taps()],
              "target_taps": [t.channels for t in transfer.target_model.feature_taps()],
              "source_tap_names": list(transfer.source_model.taps),
              "target_tap_names": list(transfer.target_model.taps),
              "pair_weights": None, "pair_attention": None, "channel_weights": None,
              "where": None}
    if transfer.meta_networks is not None:
        record.update(_meta_weights(transfer, state, source_variables, splits[split], split,
                                    config, mesh, max_batches))
    for term in attention_terms:    # at most one: two terms cannot report one metric
        record.update(_pair_attention(transfer, term, state, source_variables,
                                      splits[split], split, config, mesh, max_batches))
    return record


def _meta_weights(transfer: bilevel.Transfer, state, source_variables, source, split: str,
                  config, mesh, max_batches: int) -> dict:
    """The meta-networks' outputs (:func:`l2t_jax.transfer.bilevel.meta_weights`) averaged
    over the first ``max_batches`` evaluation batches of ``source`` (padding rows left
    out): ``pair_weights`` (mean lambda per pair, or None), ``channel_weights`` (per pair
    the mean weight of each source channel) and ``where``."""
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
    where = None
    if pair is not None:
        kind = transfer.meta_networks.pair_weight_type
        display = methods.get_method(config.method).display
        where = {"key": "pair_weights", "normalised_over": None,
                 "description": f"{display}'s pair weight lambda ({kind} of g's output) per "
                                f"pair, the mean over {count} {split} images; not "
                                "normalised: each pair's lambda is its own (0 switches the "
                                "pair off)",
                 "split": split, "images": count}
    return {"pair_weights": pair, "channel_weights": channel, "where": where}


def _pair_attention(transfer: bilevel.Transfer, term, state, source_variables, source,
                    split: str, config, mesh, max_batches: int) -> dict:
    """The term's ``pair_attention`` (batch mean of its attention per pair), computed as
    in a training step (:func:`l2t_jax.transfer.bilevel.target_losses`: the target and the
    term's module in train mode, on the batch's statistics; nothing is updated) on
    un-augmented images of ``source``, in batches of ``config.batch_size`` (SemCKD's
    module takes exactly that many examples, and both modules' attention depends on the
    batch), averaged over up to ``max_batches`` batches: the first ``len(source) //
    batch_size`` of the split, or, for a split smaller than one batch, the split repeated
    to one batch, as training repeats a small train split to fill its batches.
    Returns ``pair_attention`` and ``where``."""
    replicated = parallel.replicated_sharding(mesh)
    batch_size = config.batch_size
    batches = max(1, min(max_batches, len(source) // batch_size))
    positions = np.arange(batches * batch_size) % len(source)
    sized = config.copy_and_resolve_references()
    sized.eval_batch_size = batch_size      # a multiple of the device count (checked)

    @functools.partial(jax.jit, out_shardings=replicated)
    def attention(state, source_variables, images, labels):
        batch = bilevel.batch_constants(transfer, state, source_variables, images, labels)
        _, _, reports, _, _ = bilevel.target_losses(
            transfer, state.target_params, state.batch_stats, batch, (term,))
        return reports["pair_attention"]

    total = 0.0
    for images, labels, _ in evaluation.eval_batches(data.Subset(source, positions), sized,
                                                     mesh):
        total = total + np.asarray(jax.device_get(attention(state, source_variables, images,
                                                            labels)), np.float64)
    normalised_over, how = ATTENTION_NORMALISATION.get(term.name, UNKNOWN_NORMALISATION)
    display = methods.get_method(config.method).display
    images = len(positions)
    distinct = min(images, len(source))
    return {"pair_attention": (total / batches).tolist(),
            "where": {"key": "pair_attention", "normalised_over": normalised_over,
                      "description": f"{display}'s attention per pair, the mean over "
                                     f"{batches} batch{'es' if batches > 1 else ''} of "
                                     f"{batch_size} {split} images ({distinct} distinct), "
                                     f"as in a training step; {how}",
                      "split": split, "images": images, "batch_size": batch_size}}

"""Transfer loss terms: what a method adds to the target's CE, each a named pure function.

A :class:`LossTerm` has a name (its metric is ``train/<name>``), a function of the target's
forward pass on the batch (:class:`TermInputs`) and of the static
:class:`~l2t_jax.transfer.bilevel.Transfer`, the parts of theta it reads (the 1x1 matching heads,
LwF's head) and whether the meta-networks weight it. The real step minimises CE plus every
term of the method; the simulated steps of L2T-w/L2T-ww minimise only the terms phi weights
(the weighted feature matching), so a new term never enters the inner loop by accident.

A method lists its terms by name (:mod:`l2t_jax.transfer.methods`); :data:`TERMS` maps the names to
the terms, and :func:`register` adds one (a function plus a method row is a new method).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax

from l2t_jax.transfer import losses

PARTS = ("heads", "lwf_head")   # parts of theta a term can read (built only when used)
# Metric names of the step that a term's name would clobber (l2t_jax.transfer.bilevel.train_step).
RESERVED = ("ce", "transfer", "accuracy", "learning_rate", "adapt_ce", "meta_loss",
            "meta_grad_norm", "sim_matching", "pair_weights", "channel_weight_entropy",
            "skipped")


class TermInputs(NamedTuple):
    """What a term may read, from one train-mode forward of the target on the batch.

    Attributes:
      target_features: T^n(x) per target tap, (B, H_n, W_n, C_n).
      regressed: r(T^n(x)) per pair, the 1x1 heads' outputs with the source map's channels
        (None unless a term of the method reads ``heads``).
      lwf_logits: LwF's head on the target features, (B, source classes) (None unless
        read).
      matched_source: per pair S^m(x) resized to T^n's spatial size (constants).
      source_logits: the source's logits on the batch, (B, source classes), or None.
      channel_weights: per pair (B, C_m) softmax weights from phi, or None (FM, or the CE
        steps).
      pair_weights: per pair (B, 1) lambda from phi, or None.
    """

    target_features: tuple[jax.Array, ...]
    regressed: Optional[tuple[jax.Array, ...]]
    lwf_logits: Optional[jax.Array]
    matched_source: tuple[jax.Array, ...]
    source_logits: Optional[jax.Array]
    channel_weights: Optional[tuple[jax.Array, ...]]
    pair_weights: Optional[tuple[jax.Array, ...]]


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """One transfer loss term.

    Attributes:
      name: metric name and the name methods list it by.
      fn: ``fn(inputs: TermInputs, transfer) -> scalar``, pure, already weighted (beta,
        at_weight, ... come from ``transfer`` or from the term itself).
      reads: parts of theta the term needs (:data:`PARTS`), built for the methods that use
        it.
      needs_pairs: reads per-pair quantities (``matched_source``, ``regressed``).
      meta_weighted: phi's channel and pair weights enter it; with meta-networks it is the
        objective of the simulated steps.
    """

    name: str
    fn: Callable[[TermInputs, Any], jax.Array]
    reads: tuple[str, ...] = ()
    needs_pairs: bool = False
    meta_weighted: bool = False


TERMS: dict[str, LossTerm] = {}


def register(term: LossTerm) -> LossTerm:
    """Adds a term to :data:`TERMS`; a name already taken by another term raises."""
    if term.name in RESERVED:
        raise ValueError(f"{term.name!r} is a metric of the step; name the term otherwise")
    unknown = sorted(set(term.reads) - set(PARTS))
    if unknown:
        raise ValueError(f"term {term.name!r} reads unknown parts {unknown}; valid: {PARTS}")
    if term.name in TERMS and TERMS[term.name] != term:
        raise ValueError(f"a loss term named {term.name!r} is already registered")
    TERMS[term.name] = term
    return term


def get_terms(names) -> tuple[LossTerm, ...]:
    """The terms of a method, in its order: names of :data:`TERMS` (terms pass through)."""
    missing = [n for n in names if not isinstance(n, LossTerm) and n not in TERMS]
    if missing:
        raise ValueError(f"unknown loss terms {missing}; registered: {', '.join(TERMS)}")
    return tuple(n if isinstance(n, LossTerm) else TERMS[n] for n in names)


def _feature_matching(inputs: TermInputs, transfer) -> jax.Array:
    """beta * sum over pairs of mean_b(lambda_b * sum_c w_bc d_bc) (docs/semantics.md, "Losses")."""
    return losses.weighted_matching_loss(inputs.matched_source, inputs.regressed,
                                         inputs.channel_weights, inputs.pair_weights,
                                         transfer.beta)


def _attention(inputs: TermInputs, transfer) -> jax.Array:
    """at_weight * sum over pairs of the attention-map distance (Zagoruyko & Komodakis)."""
    return losses.attention_transfer_loss(
        inputs.matched_source, [inputs.target_features[n] for _, n in transfer.pairs],
        transfer.at_weight)


def _distillation(inputs: TermInputs, transfer) -> jax.Array:
    """lwf_weight * KD(LwF head, source logits, lwf_temperature) (Li & Hoiem)."""
    return transfer.lwf_weight * losses.distillation_loss(
        inputs.lwf_logits, inputs.source_logits, transfer.lwf_temperature)


FEATURE_MATCHING = register(LossTerm("feature_matching", _feature_matching, reads=("heads",),
                                     needs_pairs=True, meta_weighted=True))
ATTENTION = register(LossTerm("attention", _attention, needs_pairs=True))
DISTILLATION = register(LossTerm("distillation", _distillation, reads=("lwf_head",)))

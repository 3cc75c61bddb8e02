"""Transfer loss terms: what a method adds to the target's CE, each a named pure function.

A :class:`LossTerm` has a name (its metric is ``train/<name>``), a function of the target's
forward pass on the batch (:class:`TermInputs`) and of the static
:class:`~l2t_jax.transfer.bilevel.Transfer`, the shared parts of theta it reads (the 1x1
matching heads, LwF's head) and whether the meta-networks weight it. The real step
minimises CE plus every term of the method; the simulated steps of L2T-w/L2T-ww minimise
only the terms phi weights (the weighted feature matching), so a new term never enters the
inner loop by accident.

A term may bring its own trainable part (:attr:`LossTerm.part`): a Linen module whose
parameters live at ``theta[<term name>]``, initialised from shapes with the target
(:func:`l2t_jax.transfer.bilevel.init_state`) and trained jointly with it by theta's SGD
(same learning rate, momentum and weight decay), as AFD's and SemCKD's authors train their
modules with the student. Its own settings are config keys it declares
(:attr:`LossTerm.options`, checked by :attr:`LossTerm.check`), and it may report per-step
metrics besides its value (:attr:`LossTerm.metrics`).

A method lists its terms by name (:mod:`l2t_jax.transfer.methods`); :data:`TERMS` maps the
names to the terms, and :func:`register` adds one (a function plus a method row is a new
method; a term defined in a module of its own is registered when that module is imported,
which the row names: :func:`of_method`).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2t_jax.transfer import losses, pairing

PARTS = ("heads", "lwf_head")   # shared parts of theta a term can read (built only when used)
# Metric names of the step that a term's name would clobber (l2t_jax.transfer.bilevel.train_step).
RESERVED = ("ce", "transfer", "accuracy", "learning_rate", "adapt_ce", "meta_loss",
            "meta_grad_norm", "sim_matching", "pair_weights", "channel_weight_entropy",
            "skipped")
# Keys of theta that a term's own part cannot take.
THETA_KEYS = ("model",) + PARTS


class TermInputs(NamedTuple):
    """What a term may read, from one train-mode forward of the target on the batch.

    Attributes:
      target_features: T^n(x) per target tap, (B, H_n, W_n, C_n).
      regressed: r(T^n(x)) per pair, the 1x1 heads' outputs with the source map's channels
        (None unless a term of the method reads ``heads``).
      lwf_logits: LwF's head on the target features, (B, source classes) (None unless
        read).
      matched_source: per pair S^m(x) resized to T^n's spatial size (constants).
      source_features: S^m(x) per source tap as the source computes it, (B, H_m, W_m, C_m)
        (constants; the same arrays as ``matched_source`` before any resize).
      source_logits: the source's logits on the batch, (B, source classes), or None.
      channel_weights: per pair (B, C_m) softmax weights from phi, or None (FM, or the CE
        steps).
      pair_weights: per pair (B, 1) lambda from phi, or None.
      part_output: what the term's own part (:attr:`LossTerm.part`) returned on this batch;
        None for a term without one.
    """

    target_features: tuple[jax.Array, ...]
    regressed: Optional[tuple[jax.Array, ...]]
    lwf_logits: Optional[jax.Array]
    matched_source: tuple[jax.Array, ...]
    source_features: tuple[jax.Array, ...]
    source_logits: Optional[jax.Array]
    channel_weights: Optional[tuple[jax.Array, ...]]
    pair_weights: Optional[tuple[jax.Array, ...]]
    part_output: Any = None


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """One transfer loss term.

    Attributes:
      name: metric name and the name methods list it by; also the key of its own part in
        theta.
      fn: ``fn(inputs: TermInputs, transfer) -> scalar``, pure, already weighted (beta,
        at_weight, ... come from ``transfer`` or from the term itself); a term with
        ``metrics`` returns ``(scalar, {metric name: array})``.
      reads: shared parts of theta the term needs (:data:`PARTS`), built for the methods
        that use it.
      needs_pairs: reads per-pair quantities (``matched_source``, ``regressed``, the pairs).
      meta_weighted: phi's channel and pair weights enter it; with meta-networks it is the
        objective of the simulated steps.
      part: the term's own trainable part, or None: ``part(transfer, inputs) -> (module,
        arguments)``, a Linen module (its settings from ``transfer``, its shapes from the
        inputs' arrays) and the arguments of its ``__call__`` on these inputs. The step
        applies ``module.apply({"params": theta[name]}, *arguments,
        mutable=["batch_stats"])`` and hands the output to ``fn`` as
        ``inputs.part_output``. Its parameters are initialised on the shapes of one step's
        inputs (``Transfer.batch_size`` examples; there only the features are given, the
        other inputs are empty). BatchNorm in the module runs in train mode, on batch
        statistics: running statistics are computed and dropped, never carried in the
        state (nothing reads them: the target is evaluated alone).
      options: ``((config key, default), ...)``: the term's own settings, read with
        ``transfer.option(key)``; the training program sets them from the config keys of
        the same names (:func:`l2t_jax.training.build.build_transfer`).
      check: ``check(transfer)`` raises ValueError naming the config key when the
        transfer's options or pairs do not suit the term (called when the transfer is
        built, so a bad config fails before anything is compiled); None checks nothing.
      metrics: names of the per-step metrics ``fn`` reports besides its value (logged as
        ``train/<name>``, arrays as ``train/<name>/<i>``).
    """

    name: str
    fn: Callable[[TermInputs, Any], Any]
    reads: tuple[str, ...] = ()
    needs_pairs: bool = False
    meta_weighted: bool = False
    part: Optional[Callable[[Any, TermInputs], tuple[nn.Module, tuple]]] = None
    options: tuple[tuple[str, Any], ...] = ()
    check: Optional[Callable[[Any], None]] = None
    metrics: tuple[str, ...] = ()


TERMS: dict[str, LossTerm] = {}


def register(term: LossTerm) -> LossTerm:
    """Adds a term to :data:`TERMS`; a name already taken by another term raises."""
    for name in (term.name, *term.metrics):
        if name in RESERVED:
            raise ValueError(f"{name!r} is a metric of the step; name the term or its "
                             "metric otherwise")
    if term.part is not None and term.name in THETA_KEYS:
        raise ValueError(f"a term with a part of theta cannot be named {term.name!r} "
                         f"(taken: {', '.join(THETA_KEYS)})")
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


def of_method(method) -> tuple[LossTerm, ...]:
    """The terms of a :class:`~l2t_jax.transfer.methods.Method` row, after importing the
    module that defines them (``method.module``: its terms register on import)."""
    if method.module:
        importlib.import_module(method.module)
    return get_terms(method.terms)


def grid_features(transfer, inputs: TermInputs, method: str):
    """For methods that attend over taps: the source and the target features of the taps
    of the pairs (:func:`~l2t_jax.transfer.pairing.tap_grid`, in increasing tap order),
    and their shapes as (C, H, W) per tap.

    Returns:
      ((source features, target features), (source shapes, target shapes)).
    """
    source_taps, target_taps = pairing.tap_grid(transfer.pairs, method)
    features = (tuple(inputs.source_features[m] for m in source_taps),
                tuple(inputs.target_features[n] for n in target_taps))
    shapes = tuple(tuple((f.shape[3], f.shape[1], f.shape[2]) for f in side)
                   for side in features)
    return features, shapes


def per_pair(attention: jax.Array, pairs) -> jax.Array:
    """Batch-mean attention per pair, in the order of ``pairs``: (B, T, S) over the target
    and source taps of :func:`~l2t_jax.transfer.pairing.tap_grid` -> (len(pairs),), the
    metric methods that attend over taps report beside L2T-ww's ``pair_weights``."""
    sources, targets = pairing.tap_grid(pairs)
    mean = jnp.mean(attention, axis=0)
    return jnp.stack([mean[targets.index(n), sources.index(m)] for m, n in pairs])


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

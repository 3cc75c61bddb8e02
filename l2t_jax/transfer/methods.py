"""The methods (the paper's table, and two later methods that learn where to transfer) as
one table of plain data (no JAX).

A method is one :class:`Method` row: the transfer loss terms it adds to CE (names of
:mod:`l2t_jax.transfer.terms`), whether it trains meta-networks (phi) and which of their outputs, its
default pair scheme, and how summaries and pictures name and colour it. The training
program builds a run from the row (:func:`l2t_jax.training.build.build_transfer`); the summaries,
plots and the demo read the same row without importing JAX. A new method is a new row
(:func:`register`); a new loss term is a function in :mod:`l2t_jax.transfer.terms` plus a row,
or a module of its own (its loss term, and the trainable part the term brings) that the row
names (``Method.module``), as AFD and SemCKD are.

==========  ===============================================  =====================  ========
method      loss on theta                                    pairs (config.pairs)   phi
==========  ===============================================  =====================  ========
scratch     CE                                               none                   none
lwf         CE + lwf_weight * KD(head(T), S logits, temp)    none                   none
at          CE + at_weight * sum_pairs AT                    one_to_one             none
lwf_at      both of the above                                one_to_one             none
fm          CE + beta * sum_pairs mean_c d_c (FitNets)       single / one_to_one    none
l2t_w       CE + beta * sum_pairs sum_c w_c d_c, lambda = 1  single / one_to_one    f only
l2t_ww      CE + beta * sum_pairs lambda sum_c w_c d_c       all_to_all             f and g
afd         CE + afd_weight * AFD (attention over the taps   all_to_all             none
            of the pairs, trained jointly with theta)
semckd      CE + semckd_weight * SemCKD (attention over the  all_to_all             none
            taps of the pairs, per-pair regressors, trained
            jointly with theta)
==========  ===============================================  =====================  ========

Hyperparameters (l2t_jax/configs/default.py) and where they come from:

- ``beta = 0.5`` for FM, L2T-w and L2T-ww: the L2T-ww reference's default, the same for all
  three, so that FM is L2T-ww without f and g (docs/semantics.md, "Losses").
- ``at_weight = 500``: Zagoruyko & Komodakis' code uses beta = 1e3 and adds
  ``beta / 2 * mean((at(S) - at(T))^2)`` per pair; ``at(x)`` is the L2-normalised mean over
  channels of ``x^2`` (:func:`l2t_jax.transfer.losses.attention_map`).
- ``lwf_temperature = 2`` and ``lwf_weight = 1``: Li & Hoiem's T = 2 and lambda_o = 1. The
  paper does not say how it adapted LwF to a randomly initialised target of another
  architecture; here an extra head for the source's classes (:class:`~l2t_jax.transfer.pairing.
  LwfHead`) distils the frozen source's outputs on the target images.
- L2T-w keeps lambda = 1 for every pair (no g); its f is L2T-ww's.
- The meta-learning hyperparameters (T, meta learning rate, ...) are L2T-ww's for both.
- AFD (Ji, Heo, Park, AAAI 2021; :mod:`l2t_jax.transfer.afd`) and SemCKD (Chen et al.,
  AAAI 2021; :mod:`l2t_jax.transfer.semckd`) learn where to transfer without meta-networks:
  an attention between the source and target taps of the pairs, trained with the target
  by theta's SGD (its learning rate, momentum and weight decay ``config.weight_decay``:
  one optimiser over the student and the module, as both authors do, with their 5e-4).
  Their weights and widths are their authors' defaults: ``afd_weight = 200``,
  ``afd_qk_dim = 128``; ``semckd_weight = 400`` (CIFAR-100), ``semckd_factor = 4``. Both
  authors also distil the teacher's logits (Hinton's KD); here the source was trained on
  other classes, so that term is left out.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

SCHEME_NAMES = {"single": "single", "one_to_one": "one-to-one", "all_to_all": "all-to-all"}


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the method table.

    Attributes:
      name: the ``config.method`` value.
      display: how tables name it (``"FM"``; the scheme is added: ``"FM (one-to-one)"``).
      terms: the transfer loss terms added to CE, by name (:data:`l2t_jax.transfer.terms.TERMS`), in
        the order they are summed. Empty: no source network at all (scratch).
      meta_networks: trains phi; the terms that phi weights (``meta_weighted``) are then
        the objective of the simulated steps.
      learned_pair_weights: phi has g (where); without it lambda = 1 (L2T-w).
      scheme: the pair scheme of its main row; None for methods that match no feature maps
        (no ``config.pairs``).
      color: its colour in figures (matplotlib colour string).
      module: the module that defines its terms, imported before they are looked up (they
        register on import: :func:`l2t_jax.transfer.terms.of_method`); None for the terms
        of :mod:`l2t_jax.transfer.terms` itself.
    """

    name: str
    display: str
    terms: tuple[str, ...] = ()
    meta_networks: bool = False
    learned_pair_weights: bool = False
    scheme: Optional[str] = None
    color: Optional[str] = None
    module: Optional[str] = None

    @property
    def uses_source(self) -> bool:
        return bool(self.terms)

    @property
    def uses_pairs(self) -> bool:
        """Whether it matches source and target feature maps (needs ``config.pairs``)."""
        return self.scheme is not None

    def label(self, scheme=None) -> str:
        """The table row: ``"FM (one-to-one)"``, ``"L2T-ww (4-0,9-1)"``, ``"Scratch"`` (a
        method without pairs drops the scheme)."""
        text = scheme_text(scheme) if self.uses_pairs else ""
        return f"{self.display} ({text})" if text else self.display


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds a row (a new method); a name already taken raises ValueError."""
    if method.name in METHODS and METHODS[method.name] != method:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


for _row in (
        Method("scratch", "Scratch", color="#7f7f7f"),
        Method("lwf", "LwF", ("distillation",), color="#9467bd"),
        Method("at", "AT", ("attention",), scheme="one_to_one", color="#8c564b"),
        Method("lwf_at", "LwF+AT", ("attention", "distillation"), scheme="one_to_one",
               color="#e377c2"),
        Method("fm", "FM", ("feature_matching",), scheme="one_to_one", color="#1f77b4"),
        Method("l2t_w", "L2T-w", ("feature_matching",), meta_networks=True,
               scheme="one_to_one", color="#ff7f0e"),
        Method("l2t_ww", "L2T-ww", ("feature_matching",), meta_networks=True,
               learned_pair_weights=True, scheme="all_to_all", color="#d62728"),
        Method("afd", "AFD", ("afd",), scheme="all_to_all", color="#2ca02c",
               module="l2t_jax.transfer.afd"),
        Method("semckd", "SemCKD", ("semckd",), scheme="all_to_all", color="#17becf",
               module="l2t_jax.transfer.semckd")):
    register(_row)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def scheme_text(scheme) -> str:
    """A pair scheme as text: ``"one_to_one"`` -> ``"one-to-one"``; an explicit list
    (``"4-0,9-1"`` or ``[[4, 0], [9, 1]]``) -> ``"4-0,9-1"``, or ``"15 pairs"`` when long."""
    if scheme is None or scheme == "":
        return ""
    if isinstance(scheme, str) and scheme in SCHEME_NAMES:
        return SCHEME_NAMES[scheme]
    if isinstance(scheme, str):
        pairs = [p.strip() for p in scheme.split(",") if p.strip()]
    else:
        pairs = [f"{m}-{n}" for m, n in scheme]
    return ",".join(pairs) if len(pairs) <= 3 else f"{len(pairs)} pairs"


def row_label(method: str, scheme=None) -> str:
    """result.json ``method`` + ``scheme`` -> the table row: ``("fm", "one_to_one") ->
    "FM (one-to-one)"``, ``("lwf", anything) -> "LwF"``; unknown methods keep their name."""
    if method not in METHODS:
        text = scheme_text(scheme)
        return f"{method} ({text})" if text else method
    return METHODS[method].label(scheme)

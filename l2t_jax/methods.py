"""The methods of the paper's table, as choices of transfer losses over the shared step.

``config.method`` picks one; :func:`build_transfer` turns it into a
:class:`~l2t_jax.bilevel.Transfer`. Every method trains the target with the same SGD,
schedule, data and networks; they differ only in the loss terms added to CE and in whether
phi exists:

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
==========  ===============================================  =====================  ========

Hyperparameters (configs/default.py) and where they come from:

- ``beta = 0.5`` for FM, L2T-w and L2T-ww: the L2T-ww reference's default, the same for all
  three, so that FM is L2T-ww without f and g (SPEC.md, "Losses").
- ``at_weight = 500``: Zagoruyko & Komodakis' code uses beta = 1e3 and adds
  ``beta / 2 * mean((at(S) - at(T))^2)`` per pair; ``at(x)`` is the L2-normalised mean over
  channels of ``x^2`` (:func:`l2t_jax.losses.attention_map`).
- ``lwf_temperature = 2`` and ``lwf_weight = 1``: Li & Hoiem's T = 2 and lambda_o = 1. The
  paper does not say how it adapted LwF to a randomly initialised target of another
  architecture; here an extra head for the source's classes (:class:`~l2t_jax.matching.
  LwfHead`) distils the frozen source's outputs on the target images.
- L2T-w keeps lambda = 1 for every pair (no g); its f is L2T-ww's.
- The meta-learning hyperparameters (T, meta learning rate, ...) are L2T-ww's for both.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn

from l2t_jax import bilevel
from l2t_jax.matching import Pair


@dataclasses.dataclass(frozen=True)
class Method:
    """What a method builds. ``scheme`` is the paper's matching scheme for its main row."""

    uses_source: bool
    matching_heads: bool = False
    meta_networks: bool = False
    learned_pair_weights: bool = False
    attention: bool = False
    lwf: bool = False
    scheme: Optional[str] = None


METHODS: dict[str, Method] = {
    "scratch": Method(uses_source=False),
    "lwf": Method(uses_source=True, lwf=True),
    "at": Method(uses_source=True, attention=True, scheme="one_to_one"),
    "lwf_at": Method(uses_source=True, attention=True, lwf=True, scheme="one_to_one"),
    "fm": Method(uses_source=True, matching_heads=True, scheme="one_to_one"),
    "l2t_w": Method(uses_source=True, matching_heads=True, meta_networks=True,
                    scheme="one_to_one"),
    "l2t_ww": Method(uses_source=True, matching_heads=True, meta_networks=True,
                     learned_pair_weights=True, scheme="all_to_all"),
}


def uses_pairs(method: str) -> bool:
    """Whether the method matches source and target feature maps (needs config.pairs)."""
    spec = METHODS[method]
    return spec.matching_heads or spec.attention


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def build_transfer(method: str, source_model: Optional[nn.Module], target_model: nn.Module,
                   pairs: Sequence[Pair], *, channel_weighting: bool = True,
                   pair_weight_type: Optional[str] = "relu6", pair_weight_init: float = 1.0,
                   at_weight: float = 500.0, lwf_weight: float = 1.0,
                   lwf_temperature: float = 2.0, conv_impl: str = "auto",
                   **hyperparameters) -> bilevel.Transfer:
    """The :class:`~l2t_jax.bilevel.Transfer` of ``method``.

    Args:
      method: a key of :data:`METHODS`.
      source_model: the (possibly multi-) source network; ignored by ``scratch``.
      pairs: resolved (source tap, target tap) pairs; ignored by methods without pairs.
      channel_weighting, pair_weight_type, pair_weight_init: L2T-ww's meta-networks
        (L2T-w drops g, so lambda = 1).
      at_weight, lwf_weight, lwf_temperature: the baselines' loss weights (module
        docstring).
      **hyperparameters: :class:`~l2t_jax.bilevel.Transfer` fields (inner_steps, beta, ...).
    """
    spec = get_method(method)
    return bilevel.make_transfer(
        source_model if spec.uses_source else None, target_model,
        pairs if uses_pairs(method) else (),
        matching_heads=spec.matching_heads, meta_networks=spec.meta_networks, lwf=spec.lwf,
        channel_weighting=channel_weighting,
        pair_weight_type=pair_weight_type if spec.learned_pair_weights else None,
        pair_weight_init=pair_weight_init, conv_impl=conv_impl,
        at_weight=at_weight if spec.attention else 0.0,
        lwf_weight=lwf_weight if spec.lwf else 0.0, lwf_temperature=lwf_temperature,
        **hyperparameters)

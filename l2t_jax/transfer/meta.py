"""The meta-networks phi = (f, g): what to transfer (channel weights) and where (pair weights).

Both read the global-average-pooled source features, one head per pair (docs/semantics.md):

- f, "what": Linear(C_m -> C_m), zero weight and bias, softmax over channels. At init every
  channel gets 1 / C_m.
- g, "where": Linear(C_m -> 1) with bias 1.0 then ReLU6 (``relu6``, the default), ReLU
  (``relu``), ReLU of the input divided by C_m (``relu-avg``), or one free scalar per pair
  ``softplus(10 * s)`` (``const``, s initialised to 0).
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2t_jax.transfer.pairing import Pair
from l2t_jax.models.layers import torch_default_kernel_init

PAIR_WEIGHT_TYPES = ("relu6", "relu", "relu-avg", "const")


class MetaNetworks(nn.Module):
    """Channel weights (f) and pair weights (g) for every pair.

    Attributes:
      pairs: (source index, target index) per pair.
      source_channels: channel count of every source tap.
      channel_weighting: build f; without it the loss sums channels (w_c = 1).
      pair_weight_type: one of :data:`PAIR_WEIGHT_TYPES`, or None for lambda = 1.
      pair_weight_init: initial bias of g's Linear (ignored by ``const``).

    Call with the pooled source features (one (B, C_m) array per source tap); returns
    ``(channel_weights, pair_weights)``: tuples over pairs of (B, C_m) and (B,) arrays,
    each None when that network is off.
    Parameters: ``what_{i}/{kernel,bias}``, ``where_{i}/{kernel,bias}`` or ``where_const``.
    """

    pairs: Sequence[Pair]
    source_channels: Sequence[int]
    channel_weighting: bool = True
    pair_weight_type: Optional[str] = "relu6"
    pair_weight_init: float = 1.0

    def __post_init__(self):
        # When built (before anything is traced), not when first applied.
        if self.pair_weight_type not in PAIR_WEIGHT_TYPES + (None,):
            raise ValueError(f"unknown pair_weight_type {self.pair_weight_type!r}; valid: "
                             f"{', '.join(PAIR_WEIGHT_TYPES)} or None")
        super().__post_init__()

    @nn.compact
    def __call__(self, pooled_source: Sequence[jax.Array]):
        channel_weights = None
        if self.channel_weighting:
            channel_weights = tuple(
                jax.nn.softmax(nn.Dense(self.source_channels[m],
                                        kernel_init=nn.initializers.zeros,
                                        bias_init=nn.initializers.zeros,
                                        name=f"what_{i}")(pooled_source[m]), axis=-1)
                for i, (m, _) in enumerate(self.pairs))
        pair_weights = None
        if self.pair_weight_type == "const":
            scalars = self.param("where_const", nn.initializers.zeros, (len(self.pairs),))
            batch = pooled_source[0].shape[0]
            pair_weights = tuple(jnp.full((batch,), jax.nn.softplus(10.0 * scalars[i]))
                                 for i in range(len(self.pairs)))
        elif self.pair_weight_type is not None:
            outputs = []
            for i, (m, _) in enumerate(self.pairs):
                pooled = pooled_source[m]
                if self.pair_weight_type == "relu-avg":
                    pooled = pooled / pooled.shape[-1]
                logit = nn.Dense(1, kernel_init=torch_default_kernel_init,
                                 bias_init=nn.initializers.constant(self.pair_weight_init),
                                 name=f"where_{i}")(pooled)[:, 0]
                activation = jax.nn.relu6 if self.pair_weight_type == "relu6" else jax.nn.relu
                outputs.append(activation(logit))
            pair_weights = tuple(outputs)
        return channel_weights, pair_weights


def channel_weight_entropy(channel_weights: jax.Array) -> jax.Array:
    """Mean over the batch of the entropy (nats) of (B, C) channel weights; log C at init."""
    return -jnp.mean(jnp.sum(channel_weights * jnp.log(jnp.maximum(channel_weights, 1e-30)),
                             axis=-1))

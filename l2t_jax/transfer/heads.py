"""The parts of theta that methods add to the target network: the 1x1 regressors that map
target features onto source features (feature matching), and LwF's head for the source's
classes. Trained with the target by theta's SGD.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from l2t_jax.models.convolution import Conv2d
from l2t_jax.models.layers import torch_default_bias_init, torch_default_kernel_init
from l2t_jax.transfer.pairing import Pair


class MatchingHeads(nn.Module):
    """Per pair a 1x1 conv with bias, target channels -> source channels (PyTorch default init).

    Called on the target's feature tuple, returns per pair the regressed map
    (B, H_n, W_n, C_m). Parameters ``head_{i}/{kernel,bias}``.
    """

    pairs: Sequence[Pair]
    source_channels: Sequence[int]
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, target_features: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        regressed = []
        for i, (m, n) in enumerate(self.pairs):
            features = target_features[n]
            regressed.append(Conv2d(
                features=self.source_channels[m], kernel_size=1, use_bias=True,
                kernel_init=torch_default_kernel_init,
                bias_init=torch_default_bias_init(features.shape[-1]),
                impl=self.conv_impl, name=f"head_{i}")(features))
        return tuple(regressed)


class LwfHead(nn.Module):
    """LwF's head for the source's classes on the target: global average pool of the last
    target tap, then Linear(-> source classes) with PyTorch's default init. Part of theta.

    For ResNet targets the pooled last tap is exactly the classifier's input; for VGG-9 it is
    the pooled input of the last max-pool (the classifier pools after that max-pool).
    Call with the target's feature tuple; returns (B, num_classes) logits.
    """

    num_classes: int

    @nn.compact
    def __call__(self, target_features: Sequence[jax.Array]) -> jax.Array:
        pooled = target_features[-1].mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=torch_default_kernel_init,
                        bias_init=torch_default_bias_init(pooled.shape[-1]), name="fc")(pooled)

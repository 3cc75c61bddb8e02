"""Source/target layer pairs and the 1x1 regressors that map target features onto source
features (part of theta, trained with the target).

A pair ``(m, n)`` matches source tap m to target tap n (indices into each model's
``feature_taps()``). Pair lists are written as in the reference, ``"4-0,4-1,...,14-4"``.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from l2t_jax.convolution import Conv2d
from l2t_jax.models import Tap, torch_default_bias_init, torch_default_kernel_init

Pair = tuple[int, int]

# The reference's default pair lists (SPEC.md).
CIFAR_PAIRS = "4-0,4-1,4-2,4-3,4-4,9-0,9-1,9-2,9-3,9-4,14-0,14-1,14-2,14-3,14-4"
IMAGENET_PAIRS = "4-4,4-3,4-2,4-1,3-4,3-3,3-2,3-1,2-4,2-3,2-2,2-1,1-4,1-3,1-2,1-1"


def parse_pairs(spec: str | Sequence[Sequence[int]]) -> tuple[Pair, ...]:
    """Parses ``"m-n,m-n,..."`` (or a sequence of (m, n)) into a tuple of int pairs."""
    if isinstance(spec, str):
        pairs = []
        for item in spec.split(","):
            parts = item.strip().split("-")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise ValueError(f"bad pair {item!r} in {spec!r}: write pairs as "
                                 "'source-target' indices, e.g. '4-0,9-1'")
            pairs.append((int(parts[0]), int(parts[1])))
    else:
        pairs = [tuple(int(i) for i in p) for p in spec]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"pairs must be (source, target) index pairs, got {spec!r}")
    if not pairs:
        raise ValueError("the pair list is empty")
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"the pair list {spec!r} repeats a pair")
    return tuple(pairs)


def validate_pairs(pairs: Sequence[Pair], source_taps: Sequence[Tap],
                   target_taps: Sequence[Tap], source_name: str = "source",
                   target_name: str = "target") -> None:
    """Raises ValueError naming the first pair whose index a network does not expose."""
    for m, n in pairs:
        if not 0 <= m < len(source_taps):
            raise ValueError(
                f"pair {m}-{n}: source index {m} is out of range; {source_name} exposes taps "
                f"0..{len(source_taps) - 1} (channels {[t.channels for t in source_taps]})")
        if not 0 <= n < len(target_taps):
            raise ValueError(
                f"pair {m}-{n}: target index {n} is out of range; {target_name} exposes taps "
                f"0..{len(target_taps) - 1} (channels {[t.channels for t in target_taps]})")


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

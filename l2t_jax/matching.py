"""Source/target layer pairs and the 1x1 regressors that map target features onto source
features (part of theta, trained with the target).

A pair ``(m, n)`` matches source tap m to target tap n (indices into each model's
``feature_taps()``). Pair lists are written as in the reference, ``"4-0,4-1,...,14-4"``, or
named by a matching scheme (SPEC.md), resolved over each model's ``candidate_taps()``:

- ``single``: the last source candidate with the last target candidate (14-4 for ResNet-32
  -> VGG-9, 4-4 for ResNet-34 -> ResNet-18).
- ``one_to_one``: maps of the same depth, i.e. the same output stride: each source
  candidate with the target candidate of its stride (4-0, 9-1, 14-2; 1-1, 2-2, 3-3, 4-4).
- ``all_to_all``: every source candidate with every target candidate (the reference's
  default lists, 15 and 16 pairs).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from l2t_jax.convolution import Conv2d
from l2t_jax.models import (Tap, model_name, torch_default_bias_init,
                            torch_default_kernel_init)

Pair = tuple[int, int]

# The reference's default pair lists (SPEC.md).
from l2t_jax.paper import CIFAR_PAIRS, IMAGENET_PAIRS  # noqa: E402,F401  (re-exported)


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


SCHEMES = ("single", "one_to_one", "all_to_all")


def resolve_pairs(spec: str | Sequence[Sequence[int]], source_model,
                  target_model) -> tuple[Pair, ...]:
    """A scheme name (:data:`SCHEMES`) or an explicit list -> validated pairs.

    ``source_model`` and ``target_model`` are models from :mod:`l2t_jax.models`; schemes use
    their ``candidate_taps()`` and ``feature_taps()`` strides.
    """
    source_taps, target_taps = source_model.feature_taps(), target_model.feature_taps()
    source_name, target_name = model_name(source_model), model_name(target_model)
    if isinstance(spec, str) and spec in SCHEMES:
        sources, targets = source_model.candidate_taps(), target_model.candidate_taps()
        if spec == "single":
            pairs = ((sources[-1], targets[-1]),)
        elif spec == "all_to_all":
            pairs = tuple((m, n) for m in sources for n in targets)
        else:
            by_stride = {target_taps[n].stride: n for n in targets}
            pairs = tuple((m, by_stride[source_taps[m].stride]) for m in sources
                          if source_taps[m].stride in by_stride)
            if not pairs:
                raise ValueError(
                    "one_to_one: no source candidate tap has the stride of a target "
                    f"candidate (source strides {[source_taps[m].stride for m in sources]}, "
                    f"target strides {[target_taps[n].stride for n in targets]})")
    else:
        if isinstance(spec, str) and not any(c.isdigit() for c in spec):
            raise ValueError(f"unknown matching scheme {spec!r}; valid: "
                             f"{', '.join(SCHEMES)} or an explicit list such as '4-0,9-1'")
        pairs = parse_pairs(spec)
    validate_pairs(pairs, source_taps, target_taps, source_name, target_name)
    return pairs


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

"""VGG-9 with BatchNorm, the CIFAR variant of the authors' code: the target of the CIFAR-100
and STL-10 experiments.

Convolutions are named ``conv{k}`` / ``bn{k}`` in order; :func:`torch_module_name` maps
them to the positions of the authors' ``features`` Sequential.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from l2t_jax.models import layers
from l2t_jax.models.registry import ModelFamily, register_family

# VGG-9 stages: each inner tuple is one max-pool stage of 3x3 conv-BN-ReLU layers (as
# multiples of the stage width); the tap is each stage's output, i.e. the max-pool's input.
VGG9_STAGE_CONVS = (1, 1, 2, 2, 2)


class VGG(nn.Module):
    """VGG with BatchNorm, CIFAR variant of the reference (``vgg_cifar.vgg9_bn``).

    Stages of conv3x3 (pad 1, with bias)-BN-ReLU followed by 2x2 max-pool; VGG-9 is
    [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M]. Then global average pool and
    ``fc``. Convs are named ``conv{k}`` / ``bn{k}`` in order. Taps, sown: ``stage{i}``, the
    max-pool inputs (64, 128, 256, 512, 512 channels at strides 1, 2, 4, 8, 16).
    """

    num_classes: int = 100
    widths: Sequence[int] = (64, 128, 256, 512, 512)
    convs_per_stage: Sequence[int] = VGG9_STAGE_CONVS
    conv_impl: str = "auto"

    def default_taps(self) -> tuple[str, ...]:
        """Every stage (all are candidates, as in the reference's CIFAR pairs)."""
        return tuple(f"stage{i}" for i in range(len(self.widths)))

    @nn.compact
    def __call__(self, images: jax.Array, train: bool):
        smallest = 2 ** len(self.widths)
        if min(images.shape[1:3]) < smallest:
            # Each stage halves the map; the last max-pool would see an empty map (NaN).
            raise ValueError(f"VGG with {len(self.widths)} stages needs inputs of at least "
                             f"{smallest}x{smallest} px, got {images.shape[1]}x"
                             f"{images.shape[2]}")
        x = images
        k = 0
        for stage, (width, convs) in enumerate(zip(self.widths, self.convs_per_stage)):
            for _ in range(convs):
                x = layers.conv(width, 3, 1, 1, True, f"conv{k}", self.conv_impl)(x)
                x = nn.relu(layers.BatchNorm(name=f"bn{k}")(x, train))
                k += 1
            self.sow("intermediates", f"stage{stage}", x)
            x = layers.max_pool_2x2(x)
        return layers.classifier(x, self.num_classes, torch_default_init=False)


def torch_module_name(module: VGG, name: str) -> str:
    """``fc -> classifier``; ``conv{k}`` / ``bn{k}`` -> ``features.N``: torch's Sequential
    holds (conv, bn, relu) per conv and one max-pool after each stage."""
    if name == "fc":
        return "classifier"
    layer = re.fullmatch(r"(conv|bn)(\d+)", name)
    if layer:
        k = int(layer.group(2))
        stage = int(np.searchsorted(np.cumsum(module.convs_per_stage), k, side="right"))
        return f"features.{3 * k + stage + (layer.group(1) == 'bn')}"
    return name


def _torch_layout(module: VGG) -> str:
    return ("the authors' VGG-9-BN (alinlab/L2T-ww, vgg_cifar.vgg9_bn: features.K, "
            "classifier)")


def _recognize(shapes: Mapping[str, tuple]) -> Optional[str]:
    if not any(k.startswith("features.") for k in shapes) or any(
            re.match(r"features\.\d+\.conv\.", k) for k in shapes):
        return None
    return "a VGG"


FAMILY = register_family(ModelFamily(
    module=VGG, variants={"vgg9_bn": {}}, tiny={"widths": (4, 6, 8, 8, 8)},
    display_names={"vgg9_bn": "VGG-9-BN"}, torch_module_name=torch_module_name,
    torch_layout=_torch_layout, recognize=_recognize))

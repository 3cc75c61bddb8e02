"""CIFAR-style ResNets (20, 32, 56) as in the authors' code: the source of the CIFAR-100 and
STL-10 experiments (the released TinyImageNet ResNet-32).

Module names mirror the authors' PyTorch state-dict keys (``blocks2_0`` for
``blocks2.0``), so that conversion is a rename (:func:`torch_module_name`).
"""
from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

import flax.linen as nn
import jax

from l2t_jax.models import layers
from l2t_jax.models.registry import ModelFamily, register_family


class CifarResNet(nn.Module):
    """CIFAR-style ResNet-(6n+2) of the reference (``resnet_cifar.CResNet``).

    conv3x3 (with bias)-BN-ReLU, then ``block1``, ``blocks2_{0..n-2}`` at ``widths[0]``,
    ``block3`` (stride 2, 1x1 downsample), ``blocks4_*`` at ``widths[1]``, ``block5``,
    ``blocks6_*`` at ``widths[2]``, global average pool, ``fc``. Taps: the 3n block outputs
    (15 for ResNet-32: 16 ch x5 at stride 1, 32 x5 at 2, 64 x5 at 4).
    """

    depth: int = 32
    num_classes: int = 100
    widths: Sequence[int] = (16, 32, 64)
    conv_impl: str = "auto"

    @property
    def blocks_per_stage(self) -> int:
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {self.depth}")
        return (self.depth - 2) // 6

    def default_taps(self) -> tuple[str, ...]:
        n = self.blocks_per_stage
        return tuple(name for first, rest in self.STAGE_NAMES
                     for name in (first, *(f"{rest}_{i}" for i in range(n - 1))))

    def default_candidates(self) -> tuple[str, ...]:
        """Each stage's last block (taps 4, 9, 14 for ResNet-32, as the reference's CIFAR
        pairs)."""
        n = self.blocks_per_stage
        return tuple(self.default_taps()[n * (stage + 1) - 1] for stage in range(3))

    STAGE_NAMES = (("block1", "blocks2"), ("block3", "blocks4"), ("block5", "blocks6"))

    @nn.compact
    def __call__(self, images: jax.Array, train: bool):
        n = self.blocks_per_stage
        x = layers.conv(self.widths[0], 3, 1, 1, True, "conv1", self.conv_impl)(images)
        x = nn.relu(layers.BatchNorm(name="bn1")(x, train))
        for stage, (first, rest) in enumerate(self.STAGE_NAMES):
            stride = 1 if stage == 0 else 2
            x = layers.BasicBlock(self.widths[stage], stride, downsample=stage > 0,
                           conv_impl=self.conv_impl, name=first)(x, train)
            for i in range(n - 1):
                x = layers.BasicBlock(self.widths[stage], conv_impl=self.conv_impl,
                               name=f"{rest}_{i}")(x, train)
        return layers.classifier(x, self.num_classes)



def torch_module_name(module: nn.Module, name: str) -> str:
    """``blocks2_0 -> blocks2.0``, ``downsample_conv -> downsample.0``,
    ``downsample_bn -> downsample.1`` (torch's ``nn.Sequential`` indices); the rest as is.
    The torchvision-layout ResNets use the same rules."""
    if name == "downsample_conv":
        return "downsample.0"
    if name == "downsample_bn":
        return "downsample.1"
    indexed = re.fullmatch(r"(blocks\d|layer\d)_(\d+)", name)
    return f"{indexed.group(1)}.{indexed.group(2)}" if indexed else name


def _torch_layout(module: CifarResNet) -> str:
    return (f"the authors' CIFAR ResNet-{module.depth} (alinlab/L2T-ww, "
            "resnet_cifar.CResNet: conv1, bn1, block1, blocks2.N, block3, ...)")


def _recognize(shapes: Mapping[str, tuple]) -> Optional[str]:
    if "block1.conv1.weight" not in shapes:
        return None
    n = len({k.split(".")[1] for k in shapes if k.startswith("blocks2.")}) + 1
    return f"resnet{6 * n + 2}"


FAMILY = register_family(ModelFamily(
    module=CifarResNet,
    variants={f"resnet{depth}": {"depth": depth} for depth in (20, 32, 56)},
    tiny={"widths": (4, 6, 8)},
    display_names={f"resnet{depth}": f"ResNet-{depth}" for depth in (20, 32, 56)},
    torch_module_name=torch_module_name, torch_layout=_torch_layout, recognize=_recognize))

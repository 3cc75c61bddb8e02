"""Wide ResNets (WRN-depth-k) for CIFAR, in the layout of RepDistiller's ``models/wrn.py``:
the knowledge-distillation benchmarks' teachers and students (wrn_16_2, wrn_40_2, ...).

Module names mirror that layout's PyTorch state-dict keys: torch's ``block2.layer.0`` is the
Flax submodule ``block2/layer_0`` (:func:`torch_module_name`).
"""
from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2t_jax.models import layers
from l2t_jax.models.registry import ModelFamily, register_family


class PreActBlock(nn.Module):
    """The WRN basic block of RepDistiller's ``models/wrn.py`` (Zagoruyko & Komodakis'
    layout as ported by xternalz/WideResNet-pytorch): BN-ReLU-conv3x3(stride)-BN-ReLU-
    conv3x3, plus the shortcut, no ReLU after the sum.

    (B, H, W, C_in) -> (B, H / stride, W / stride, features). When C_in != features the
    shortcut is ``convShortcut`` (1x1, stride) applied to the *activated* input
    relu(bn1(x)), as that code does; otherwise it is x itself.
    """

    features: int
    stride: int = 1
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        equal_in_out = x.shape[-1] == self.features
        if equal_in_out and self.stride != 1:
            # The PyTorch block would add maps of different sizes; WRNs never build it.
            raise ValueError("a WRN block that keeps its width must have stride 1")
        activated = nn.relu(layers.BatchNorm(name="bn1")(x, train))
        y = layers.conv(self.features, 3, self.stride, 1, False, "conv1", self.conv_impl)(activated)
        y = nn.relu(layers.BatchNorm(name="bn2")(y, train))
        # Dropout: the KD standard trains WRNs with dropRate 0, and the checkpoints carry
        # no parameter for it, so there is none here.
        y = layers.conv(self.features, 3, 1, 1, False, "conv2", self.conv_impl)(y)
        if equal_in_out:
            return x + y
        return layers.conv(self.features, 1, self.stride, 0, False, "convShortcut",
                     self.conv_impl)(activated) + y


class WRNGroup(nn.Module):
    """``NetworkBlock``: ``blocks`` PreActBlocks named ``layer_{i}`` (torch's ``layer.i``);
    the first has the group's stride. (B, H, W, C) -> (B, H / stride, W / stride, features).
    """

    blocks: int
    features: int
    stride: int
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i in range(self.blocks):
            x = PreActBlock(self.features, self.stride if i == 0 else 1,
                            conv_impl=self.conv_impl, name=f"layer_{i}")(x, train)
        return x


class WideResNet(nn.Module):
    """WRN-depth-k for CIFAR in the layout of RepDistiller's ``models/wrn.py``
    (HobbitLong/RepDistiller; the same keys as xternalz/WideResNet-pytorch, which the CRD /
    KD benchmarks' wrn_16_2, wrn_40_2 ... checkpoints use).

    ``conv1`` (3x3, 3 -> 16, no bias), ``block1..block3`` (WRNGroup of n = (depth - 4) / 6
    PreActBlocks at 16k, 32k, 64k channels, strides 1, 2, 2), ``bn1`` + ReLU, global
    average pool (that code's avg_pool2d(8) at 32 px), ``fc``. State-dict keys:
    ``block2.layer.0.convShortcut.weight`` and so on; dropout is 0 (see PreActBlock).

    Taps: ``conv1`` (RepDistiller's f0, stride 1) and the group outputs ``block1..block3``
    (its f1..f3, and the maps attention transfer reads), strides 1, 2, 4, channels
    [16, 16k, 32k, 64k]. The group outputs are pre-activation sums, tapped as those codes
    tap them (before the next BN-ReLU). Candidates: the three group outputs.

    Attributes:
      depth: 6n + 4 (16, 28, 40 ...).
      widen_factor: k.
      widths: (stem, group 1, 2, 3) channels; None for (16, 16k, 32k, 64k).
    """

    depth: int = 16
    widen_factor: int = 2
    num_classes: int = 100
    widths: Sequence[int] | None = None
    conv_impl: str = "auto"

    @property
    def blocks_per_group(self) -> int:
        if (self.depth - 4) % 6 or self.depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1, got {self.depth}")
        return (self.depth - 4) // 6

    @property
    def channels(self) -> tuple[int, int, int, int]:
        if self.widths is not None:
            return tuple(int(w) for w in self.widths)
        k = self.widen_factor
        return (16, 16 * k, 32 * k, 64 * k)

    def default_taps(self) -> tuple[str, ...]:
        return ("conv1", "block1", "block2", "block3")

    def default_candidates(self) -> tuple[str, ...]:
        return ("block1", "block2", "block3")

    @nn.compact
    def __call__(self, images: jax.Array, train: bool):
        stem, *groups = self.channels
        n = self.blocks_per_group
        x = layers.conv(stem, 3, 1, 1, False, "conv1", self.conv_impl)(images)
        for g, (width, stride) in enumerate(zip(groups, (1, 2, 2))):
            x = WRNGroup(n, width, stride, conv_impl=self.conv_impl,
                         name=f"block{g + 1}")(x, train)
        x = nn.relu(layers.BatchNorm(name="bn1")(x, train))
        pooled = jnp.mean(x, axis=(1, 2))
        # PyTorch's default Linear weight init; that code zeroes the bias.
        return nn.Dense(self.num_classes, kernel_init=layers.torch_default_kernel_init,
                        bias_init=nn.initializers.zeros, name="fc")(pooled)


def torch_module_name(module: WideResNet, name: str) -> str:
    """``layer_0 -> layer.0`` (``block2/layer_0/convShortcut -> block2.layer.0.convShortcut``)."""
    indexed = re.fullmatch(r"layer_(\d+)", name)
    return f"layer.{indexed.group(1)}" if indexed else name


def _torch_layout(module: WideResNet) -> str:
    return (f"RepDistiller's WRN-{module.depth}-{module.widen_factor} (models/wrn.py: conv1, "
            "block1.layer.N, bn1, fc)")


def _recognize(shapes: Mapping[str, tuple]) -> Optional[str]:
    if not any(k.startswith("block1.layer.") for k in shapes):
        return None
    n = len({k.split(".")[2] for k in shapes if k.startswith("block1.layer.")})
    fc = shapes.get("fc.weight", ())
    k = f"{fc[1] // 64}" if len(fc) == 2 else "k"
    return f"wrn{6 * n + 4}_{k}"


# 16/28/40 are the CIFAR knowledge-distillation depths.
_DEPTHS_AND_WIDTHS = ((16, 1), (16, 2), (16, 4), (16, 8), (28, 2), (28, 4), (28, 10),
                      (40, 1), (40, 2), (40, 4))
FAMILY = register_family(ModelFamily(
    module=WideResNet,
    variants={f"wrn{d}_{k}": {"depth": d, "widen_factor": k} for d, k in _DEPTHS_AND_WIDTHS},
    # Widths (stem, group 1..3) with every group widening: each group's first block has
    # its 1x1 convShortcut, as in WRN-k for k > 1.
    tiny={"widths": (4, 8, 12, 16)},
    display_names={f"wrn{d}_{k}": f"WRN-{d}-{k}" for d, k in _DEPTHS_AND_WIDTHS},
    torch_module_name=torch_module_name, torch_layout=_torch_layout, recognize=_recognize))

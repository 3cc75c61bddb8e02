"""The zoo's families beyond the paper's networks: WideResNet and MobileNetV2.

This module owns these two architectures; :mod:`l2t_jax.models` registers them
(``wrn{depth}_{k}``, ``mobilenet_v2``) and owns the layers they are built from (PyTorch-
numerics BatchNorm, the convolutions). Images and features are NHWC; ``__call__(images,
train)`` returns logits, and each class declares its taps as the paper's networks do.

Module names mirror the PyTorch state-dict keys of the layout each class follows, so that
:mod:`l2t_jax.convert` maps them by renaming: a PyTorch ``nn.Sequential`` index ``seq.3``
is the Flax submodule ``seq_3``, and inside torchvision's ``Conv2dNormActivation`` (whose
children are bare indices) the submodules are named ``0`` and ``1``.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2t_jax import convolution
from l2t_jax.models import BatchNorm, _conv, conv_kernel_init, torch_default_kernel_init


# --------------------------------------------------------------------------- WideResNet
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
        activated = nn.relu(BatchNorm(name="bn1")(x, train))
        y = _conv(self.features, 3, self.stride, 1, False, "conv1", self.conv_impl)(activated)
        y = nn.relu(BatchNorm(name="bn2")(y, train))
        # Dropout: the KD standard trains WRNs with dropRate 0, and the checkpoints carry
        # no parameter for it, so there is none here.
        y = _conv(self.features, 3, 1, 1, False, "conv2", self.conv_impl)(y)
        if equal_in_out:
            return x + y
        return _conv(self.features, 1, self.stride, 0, False, "convShortcut",
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
        x = _conv(stem, 3, 1, 1, False, "conv1", self.conv_impl)(images)
        for g, (width, stride) in enumerate(zip(groups, (1, 2, 2))):
            x = WRNGroup(n, width, stride, conv_impl=self.conv_impl,
                         name=f"block{g + 1}")(x, train)
        x = nn.relu(BatchNorm(name="bn1")(x, train))
        pooled = jnp.mean(x, axis=(1, 2))
        # PyTorch's default Linear weight init; that code zeroes the bias.
        return nn.Dense(self.num_classes, kernel_init=torch_default_kernel_init,
                        bias_init=nn.initializers.zeros, name="fc")(pooled)


# -------------------------------------------------------------------------- MobileNetV2
# torchvision's inverted-residual table: expansion t, channels c, blocks n, first stride s.
MOBILENET_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int) -> int:
    """torchvision's ``_make_divisible``: the nearest multiple of ``divisor`` at least
    ``divisor`` that is no more than 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNReLU6(nn.Module):
    """torchvision's ``Conv2dNormActivation`` with ReLU6: conv (no bias, padding
    (k - 1) / 2, ``groups``) named ``0``, BN named ``1`` (torch's ``.0`` / ``.1``).
    (B, H, W, C_in) -> (B, H / stride, W / stride, features)."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    groups: int = 1
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = convolution.Conv2d(
            features=self.features, kernel_size=self.kernel_size, stride=self.stride,
            padding=(self.kernel_size - 1) // 2, use_bias=False, groups=self.groups,
            kernel_init=conv_kernel_init, impl=self.conv_impl, name="0")(x)
        return jax.nn.relu6(BatchNorm(name="1")(x, train))


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block: [1x1 expand ConvBNReLU6 if t != 1], 3x3 depthwise
    ConvBNReLU6 (stride), 1x1 linear conv, BN; plus x when stride is 1 and the width is
    kept. Submodules ``conv_0``, ``conv_1``, ... are torch's ``conv.0``, ``conv.1``, ...

    (B, H, W, C_in) -> (B, H / stride, W / stride, features).
    """

    features: int
    stride: int
    expand_ratio: int
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c_in = x.shape[-1]
        hidden = int(round(c_in * self.expand_ratio))
        y, index = x, 0
        if self.expand_ratio != 1:
            y = ConvBNReLU6(hidden, 1, conv_impl=self.conv_impl, name="conv_0")(y, train)
            index = 1
        y = ConvBNReLU6(hidden, 3, self.stride, groups=hidden, conv_impl=self.conv_impl,
                        name=f"conv_{index}")(y, train)
        y = convolution.Conv2d(features=self.features, kernel_size=1, use_bias=False,
                               kernel_init=conv_kernel_init, impl=self.conv_impl,
                               name=f"conv_{index + 1}")(y)
        y = BatchNorm(name=f"conv_{index + 2}")(y, train)
        return x + y if self.stride == 1 and c_in == self.features else y


class MobileNetV2(nn.Module):
    """torchvision's ``mobilenet_v2`` (layout and state-dict keys of
    ``torchvision.models.MobileNetV2``).

    ``features_0`` (ConvBNReLU6 3x3, stride 2, 32 w channels), ``features_1..17``
    (InvertedResidual per :data:`MOBILENET_V2_SETTING`), ``features_18`` (ConvBNReLU6
    1x1 to ``last_channel``), global average pool, ``classifier_1`` (torch's
    ``classifier.1`` Linear). torchvision's ``classifier.0`` is Dropout(0.2); it has no
    parameters, is off in eval mode, and is not applied here in train mode either (the
    forward pass takes no random key): fine-tuning without it is a small change of
    regularisation, not of the network.

    Taps: the last block at each resolution, ``features_1, _3, _6, _13, _18``: strides 2,
    4, 8, 16, 32, channels [16, 24, 32, 96, 1280] at width 1. Candidates: the four at
    strides 4-32 (as the ImageNet ResNets' layer1..4 without the stem).

    Attributes:
      width_mult, round_nearest: torchvision's channel multiplier and rounding.
      last_channel: the 1x1 head's channels, times max(1, width_mult) (1280 in
        torchvision, which does not expose it; ``:tiny`` lowers it).
    """

    num_classes: int = 1000
    width_mult: float = 1.0
    round_nearest: int = 8
    last_channel: int = 1280
    conv_impl: str = "auto"

    TAPPED_BLOCKS = (1, 3, 6, 13, 18)

    def default_taps(self) -> tuple[str, ...]:
        return tuple(f"features_{i}" for i in self.TAPPED_BLOCKS)

    def default_candidates(self) -> tuple[str, ...]:
        return self.default_taps()[1:]

    @nn.compact
    def __call__(self, images: jax.Array, train: bool):
        def width(channels):
            return make_divisible(channels * self.width_mult, self.round_nearest)
        x = ConvBNReLU6(width(32), 3, 2, conv_impl=self.conv_impl, name="features_0")(
            images, train)
        index = 1
        for t, c, n, s in MOBILENET_V2_SETTING:
            for i in range(n):
                x = InvertedResidual(width(c), s if i == 0 else 1, t, conv_impl=self.conv_impl,
                                     name=f"features_{index}")(x, train)
                index += 1
        last = make_divisible(self.last_channel * max(1.0, self.width_mult),
                              self.round_nearest)
        x = ConvBNReLU6(last, 1, conv_impl=self.conv_impl, name=f"features_{index}")(
            x, train)
        pooled = jnp.mean(x, axis=(1, 2))
        # torchvision: Linear weight N(0, 0.01), bias 0.
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                        bias_init=nn.initializers.zeros, name="classifier_1")(pooled)

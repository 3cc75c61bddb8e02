"""MobileNetV2 in torchvision's layout and state-dict keys.

Module names mirror the PyTorch keys: an ``nn.Sequential`` index ``seq.3`` is the Flax
submodule ``seq_3`` (:func:`torch_module_name`), and inside torchvision's
``Conv2dNormActivation`` (whose children are bare indices) the submodules are named ``0``
and ``1``.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2t_jax.models import convolution, layers
from l2t_jax.models.registry import ModelFamily, register_family

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
            kernel_init=layers.conv_kernel_init, impl=self.conv_impl, name="0")(x)
        return jax.nn.relu6(layers.BatchNorm(name="1")(x, train))


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
                               kernel_init=layers.conv_kernel_init, impl=self.conv_impl,
                               name=f"conv_{index + 1}")(y)
        y = layers.BatchNorm(name=f"conv_{index + 2}")(y, train)
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


def torch_module_name(module: MobileNetV2, name: str) -> str:
    """``features_3/conv_1/0 -> features.3.conv.1.0`` (nn.Sequential indices)."""
    indexed = re.fullmatch(r"(features|conv|classifier)_(\d+)", name)
    return f"{indexed.group(1)}.{indexed.group(2)}" if indexed else name


def _torch_layout(module: MobileNetV2) -> str:
    return "torchvision.models.mobilenet_v2 (torchvision's module and key names)"


def _recognize(shapes: Mapping[str, tuple]) -> Optional[str]:
    if any(re.match(r"features\.\d+\.conv\.", k) for k in shapes):
        return "mobilenet_v2"
    return None


FAMILY = register_family(ModelFamily(
    module=MobileNetV2, variants={"mobilenet_v2": {}},
    tiny={"width_mult": 0.25, "round_nearest": 4, "last_channel": 32},
    display_names={"mobilenet_v2": "MobileNetV2"}, torch_module_name=torch_module_name,
    torch_layout=_torch_layout, recognize=_recognize))

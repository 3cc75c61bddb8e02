"""Layers the networks share: PyTorch-numerics BatchNorm, convolutions, initialisers, the
ResNet blocks, the classifier and the 2x2 max-pool.

Numerics follow the authors' PyTorch code (docs/semantics.md, "Networks"): BatchNorm with
eps 1e-5, running-stat momentum 0.1, normalisation by the biased batch variance and the
running variance updated with the unbiased one; convolution padding and initialisation as
PyTorch's. Images and features are NHWC.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2t_jax.models import convolution

# PyTorch's kaiming-normal(fan_out) and the ResNets' normal(0, sqrt(2 / (k*k*out))) are the
# same distribution: variance 2 / fan_out, untruncated.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default Linear / Conv init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Callable:
    """PyTorch's default bias init for Linear / Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nn.Module):
    """BatchNorm2d with PyTorch numerics (NHWC).

    Train mode normalises with the batch mean and biased variance over (N, H, W) and, unless
    the module is being initialised, updates ``batch_stats/{mean,var}`` with momentum 0.1 and
    the *unbiased* variance (x n / (n - 1), n = N*H*W), as ``torch.nn.BatchNorm2d`` does.
    Flax's own BatchNorm uses the biased variance there, which changes the evaluation
    statistics.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,))
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,))
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axes)
            var = jnp.mean(jnp.square(x - mean), axes)
            if not self.is_initializing():
                count = x.size // channels
                unbiased = jax.lax.stop_gradient(var) * (count / max(count - 1, 1))
                running_mean.value = (1.0 - self.momentum) * running_mean.value + (
                    self.momentum * jax.lax.stop_gradient(mean))
                running_var.value = (1.0 - self.momentum) * running_var.value + (
                    self.momentum * unbiased)
        else:
            mean, var = running_mean.value, running_var.value
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


def conv(features: int, kernel: int, stride: int, padding: int, use_bias: bool, name: str,
         impl: str) -> nn.Module:
    """A square ``kernel`` convolution with PyTorch's symmetric zero ``padding`` and the
    networks' initialisation (:data:`conv_kernel_init`), by ``impl``
    (:mod:`l2t_jax.models.convolution`)."""
    return convolution.Conv2d(
        features=features, kernel_size=kernel, stride=stride, padding=padding,
        use_bias=use_bias, kernel_init=conv_kernel_init, impl=impl, name=name)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (torchvision layout and names)."""

    features: int
    stride: int = 1
    downsample: bool = False
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = conv(self.features, 3, self.stride, 1, False, "conv1", self.conv_impl)(x)
        y = nn.relu(BatchNorm(name="bn1")(y, train))
        y = conv(self.features, 3, 1, 1, False, "conv2", self.conv_impl)(y)
        y = BatchNorm(name="bn2")(y, train)
        shortcut = x
        if self.downsample:
            shortcut = conv(self.features, 1, self.stride, 0, False, "downsample_conv",
                             self.conv_impl)(x)
            shortcut = BatchNorm(name="downsample_bn")(shortcut, train)
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """torchvision's ResNet-50/101 Bottleneck (v1.5: the stride is on the 3x3 conv):
    conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(x4)-BN plus shortcut, then ReLU.

    (B, H, W, C_in) -> (B, H / stride, W / stride, 4 * features); ``downsample`` (1x1 conv
    + BN, torch's ``downsample.0/1``) when the stride or the width changes.
    """

    features: int
    stride: int = 1
    downsample: bool = False
    conv_impl: str = "auto"

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = self.features * self.expansion
        y = conv(self.features, 1, 1, 0, False, "conv1", self.conv_impl)(x)
        y = nn.relu(BatchNorm(name="bn1")(y, train))
        y = conv(self.features, 3, self.stride, 1, False, "conv2", self.conv_impl)(y)
        y = nn.relu(BatchNorm(name="bn2")(y, train))
        y = conv(out, 1, 1, 0, False, "conv3", self.conv_impl)(y)
        y = BatchNorm(name="bn3")(y, train)
        shortcut = x
        if self.downsample:
            shortcut = conv(out, 1, self.stride, 0, False, "downsample_conv",
                             self.conv_impl)(x)
            shortcut = BatchNorm(name="downsample_bn")(shortcut, train)
        return nn.relu(y + shortcut)



def classifier(features: jax.Array, num_classes: int, torch_default_init: bool = True
               ) -> jax.Array:
    """Global average pool and Linear ``fc``: (B, H, W, C) -> (B, num_classes). PyTorch's
    default init for the ResNets; the authors' VGG initialises its classifier N(0, 0.01)
    with zero bias."""
    pooled = jnp.mean(features, axis=(1, 2))
    if torch_default_init:
        kernel_init = torch_default_kernel_init
        bias_init = torch_default_bias_init(features.shape[-1])
    else:
        kernel_init, bias_init = nn.initializers.normal(0.01), nn.initializers.zeros
    return nn.Dense(num_classes, kernel_init=kernel_init, bias_init=bias_init, name="fc")(pooled)



def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, no padding (``nn.MaxPool2d(2, 2)``): (B, H, W, C) ->
    (B, H // 2, W // 2, C); an odd last row or column is dropped, as in PyTorch.

    Written with reshapes and element-wise code rather than ``nn.max_pool``: XLA fuses it and
    its first- and second-order derivatives, where reduce-window's select-and-scatter
    gradients cost about a tenth of the L2T-ww step on CPU. The gradient goes to the first
    maximum of each window in row-major order, as PyTorch's does. Ties are common in real
    images, not only in all-zero windows after a ReLU: flat or saturated regions, and
    up-sampled inputs such as the demo's digits. ``jnp.max`` would split the gradient
    evenly among tied elements instead.
    """
    b, h, w, c = x.shape
    x = x[:, :h - h % 2, :w - w % 2, :].reshape(b, h // 2, 2, w // 2, 2, c)
    # (B, H/2, W/2, C, 4): a window's elements in PyTorch's scan order (row, then column).
    windows = x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4)
    first_max = jax.lax.stop_gradient(
        jax.nn.one_hot(jnp.argmax(windows, axis=-1), 4, dtype=x.dtype))
    return jnp.sum(windows * first_max, axis=-1)

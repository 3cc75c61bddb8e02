"""The paper's networks and the model registry: CIFAR-style ResNets, VGG-9-BN,
torchvision-layout ResNets (BasicBlock 18/34 and Bottleneck 50/101).

This module owns the source and target architectures and :func:`get_model`, which returns
any registered (or importable) Linen classifier as a :class:`~l2t_jax.taps.TappedNetwork`.
Every model's ``__call__(images, train)`` returns logits; each declares its taps in the
paper's index order (``default_taps()``, the indices that pair lists such as ``"4-0,9-1"``
refer to) and the ones the matching schemes pick from (``default_candidates()``). Taps are
block outputs (read by Flax's intermediate capture) or values sown where no module ends
(:mod:`l2t_jax.taps`). Images and features are NHWC.

Numerics follow the PyTorch reference (SPEC.md): BatchNorm with eps 1e-5, running-stat
momentum 0.1, normalisation by the biased batch variance and running variance updated with
the unbiased one; convolution padding and initialisation as in the reference.

Module names mirror the reference's PyTorch state-dict keys (``blocks2_0`` for
``blocks2.0``, ``layer3_1`` for ``layer3.1``) so that :mod:`l2t_jax.convert` is a rename.
The other families of the zoo (WideResNet, MobileNetV2) live in :mod:`l2t_jax.zoo` and
are registered here. Every registered name also has a ``NAME:tiny`` variant, the same
layout at a few channels per layer, for tests and quick runs.
"""
from __future__ import annotations

import importlib
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2t_jax import convolution
from l2t_jax.taps import TappedNetwork, tapped

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


def _conv(features: int, kernel: int, stride: int, padding: int, use_bias: bool, name: str,
          impl: str) -> nn.Module:
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
        y = _conv(self.features, 3, self.stride, 1, False, "conv1", self.conv_impl)(x)
        y = nn.relu(BatchNorm(name="bn1")(y, train))
        y = _conv(self.features, 3, 1, 1, False, "conv2", self.conv_impl)(y)
        y = BatchNorm(name="bn2")(y, train)
        shortcut = x
        if self.downsample:
            shortcut = _conv(self.features, 1, self.stride, 0, False, "downsample_conv",
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
        y = _conv(self.features, 1, 1, 0, False, "conv1", self.conv_impl)(x)
        y = nn.relu(BatchNorm(name="bn1")(y, train))
        y = _conv(self.features, 3, self.stride, 1, False, "conv2", self.conv_impl)(y)
        y = nn.relu(BatchNorm(name="bn2")(y, train))
        y = _conv(out, 1, 1, 0, False, "conv3", self.conv_impl)(y)
        y = BatchNorm(name="bn3")(y, train)
        shortcut = x
        if self.downsample:
            shortcut = _conv(out, 1, self.stride, 0, False, "downsample_conv",
                             self.conv_impl)(x)
            shortcut = BatchNorm(name="downsample_bn")(shortcut, train)
        return nn.relu(y + shortcut)


def _classifier(features: jax.Array, num_classes: int, torch_default_init: bool = True
                ) -> jax.Array:
    """Global average pool and Linear. PyTorch's default init for the ResNets; the
    reference's VGG initialises its classifier N(0, 0.01) with zero bias."""
    pooled = jnp.mean(features, axis=(1, 2))
    if torch_default_init:
        kernel_init = torch_default_kernel_init
        bias_init = torch_default_bias_init(features.shape[-1])
    else:
        kernel_init, bias_init = nn.initializers.normal(0.01), nn.initializers.zeros
    return nn.Dense(num_classes, kernel_init=kernel_init, bias_init=bias_init, name="fc")(pooled)


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
        x = _conv(self.widths[0], 3, 1, 1, True, "conv1", self.conv_impl)(images)
        x = nn.relu(BatchNorm(name="bn1")(x, train))
        for stage, (first, rest) in enumerate(self.STAGE_NAMES):
            stride = 1 if stage == 0 else 2
            x = BasicBlock(self.widths[stage], stride, downsample=stage > 0,
                           conv_impl=self.conv_impl, name=first)(x, train)
            for i in range(n - 1):
                x = BasicBlock(self.widths[stage], conv_impl=self.conv_impl,
                               name=f"{rest}_{i}")(x, train)
        return _classifier(x, self.num_classes)


class ImageNetResNet(nn.Module):
    """torchvision-layout ResNets: 18/34 with BasicBlock (as the reference's
    ``resnet_ilsvrc``), 50/101 with Bottleneck (torchvision's ``resnet50`` / ``resnet101``,
    v1.5).

    Taps, sown: ``stem``, the stem output after ReLU (before max-pool, stride 2), and
    ``layer1..layer4``, each stage's output (strides 4, 8, 16, 32): channels
    [64, 64, 128, 256, 512] for 18/34, [64, 256, 512, 1024, 2048] for 50/101 (the stage
    widths times the block's expansion).
    The classifier pools globally (the reference's AvgPool2d(7) at 224 px is the same).
    """

    depth: int = 18
    num_classes: int = 1000
    widths: Sequence[int] = (64, 128, 256, 512)
    conv_impl: str = "auto"

    # depth -> (block, blocks per stage), torchvision's table.
    DEPTHS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
              50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3))}

    def _depth_entry(self) -> tuple[type, tuple[int, ...]]:
        if self.depth not in self.DEPTHS:
            raise ValueError(f"ImageNet ResNet depth must be one of {sorted(self.DEPTHS)}, "
                             f"got {self.depth}")
        return self.DEPTHS[self.depth]

    @property
    def block(self) -> type:
        """BasicBlock or Bottleneck, by depth."""
        return self._depth_entry()[0]

    @property
    def stage_sizes(self) -> tuple[int, ...]:
        return self._depth_entry()[1]

    def default_taps(self) -> tuple[str, ...]:
        return ("stem", *(f"layer{k + 1}" for k in range(len(self.widths))))

    def default_candidates(self) -> tuple[str, ...]:
        """layer1..layer4 (taps 1..4), not the stem, as the reference's ImageNet pairs."""
        return self.default_taps()[1:]

    @nn.compact
    def __call__(self, images: jax.Array, train: bool):
        x = _conv(self.widths[0], 7, 2, 3, False, "conv1", self.conv_impl)(images)
        x = nn.relu(BatchNorm(name="bn1")(x, train))
        self.sow("intermediates", "stem", x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block = self.block
        expansion = getattr(block, "expansion", 1)
        in_channels = self.widths[0]
        for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for i in range(blocks):
                stride = 2 if (stage > 0 and i == 0) else 1
                downsample = stride != 1 or in_channels != width * expansion
                x = block(width, stride, downsample=downsample, conv_impl=self.conv_impl,
                          name=f"layer{stage + 1}_{i}")(x, train)
                in_channels = width * expansion
            self.sow("intermediates", f"layer{stage + 1}", x)
        return _classifier(x, self.num_classes)


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
                x = _conv(width, 3, 1, 1, True, f"conv{k}", self.conv_impl)(x)
                x = nn.relu(BatchNorm(name=f"bn{k}")(x, train))
                k += 1
            self.sow("intermediates", f"stage{stage}", x)
            x = max_pool_2x2(x)
        return _classifier(x, self.num_classes, torch_default_init=False)


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


def _zoo(class_name: str, **attributes) -> Callable[..., nn.Module]:
    """A factory for a :mod:`l2t_jax.zoo` class, imported when first built (zoo builds on
    this module's layers, so it cannot be imported while this module is)."""
    def factory(**kw):
        from l2t_jax import zoo
        return getattr(zoo, class_name)(**attributes, **kw)
    return factory


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet20": lambda **kw: CifarResNet(depth=20, **kw),
    "resnet32": lambda **kw: CifarResNet(depth=32, **kw),
    "resnet56": lambda **kw: CifarResNet(depth=56, **kw),
    "vgg9_bn": lambda **kw: VGG(**kw),
    "resnet18": lambda **kw: ImageNetResNet(depth=18, **kw),
    "resnet34": lambda **kw: ImageNetResNet(depth=34, **kw),
    "resnet50": lambda **kw: ImageNetResNet(depth=50, **kw),
    "resnet101": lambda **kw: ImageNetResNet(depth=101, **kw),
    # WRN-depth-k in the layout of RepDistiller's models/wrn.py (l2t_jax.zoo.WideResNet);
    # 16/28/40 are the CIFAR knowledge-distillation depths.
    **{f"wrn{depth}_{k}": _zoo("WideResNet", depth=depth, widen_factor=k)
       for depth, k in ((16, 1), (16, 2), (16, 4), (16, 8), (28, 2), (28, 4), (28, 10),
                        (40, 1), (40, 2), (40, 4))},
    "mobilenet_v2": _zoo("MobileNetV2"),
}

# NAME:tiny: the same layout with a few channels per layer (tests, quick runs); explicit
# overrides win. A family's tiny widths keep every structural case of the full network (a
# shortcut convolution where the full one has one, a residual where it has one).
_TINY_OVERRIDES: dict[str, dict] = {
    **{name: {"widths": (4, 6, 8)} for name in ("resnet20", "resnet32", "resnet56")},
    "vgg9_bn": {"widths": (4, 6, 8, 8, 8)},
    **{name: {"widths": (4, 4, 8, 8)} for name in ("resnet18", "resnet34")},
    **{name: {"widths": (4, 4, 8, 8)} for name in ("resnet50", "resnet101")},
    # WRN widths (stem, group 1..3) with every group widening: each group's first block
    # has its 1x1 convShortcut, as in WRN-k for k > 1.
    **{name: {"widths": (4, 8, 12, 16)} for name in _REGISTRY if name.startswith("wrn")},
    "mobilenet_v2": {"width_mult": 0.25, "round_nearest": 4, "last_channel": 32},
}

MODEL_NAMES = tuple(_REGISTRY)
TINY_SUFFIX = ":tiny"


def register(name: str, factory: Callable[..., nn.Module],
             tiny: dict | None = None) -> None:
    """Adds a network to the registry (a notebook's own model, say): ``factory(num_classes,
    **overrides)`` returns a Linen module whose ``__call__(images, train)`` returns logits;
    ``tiny``: the overrides of its ``NAME:tiny`` variant. Configs can also name a model by
    import path, ``package.module:Class``, unregistered."""
    global MODEL_NAMES
    _REGISTRY[name] = factory
    if tiny is not None:
        _TINY_OVERRIDES[name] = dict(tiny)
    MODEL_NAMES = tuple(_REGISTRY)


def tiny_overrides(name: str) -> dict:
    """The overrides of ``NAME:tiny``."""
    if name not in _TINY_OVERRIDES:
        raise ValueError(f"model {name!r} has no {TINY_SUFFIX} variant; those with one: "
                         f"{', '.join(_TINY_OVERRIDES)}")
    return dict(_TINY_OVERRIDES[name])


def is_import_path(name: str) -> bool:
    """``package.module:Attribute`` names a model outside the registry."""
    return isinstance(name, str) and name.count(":") == 1 and all(name.split(":"))


def _factory(name: str) -> Callable[..., nn.Module]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.endswith(TINY_SUFFIX) and name[:-len(TINY_SUFFIX)] in _REGISTRY:
        base = name[:-len(TINY_SUFFIX)]
        tiny = tiny_overrides(base)
        return lambda **kw: _REGISTRY[base](**{**tiny, **kw})
    if is_import_path(name):
        module_name, attribute = name.split(":")
        try:
            return getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import model {name!r}: {e}") from None
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}, or "
                     "an import path package.module:Class")


def get_model(name: str, num_classes: int, *, taps: str | Sequence[str] | None = None,
              candidates: str | Sequence[str] | None = None, probe_size: int = 64,
              **overrides) -> TappedNetwork:
    """Builds a network with its taps.

    Args:
      name: one of :data:`MODEL_NAMES` (``resnet20/32/56`` are CIFAR-style,
        ``resnet18/34/50/101`` torchvision-style, ``vgg9_bn``, ``wrn{depth}_{k}``,
        ``mobilenet_v2``), one of those with ``:tiny`` (a few channels), or an import path
        ``package.module:Class`` of any Linen module with a ``num_classes`` attribute whose
        ``__call__(images, train)`` returns logits.
      num_classes: classifier outputs.
      taps, candidates: tap names (:func:`l2t_jax.taps.tapped`); None takes the model's own.
      probe_size: input side at which tap strides are read (the data's image size).
      **overrides: module attributes, e.g. ``widths=(4, 8, 16)`` for tiny test models or
        ``conv_impl='matmul'`` (dropped for a model without that attribute).

    Returns:
      A :class:`~l2t_jax.taps.TappedNetwork`; ``feature_taps()`` lists its taps (channels,
      stride).
    """
    factory = _factory(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if "conv_impl" in overrides:   # when built, not when first traced
        convolution.check_impl(overrides["conv_impl"])
        fields = getattr(factory, "__dataclass_fields__", None)
        if name not in _REGISTRY and fields is not None and "conv_impl" not in fields:
            overrides.pop("conv_impl")
    # Lists (from JSON metadata or a config) as tuples: a network is hashable, part of the
    # static description of the step.
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    module = factory(num_classes=num_classes, **overrides)
    if not isinstance(module, nn.Module):
        raise ValueError(f"model {name!r} built a {type(module).__name__}, not a Linen module")
    return tapped(module, taps, candidates, name=name, probe_size=probe_size)

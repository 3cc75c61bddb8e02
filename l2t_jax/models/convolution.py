"""2-D convolution with a selectable implementation (XLA's native op, or im2col + matmul).

This module owns how convolutions are computed. Both implementations use the same
parameters (``kernel`` HWIO, optional ``bias``) and PyTorch's symmetric zero padding, so a
checkpoint or a test can switch between them freely:

- ``native``: ``lax.conv_general_dilated``, the right choice on GPU and TPU.
- ``matmul``: patches gathered by strided slices and one matrix product per conv. On
  XLA:CPU this is faster than the native convolution for the small CIFAR networks, because
  it lands on the tuned dot kernels (see BENCHMARKS.md).
- ``auto``: ``matmul`` when the default backend is the CPU, else ``native``.

1x1 convolutions are always computed as matrix products (see ``Conv2d``).

Depthwise convolutions (``groups`` = input channels, MobileNetV2's 3x3 layers) have no
matrix product to share across channels. Their ``matmul`` path (:func:`conv2d_depthwise`)
takes the same strided slices as im2col and sums each one times its kernel tap, element
by element; ``native`` is XLA's grouped convolution (``feature_group_count``). ``auto``
picks :data:`DEPTHWISE_AUTO_CPU` on the CPU (measured, BENCHMARKS.md "Depthwise
convolutions"), ``native`` elsewhere. Other group counts always use ``native``.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2t_jax.models import xla_workarounds

# Every network of the package is built from this module's convolutions, so this is the
# first of its modules that any program computing a network imports: set XLA's flags now,
# before a backend starts (importing jax does not start one).
xla_workarounds.apply()

CONV_IMPLS = ("native", "matmul", "auto")


def check_impl(impl: str) -> str:
    """``impl`` if it is one of :data:`CONV_IMPLS`, else ValueError naming the config key."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"config.conv_impl={impl!r}; valid: {', '.join(CONV_IMPLS)}")
    return impl


# What ``auto`` means for a depthwise convolution on the CPU (BENCHMARKS.md, "Depthwise
# convolutions": the MobileNetV2 training step with each implementation).
DEPTHWISE_AUTO_CPU = "matmul"


def resolve_impl(impl: str, depthwise: bool = False) -> str:
    """Maps ``auto`` to the implementation for the current default backend (for a depthwise
    convolution when ``depthwise``)."""
    if check_impl(impl) == "auto":
        if jax.default_backend() != "cpu":
            return "native"
        return DEPTHWISE_AUTO_CPU if depthwise else "matmul"
    return impl


def _padded_slices(x: jax.Array, kh: int, kw: int, stride: int, padding: int
                   ) -> tuple[list[jax.Array], int, int]:
    """The kh * kw strided windows of im2col, row-major over the kernel taps: each
    (B, H_out, W_out, C); and H_out, W_out."""
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    h_out = (x.shape[1] - kh) // stride + 1
    w_out = (x.shape[2] - kw) // stride + 1
    slices = [
        x[:, i:i + stride * (h_out - 1) + 1:stride, j:j + stride * (w_out - 1) + 1:stride, :]
        for i in range(kh) for j in range(kw)
    ]
    return slices, h_out, w_out


def conv2d_matmul(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Convolution as im2col + one matmul.

    Args:
      x: (B, H, W, C_in).
      kernel: (kh, kw, C_in, C_out).
      stride, padding: as in ``torch.nn.Conv2d`` (same on both spatial axes).

    Returns:
      (B, H_out, W_out, C_out) with H_out = (H + 2 * padding - kh) // stride + 1.
    """
    kh, kw, c_in, c_out = kernel.shape
    patches, h_out, w_out = _padded_slices(x, kh, kw, stride, padding)
    patches = patches[0] if len(patches) == 1 else jnp.concatenate(patches, axis=-1)
    # A rank-2 product: XLA folds the transposes that reverse-mode differentiation puts
    # around a dot into the dot only for rank-2 operands. With (B, H, W, K) patches the
    # second-order step materialised every patch cotangent as (K, B, H, W) and transposed
    # it back (495 transposes in the T=2 step against 142; 8-15% of its time, BENCHMARKS.md).
    y = jnp.dot(patches.reshape(-1, kh * kw * c_in), kernel.reshape(kh * kw * c_in, c_out))
    return y.reshape(x.shape[0], h_out, w_out, c_out)


def conv2d_depthwise(x: jax.Array, kernel: jax.Array, stride: int, padding: int
                     ) -> jax.Array:
    """Depthwise convolution (``groups`` = C_in) as a sum of kernel taps times im2col's
    strided slices: element-wise work that XLA fuses, to any order of differentiation.

    Args:
      x: (B, H, W, C_in).
      kernel: (kh, kw, 1, C_in * m), PyTorch's ``groups=C_in`` weight in HWIO: output
        channel ``o`` reads input channel ``o // m``.
      stride, padding: as in ``torch.nn.Conv2d``.

    Returns:
      (B, H_out, W_out, C_in * m).
    """
    kh, kw, one, c_out = kernel.shape
    c_in = x.shape[-1]
    if one != 1 or c_out % c_in:
        raise ValueError(f"a depthwise kernel is (kh, kw, 1, C_in * m), got {kernel.shape} "
                         f"for {c_in} input channels")
    multiplier = c_out // c_in
    slices, h_out, w_out = _padded_slices(x, kh, kw, stride, padding)
    taps = kernel.reshape(kh * kw, c_in, multiplier)
    y = sum(window[..., None] * taps[t] for t, window in enumerate(slices))
    return y.reshape(x.shape[0], h_out, w_out, c_out)


def conv2d_native(x: jax.Array, kernel: jax.Array, stride: int, padding: int,
                  groups: int = 1) -> jax.Array:
    """Same contract as :func:`conv2d_matmul` (kernel (kh, kw, C_in / groups, C_out)), with
    XLA's convolution."""
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


class Conv2d(nn.Module):
    """Square 2-D convolution with PyTorch-style padding; parameters ``kernel`` (HWIO:
    (k, k, C_in / groups, features)), ``bias``. ``groups`` as in ``torch.nn.Conv2d``."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable | None = None
    impl: str = "auto"
    groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c_in = x.shape[-1]
        if c_in % self.groups or self.features % self.groups:
            raise ValueError(f"groups={self.groups} must divide the input ({c_in}) and "
                             f"output ({self.features}) channels")
        kernel = self.param("kernel", self.kernel_init, (
            self.kernel_size, self.kernel_size, c_in // self.groups, self.features))
        kernel = kernel.astype(jnp.result_type(x, kernel))
        x = x.astype(kernel.dtype)
        if self.groups == 1:
            # A 1x1 conv is a (strided) matrix product on every backend. XLA:CPU's native
            # 1x1 conv also produced NaN meta-gradients under jit in the second-order step
            # of this package (jax 0.10.2; eager mode was fine), which the product avoids.
            use_matmul = self.kernel_size == 1 or resolve_impl(self.impl) == "matmul"
            conv = conv2d_matmul if use_matmul else conv2d_native
            y = conv(x, kernel, self.stride, self.padding)
        elif self.groups == c_in and resolve_impl(self.impl, depthwise=True) == "matmul":
            y = conv2d_depthwise(x, kernel, self.stride, self.padding)
        else:
            y = conv2d_native(x, kernel, self.stride, self.padding, self.groups)
        if self.use_bias:
            bias_init = self.bias_init or nn.initializers.zeros
            y = y + self.param("bias", bias_init, (self.features,))
        return y

"""Loss functions, pure over arrays: feature matching (weighted and plain), attention
transfer, LwF distillation, cross-entropy, and the PyTorch-exact resamplings they use
(bilinear resize, adaptive average pooling).

All feature maps are NHWC. Nothing here holds parameters: the 1x1 regressors live in
:mod:`l2t_jax.transfer.heads`, the weight networks in :mod:`l2t_jax.transfer.meta`, the
modules of AFD and SemCKD in :mod:`l2t_jax.transfer.afd` and :mod:`l2t_jax.transfer.semckd`.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def _interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of PyTorch's bilinear weights along one axis.

    ``F.interpolate(mode='bilinear', align_corners=False)`` without antialiasing: output
    pixel o samples the input at src = (o + 0.5) * in/out - 0.5, clamped below at 0, and
    mixes the two neighbours floor(src) and min(floor(src) + 1, in - 1). The reference
    passes ``scale_factor = out / in``; for the networks here that ratio is a power of two,
    so it equals the size ratio used below exactly.
    """
    scale = in_size / out_size
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for o in range(out_size):
        src = max((o + 0.5) * scale - 0.5, 0.0)
        lo = min(int(np.floor(src)), in_size - 1)
        hi = min(lo + 1, in_size - 1)
        frac = src - lo
        matrix[o, lo] += 1.0 - frac
        matrix[o, hi] += frac
    return matrix


def bilinear_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resizes (B, H, W, C) to (B, *size, C) exactly as PyTorch's bilinear, align_corners=False.

    Unlike ``jax.image.resize`` this never antialiases when downsampling (the reference
    does not), so 32 -> 8 reads 2 of every 4 pixels with weights 1/2, as PyTorch does.
    """
    out_h, out_w = size
    if x.shape[1:3] == (out_h, out_w):
        return x
    rows = jnp.asarray(_interpolation_matrix(x.shape[1], out_h), dtype=x.dtype)
    cols = jnp.asarray(_interpolation_matrix(x.shape[2], out_w), dtype=x.dtype)
    return jnp.einsum("oh,bhwc,pw->bopc", rows, x, cols)


@functools.lru_cache(maxsize=None)
def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) averaging weights of PyTorch's adaptive average pooling on one
    axis: output o averages inputs floor(o*in/out) .. ceil((o+1)*in/out) - 1. For
    out > in this replicates inputs (every bin holds at least one input)."""
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for o in range(out_size):
        start = (o * in_size) // out_size
        end = -((-(o + 1) * in_size) // out_size)
        matrix[o, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_avg_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.adaptive_avg_pool2d`` on the two axes after the batch: (B, H, W, ...) ->
    (B, size[0], size[1], ...), up-sampling by replication where a side grows. The bins
    are rectangles, so pooling is separable into one averaging matrix per axis."""
    in_h, in_w = x.shape[1], x.shape[2]
    if (in_h, in_w) == tuple(size):
        return x
    rows = jnp.asarray(_adaptive_pool_matrix(in_h, size[0]), x.dtype)
    cols = jnp.asarray(_adaptive_pool_matrix(in_w, size[1]), x.dtype)
    return jnp.einsum("oh,bhw...,pw->bop...", rows, x, cols)


def channel_distances(source: jax.Array, regressed_target: jax.Array) -> jax.Array:
    """Per-example, per-channel mean squared difference.

    Args:
      source: source feature map (B, H_s, W_s, C); resized to the target's size if needed.
      regressed_target: the target map after its 1x1 regressor, (B, H_t, W_t, C).

    Returns:
      d of shape (B, C): mean over (h, w) of (regressed - source)^2.
    """
    source = bilinear_resize(source, regressed_target.shape[1:3])
    return jnp.mean(jnp.square(regressed_target - source), axis=(1, 2))


def weighted_matching_loss(
    source_features: Sequence[jax.Array],
    regressed_targets: Sequence[jax.Array],
    channel_weights: Optional[Sequence[jax.Array]],
    pair_weights: Optional[Sequence[jax.Array]],
    beta: float,
) -> jax.Array:
    """L2T-ww's matching loss summed over pairs (docs/semantics.md, "Losses").

    Args:
      source_features: per pair, the source map S^m(x), (B, H, W, C_m).
      regressed_targets: per pair, r(T^n(x)), (B, H_t, W_t, C_m).
      channel_weights: per pair w^{m,n} (B, C_m), rows summing to 1, or None (w_c = 1).
      pair_weights: per pair lambda^{m,n}, (B,) or broadcastable, or None (lambda = 1).
      beta: multiplies every pair's term.

    Returns:
      Scalar: sum over pairs of beta * mean_b(lambda_b * sum_c w_bc d_bc); with neither
      weighting, beta * mean over (b, c) of d (plain FitNets matching).
    """
    total = 0.0
    for i, (source, regressed) in enumerate(zip(source_features, regressed_targets)):
        distances = channel_distances(source, regressed)
        if channel_weights is None and pair_weights is None:
            total = total + beta * jnp.mean(distances)
            continue
        if channel_weights is None:
            per_example = jnp.sum(distances, axis=1)
        else:
            per_example = jnp.sum(channel_weights[i] * distances, axis=1)
        if pair_weights is not None:
            per_example = per_example * jnp.reshape(pair_weights[i], (-1,))
        total = total + beta * jnp.mean(per_example)
    return total


def attention_map(features: jax.Array) -> jax.Array:
    """Zagoruyko & Komodakis' spatial attention: mean over channels of x^2, flattened and
    L2-normalised per example. (B, H, W, C) -> (B, H*W)."""
    attention = jnp.mean(jnp.square(features), axis=-1).reshape(features.shape[0], -1)
    norm = jnp.linalg.norm(attention, axis=1, keepdims=True)
    return attention / jnp.maximum(norm, 1e-12)


def attention_transfer_loss(source_features: Sequence[jax.Array],
                            target_features: Sequence[jax.Array], beta: float) -> jax.Array:
    """Sum over pairs of beta * mean over (b, position) of (at(T) - at(S))^2.

    The source map is resized to the target's spatial size first (same resize as matching).
    Channel counts may differ: attention maps are per position.
    """
    total = 0.0
    for source, target in zip(source_features, target_features):
        source = bilinear_resize(source, target.shape[1:3])
        total = total + beta * jnp.mean(jnp.square(attention_map(target) - attention_map(source)))
    return total


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy. logits (B, K), integer labels (B,)."""
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      temperature: float) -> jax.Array:
    """LwF's knowledge-distillation term: cross-entropy between the teacher's and the
    student's softened distributions, -mean_b sum_k softmax(t/T)_k log softmax(s/T)_k."""
    teacher = jax.nn.softmax(teacher_logits / temperature)
    return -jnp.mean(jnp.sum(teacher * jax.nn.log_softmax(student_logits / temperature), -1))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Top-1 accuracy in [0, 1]."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)

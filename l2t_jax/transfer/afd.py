"""AFD: attention-based feature distillation over all (source tap, target tap) pairs.

"Show, Attend and Distill: Knowledge Distillation via Attention-based Feature Matching"
(Ji, Heo, Park, AAAI 2021). This module restates the math of the authors' module
``distill/AFD.py`` of github.com/clovaai/attention-feature-distillation (commit dd990d0b,
classes ``AFD``, ``Attention``, ``LinearTransformTeacher``, ``LinearTransformStudent``,
``Sample``, ``nn_bn_relu``) in Flax Linen, NHWC.

Roles. Their teacher is our *source* (frozen, pretrained on another task), their student
our *target* (trained). Their "guide layers" (``g_t``) are our source taps, their "hint
layers" (``g_s``) our target taps. Every source tap attends over every target tap (their
``Attention`` always forms all teacher x student combinations of the taps it is given), so
the module is all-to-all over the taps passed in; which taps to pass is the caller's
choice. Only the feature term is here: the authors add Hinton's KD on logits
(``alpha * KL``, T = 4, main.py:34-35), which has no meaning in transfer (the source was
trained on other classes), so it is not part of this module and should not be added.

The math, per example b, with S source taps m (C_m, H_m, W_m) and T target taps n
(C_n, H'_n, W'_n), d = ``qk_dim``:

* source query  q_m = BN(Linear_m(GAP(S_m)))                          (B, S, d)
* target key    k_n = ReLU(BN(Linear_n(GAP(T_n))))                     (B, T, d)
* bilinear key  K = BN(Linear(k)) reshaped (B, T, S, d); the BN here normalises over the
  B*T rows (batch and target taps together), as the authors' ``view(bs * s, -1)`` does.
* positional    P = p_source @ p_target^T                                (S, T)
* logits        z[b, m, n] = (<K[b, n, m], q[b, m]> + P[m, n]) / sqrt(d)
* attention     a[b, m, :] = softmax over the *target* taps n of z[b, m, :]
* source value  v_m = l2normalize(flatten(mean_c S_m^2))                 (B, H_m W_m)
* target value  u_{n->m} = l2normalize(flatten(AdaptiveAvgPool_{(H_m, W_m)}(mean_c T_n^2)))
  (pool the channel-mean of squares, then normalise; PyTorch's adaptive average pooling,
  which up-samples by replication when the target map is smaller)
* loss          sum_m mean_b sum_n a[b, m, n] * mean_{hw} (u_{n->m} - v_m)^2

``l2normalize`` is ``F.normalize``: x / max(||x||_2, 1e-12). The loss is what the authors'
``AFD.forward`` returns, before their weight ``beta`` (:data:`BETA`).

Attention convention. The authors' ``atts`` is (B, teacher, student) = (B, S, T) and is
normalised over the student axis: for each source tap the weights over the target taps sum
to one. :class:`AFD` returns it transposed to our (B, T, S) convention (target taps x
source taps), so in the returned array it is the columns (axis 1, the target axis) that
sum to one, not the rows.

BatchNorm. All three embeddings end in ``nn.BatchNorm1d`` (momentum 0.1, eps 1e-5). With
``train=True`` the batch statistics normalise (biased variance) and the running statistics
in the ``batch_stats`` collection are updated (unbiased variance, n / (n - 1)), exactly as
PyTorch does; call ``apply(..., mutable=["batch_stats"])``. The authors only ever run this
module in train mode (their ``train_kl`` calls ``.train()`` on it; evaluation runs the
student alone), so train mode is the one that matters for the loss and its gradients.
``train=False`` normalises with the running statistics, as PyTorch's ``.eval()`` would;
use it only to look at the attention outside training. Train-mode outputs never read the
running statistics: applying ``{"params": ...}`` alone with ``mutable=["batch_stats"]``
gives the same loss, attention and gradients (Flax starts the collection from its init
values), and the update may be dropped when no eval-mode read-out is wanted.

Parameters and initialisation (PyTorch defaults, as the authors do not re-initialise):
Linear kernels and biases U(+-1/sqrt(fan_in)) (kaiming_uniform(a=sqrt(5)) and PyTorch's
bias rule); BN scale 1, bias 0, running mean 0, running var 1; ``p_source``, ``p_target``
xavier_normal (untruncated normal, std sqrt(2 / (rows + cols))). Parameter names and the
authors' (``attention.`` omitted):

    query_{m}/linear, query_{m}/bn  <- linear_trans_t.query_layer[m].linear / .bn
    key_{n}/linear,   key_{n}/bn    <- linear_trans_s.key_layer[n].linear / .bn
    bilinear/linear,  bilinear/bn   <- linear_trans_s.bilinear.linear / .bn
    p_source (S, d)                 <- p_t
    p_target (T, d)                 <- p_s

Flax Dense kernels are (in, out), the transpose of PyTorch's Linear weight.

Choices the transfer setting forced (their code does not make them):

* The source features are wrapped in ``stop_gradient`` (the authors detach the teacher's
  features before the loss; here the module does it so a caller cannot forget).
* Unique source shapes are found by spatial size (H, W); the authors' ``unique_shape``
  compares the full ``torch.Size`` (N, C, H, W), so two source taps with the same H, W but
  different channels got two identical samplers there. The numbers are the same.
* Shapes are given as (C, H, W) per tap without a batch size; the module works for any
  batch size of at least 2 (BatchNorm needs two rows per channel in train mode).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The authors' defaults (clovaai/attention-feature-distillation @ dd990d0b).
QK_DIM = 128          # main.py:41, --qk_dim: width of queries, keys and positional terms
BETA = 200.0          # main.py:40, --beta: loss = CE + alpha*KL + beta*AFD (utils.py:81)
BN_MOMENTUM = 0.1     # nn.BatchNorm1d default (AFD.py:15)
BN_EPSILON = 1e-5     # nn.BatchNorm1d default
NORMALIZE_EPSILON = 1e-12  # F.normalize default (AFD.py:84, 108)

# PyTorch's default Linear init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
_torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# torch.nn.init.xavier_normal_: N(0, 2 / (fan_in + fan_out)), not truncated.
_xavier_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")

Shape = tuple[int, int, int]   # (channels, height, width) of one tap


def _torch_bias_init(fan_in: int):
    """PyTorch's default Linear bias init, U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


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
    (B, size[0], size[1], ...). The bins are rectangles, so pooling is separable into one
    averaging matrix per axis."""
    in_h, in_w = x.shape[1], x.shape[2]
    if (in_h, in_w) == tuple(size):
        return x
    rows = jnp.asarray(_adaptive_pool_matrix(in_h, size[0]), x.dtype)
    cols = jnp.asarray(_adaptive_pool_matrix(in_w, size[1]), x.dtype)
    return jnp.einsum("oh,bhw...,pw->bop...", rows, x, cols)


def _l2_normalize(x: jax.Array) -> jax.Array:
    """``F.normalize(x, dim=-1)``: x / max(||x||_2, 1e-12)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, NORMALIZE_EPSILON)


class TorchBatchNorm(nn.Module):
    """``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` with PyTorch numerics, channels last.

    Statistics over every axis but the last. Train mode: normalise with the batch mean and
    biased variance; unless initialising, update ``batch_stats/{mean,var}`` as
    r <- (1 - momentum) r + momentum * s with the *unbiased* variance (x n / (n - 1)).
    Eval mode: normalise with the running statistics. (Flax's BatchNorm puts the biased
    variance into its running average, which changes eval-mode numbers.)
    """

    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,),
                                     self.param_dtype)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,),
                                    self.param_dtype)
        if train:
            count = x.size // channels
            if count < 2:
                # PyTorch raises here too ("Expected more than 1 value per channel").
                raise ValueError(f"BatchNorm in train mode needs 2+ values per channel, "
                                 f"got input shape {x.shape}")
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axes)
            var = jnp.mean(jnp.square(x - mean), axes)
            if not self.is_initializing():
                stats_mean = jax.lax.stop_gradient(mean)
                stats_var = jax.lax.stop_gradient(var) * (count / (count - 1))
                running_mean.value = ((1.0 - self.momentum) * running_mean.value
                                      + self.momentum * stats_mean)
                running_var.value = ((1.0 - self.momentum) * running_var.value
                                     + self.momentum * stats_var)
        else:
            mean, var = running_mean.value, running_var.value
        return (x - mean) / jnp.sqrt(var + self.epsilon) * scale + bias


class LinearBN(nn.Module):
    """The authors' ``nn_bn_relu``: Linear, BatchNorm1d, optionally ReLU. (rows, in) ->
    (rows, features)."""

    features: int
    relu: bool
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dense(self.features, kernel_init=_torch_kernel_init,
                     bias_init=_torch_bias_init(x.shape[-1]), param_dtype=self.param_dtype,
                     name="linear")(x)
        x = TorchBatchNorm(param_dtype=self.param_dtype, name="bn")(x, train)
        return nn.relu(x) if self.relu else x


def _check_features(features: Sequence[jax.Array], shapes: Sequence[Shape], side: str):
    if len(features) != len(shapes):
        raise ValueError(f"{len(features)} {side} features for {len(shapes)} {side} shapes")
    for i, (f, shape) in enumerate(zip(features, shapes)):
        if f.ndim != 4 or tuple(f.shape[1:]) != (shape[1], shape[2], shape[0]):
            raise ValueError(f"{side} tap {i}: expected (B, {shape[1]}, {shape[2]}, "
                             f"{shape[0]}) (NHWC), got {tuple(f.shape)}")


class AFD(nn.Module):
    """AFD's trainable attention and embeddings; ``__call__`` returns (loss, attention).

    Attributes:
      source_shapes: (C, H, W) per source tap, in tap order (the authors' ``t_shapes`` of
        the guide layers, less the batch size).
      target_shapes: (C, H, W) per target tap (the authors' ``s_shapes``, hint layers).
      qk_dim: query/key width d (authors' default 128).
      param_dtype: dtype of the parameters and running statistics.
    """

    source_shapes: Sequence[Shape]
    target_shapes: Sequence[Shape]
    qk_dim: int = QK_DIM
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, source_features: Sequence[jax.Array],
                 target_features: Sequence[jax.Array],
                 train: bool) -> tuple[jax.Array, jax.Array]:
        """Loss and attention for one batch.

        Args:
          source_features: S arrays (B, H_m, W_m, C_m), the frozen source's tap outputs
            (treated as constants).
          target_features: T arrays (B, H'_n, W'_n, C_n), the target's tap outputs.
          train: BatchNorm mode (see the module docstring); True needs
            ``mutable=["batch_stats"]``.

        Returns:
          loss: scalar, the authors' ``AFD.forward`` value (sum over source taps of the
            batch-mean attention-weighted squared distance of normalised spatial maps;
            dimensionless, before ``BETA``).
          attention: (B, T, S), attention[b, n, m] = weight of target tap n for source tap
            m; sums to one over n (axis 1). The authors' ``atts`` transposed.
        """
        _check_features(source_features, self.source_shapes, "source")
        _check_features(target_features, self.target_shapes, "target")
        num_s, num_t, d = len(self.source_shapes), len(self.target_shapes), self.qk_dim
        source_features = [jax.lax.stop_gradient(f) for f in source_features]
        batch = target_features[0].shape[0]

        # Source side (their LinearTransformTeacher): queries from channel means, values
        # from the channel-mean of squares (the attention map of Zagoruyko & Komodakis).
        query = jnp.stack([
            LinearBN(d, relu=False, param_dtype=self.param_dtype, name=f"query_{m}")(
                jnp.mean(f, axis=(1, 2)), train)
            for m, f in enumerate(source_features)], axis=1)                  # (B, S, d)
        source_values = [_l2_normalize(jnp.mean(jnp.square(f), axis=-1).reshape(batch, -1))
                         for f in source_features]                            # (B, HW_m)

        # Target side (their LinearTransformStudent).
        key = jnp.stack([
            LinearBN(d, relu=True, param_dtype=self.param_dtype, name=f"key_{n}")(
                jnp.mean(f, axis=(1, 2)), train)
            for n, f in enumerate(target_features)], axis=1)                  # (B, T, d)
        # One BN over the B*T rows: batch and target taps share its statistics.
        bilinear_key = LinearBN(d * num_s, relu=False, param_dtype=self.param_dtype,
                                name="bilinear")(key.reshape(batch * num_t, d), train)
        bilinear_key = bilinear_key.reshape(batch, num_t, num_s, d)           # (B, T, S, d)

        # Target values resampled to each distinct source spatial size (their Sample):
        # channel-mean of squares first, then adaptive average pooling, then normalise.
        target_maps = [jnp.mean(jnp.square(f), axis=-1) for f in target_features]
        resampled = {}
        for shape in self.source_shapes:
            size = (shape[1], shape[2])
            if size not in resampled:
                pooled = jnp.stack([adaptive_avg_pool(t, size).reshape(batch, -1)
                                    for t in target_maps], axis=1)            # (B, T, HW)
                resampled[size] = _l2_normalize(pooled)

        p_source = self.param("p_source", _xavier_normal, (num_s, d), self.param_dtype)
        p_target = self.param("p_target", _xavier_normal, (num_t, d), self.param_dtype)
        logits = (jnp.einsum("btsq,bsq->bst", bilinear_key, query)
                  + p_source @ p_target.T) / np.sqrt(d)                       # (B, S, T)
        attention = jax.nn.softmax(logits, axis=-1)    # over target taps, as theirs (dim 2)

        loss = 0.0
        for m, shape in enumerate(self.source_shapes):
            target_value = resampled[(shape[1], shape[2])]                    # (B, T, HW_m)
            sq_dist = jnp.mean(jnp.square(target_value - source_values[m][:, None]),
                               axis=-1)                                       # (B, T)
            loss = loss + jnp.mean(jnp.sum(sq_dist * attention[:, m], axis=1))
        return loss, jnp.swapaxes(attention, 1, 2)

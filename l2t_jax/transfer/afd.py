"""AFD: attention-based feature distillation over all (source tap, target tap) pairs, and
the method ``afd`` built on it (its loss term, :data:`TERM`).

"Show, Attend and Distill: Knowledge Distillation via Attention-based Feature Matching"
(Ji, Heo, Park, AAAI 2021). This module restates the math of the authors' module
``distill/AFD.py`` of github.com/clovaai/attention-feature-distillation (commit dd990d0b,
classes ``AFD``, ``Attention``, ``LinearTransformTeacher``, ``LinearTransformStudent``,
``Sample``, ``nn_bn_relu``) in Flax Linen, NHWC.

As a method (:data:`TERM`, the row ``afd`` of :mod:`l2t_jax.transfer.methods`): the
module's parameters are ``theta["afd"]``, trained jointly with the target by theta's SGD
(its learning rate, momentum and weight decay), as the authors train it with the student
under one optimiser (main.py:76-84). It attends over the source and target taps that
appear in ``config.pairs`` (every combination of them: the ``all_to_all`` scheme by
default, L2T-ww's candidate taps and pairs). The loss added to CE is
``config.afd_weight * AFD`` (their ``beta``); the step reports the batch-mean attention
per pair as ``pair_attention`` (in the order of the pairs). The authors' logit
distillation is not part of it (below).

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

BatchNorm. All three embeddings end in ``nn.BatchNorm1d`` (momentum 0.1, eps 1e-5), here
the networks' PyTorch-numerics :class:`~l2t_jax.models.layers.BatchNorm` (statistics over
every axis but the last, so it takes these (rows, features) inputs too). With
``train=True`` the batch statistics normalise (biased variance) and the running statistics
in the ``batch_stats`` collection are updated (unbiased variance, n / (n - 1)), exactly as
PyTorch does; call ``apply(..., mutable=["batch_stats"])``. The authors only ever run this
module in train mode (their ``train_kl`` calls ``.train()`` on it; evaluation runs the
student alone), so train mode is the one that matters for the loss and its gradients.
``train=False`` normalises with the running statistics, as PyTorch's ``.eval()`` would;
use it only to look at the attention outside training. Train-mode outputs never read the
running statistics: applying ``{"params": ...}`` alone with ``mutable=["batch_stats"]``
gives the same loss, attention and gradients (Flax starts the collection from its init
values). The method does exactly that and drops the update: the running statistics are
not part of the training state (nothing would read them).

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

* No logit distillation: the authors add Hinton's KD on the teacher's logits
  (``alpha * KL``, T = 4); the source here was trained on other classes, so there is
  nothing to distil, and the method's loss is CE + ``afd_weight`` * AFD alone.
* The source features are wrapped in ``stop_gradient`` (the authors detach the teacher's
  features before the loss; here the module does it so a caller cannot forget).
* Unique source shapes are found by spatial size (H, W); the authors' ``unique_shape``
  compares the full ``torch.Size`` (N, C, H, W), so two source taps with the same H, W but
  different channels got two identical samplers there. The numbers are the same.
* Shapes are given as (C, H, W) per tap without a batch size; the module works for any
  batch size of at least 2 (PyTorch's BatchNorm refuses one row per channel in train
  mode; here one row would give zero variance).
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from l2t_jax.models.layers import BatchNorm, torch_default_bias_init, torch_default_kernel_init
from l2t_jax.transfer import pairing, terms
from l2t_jax.transfer.losses import adaptive_avg_pool

# The authors' defaults (clovaai/attention-feature-distillation @ dd990d0b).
QK_DIM = 128          # main.py:41, --qk_dim: width of queries, keys and positional terms
BETA = 200.0          # main.py:40, --beta: loss = CE + alpha*KL + beta*AFD (utils.py:81)
NORMALIZE_EPSILON = 1e-12  # F.normalize default (AFD.py:84, 108)

# torch.nn.init.xavier_normal_: N(0, 2 / (fan_in + fan_out)), not truncated.
_xavier_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")

Shape = tuple[int, int, int]   # (channels, height, width) of one tap


def _l2_normalize(x: jax.Array) -> jax.Array:
    """``F.normalize(x, dim=-1)``: x / max(||x||_2, 1e-12)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, NORMALIZE_EPSILON)


class LinearBN(nn.Module):
    """The authors' ``nn_bn_relu``: Linear, BatchNorm1d, optionally ReLU. (rows, in) ->
    (rows, features)."""

    features: int
    relu: bool

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dense(self.features, kernel_init=torch_default_kernel_init,
                     bias_init=torch_default_bias_init(x.shape[-1]), name="linear")(x)
        x = BatchNorm(name="bn")(x, train)
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
    """

    source_shapes: Sequence[Shape]
    target_shapes: Sequence[Shape]
    qk_dim: int = QK_DIM

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
            LinearBN(d, relu=False, name=f"query_{m}")(
                jnp.mean(f, axis=(1, 2)), train)
            for m, f in enumerate(source_features)], axis=1)                  # (B, S, d)
        source_values = [_l2_normalize(jnp.mean(jnp.square(f), axis=-1).reshape(batch, -1))
                         for f in source_features]                            # (B, HW_m)

        # Target side (their LinearTransformStudent).
        key = jnp.stack([
            LinearBN(d, relu=True, name=f"key_{n}")(
                jnp.mean(f, axis=(1, 2)), train)
            for n, f in enumerate(target_features)], axis=1)                  # (B, T, d)
        # One BN over the B*T rows: batch and target taps share its statistics.
        bilinear_key = LinearBN(d * num_s, relu=False, name="bilinear")(
            key.reshape(batch * num_t, d), train)
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

        p_source = self.param("p_source", _xavier_normal, (num_s, d))
        p_target = self.param("p_target", _xavier_normal, (num_t, d))
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


# ------------------------------------------------------------------------- the method
def _part(transfer, inputs: terms.TermInputs):
    """The module over the taps of the pairs, and its arguments on this batch (train
    mode)."""
    (source, target), (source_shapes, target_shapes) = terms.grid_features(
        transfer, inputs, "AFD")
    module = AFD(source_shapes, target_shapes, qk_dim=transfer.option("afd_qk_dim"))
    return module, (source, target, True)


def _loss(inputs: terms.TermInputs, transfer):
    """afd_weight * AFD, and the batch-mean attention per pair."""
    loss, attention = inputs.part_output
    return transfer.option("afd_weight") * loss, {
        "pair_attention": terms.per_pair(attention, transfer.pairs)}


def _check(transfer) -> None:
    weight, qk_dim = transfer.option("afd_weight"), transfer.option("afd_qk_dim")
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
        raise ValueError(f"config.afd_weight must be finite and >= 0, got {weight!r}")
    if not (isinstance(qk_dim, int) and qk_dim >= 1):
        raise ValueError(f"config.afd_qk_dim must be an integer >= 1, got {qk_dim!r}")
    pairing.tap_grid(transfer.pairs, "AFD")


TERM = terms.register(terms.LossTerm(
    "afd", _loss, needs_pairs=True, part=_part,
    options=(("afd_weight", BETA), ("afd_qk_dim", QK_DIM)), check=_check,
    metrics=("pair_attention",)))

"""SemCKD: semantic-calibrated cross-layer feature matching over all (target, source) taps,
and the method ``semckd`` built on it (its loss term, :data:`TERM`).

"Cross-Layer Distillation with Semantic Calibration" (Chen et al., AAAI 2021). This module
restates the math of the authors' ``SelfA`` (with ``MLPEmbed``, ``AAEmbed``, ``Normalize``)
in ``models/util.py`` and ``SemCKDLoss`` in ``distiller_zoo/SemCKD.py`` of
github.com/DefangChen/SemCKD (commit ebe5db19) in Flax Linen, NHWC.

As a method (:data:`TERM`, the row ``semckd`` of :mod:`l2t_jax.transfer.methods`): the
module's parameters are ``theta["semckd"]``, trained jointly with the target by theta's
SGD (its learning rate, momentum and weight decay), as the authors append ``SelfA`` to the
student's one optimiser (train_student.py:272-273, 343-346). It attends over the source
and target taps that appear in ``config.pairs`` (every combination of them: the
``all_to_all`` scheme by default, L2T-ww's candidate taps and pairs). The loss added to CE
is ``config.semckd_weight * SemCKD`` (their ``beta``); the step reports the batch-mean
attention per pair as ``pair_attention`` (in the order of the pairs). The MLPs' input
width is ``config.batch_size``, the global batch: under data parallelism the Gram
matrices span the whole batch across devices (their CIFAR runs, on one GPU), not each
device's share (their ImageNet DDP runs, where each GPU's SelfA saw its own 32 examples).
The authors' logit distillation is not part of it (below).

Roles. Their teacher is our *source* (frozen, pretrained on another task), their student
our *target* (trained). Careful with their comments: in ``SelfA`` "target layers" are the
*teacher's* and "source layers" the *student's*. Their training script passes
``feat_s[1:-1]`` and ``feat_t[1:-1]`` (every tapped stage output but the stem's and the
pooled vector; train_student.py:267-271, helper/loops.py:135); here the caller passes the
taps. Every target tap is paired with every source tap (their ``SelfA`` always forms all
student x teacher combinations). Only the feature term is here: the authors add Hinton's
KD on logits (``alpha * KL``, T = 4), meaningless in transfer (the source was trained on
other classes), so it is not part of this module and should not be added.

The math, with B the batch, T target taps n (C_n, H_n, W_n), S source taps m
(C_m, H_m, W_m), d = B // ``factor``:

* Gram matrices    G_n = F_n F_n^T with F_n = T_n(x) flattened to (B, C H W); the same for
  each source tap. Each row (one example's similarities to the batch) is an input vector
  of size B, so the embedding sizes depend on the batch size.
* query            q_n = l2normalize(Linear2_n(ReLU(Linear1_n(G_n))))    (B, T, d)
* key              k_m = the same with the source tap's own MLP           (B, S, d)
* attention        a[b, n, :] = softmax over the *source* taps m of <q[b, n], k[b, m]>
  (no temperature)
* regression       for each (n, m): if H_n > H_m, pool T_n to (H_m, W_m) and regress it;
  else regress T_n and pool S_m to (H_n, W_n) (PyTorch adaptive average pooling, which
  up-samples by replication). The regressor ``AAEmbed(C_n, C_m)``: conv1x1 C_n -> 2 C_m,
  BN, ReLU, conv3x3 (pad 1) 2 C_m -> 2 C_m, BN, ReLU, conv1x1 2 C_m -> C_m, no conv biases.
* pair loss        e[b, n, m] = mean over (H, W, C) of (regressed - source map)^2
* loss             sum_{b, n, m} a[b, n, m] e[b, n, m] / (B T)

``l2normalize`` is their ``Normalize``: x / ||x||_2 with no epsilon (a zero embedding gives
NaN there and here). The loss is what ``SemCKDLoss`` returns, before their weight ``beta``
(:data:`BETA`). Source Gram matrices and maps carry no gradient; the key MLPs still learn
(through the attention).

Attention convention. Their ``attention`` is (B, student, teacher) = (B, T, S), normalised
over the teacher axis: our convention already, returned as is; each row (axis 2, the
source taps) sums to one.

BatchNorm. Only the regressors have BN (``nn.BatchNorm2d``, momentum 0.1, eps 1e-5;
statistics over B, H, W), here the networks' :class:`~l2t_jax.models.layers.BatchNorm`.
``train=True`` normalises with the batch statistics (biased variance) and updates
``batch_stats`` (unbiased variance, n / (n - 1)), as PyTorch does; call
``apply(..., mutable=["batch_stats"])``. The authors only run ``SelfA`` in train mode
(``train_distill`` calls ``.train()`` on it; validation runs the student alone), so that is
the mode for the loss. ``train=False`` normalises with the running statistics, as
PyTorch's ``.eval()`` would. Train-mode outputs never read the running statistics:
applying ``{"params": ...}`` alone with ``mutable=["batch_stats"]`` gives the same loss,
attention and gradients. The method does exactly that and drops the update: the running
statistics are not part of the training state (nothing would read them).

Parameters and initialisation (PyTorch defaults; the authors do not re-initialise):
Linear kernels and biases U(+-1/sqrt(fan_in)); conv kernels U(+-1/sqrt(C_in k k)); BN
scale 1, bias 0, running mean 0, running var 1. Names and the authors' (``SelfA.``):

    query_{n}/linear1, /linear2        <- query_weight{n}.linear1 / .linear2  (target tap n)
    key_{m}/linear1, /linear2          <- key_weight{m}.linear1 / .linear2    (source tap m)
    regressor_{n}_{m}/conv1, bn1, conv2, bn2, conv3
                                       <- regressor{n}{m}.regressor[0, 1, 3, 4, 6]

Flax Dense kernels are (in, out), PyTorch Linear weights (out, in); the 1x1 convolutions
are Dense layers on the channel axis (kernel (C_in, C_out) = weight[:, :, 0, 0].T); the
3x3 kernel is (3, 3, C_in, C_out) = weight.permute(2, 3, 1, 0).

Choices the transfer setting forced (their code does not make them):

* No logit distillation: the authors add Hinton's KD on the teacher's logits
  (``alpha * KL``, T = 4); the source here was trained on other classes, so there is
  nothing to distil, and the method's loss is CE + ``semckd_weight`` * SemCKD alone.
* The source features are wrapped in ``stop_gradient`` (they detach the teacher's).
* Non-square maps: they compare heights only and pool to (H, H); here the comparison is
  on heights too, but pooling goes to the other map's (H, W). Same numbers for square maps.
* The batch size is a static attribute (their ``SelfA(..., input_channel=batch_size)``);
  every call must have exactly that many examples. Their loop skips the last, smaller
  batch (helper/loops.py:105); the training pipeline drops remainders too, and only the
  training step runs the module.
* Their module names ``'regressor' + str(i) + str(j)`` collide once a side has 10+ taps
  (i=1, j=11 and i=11, j=1 both give ``regressor111``), silently sharing one regressor;
  ``regressor_{n}_{m}`` does not.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2t_jax.models.layers import BatchNorm, torch_default_bias_init, torch_default_kernel_init
from l2t_jax.transfer import pairing, terms
from l2t_jax.transfer.losses import adaptive_avg_pool

# The authors' defaults (DefangChen/SemCKD @ ebe5db19).
FACTOR = 4            # models/util.py:57, SelfA(factor=4): embedding width = batch // 4
BETA = 400.0          # CIFAR-100 (-b 400): scripts/run_cifar_distill.sh:25, README.md:37
BETA_IMAGENET = 50.0  # ImageNet (-b 50): README.md:41. (train_student.py:80 defaults to 0.)

Shape = tuple[int, int, int]   # (channels, height, width) of one tap


class MLPEmbed(nn.Module):
    """Their ``MLPEmbed(dim_in, dim_out)``: Linear(dim_in, 2 dim_out), ReLU,
    Linear(2 dim_out, dim_out), then x / ||x||_2 (their ``Normalize``, no epsilon)."""

    dim_out: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(2 * self.dim_out, kernel_init=torch_default_kernel_init,
                     bias_init=torch_default_bias_init(x.shape[-1]), name="linear1")(x)
        x = nn.relu(x)
        x = nn.Dense(self.dim_out, kernel_init=torch_default_kernel_init,
                     bias_init=torch_default_bias_init(x.shape[-1]), name="linear2")(x)
        return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


class AAEmbed(nn.Module):
    """Their ``AAEmbed(C_in, C_out)``: conv1x1 -> 2 C_out, BN, ReLU, conv3x3 (pad 1),
    BN, ReLU, conv1x1 -> C_out; no conv biases. (B, H, W, C_in) -> (B, H, W, C_out)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        mid = 2 * self.features
        # A 1x1 convolution is a matmul on the channel axis.
        x = nn.Dense(mid, use_bias=False, kernel_init=torch_default_kernel_init,
                     name="conv1")(x)
        x = nn.relu(BatchNorm(name="bn1")(x, train))
        x = nn.Conv(mid, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    kernel_init=torch_default_kernel_init, name="conv2")(x)
        x = nn.relu(BatchNorm(name="bn2")(x, train))
        return nn.Dense(self.features, use_bias=False, kernel_init=torch_default_kernel_init,
                        name="conv3")(x)


def _check_features(features: Sequence[jax.Array], shapes: Sequence[Shape], side: str,
                    batch: int):
    if len(features) != len(shapes):
        raise ValueError(f"{len(features)} {side} features for {len(shapes)} {side} shapes")
    for i, (f, shape) in enumerate(zip(features, shapes)):
        if tuple(f.shape) != (batch, shape[1], shape[2], shape[0]):
            raise ValueError(f"{side} tap {i}: expected ({batch}, {shape[1]}, {shape[2]}, "
                             f"{shape[0]}) (NHWC, the module's batch size), got "
                             f"{tuple(f.shape)}")


def _gram(f: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, B) inner products of the flattened maps (the flattening order,
    NHWC here and NCHW there, does not change them)."""
    flat = f.reshape(f.shape[0], -1)
    return flat @ flat.T


class SemCKD(nn.Module):
    """SemCKD's attention MLPs and pair regressors; ``__call__`` returns (loss, attention).

    Attributes:
      source_shapes: (C, H, W) per source tap, in tap order (their teacher ``feat_t[1:-1]``).
      target_shapes: (C, H, W) per target tap (their student ``feat_s[1:-1]``).
      batch_size: examples per call; the MLPs' input width (their ``opt.batch_size``).
      factor: embedding width = batch_size // factor (their default 4).
    """

    source_shapes: Sequence[Shape]
    target_shapes: Sequence[Shape]
    batch_size: int
    factor: int = FACTOR

    @nn.compact
    def __call__(self, source_features: Sequence[jax.Array],
                 target_features: Sequence[jax.Array],
                 train: bool) -> tuple[jax.Array, jax.Array]:
        """Loss and attention for one batch.

        Args:
          source_features: S arrays (B, H_m, W_m, C_m), the frozen source's tap outputs
            (treated as constants).
          target_features: T arrays (B, H_n, W_n, C_n), the target's tap outputs.
          train: BatchNorm mode (see the module docstring); True needs
            ``mutable=["batch_stats"]``.

        Returns:
          loss: scalar, ``SemCKDLoss``'s value: the attention-weighted mean squared error
            between regressed target maps and source maps, summed over source taps and
            averaged over examples and target taps (units of the source features squared;
            before ``BETA``).
          attention: (B, T, S), softmax over the source taps (axis 2).
        """
        batch = self.batch_size
        dim = batch // self.factor
        if dim < 1:
            raise ValueError(f"batch_size {batch} // factor {self.factor} is 0: the "
                             "embeddings would be empty")
        _check_features(source_features, self.source_shapes, "source", batch)
        _check_features(target_features, self.target_shapes, "target", batch)
        source_features = [jax.lax.stop_gradient(f) for f in source_features]

        query = jnp.stack([
            MLPEmbed(dim, name=f"query_{n}")(_gram(f))
            for n, f in enumerate(target_features)], axis=1)                  # (B, T, d)
        key = jnp.stack([
            MLPEmbed(dim, name=f"key_{m}")(_gram(f))
            for m, f in enumerate(source_features)], axis=1)                  # (B, S, d)
        attention = jax.nn.softmax(jnp.einsum("btd,bsd->bts", query, key), axis=-1)

        errors = []                                                           # [n][m]: (B,)
        for n, (t_map, (_, t_h, t_w)) in enumerate(zip(target_features, self.target_shapes)):
            row = []
            for m, (s_map, (s_c, s_h, s_w)) in enumerate(zip(source_features,
                                                             self.source_shapes)):
                regressor = AAEmbed(s_c, name=f"regressor_{n}_{m}")
                if t_h > s_h:   # larger target map: pool it down before regressing
                    regressed = regressor(adaptive_avg_pool(t_map, (s_h, s_w)), train)
                    goal = s_map
                else:           # otherwise bring the source map to the target's size
                    regressed = regressor(t_map, train)
                    goal = adaptive_avg_pool(s_map, (t_h, t_w))
                row.append(jnp.mean(jnp.square(regressed - goal), axis=(1, 2, 3)))
            errors.append(jnp.stack(row, axis=1))
        errors = jnp.stack(errors, axis=1)                                    # (B, T, S)
        loss = jnp.sum(attention * errors) / (batch * len(self.target_shapes))
        return loss, attention


# ------------------------------------------------------------------------- the method
def _part(transfer, inputs: terms.TermInputs):
    """The module over the taps of the pairs, at this batch's size (the step's global
    batch, ``transfer.batch_size``), and its arguments on this batch (train mode)."""
    (source, target), (source_shapes, target_shapes) = terms.grid_features(
        transfer, inputs, "SemCKD")
    module = SemCKD(source_shapes, target_shapes, batch_size=source[0].shape[0],
                    factor=transfer.option("semckd_factor"))
    return module, (source, target, True)


def _loss(inputs: terms.TermInputs, transfer):
    """semckd_weight * SemCKD, and the batch-mean attention per pair."""
    loss, attention = inputs.part_output
    return transfer.option("semckd_weight") * loss, {
        "pair_attention": terms.per_pair(attention, transfer.pairs)}


def _check(transfer) -> None:
    weight, factor = transfer.option("semckd_weight"), transfer.option("semckd_factor")
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
        raise ValueError(f"config.semckd_weight must be finite and >= 0, got {weight!r}")
    if not (isinstance(factor, int) and factor >= 1):
        raise ValueError(f"config.semckd_factor must be an integer >= 1, got {factor!r}")
    if transfer.batch_size // factor < 1:
        raise ValueError(f"config.semckd_factor={factor} leaves SemCKD's embeddings empty "
                         f"at config.batch_size={transfer.batch_size} (their width is "
                         "batch_size // semckd_factor)")
    pairing.tap_grid(transfer.pairs, "SemCKD")


TERM = terms.register(terms.LossTerm(
    "semckd", _loss, needs_pairs=True, part=_part,
    options=(("semckd_weight", BETA), ("semckd_factor", FACTOR)), check=_check,
    metrics=("pair_attention",)))

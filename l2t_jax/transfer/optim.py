"""theta's optimiser and learning-rate schedules, as the authors' PyTorch code runs them.

theta (the target network and the parts methods add to it) trains by ``torch.optim.SGD``
with momentum and weight decay added to the gradient (:func:`sgd_momentum`), at a rate
that a per-epoch schedule sets: the authors' cosine annealing
(:func:`cosine_learning_rate`) or a step schedule (:func:`step_learning_rate`, the source
pre-training recipe). phi's Adam is optax's (:meth:`l2t_jax.transfer.bilevel.Transfer.
meta_optimizer`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def sgd_momentum(params: PyTree, buffers: PyTree, grads: PyTree, learning_rate: jax.Array,
                 momentum: float, weight_decay: float) -> tuple[PyTree, PyTree]:
    """One ``torch.optim.SGD`` step (weight decay added to the gradient, no dampening).

    Differentiable, so the simulated steps can be unrolled under ``jax.grad``.
    Returns (new params, new buffers).

    Not ``optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum))``: optax sums
    ``(g + wd * p) + mu * buf``, this ``(mu * buf + g) + wd * p``, the same to the last bit
    or two (float64 parity holds either way) but not bitwise: on a (1000, 1000) float32
    step 29% of the buffers and 0.6% of the parameters differ in the last place, so every
    recorded result would move. theta's per-epoch schedules (below) stay hand-written for the same reason.
    """
    buffers = jax.tree.map(lambda b, g, p: momentum * b + g + weight_decay * p,
                           buffers, grads, params)
    params = jax.tree.map(lambda p, b: p - learning_rate * b, params, buffers)
    return params, buffers


def step_learning_rate(base: float, epochs: int, steps_per_epoch: int,
                       decay_at: tuple[float, ...], factor: float):
    """PyTorch's MultiStepLR with milestones at ``round(f * epochs)`` for f in decay_at:
    epoch e trains at base * factor ** (number of milestones <= e)."""
    milestones = jnp.asarray([round(f * epochs) for f in decay_at])

    def learning_rate(step):
        epoch = step // steps_per_epoch
        return base * factor ** jnp.sum(milestones <= epoch)
    return learning_rate


def cosine_learning_rate(base: float, epochs: int, steps_per_epoch: int):
    """The reference's CosineAnnealingLR(T_max=epochs), stepped at the start of each epoch:
    epoch e trains at base * (1 + cos(pi * (e + 1) / epochs)) / 2."""
    def learning_rate(step):
        epoch = step // steps_per_epoch
        return base * 0.5 * (1.0 + jnp.cos(jnp.pi * (epoch + 1) / epochs))
    return learning_rate

"""The L2T-ww training iteration: one jit-compiled bilevel step over a pytree state.

This module owns the iteration of docs/semantics.md, for a batch (x, y):

1. real step: theta_0 -> theta_1 by SGD-momentum on CE + weighted matching (phi constant);
2. T matching-only SGD steps from (theta_1, its momentum buffers), in a ``lax.scan``;
3. one SGD step on CE;
4. meta loss: CE at the adapted parameters (train-mode BN), on the same batch (or, as
   options beyond the paper, on a batch of its own: held-out, val or another view of the
   same images; and of the logits over a temperature, ``Transfer.meta_temperature``);
5. phi <- Adam with L2 weight decay on d(meta loss)/d(phi), differentiated exactly
   (second order) through steps 2-3 by ``jax.grad``; theta_1 and its buffers are constants
   (as an option beyond the paper, Adam steps on the mean of every
   ``Transfer.meta_gradient_batches`` meta-gradients, phi fixed in between);
6. rollback: theta and the buffers stay at their values after step 1.

BN running statistics end as the reference leaves them: the update of step 1, then one more
update from a train-mode forward pass of the same batch at theta_1 (the reference's replay of
its first simulated step; ``replay_bn_update=False`` drops it). That forward pass is the first
simulated step's, so it costs nothing extra.

The source network runs once per batch (eval-mode BN); its features, pooled features and the
resized maps are constants of the whole iteration.

The baselines share this module (:mod:`l2t_jax.transfer.methods` chooses what a method builds): a
transfer without meta-networks takes only step 1, on CE plus its transfer loss terms
(:mod:`l2t_jax.transfer.terms`: plain feature matching through the heads, attention transfer, LwF
distillation, AFD, SemCKD), and leaves phi empty. With meta-networks, the simulated steps
minimise only the terms phi weights (the weighted feature matching), the real step all of
them. A term's own trainable part (AFD's and SemCKD's attention modules) is one more key of
theta, so theta's SGD trains it with the target.

SGD follows ``torch.optim.SGD`` with momentum mu, weight decay wd and no dampening:
buf <- mu * buf + (g + wd * p); p <- p - lr * buf, on every parameter of theta at every step,
also where the loss does not reach it (its gradient is then zero, decay and momentum still
apply). Buffers start at zero, which equals PyTorch's first ``buf = g + wd * p``.
"""
from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from l2t_jax.transfer import losses, optim, terms as loss_terms
from l2t_jax.transfer.heads import LwfHead, MatchingHeads
from l2t_jax.transfer.pairing import Pair, validate_pairs
from l2t_jax.transfer.meta import MetaNetworks, channel_weight_entropy
from l2t_jax.models.taps import TappedNetwork

PyTree = Any

# jax.checkpoint policies for the simulated step (``Transfer.remat``). Memory for large T:
# without remat, the reverse pass keeps every activation of every simulated step.
#   none: keep everything (fastest, memory grows with T);
#   dots: keep the matrix products' outputs (the convolutions: costly to recompute, one
#         map each) and recompute the cheap element-wise work (BN, ReLU, im2col patches);
#   full: keep only the step's inputs (theta, buffers) and recompute the whole step.
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; donated to and returned by the step.

    Attributes:
      step: number of iterations taken (int32 scalar).
      target_params: theta = ``{'model': target network params, 'heads': 1x1 regressors,
        'lwf_head': LwF's head, <term name>: a term's own part}`` (each but the model only
        for methods that have it).
      batch_stats: the target network's BN running statistics.
      momentum: SGD momentum buffers, same structure as ``target_params``.
      meta_params: phi, the parameters of :class:`~l2t_jax.transfer.meta.MetaNetworks` ({} for
        methods without meta-networks).
      meta_opt_state: phi's Adam state (() without meta-networks).
    """

    step: jax.Array
    target_params: PyTree
    batch_stats: PyTree
    momentum: PyTree
    meta_params: PyTree
    meta_opt_state: PyTree


@dataclasses.dataclass(frozen=True)
class Transfer:
    """Static description of one source -> target transfer (hashable, bound before jit).

    Build it with :func:`make_transfer`, which validates pairs against the networks' taps.
    Hyperparameter defaults are the reference's (docs/semantics.md). ``terms`` are the method's
    transfer loss terms (:mod:`l2t_jax.transfer.terms`), summed in order; parts a method does not use
    are None (no source for ``scratch``, no heads without feature matching, no LwF head
    without distillation, no meta-networks for the baselines). The terms' weights (beta,
    at_weight, lwf_weight, lwf_temperature) are read only by the terms that use them; terms
    defined outside :mod:`l2t_jax.transfer.terms` keep their settings in ``options``
    (:attr:`~l2t_jax.transfer.terms.LossTerm.options`, read with :meth:`option`).
    """

    source_model: Optional[TappedNetwork]
    target_model: TappedNetwork
    heads: Optional[MatchingHeads]
    meta_networks: Optional[MetaNetworks]
    pairs: tuple[Pair, ...]
    terms: tuple[loss_terms.LossTerm, ...] = ()
    lwf_head: Optional[LwfHead] = None
    at_weight: float = 500.0      # the baselines' weights (l2t_jax.transfer.methods says where from)
    lwf_weight: float = 1.0
    lwf_temperature: float = 2.0
    inner_steps: int = 2          # T, matching-only steps simulated per iteration
    beta: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 1e-4
    meta_learning_rate: float = 1e-4
    meta_weight_decay: float = 1e-4
    # Not in the paper (1 and 1.0 are its rule): phi takes one Adam step on the mean of
    # every n meta-gradients (optax.MultiSteps; phi is fixed in between, theta steps every
    # iteration), averaging out the per-batch noise of the meta-gradient's direction.
    meta_gradient_batches: int = 1
    # The meta loss is CE of the adapted logits over this temperature, z / tau: its
    # gradient (p_tau - y) / tau stays away from 0 longer once the batch is fitted, while
    # still asking for larger margins. (Label smoothing, the other way to keep the CE
    # gradient alive, is not offered: once the batch is fitted its target sits below the
    # fitted probabilities, so its gradient asks for less confidence; measured on the
    # digits study at 2 labelled images per class, its meta-gradient pointed against the
    # val-label meta-gradient, cosine -0.66 and -0.71 at steps 60 and 120.)
    meta_temperature: float = 1.0
    remat: str = "none"           # REMAT_POLICIES: what the simulated step keeps for backward
    unroll_inner: bool = True     # unroll the T-step scan (faster); ignored under remat
    replay_bn_update: bool = True
    # Examples per step (config.batch_size: the global batch under data parallelism). The
    # terms' own parts are initialised on inputs of this size: a part's shapes may depend
    # on it (SemCKD's embeddings are as wide as the batch).
    batch_size: int = 1
    options: tuple[tuple[str, Any], ...] = ()   # the terms' own settings, (key, value) sorted

    def option(self, key: str) -> Any:
        """The value of a term's setting (:attr:`~l2t_jax.transfer.terms.LossTerm.options`)."""
        options = dict(self.options)
        if key not in options:
            raise KeyError(f"no term of this transfer declares the option {key!r} (options: "
                           f"{', '.join(options) or 'none'})")
        return options[key]

    @property
    def inner_terms(self) -> tuple[loss_terms.LossTerm, ...]:
        """The terms the simulated steps minimise: those phi weights."""
        return tuple(t for t in self.terms if t.meta_weighted)

    def meta_optimizer(self) -> optax.GradientTransformation:
        """torch.optim.Adam(lr, weight_decay): L2 decay added to the gradient, not AdamW;
        with ``meta_gradient_batches`` = n > 1, applied once per n meta-gradients to their
        mean (optax.MultiSteps: its updates are zero in between). n = 1 keeps the plain
        optimizer and its state, so earlier checkpoints restore."""
        adam = optax.chain(optax.add_decayed_weights(self.meta_weight_decay),
                           optax.adam(self.meta_learning_rate))
        if self.meta_gradient_batches == 1:
            return adam
        return optax.MultiSteps(adam, self.meta_gradient_batches).gradient_transformation()


def make_transfer(source_model: Optional[TappedNetwork], target_model: TappedNetwork,
                  pairs: Sequence[Pair], *,
                  terms: Sequence[str | loss_terms.LossTerm] = ("feature_matching",),
                  meta_networks: bool = True, channel_weighting: bool = True,
                  pair_weight_type: Optional[str] = "relu6", pair_weight_init: float = 1.0,
                  conv_impl: str = "auto", **hyperparameters) -> Transfer:
    """Validates the pairs and builds the parts of theta and phi the terms need (each part
    validates its own settings when built: :class:`~l2t_jax.transfer.meta.MetaNetworks` its pair
    weight type).

    Args:
      source_model, target_model: networks from :func:`l2t_jax.models.get_model` (the
        source may be several combined by :func:`l2t_jax.models.taps.combine`, or None when nothing
        is transferred).
      pairs: (source tap, target tap) index pairs.
      terms: the transfer loss terms (names of :data:`l2t_jax.transfer.terms.TERMS`, or terms); the
        default is L2T-ww's feature matching. The 1x1 matching heads and LwF's head are
        built when a term reads them.
      meta_networks: build phi and train it through the bilevel step (L2T-w/ww); it weights
        the ``meta_weighted`` terms. Without it the step is a plain SGD step on CE + terms.
      channel_weighting, pair_weight_type, pair_weight_init: see
        :class:`~l2t_jax.transfer.meta.MetaNetworks`.
      conv_impl: convolution implementation of the 1x1 heads.
      **hyperparameters: any other :class:`Transfer` field (inner_steps, beta, at_weight,
        ...), and the terms' own options by key (afd_weight, ...); an option not given
        takes the term's default.

    Raises:
      ValueError: pairs that do not fit the networks' taps, unknown terms, remat policy or
        pair-weight type, T < 0, meta-networks without a term for them to weight, a term's
        check failing, two terms reporting under one metric name.
    """
    pairs = tuple(tuple(p) for p in pairs)
    terms = loss_terms.get_terms(terms)
    declared = {key: default for term in terms for key, default in term.options}
    options = tuple(sorted((key, hyperparameters.pop(key, default))
                           for key, default in declared.items()))
    reported = [name for term in terms for name in (term.name, *term.metrics)]
    if len(set(reported)) != len(reported):
        raise ValueError(f"the terms {[t.name for t in terms]} report two metrics under one "
                         f"name: {reported}")
    if hyperparameters.get("remat", "none") not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {hyperparameters['remat']!r}; valid: "
                         f"{', '.join(REMAT_POLICIES)}")
    if hyperparameters.get("inner_steps", 2) < 0:
        raise ValueError(f"config.T must be >= 0, got {hyperparameters['inner_steps']} (the "
                         "simulated steps per iteration, Transfer.inner_steps)")
    if source_model is None:
        if pairs or meta_networks or terms:
            raise ValueError("a transfer without a source network can have no pairs, loss "
                             "terms or meta-networks")
        return Transfer(source_model=None, target_model=target_model, heads=None,
                        meta_networks=None, pairs=(), **hyperparameters)
    if meta_networks and not any(t.meta_weighted for t in terms):
        raise ValueError("meta-networks weight the feature-matching loss; the method has no "
                         "term for them to weight (terms: "
                         f"{', '.join(t.name for t in terms) or 'none'})")
    if any(t.needs_pairs for t in terms) != bool(pairs):
        raise ValueError(f"terms {[t.name for t in terms]} and pairs {list(pairs)} do not "
                         "fit: terms that match feature maps need pairs, others none")
    source_taps = source_model.feature_taps()
    validate_pairs(pairs, source_taps, target_model.feature_taps(),
                   source_model.name, target_model.name)
    reads = {part for t in terms for part in t.reads}
    source_channels = tuple(t.channels for t in source_taps)
    transfer = Transfer(
        source_model=source_model, target_model=target_model,
        heads=(MatchingHeads(pairs, source_channels, conv_impl=conv_impl)
               if "heads" in reads else None),
        meta_networks=(MetaNetworks(pairs, source_channels, channel_weighting,
                                    pair_weight_type, pair_weight_init)
                       if meta_networks else None),
        lwf_head=LwfHead(source_model.num_classes) if "lwf_head" in reads else None,
        pairs=pairs, terms=terms, options=options, **hyperparameters)
    for term in terms:
        if term.check is not None:
            term.check(transfer)
    return transfer


def check_source_variables(transfer: Transfer, source_variables: PyTree) -> None:
    """Raises ValueError unless ``source_variables`` fit the transfer's source network
    (same variables, same shapes: e.g. a checkpoint of another width or class count)."""
    if transfer.source_model is None:
        return
    expected = transfer.source_model.abstract_variables()
    name = transfer.source_model.name
    flat_expected = flax.traverse_util.flatten_dict(expected, sep="/")
    flat_given = flax.traverse_util.flatten_dict(dict(source_variables), sep="/")
    missing = sorted(set(flat_expected) - set(flat_given))
    unexpected = sorted(set(flat_given) - set(flat_expected))
    if missing or unexpected:
        raise ValueError(f"the source variables do not fit {name}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for path, abstract in flat_expected.items():
        if tuple(flat_given[path].shape) != tuple(abstract.shape):
            raise ValueError(f"source variable {path} has shape {tuple(flat_given[path].shape)}"
                             f", {name} (num_classes={transfer.source_model.num_classes}) "
                             f"expects {tuple(abstract.shape)}: a channel or class-count "
                             "mismatch between the source checkpoint and the config")


def init_state(transfer: Transfer, rng: jax.Array, image_shape: Sequence[int], *,
               jit: bool = False) -> TrainState:
    """Fresh state: random target and heads, zero momentum, initial phi and Adam state.

    Args:
      rng: PRNG key.
      image_shape: one input's (H, W, C).
      jit: initialise in one compiled program, freed on return. Op by op (the default),
        every op's small executable stays in jax's caches for the life of the process:
        0.4 GiB more resident memory while training the CIFAR networks (BENCHMARKS.md,
        "Time and memory against T"). Op by op is cheaper where one process initialises
        many networks (the tests): ops of the same shapes share executables.
    """
    if jit:
        image_shape = tuple(image_shape)
        return jax.jit(lambda rng: init_state(transfer, rng, image_shape))(rng)
    model_rng, heads_rng, meta_rng, lwf_rng = jax.random.split(rng, 4)
    # Only shapes go in (Linen's lazy_init): the variables are computed without the
    # networks' forward passes, the same numbers as initialising on zero inputs.
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    variables = transfer.target_model.init(model_rng, images, train=False)
    _, target_features = jax.eval_shape(
        functools.partial(transfer.target_model.apply, train=False), variables, images)
    target_params = {"model": variables["params"]}
    if transfer.heads is not None:
        target_params["heads"] = transfer.heads.lazy_init(heads_rng, target_features)["params"]
    if transfer.lwf_head is not None:
        target_params["lwf_head"] = transfer.lwf_head.lazy_init(
            lwf_rng, target_features)["params"]
    target_params.update(_init_term_parts(transfer, rng, variables, image_shape))
    meta_params, meta_opt_state = {}, ()
    if transfer.meta_networks is not None:
        pooled = tuple(jax.ShapeDtypeStruct((1, t.channels), jnp.float32)
                       for t in transfer.source_model.feature_taps())
        meta_params = transfer.meta_networks.lazy_init(meta_rng, pooled)["params"]
        meta_opt_state = transfer.meta_optimizer().init(meta_params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        target_params=target_params,
        batch_stats=variables.get("batch_stats", {}),
        momentum=jax.tree.map(jnp.zeros_like, target_params),
        meta_params=meta_params,
        meta_opt_state=meta_opt_state)


def _init_term_parts(transfer: Transfer, rng: jax.Array, target_variables: PyTree,
                     image_shape: Sequence[int]) -> dict:
    """{term name: params} of the terms' own parts, from shapes only (Linen's lazy_init)
    on a step's inputs of ``transfer.batch_size`` examples (features only). Each part's
    key is ``rng`` folded with its name, independent of the other parts and of the keys
    above, which stay those of the released runs."""
    owners = [term for term in transfer.terms if term.part is not None]
    if not owners:
        return {}
    images = jax.ShapeDtypeStruct((transfer.batch_size, *image_shape), jnp.float32)

    def features(target_variables, source_variables, images):
        _, target_features = transfer.target_model.apply(target_variables, images,
                                                         train=False)
        return target_features, source_forward(transfer, source_variables, images)[1]
    target_features, source_features = jax.eval_shape(
        features, target_variables, transfer.source_model.abstract_variables(), images)
    inputs = loss_terms.TermInputs(
        target_features=target_features, regressed=None, lwf_logits=None, matched_source=(),
        source_features=source_features, source_logits=None, channel_weights=None,
        pair_weights=None)
    parts = {}
    for term in owners:
        module, arguments = term.part(transfer, inputs)
        key = jax.random.fold_in(rng, zlib.crc32(term.name.encode()) & 0x7FFFFFFF)
        parts[term.name] = module.lazy_init(key, *arguments)["params"]
    return parts


@flax.struct.dataclass
class BatchConstants:
    """Per-batch quantities that no step of the iteration changes."""

    images: jax.Array
    labels: jax.Array
    matched_source: tuple[jax.Array, ...]   # per pair S^m(x) resized to T^n's size
    source_features: tuple[jax.Array, ...]  # per source tap S^m(x), (B, H_m, W_m, C_m)
    pooled_source: tuple[jax.Array, ...]    # per source tap, (B, C_m)
    source_logits: Optional[jax.Array]      # (B, source classes), for LwF


def target_losses(transfer: Transfer, theta: PyTree, batch_stats: PyTree,
                  batch: BatchConstants, terms: Sequence[loss_terms.LossTerm],
                  channel_weights=None, pair_weights=None):
    """Train-mode forward of the target and the values of ``terms`` on the batch.

    Args:
      theta: ``{'model', 'heads'?, 'lwf_head'?, <term name>?}`` (:class:`TrainState`
        ``target_params``).
      terms: the loss terms to evaluate (a subset of ``transfer.terms``; () for CE only).
      channel_weights, pair_weights: phi's outputs for the weighted terms, or None.

    Returns:
      (ce, {term name: value}, {metric name: value} the terms report besides, logits, new
      batch_stats).
    """
    (logits, target_features), updated = transfer.target_model.apply(
        {"params": theta["model"], "batch_stats": batch_stats}, batch.images, train=True,
        mutable=["batch_stats"])
    reads = {part for term in terms for part in term.reads}
    inputs = loss_terms.TermInputs(
        target_features=target_features,
        regressed=(transfer.heads.apply({"params": theta["heads"]}, target_features)
                   if "heads" in reads else None),
        lwf_logits=(transfer.lwf_head.apply({"params": theta["lwf_head"]}, target_features)
                    if "lwf_head" in reads else None),
        matched_source=batch.matched_source, source_features=batch.source_features,
        source_logits=batch.source_logits, channel_weights=channel_weights,
        pair_weights=pair_weights)
    values, reports = {}, {}
    for term in terms:
        term_inputs = inputs
        if term.part is not None:
            module, arguments = term.part(transfer, inputs)
            # Train mode on batch statistics; the running statistics it computes are dropped.
            output, _ = module.apply({"params": theta[term.name]}, *arguments,
                                     mutable=["batch_stats"])
            term_inputs = inputs._replace(part_output=output)
        values[term.name] = term.fn(term_inputs, transfer)
        if term.metrics:
            values[term.name], reported = values[term.name]
            reports.update({name: reported[name] for name in term.metrics})
    return (losses.cross_entropy(logits, batch.labels), values, reports, logits,
            updated.get("batch_stats", {}))   # {} for a network without BatchNorm


def total(values: dict) -> jax.Array:
    """The sum of term values, in their order (0.0 without terms)."""
    result = 0.0
    for value in values.values():
        result += value
    return result


def source_forward(transfer: Transfer, source_variables: PyTree, images: jax.Array):
    """The frozen source on ``images`` (eval-mode BN, no gradient).

    Returns (logits, features per source tap, pooled features per tap (B, C_m)).
    """
    logits, features = jax.lax.stop_gradient(
        transfer.source_model.apply(source_variables, images, train=False))
    pooled = tuple(jnp.mean(f, axis=(1, 2)) for f in features)
    return logits, features, pooled


def meta_weights(transfer: Transfer, meta_params: PyTree, pooled_source):
    """phi's outputs: (channel weights per pair (B, C_m) or None, pair weights per pair
    (B, 1) or None), from the pooled source features (:func:`source_forward`)."""
    return transfer.meta_networks.apply({"params": meta_params}, pooled_source)


def batch_constants(transfer: Transfer, state: TrainState, source_variables: PyTree,
                    images: jax.Array, labels: jax.Array) -> BatchConstants:
    """Runs the source once (eval mode) and prepares its maps for every pair."""
    if transfer.source_model is None:
        return BatchConstants(images, labels, (), (), (), None)
    source_logits, source_features, pooled = source_forward(transfer, source_variables,
                                                            images)
    # Static target map sizes, to resize the source maps once rather than at every step.
    _, target_shapes = jax.eval_shape(
        functools.partial(transfer.target_model.apply, train=False),
        {"params": state.target_params["model"], "batch_stats": state.batch_stats}, images)
    matched = tuple(losses.bilinear_resize(source_features[m], target_shapes[n].shape[1:3])
                    for m, n in transfer.pairs)
    return BatchConstants(images, labels, matched, source_features, pooled, source_logits)


def _simulate_and_adapt(transfer: Transfer, meta_params: PyTree, theta_1: PyTree,
                        momentum_1: PyTree, batch_stats_1: PyTree, batch: BatchConstants,
                        learning_rate: jax.Array, meta_batch: Optional[BatchConstants] = None):
    """Steps 2-4 as a function of phi: returns (meta loss, aux).

    The meta loss is CE at the adapted parameters on ``batch`` (the paper's), or on
    ``meta_batch`` when given (``config.meta_loss_batch`` 'held_out', 'val' or
    'augment'), of the logits over ``transfer.meta_temperature``.

    aux: ``sim_matching`` (T,) the simulated steps' objective (the phi-weighted terms) at
    the start of each, ``adapt_ce`` CE at the start of the adaptation step,
    ``meta_logits`` the adapted parameters' logits on the meta loss's batch,
    ``replay_batch_stats`` the running statistics after one train-mode forward at theta_1
    from ``batch_stats_1``, ``weights`` the meta-networks' (channel weights, pair weights).
    """
    channel_weights, pair_weights = meta_weights(transfer, meta_params, batch.pooled_source)

    def matching_objective(theta):
        _, values, _, _, stats = target_losses(transfer, theta, batch_stats_1, batch,
                                               transfer.inner_terms, channel_weights,
                                               pair_weights)
        return total(values), stats

    def simulated_step(carry, _):
        theta, buffers = carry
        (matching, stats), grads = jax.value_and_grad(matching_objective, has_aux=True)(theta)
        theta, buffers = optim.sgd_momentum(theta, buffers, grads, learning_rate,
                                      transfer.momentum, transfer.weight_decay)
        return (theta, buffers), (matching, stats)

    if transfer.remat != "none":
        simulated_step = jax.checkpoint(simulated_step, policy=REMAT_POLICIES[transfer.remat])

    def ce_objective(theta, on=batch):
        ce, _, _, _, stats = target_losses(transfer, theta, batch_stats_1, on, ())
        return ce, stats

    def meta_ce(theta, on):
        ce, _, _, logits, _ = target_losses(transfer, theta, batch_stats_1, on, ())
        if transfer.meta_temperature != 1.0:           # 1.0: the paper's CE, as it was
            ce = losses.cross_entropy(logits / transfer.meta_temperature, on.labels)
        return ce, logits

    # Remat saves memory only inside the scan loop: unrolled, XLA schedules the recomputed
    # steps early and keeps them alive (measured at T = 5: no saving), so remat keeps the loop.
    unroll = transfer.unroll_inner and transfer.remat == "none"
    (theta, buffers), (sim_matching, sim_stats) = jax.lax.scan(
        simulated_step, (theta_1, momentum_1), None, length=transfer.inner_steps,
        unroll=max(transfer.inner_steps, 1) if unroll else 1)
    (adapt_ce, adapt_stats), grads = jax.value_and_grad(ce_objective, has_aux=True)(theta)
    theta, _ = optim.sgd_momentum(theta, buffers, grads, learning_rate, transfer.momentum,
                            transfer.weight_decay)
    meta_loss, meta_logits = meta_ce(theta, batch if meta_batch is None else meta_batch)
    # The reference's replay ends on the first simulated step (or on the adaptation step when
    # T = 0), a train-mode forward at theta_1; its BN update is what the run keeps.
    if transfer.inner_steps > 0:
        replay_stats = jax.tree.map(lambda s: s[0], sim_stats)
    else:
        replay_stats = adapt_stats
    return meta_loss, {"sim_matching": sim_matching, "adapt_ce": adapt_ce,
                       "meta_logits": jax.lax.stop_gradient(meta_logits),
                       "replay_batch_stats": replay_stats,
                       "weights": jax.lax.stop_gradient((channel_weights, pair_weights))}


def real_step(transfer: Transfer, state: TrainState, batch: BatchConstants,
              learning_rate: jax.Array):
    """Step 1: SGD on CE + every transfer term at theta_0 with phi's outputs held constant
    (the reference discards this step's phi gradient).

    Without meta-networks this is the whole step of a baseline (CE + its transfer terms).
    Returns (theta_1, momentum_1, batch_stats_1, (ce, {term: value}, {metric: value the
    terms report}, logits)).
    """
    channel_weights = pair_weights = None
    if transfer.meta_networks is not None:
        channel_weights, pair_weights = jax.lax.stop_gradient(
            meta_weights(transfer, state.meta_params, batch.pooled_source))

    def objective(theta):
        ce, values, reports, logits, stats = target_losses(
            transfer, theta, state.batch_stats, batch, transfer.terms, channel_weights,
            pair_weights)
        return ce + total(values), (ce, values, reports, logits, stats)

    grads, (ce, values, reports, logits, batch_stats_1) = jax.grad(objective, has_aux=True)(
        state.target_params)
    theta_1, momentum_1 = optim.sgd_momentum(state.target_params, state.momentum, grads,
                                       learning_rate, transfer.momentum, transfer.weight_decay)
    return theta_1, momentum_1, batch_stats_1, (ce, values, reports, logits)


def meta_objective(transfer: Transfer, state: TrainState, source_variables: PyTree,
                   images: jax.Array, labels: jax.Array, learning_rate: jax.Array,
                   meta_images: Optional[jax.Array] = None,
                   meta_labels: Optional[jax.Array] = None):
    """The meta loss of one iteration as a function of phi (for tests and analysis).

    Runs the source and the real step, then returns ``phi -> (meta loss, aux)`` (see
    :func:`_simulate_and_adapt`); ``jax.grad`` of it is the exact meta-gradient.
    """
    batch = batch_constants(transfer, state, source_variables, images, labels)
    theta_1, momentum_1, batch_stats_1, _ = real_step(transfer, state, batch, learning_rate)
    return _phi_to_meta_loss(transfer, theta_1, momentum_1, batch_stats_1, batch, learning_rate,
                             _meta_batch(meta_images, meta_labels))


def _meta_batch(meta_images, meta_labels) -> Optional[BatchConstants]:
    """The images the meta loss scores when not the training batch (CE only: no source
    maps), or None."""
    if meta_images is None:
        return None
    return BatchConstants(meta_images, meta_labels, (), (), (), None)


def _phi_to_meta_loss(transfer, theta_1, momentum_1, batch_stats_1, batch, learning_rate,
                      meta_batch=None):
    return functools.partial(_simulate_and_adapt, transfer, theta_1=theta_1,
                             momentum_1=momentum_1, batch_stats_1=batch_stats_1, batch=batch,
                             learning_rate=learning_rate, meta_batch=meta_batch)


def train_step(transfer: Transfer, learning_rate_fn: Callable[[jax.Array], jax.Array],
               state: TrainState, source_variables: PyTree, images: jax.Array,
               labels: jax.Array, meta_images: Optional[jax.Array] = None,
               meta_labels: Optional[jax.Array] = None, *, update_phi: bool = True
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One L2T-ww iteration (module docstring). Pure; the training program and the benchmark
    jit it with :func:`l2t_jax.training.train.step_program`.

    Args:
      transfer: static description (bind with functools.partial).
      learning_rate_fn: theta's SGD learning rate as a function of ``state.step``.
      state: the training state.
      source_variables: the frozen source network's ``{'params', 'batch_stats'}``.
      images: (B, H, W, 3) normalised inputs; labels: (B,) int.
      meta_images, meta_labels: a batch of its own (B', H, W, 3), (B',) that the meta
        loss scores instead of ``images`` (``config.meta_loss_batch`` 'held_out', 'val',
        'augment'); None: the paper's same batch.
      update_phi: False takes only the real step (1), with phi's weights but phi fixed:
        the iterations between meta-updates when phi is updated every k-th iteration
        (``config.meta_update_every``) or not at all (``config.meta_warmup_steps``,
        ``config.meta_freeze_after``), a second program of their own.

    Returns:
      (new state, metrics): scalars ``ce``, ``transfer`` (the sum of the transfer terms)
      and one per term under its name (``feature_matching``, ``attention``, ...),
      ``accuracy`` (of the real step), ``learning_rate``, and what the terms report besides
      (AFD's and SemCKD's ``pair_attention``, per pair); with meta-networks also
      ``adapt_ce``, ``meta_loss``, ``meta_grad_norm``, ``sim_matching`` (T,), and per pair
      ``pair_weights`` (mean lambda) and ``channel_weight_entropy`` (nats).
    """
    learning_rate = learning_rate_fn(state.step)
    batch = batch_constants(transfer, state, source_variables, images, labels)
    # 1. The real step.
    theta_1, momentum_1, batch_stats_1, (ce, values, reports, logits) = real_step(
        transfer, state, batch, learning_rate)
    metrics = {"ce": ce, "transfer": total(values), **values, **reports,
               "accuracy": losses.accuracy(logits, labels), "learning_rate": learning_rate}
    if transfer.meta_networks is None or not update_phi:   # step 1 is the whole iteration
        return state.replace(step=state.step + 1, target_params=theta_1, momentum=momentum_1,
                             batch_stats=batch_stats_1), metrics

    # 2-5. Meta-gradient through the simulated steps; theta_1 and its buffers are constants.
    objective = _phi_to_meta_loss(transfer, theta_1, momentum_1, batch_stats_1, batch,
                                  learning_rate, _meta_batch(meta_images, meta_labels))
    (meta_loss, aux), meta_grads = jax.value_and_grad(objective, has_aux=True)(
        state.meta_params)
    updates, meta_opt_state = transfer.meta_optimizer().update(
        meta_grads, state.meta_opt_state, state.meta_params)
    meta_params = optax.apply_updates(state.meta_params, updates)

    # 6. Rollback: theta and buffers stay at step 1's values.
    new_state = state.replace(
        step=state.step + 1, target_params=theta_1, momentum=momentum_1,
        batch_stats=aux["replay_batch_stats"] if transfer.replay_bn_update else batch_stats_1,
        meta_params=meta_params, meta_opt_state=meta_opt_state)
    metrics.update(sim_matching=aux["sim_matching"], adapt_ce=aux["adapt_ce"],
                   meta_loss=meta_loss, meta_grad_norm=optax.tree.norm(meta_grads))
    channel_weights, pair_weights = aux["weights"]
    if pair_weights is not None:
        metrics["pair_weights"] = jnp.stack([jnp.mean(w) for w in pair_weights])
    if channel_weights is not None:
        metrics["channel_weight_entropy"] = jnp.stack(
            [channel_weight_entropy(w) for w in channel_weights])
    return new_state, metrics

"""The bilevel step on tiny networks: exact meta-gradient (finite differences), one trace,
rollback, BN replay option, and clear errors for bad pairs and mismatched sources."""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_networks
from l2t_jax import models
from l2t_jax.transfer import bilevel, pairing

TINY_PAIRS = pairing.parse_pairs("2-0,2-1,5-1,5-2,8-3,8-4,8-2")


def _tiny_transfer(**hyperparameters):
    return bilevel.make_transfer(*tiny_networks(), TINY_PAIRS, **hyperparameters)


def _tiny_setup(seed=0, dtype=jnp.float32, batch=4, **hyperparameters):
    transfer = _tiny_transfer(**hyperparameters)
    rng = jax.random.key(seed)
    state = bilevel.init_state(transfer, rng, (32, 32, 3))
    source_variables = transfer.source_model.init(
        jax.random.fold_in(rng, 1), jnp.zeros((1, 32, 32, 3)), train=False)
    images = jax.random.normal(jax.random.fold_in(rng, 2), (batch, 32, 32, 3))
    labels = jnp.arange(batch) % 3
    cast = lambda tree: jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
    return transfer, cast(state), cast(source_variables), images.astype(dtype), labels


def test_meta_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        transfer, state, source_variables, images, labels = _tiny_setup(dtype=jnp.float64)
        # Move phi off its symmetric init so every path carries gradient. (lr 0.01: with
        # this random source the matching loss diverges at 0.1, and the meta loss with it.)
        keys = iter(jax.random.split(jax.random.key(3), 1000))
        phi = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape, p.dtype),
                           state.meta_params)
        # One compiled program gives the meta loss and its gradient (compiling the loss
        # alone as well would double the compile time of this test).
        value_and_grad = jax.jit(jax.value_and_grad(lambda p: bilevel.meta_objective(
            transfer, state, source_variables, images, labels, 0.01)(p)[0]))
        objective = lambda p: value_and_grad(p)[0]
        gradient = value_and_grad(phi)[1]
        # Small steps: ReLU / max-pool kinks lie within 1e-5 of phi in some directions.
        epsilon = 1e-7
        for trial in range(3):
            direction = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape, p.dtype),
                                     phi)
            shifted = lambda sign: jax.tree.map(lambda p, d: p + sign * epsilon * d, phi,
                                                direction)
            numeric = (objective(shifted(1)) - objective(shifted(-1))) / (2 * epsilon)
            analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(gradient),
                                                          jax.tree.leaves(direction)))
            assert abs(numeric - analytic) <= 1e-5 * abs(analytic), (trial, numeric, analytic)


def _halving_schedule(step):
    return 0.1 * 0.5 ** step


def test_step_traces_once_and_rolls_back():
    transfer, state, source_variables, images, labels = _tiny_setup(inner_steps=2)

    # Named as bilevel's: this is the program of jit(partial(train_step, transfer,
    # _halving_schedule), donate_argnums=(0,)), which the remat test compares against (the
    # session's compilation cache then compiles it once).
    @chex.assert_max_traces(n=1)
    def train_step(*args):
        return bilevel.train_step(transfer, _halving_schedule, *args)

    step = jax.jit(train_step, donate_argnums=(0,))
    without_simulation = jax.jit(functools.partial(
        bilevel.train_step, dataclasses.replace(transfer, inner_steps=0), _halving_schedule))
    for i in range(3):
        batch = images + 0.1 * i
        reference, _ = without_simulation(state, source_variables, batch, labels)
        theta_0 = jax.tree.map(np.array, state.target_params)
        phi_0 = jax.tree.map(np.array, state.meta_params)
        batch = jax.device_put(batch)
        # No host round-trip inside the step: any implicit transfer would raise here.
        with jax.transfer_guard("disallow"):
            state, metrics = step(state, source_variables, batch, labels)
        # Rollback: T simulated steps leave theta and the buffers exactly where the real
        # step put them, i.e. where a run with T = 0 puts them.
        chex.assert_trees_all_equal(state.target_params, reference.target_params)
        chex.assert_trees_all_equal(state.momentum, reference.momentum)
        # ... and the real step did move theta (conv biases before a BN stay at 0: their
        # gradient is 0 and so is their weight decay).
        for path in (("model", "fc", "kernel"), ("model", "conv3", "kernel"),
                     ("heads", "head_0", "bias")):
            now, before = state.target_params, theta_0
            for key in path:
                now, before = now[key], before[key]
            assert not np.allclose(now, before), path
        assert any(not np.allclose(a, b) for a, b in zip(
            jax.tree.leaves(state.meta_params), jax.tree.leaves(phi_0)))
        assert metrics["sim_matching"].shape == (2,)
        assert metrics["pair_weights"].shape == metrics["channel_weight_entropy"].shape == (7,)
        np.testing.assert_allclose(metrics["learning_rate"], _halving_schedule(i), rtol=1e-6)
    assert int(state.step) == 3


def test_replay_bn_update_option():
    """BN statistics: step 1's update plus one from a forward at theta_1 (the reference's
    replay), or step 1's alone with replay_bn_update=False. T = 0 keeps the compile small:
    the replayed forward is then the adaptation step's, also at theta_1. (At step 0 the
    halving schedule is lr 0.1; with it, the first program is the trace test's T = 0 one.)"""
    transfer, state, source_variables, images, labels = _tiny_setup(inner_steps=0)
    with_replay, _ = jax.jit(functools.partial(bilevel.train_step, transfer,
                                               _halving_schedule))(
        state, source_variables, images, labels)
    no_replay, _ = jax.jit(functools.partial(
        bilevel.train_step, dataclasses.replace(transfer, replay_bn_update=False),
        _halving_schedule))(state, source_variables, images, labels)
    forward = jax.jit(functools.partial(transfer.target_model.apply, train=True,
                                        mutable=["batch_stats"]))
    _, one_update = forward({"params": state.target_params["model"],
                             "batch_stats": state.batch_stats}, images)
    chex.assert_trees_all_close(no_replay.batch_stats, one_update["batch_stats"], rtol=1e-5,
                                atol=1e-6)
    _, two_updates = forward({"params": with_replay.target_params["model"],
                              "batch_stats": one_update["batch_stats"]}, images)
    chex.assert_trees_all_close(with_replay.batch_stats, two_updates["batch_stats"], rtol=1e-5,
                                atol=1e-6)


def test_remat_scan_loop_gives_the_unrolled_step():
    """remat="full": the simulated steps as a scan loop (unroll=1, the path of
    unroll_inner=False too; only the jax.checkpoint wrapper differs) with recomputation,
    against the default unrolled step without it."""
    transfer, state, source_variables, images, labels = _tiny_setup()
    # The plain step as the trace test compiles it (state donated, so a copy goes in): the
    # same program, a hit in the session's compilation cache.
    plain, plain_metrics = jax.jit(functools.partial(
        bilevel.train_step, transfer, _halving_schedule), donate_argnums=(0,))(
        jax.tree.map(jnp.copy, state), source_variables, images, labels)
    variant_state, variant_metrics = jax.jit(functools.partial(
        bilevel.train_step, dataclasses.replace(transfer, remat="full"), _halving_schedule))(
        state, source_variables, images, labels)
    chex.assert_trees_all_close(plain.meta_params, variant_state.meta_params, rtol=1e-5,
                                atol=1e-7)
    chex.assert_trees_all_close(plain.batch_stats, variant_state.batch_stats, rtol=1e-5,
                                atol=1e-7)
    np.testing.assert_allclose(plain_metrics["meta_loss"], variant_metrics["meta_loss"],
                               rtol=1e-5)


def test_jitted_init_gives_the_op_by_op_state():
    """init_state(jit=True) (config.jit_init: one compiled program, less resident memory)
    draws the same random bits and gives the same state as the default, op by op."""
    transfer = _tiny_transfer()
    op_by_op = bilevel.init_state(transfer, jax.random.key(5), (32, 32, 3))
    jitted = bilevel.init_state(transfer, jax.random.key(5), (32, 32, 3), jit=True)
    chex.assert_trees_all_close(jitted, op_by_op, rtol=1e-6, atol=0)
    other_seed = bilevel.init_state(transfer, jax.random.key(6), (32, 32, 3), jit=True)
    assert not np.allclose(other_seed.target_params["model"]["conv0"]["kernel"],
                           op_by_op.target_params["model"]["conv0"]["kernel"])


def test_init_from_shapes_is_bitwise_the_init_on_zero_images():
    """init_state computes the variables from shapes (Linen's lazy_init, no forward pass):
    bit for bit what initialising on zero images and the features they give did (the
    released runs were made that way), with the LwF head and meta-networks too."""
    for method_terms in (dict(), dict(terms=("feature_matching", "distillation"))):
        transfer = _tiny_transfer(**method_terms)
        rng = jax.random.key(5)
        model_rng, heads_rng, meta_rng, lwf_rng = jax.random.split(rng, 4)
        images = jnp.zeros((1, 32, 32, 3), jnp.float32)
        variables = transfer.target_model.init(model_rng, images, train=False)
        _, features = transfer.target_model.apply(variables, images, train=False)
        expected = {"model": variables["params"]}
        if transfer.heads is not None:
            expected["heads"] = transfer.heads.init(heads_rng, features)["params"]
        if transfer.lwf_head is not None:
            expected["lwf_head"] = transfer.lwf_head.init(lwf_rng, features)["params"]
        state = bilevel.init_state(transfer, rng, (32, 32, 3))
        chex.assert_trees_all_equal(state.target_params, expected)
        chex.assert_trees_all_equal(state.batch_stats, variables["batch_stats"])
        if transfer.meta_networks is not None:
            pooled = tuple(jnp.zeros((1, t.channels)) for t in
                           transfer.source_model.feature_taps())
            chex.assert_trees_all_equal(
                state.meta_params, transfer.meta_networks.init(meta_rng, pooled)["params"])


def test_bad_pairs_and_sources_are_clear_errors():
    source = models.get_model("resnet32", 200)
    target = models.get_model("vgg9_bn", 100)
    with pytest.raises(ValueError, match=r"pair 15-0: source index 15 is out of range; "
                                         r"resnet32 exposes taps 0\.\.14"):
        bilevel.make_transfer(source, target, [(15, 0)])
    with pytest.raises(ValueError, match=r"target index 5 is out of range; vgg9_bn exposes "
                                         r"taps 0\.\.4 \(channels \[64, 128, 256, 512, 512\]\)"):
        bilevel.make_transfer(source, target, [(4, 5)])
    with pytest.raises(ValueError, match="bad pair '4:0'"):
        pairing.parse_pairs("4:0")
    with pytest.raises(ValueError, match=r"config.T must be >= 0"):
        bilevel.make_transfer(source, target, [(4, 0)], inner_steps=-1)
    with pytest.raises(ValueError, match="unknown pair_weight_type 'sigmoid'.*relu6"):
        bilevel.make_transfer(source, target, [(4, 0)], pair_weight_type="sigmoid")
    with pytest.raises(ValueError, match="unknown remat policy True; valid: none, dots, full"):
        bilevel.make_transfer(source, target, [(4, 0)], remat=True)
    transfer = bilevel.make_transfer(source, target, [(4, 0)])
    # Variables of other networks, as shapes (jax.eval_shape: the check reads only shapes,
    # and initialising three ResNet-32s for real costs 12 s of small compilations).
    init = lambda model: jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    other_classes = init(models.get_model("resnet32", 10))
    with pytest.raises(ValueError, match=r"params/fc/(bias|kernel) has shape \((64, )?10,?\)"
                                         r".*num_classes=200.*\((64, )?200,?\)"):
        bilevel.check_source_variables(transfer, other_classes)
    other_widths = init(models.get_model("resnet32", 200, widths=(8, 16, 32)))
    with pytest.raises(ValueError, match="channel or class-count mismatch"):
        bilevel.check_source_variables(transfer, other_widths)
    with pytest.raises(ValueError, match="do not fit resnet32"):
        bilevel.check_source_variables(transfer, init(models.get_model("resnet20", 200)))


def test_a_step_without_the_meta_update_is_the_real_step_with_phi_fixed():
    """update_phi=False (the iterations between meta-updates, config.meta_update_every):
    phi and its Adam state stay, theta, buffers and BN statistics are step 1's."""
    transfer, state, source_variables, images, labels = _tiny_setup()
    program = jax.jit(functools.partial(bilevel.train_step, transfer, lambda step: 0.1,
                                        update_phi=False))
    after, metrics = program(state, source_variables, images, labels)
    assert "meta_loss" not in metrics and int(after.step) == 1
    chex.assert_trees_all_equal(after.meta_params, state.meta_params)
    chex.assert_trees_all_equal(after.meta_opt_state, state.meta_opt_state)
    batch = bilevel.batch_constants(transfer, state, source_variables, images, labels)
    theta_1, momentum_1, batch_stats_1, _ = bilevel.real_step(transfer, state, batch, 0.1)
    chex.assert_trees_all_close((after.target_params, after.momentum, after.batch_stats),
                                (theta_1, momentum_1, batch_stats_1), rtol=1e-5, atol=1e-6)
    full, _ = jax.jit(functools.partial(bilevel.train_step, transfer, lambda step: 0.1))(
        state, source_variables, images, labels)
    # The full step differs only by phi and the BN replay: theta after step 1 is the same.
    chex.assert_trees_all_close(full.target_params, after.target_params, rtol=1e-5,
                                atol=1e-6)
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(full.meta_params),
                                              jax.tree.leaves(state.meta_params)))


def test_held_out_meta_loss_scores_the_adapted_parameters_on_the_other_batch():
    """meta_images/meta_labels (config.meta_loss_batch='held_out'): the meta loss is CE of
    the adapted parameters on the held-out batch, phi's gradient comes from it, and theta
    (step 1) is the same-batch step's; without them the step is the paper's."""
    transfer, state, source_variables, images, labels = _tiny_setup()
    _, _, _, held_images, _ = _tiny_setup(seed=1)
    held_labels = (labels + 1) % 3
    step = jax.jit(functools.partial(bilevel.train_step, transfer, lambda step: 0.1))
    same, same_metrics = step(state, source_variables, images, labels)
    held, held_metrics = step(state, source_variables, images, labels, held_images,
                              held_labels)
    chex.assert_trees_all_close(held.target_params, same.target_params, rtol=1e-5, atol=1e-6)
    # The meta loss by hand: adapt from theta_1 on the training batch (phi's aux), then CE
    # at the adapted parameters on the held-out batch.
    objective = bilevel.meta_objective(transfer, state, source_variables, images, labels, 0.1,
                                       held_images, held_labels)
    expected, _ = objective(state.meta_params)
    np.testing.assert_allclose(held_metrics["meta_loss"], expected, rtol=1e-5)
    same_objective = bilevel.meta_objective(transfer, state, source_variables, images, labels,
                                            0.1)
    np.testing.assert_allclose(same_metrics["meta_loss"], same_objective(state.meta_params)[0],
                               rtol=1e-5)
    assert abs(float(held_metrics["meta_loss"]) - float(same_metrics["meta_loss"])) > 1e-3
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(held.meta_params),
                                              jax.tree.leaves(same.meta_params)))


def test_meta_temperature_scores_the_adapted_logits_over_tau():
    """Transfer.meta_temperature: the meta loss is CE of the adapted parameters' logits
    over tau; the adaptation is the same (the same logits), only the loss and so phi's
    gradient change; tau = 1 is the paper's CE."""
    from l2t_jax.transfer import losses
    transfer, state, source_variables, images, labels = _tiny_setup()
    warm = dataclasses.replace(transfer, meta_temperature=4.0)

    def loss_and_grad(t):
        objective = bilevel.meta_objective(t, state, source_variables, images, labels, 0.1)
        return jax.jit(jax.value_and_grad(objective, has_aux=True))(state.meta_params)
    (paper, paper_aux), paper_grads = loss_and_grad(transfer)
    (tempered, aux), grads = loss_and_grad(warm)
    np.testing.assert_array_equal(aux["meta_logits"], paper_aux["meta_logits"])
    np.testing.assert_allclose(tempered, losses.cross_entropy(aux["meta_logits"] / 4.0,
                                                              labels), rtol=1e-6)
    np.testing.assert_allclose(paper, losses.cross_entropy(paper_aux["meta_logits"], labels),
                               rtol=1e-6)
    assert abs(float(tempered) - float(paper)) > 1e-4
    assert any(np.any(np.abs(a - b) > 1e-6 * np.abs(b).max())
               for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(paper_grads)))


def test_meta_gradient_batches_take_one_adam_step_on_the_mean_of_n():
    """Transfer.meta_gradient_batches = 3: phi is unchanged for two iterations (theta steps
    at each), then moves by one Adam step (with L2 decay) on the mean of the three
    meta-gradients, each computed at its own iteration's state."""
    transfer, state, source_variables, images, labels = _tiny_setup(meta_gradient_batches=3)
    step = jax.jit(functools.partial(bilevel.train_step, transfer, lambda step: 0.1))
    batches = [(images, labels)] + [_tiny_setup(seed=s)[3:] for s in (1, 2)]

    @jax.jit                       # one program for the three states (op by op is slow)
    def meta_gradient(before, batch_images, batch_labels):
        objective = bilevel.meta_objective(transfer, before, source_variables, batch_images,
                                           batch_labels, 0.1)
        return jax.grad(lambda p: objective(p)[0])(before.meta_params)

    states, gradients = [state], []
    for batch_images, batch_labels in batches:
        gradients.append(meta_gradient(states[-1], batch_images, batch_labels))
        states.append(step(states[-1], source_variables, batch_images, batch_labels)[0])
    for moved in states[1:3]:
        chex.assert_trees_all_equal(moved.meta_params, state.meta_params)
        assert int(moved.step) > 0
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(states[2].target_params),
                                              jax.tree.leaves(states[1].target_params)))
    plain = bilevel.make_transfer(*tiny_networks(), TINY_PAIRS).meta_optimizer()
    mean = jax.tree.map(lambda *g: sum(g) / 3, *gradients)
    updates, _ = plain.update(mean, plain.init(state.meta_params), state.meta_params)
    expected = jax.tree.map(lambda p, u: p + u, state.meta_params, updates)
    chex.assert_trees_all_close(states[3].meta_params, expected, rtol=1e-5, atol=1e-7)
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(states[3].meta_params),
                                              jax.tree.leaves(state.meta_params)))

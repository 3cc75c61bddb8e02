"""Parity of the whole L2T-ww iteration with an independent PyTorch implementation, float64.

Released ResNet-32 (source) -> VGG-9-BN (target), the 15 CIFAR pairs, T = 2, batch 4, from
the same weights, momentum buffers and batch. Bounds (issue 3): theta after the iteration
rel L2 <= 1e-10 (conv biases that feed a BatchNorm have a true gradient of zero and are
compared in absolute terms), BN running statistics rel <= 1e-10, every loss of every step
rel <= 1e-10, every meta-gradient tensor rel L2 <= 1e-8.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as ref
from helpers import nchw, normalized_images
from l2t_jax import models
from l2t_jax.models import torch_layout
from l2t_jax.transfer import bilevel, pair_lists, pairing

BATCH = 4


def _rel_l2(ours, theirs):
    ours, theirs = np.ravel(ours), np.ravel(theirs)
    return np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-300)


def _heads_to_flax(named, num_pairs):
    """{'3.weight': (C_s, C_t, 1, 1), '3.bias': ...} -> the MatchingHeads param tree."""
    return {f"head_{i}": {"kernel": named[f"{i}.weight"].detach().numpy().transpose(2, 3, 1, 0),
                          "bias": named[f"{i}.bias"].detach().numpy()} for i in range(num_pairs)}


def _meta_to_flax(what_nets, where_nets):
    params = {f"what_{i}": {"kernel": net.weight.detach().numpy().T,
                            "bias": net.bias.detach().numpy()} for i, net in enumerate(what_nets)}
    if isinstance(where_nets, torch.Tensor):
        params["where_const"] = where_nets.detach().numpy()
    else:
        params.update({f"where_{i}": {"kernel": net.weight.detach().numpy().T,
                                      "bias": net.bias.detach().numpy()}
                       for i, net in enumerate(where_nets)})
    return params


def _meta_from_flax(params):
    """phi in the reference's names ('what.3.weight', 'where.const', ...)."""
    out = {}
    for name, value in params.items():
        if name == "where_const":
            out["where.const"] = np.asarray(value)
            continue
        net, index = name.split("_")
        out[f"{net}.{index}.weight"] = np.asarray(value["kernel"]).T
        out[f"{net}.{index}.bias"] = np.asarray(value["bias"])
    return out


def _theta_from_flax(target_model, theta):
    out = {"model." + k: v for k, v in torch_layout.torch_state_dict_from_flax(
        target_model, {"params": theta["model"]}).items()}
    for name, head in theta["heads"].items():
        index = name.split("_")[1]
        out[f"heads.{index}.weight"] = np.asarray(head["kernel"]).transpose(3, 2, 0, 1)
        out[f"heads.{index}.bias"] = np.asarray(head["bias"])
    return out


def _bn_feeding_biases(torch_model):
    """Names of conv biases directly followed by a BatchNorm (gradient identically 0)."""
    names, modules = [], list(torch_model.named_modules())
    for (name, module), (_, following) in zip(modules, modules[1:]):
        if isinstance(module, torch.nn.Conv2d) and module.bias is not None and isinstance(
                following, torch.nn.BatchNorm2d):
            names.append(f"model.{name}.bias")
    return names


def _run_both(released_resnet32_path, pair_weight_type="relu6", inner_steps=2,
              conv_impl="auto"):
    pairs = pairing.parse_pairs(pair_lists.CIFAR_PAIRS)
    torch.manual_seed(0)
    source_torch = ref.load_released_resnet32(released_resnet32_path).double().eval()
    target_torch = ref.VGG9BN(num_classes=100).double().train()
    source_channels = ref.feature_channels(source_torch)
    heads = ref.make_matching_heads(source_channels, ref.feature_channels(target_torch),
                                    pairs).double()
    what_nets = ref.make_what_nets(source_channels, pairs).double()
    where_nets = ref.make_where_nets(source_channels, pairs, pair_weight_type).double()
    with torch.no_grad():
        # Non-zero phi outputs and a mid-training momentum buffer make every term count.
        for net in what_nets:
            net.weight.normal_(0.0, 0.05)
        momentum_buffers = {"model." + k: 0.01 * torch.randn_like(v)
                            for k, v in target_torch.named_parameters()}
        momentum_buffers.update({"heads." + k: 0.01 * torch.randn_like(v)
                                 for k, v in heads.named_parameters()})
    images = normalized_images(BATCH, 32, seed=7, dtype=np.float64)
    labels = np.array([3, 17, 42, 99])
    with torch.no_grad():
        _, source_features = source_torch(torch.from_numpy(nchw(images)))
    expected = ref.l2t_iteration(
        target_torch, heads, what_nets, where_nets, source_features,
        torch.from_numpy(nchw(images)), torch.from_numpy(labels), pairs=pairs, T=inner_steps,
        pair_weight_type=pair_weight_type, momentum_buffers=momentum_buffers)

    with jax.enable_x64(True):
        source = models.get_model("resnet32", 200, conv_impl=conv_impl)
        target = models.get_model("vgg9_bn", 100, conv_impl=conv_impl)
        transfer = bilevel.make_transfer(source, target, pairs, inner_steps=inner_steps,
                                         pair_weight_type=pair_weight_type, conv_impl=conv_impl)
        source_variables = torch_layout.flax_variables_from_torch(source, source_torch.state_dict())
        target_variables = torch_layout.flax_variables_from_torch(target, target_torch.state_dict())
        meta_params = jax.tree.map(jnp.asarray, _meta_to_flax(what_nets, where_nets))
        target_params = {"model": target_variables["params"],
                         "heads": _heads_to_flax(dict(heads.named_parameters()), len(pairs))}
        model_momentum = {k[len("model."):]: v for k, v in momentum_buffers.items()
                          if k.startswith("model.")}
        running_stats = {k: v for k, v in target_torch.state_dict().items() if "running" in k}
        momentum_tree = {
            "model": torch_layout.flax_variables_from_torch(
                target, model_momentum | running_stats)["params"],
            "heads": _heads_to_flax({k[len("heads."):]: v for k, v in momentum_buffers.items()
                                     if k.startswith("heads.")}, len(pairs)),
        }
        state = bilevel.TrainState(
            step=jnp.zeros((), jnp.int32),
            target_params=jax.tree.map(jnp.asarray, target_params),
            batch_stats=jax.tree.map(jnp.asarray, target_variables["batch_stats"]),
            momentum=jax.tree.map(jnp.asarray, momentum_tree),
            meta_params=meta_params,
            meta_opt_state=transfer.meta_optimizer().init(meta_params))
        assert jax.tree.leaves(state.target_params)[0].dtype == jnp.float64
        # The meta-gradient directly (train_step only returns its norm), and the step, as
        # one compiled program (the state donated, as train.step_program does): the two hold
        # the same unrolled iteration, and one program compiles in 3/4 of the time of two.
        @functools.partial(jax.jit, donate_argnums=(0,))
        def meta_gradient_and_step(state, source_variables, images, labels):
            objective = bilevel.meta_objective(transfer, state, source_variables, images,
                                               labels, 0.1)
            meta_grads = jax.grad(lambda phi: objective(phi)[0])(state.meta_params)
            return meta_grads, bilevel.train_step(transfer, lambda _: 0.1, state,
                                                  source_variables, images, labels)

        source_variables = jax.tree.map(jnp.asarray, source_variables)
        meta_grads, (new_state, metrics) = meta_gradient_and_step(
            state, source_variables, jnp.asarray(images), jnp.asarray(labels))
        got = {
            "theta": _theta_from_flax(target, new_state.target_params),
            "momentum": _theta_from_flax(target, new_state.momentum),
            "bn_stats": torch_layout.torch_state_dict_from_flax(
                target, {"batch_stats": new_state.batch_stats}),
            "meta_grads": _meta_from_flax(meta_grads),
            "meta_params": _meta_from_flax(new_state.meta_params),
            "metrics": jax.device_get(metrics),
        }
    return expected, got, _bn_feeding_biases(target_torch)


@pytest.fixture(scope="module")
def relu6_run(released_resnet32_path):
    return _run_both(released_resnet32_path)


def test_theta_and_momentum_after_the_iteration(relu6_run):
    expected, got, bn_fed = relu6_run
    for part in ("theta", "momentum"):
        names = sorted(expected[part])
        assert sorted(got[part]) == names
        free = [n for n in names if n not in bn_fed]
        error = _rel_l2(np.concatenate([np.ravel(got[part][n]) for n in free]),
                        np.concatenate([expected[part][n].numpy().ravel() for n in free]))
        print(f"parity {part} rel L2: {error:.3e}")
        assert error <= 1e-10, f"{part}: rel L2 {error:.3e}"
        for name in bn_fed:
            np.testing.assert_allclose(got[part][name], expected[part][name].numpy(),
                                       rtol=0, atol=1e-12, err_msg=name)


def test_bn_statistics_after_the_iteration(relu6_run):
    expected, got, _ = relu6_run
    assert set(got["bn_stats"]) == set(expected["bn_stats"])
    worst = max(_rel_l2(got["bn_stats"][k], v.numpy()) for k, v in expected["bn_stats"].items())
    print(f"parity bn stats max rel L2: {worst:.3e}")
    assert worst <= 1e-10


def test_losses_at_every_step(relu6_run):
    expected, got, _ = relu6_run
    metrics = got["metrics"]
    pairs = [(metrics["ce"], expected["real_ce"]), (metrics["transfer"], expected["real_matching"]),
             (metrics["adapt_ce"], expected["adapt_ce"]),
             (metrics["meta_loss"], expected["meta_loss"])]
    pairs += list(zip(metrics["sim_matching"], expected["sim_matching"]))
    assert len(metrics["sim_matching"]) == 2
    worst = max(abs(float(a) - b) / abs(b) for a, b in pairs)
    print(f"parity losses max rel: {worst:.3e}")
    assert worst <= 1e-10


def test_meta_gradients_and_meta_update(relu6_run):
    expected, got, _ = relu6_run
    assert sorted(got["meta_grads"]) == sorted(expected["meta_grads"])
    worst = 0.0
    for name, theirs in expected["meta_grads"].items():
        theirs = theirs.numpy()
        if np.linalg.norm(theirs) == 0:     # a pair weight clipped by relu6: no gradient
            np.testing.assert_array_equal(got["meta_grads"][name], 0.0, err_msg=name)
            continue
        error = _rel_l2(got["meta_grads"][name], theirs)
        worst = max(worst, error)
        assert error <= 1e-8, f"{name}: rel L2 {error:.3e}"
    print(f"parity meta-gradient max rel L2: {worst:.3e}")
    for name, theirs in expected["meta_params"].items():
        np.testing.assert_allclose(got["meta_params"][name], theirs.numpy(), rtol=1e-8,
                                   atol=1e-14, err_msg=name)


def test_const_pair_weights_with_native_convolutions(released_resnet32_path):
    """The other pair-weight network and XLA's native convolutions (the default on GPU/TPU;
    the run above uses the CPU default, convolutions as matmuls)."""
    expected, got, _ = _run_both(released_resnet32_path, "const", inner_steps=1,
                                 conv_impl="native")
    for name, theirs in expected["meta_grads"].items():
        assert _rel_l2(got["meta_grads"][name], theirs.numpy()) <= 1e-8, name
    assert _rel_l2(got["theta"]["model.classifier.weight"],
                   expected["theta"]["model.classifier.weight"].numpy()) <= 1e-10


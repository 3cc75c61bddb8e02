"""l2t_jax.models: the registry and the feature taps, train-mode BatchNorm (outputs and the
running-stat update) against PyTorch's, and the max-pools' gradients going where PyTorch's
go, ties included."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as ref
from helpers import nchw, normalized_images, randomize_bn_statistics
from l2t_jax import models
from l2t_jax.models import layers, torch_layout


def test_train_mode_batchnorm_matches_torch():
    """Train-mode outputs and the running-stat update (unbiased variance, momentum 0.1)."""
    torch.manual_seed(2)
    torch_model = ref.VGG9BN(num_classes=10, widths=(8, 16, 16, 32, 32))
    randomize_bn_statistics(torch_model, seed=2)
    model = models.get_model("vgg9_bn", 10, widths=(8, 16, 16, 32, 32))
    variables = torch_layout.flax_variables_from_torch(model, torch_model.state_dict())
    images = normalized_images(4, 32, seed=3)
    torch_logits, _ = torch_model.train()(torch.from_numpy(nchw(images)))
    (logits, _), updated = model.apply(variables, jnp.asarray(images), train=True,
                                       mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(logits), torch_logits.detach().numpy(), atol=1e-4)
    after = torch_layout.torch_state_dict_from_flax(
        model, {"params": variables["params"], "batch_stats": updated["batch_stats"]})
    for key, value in torch_model.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(after[key], value.numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=key)


def test_registry_and_taps():
    assert [t.channels for t in models.get_model("resnet32", 10).feature_taps()] == \
        [16] * 5 + [32] * 5 + [64] * 5
    assert [t.channels for t in models.get_model("vgg9_bn", 10).feature_taps()] == \
        [64, 128, 256, 512, 512]
    assert [t.channels for t in models.get_model("resnet18", 10).feature_taps()] == \
        [64, 64, 128, 256, 512]
    with pytest.raises(ValueError, match="unknown model 'resnet33'.*resnet32"):
        models.get_model("resnet33", 10)
    params = models.get_model("resnet32", 100).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
    # The reference ResNet-32 (CIFAR-100 head): 0.47M parameters.
    assert sum(p.size for p in jax.tree.leaves(params)) == sum(
        p.numel() for p in ref.CifarResNet(32, 100).parameters())


def test_max_pool_gradient_goes_to_the_first_maximum_as_in_torch():
    """Forward, gradient and a Hessian-vector product of the VGG 2x2 max-pool against
    torch's, on windows with ties at positive values (a 2x nearest up-sampling makes every
    window a 4-way tie; a flat region and a 2-way tie are added) and an odd size."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((2, 5, 5, 3))
    x = np.repeat(np.repeat(base, 2, axis=1), 2, axis=2)[:, :9, :9]      # odd: 9 x 9
    x[0, 0:4, 4:8, :] = 0.7                                                # flat region
    x[1, 2, 3, :] = x[1, 2, 2, :]                                          # 2-way tie
    upstream = rng.standard_normal((2, 4, 4, 3))
    nhwc = lambda a: np.transpose(a, (0, 2, 3, 1))
    with jax.enable_x64(True):
        def loss(x):  # a second-order path: the squared output, weighted
            return jnp.sum(upstream * layers.max_pool_2x2(x) ** 2)
        x64 = jnp.asarray(x)
        out = layers.max_pool_2x2(x64)
        grad = jax.grad(loss)(x64)
        hvp = jax.jvp(jax.grad(loss), (x64,), (jnp.ones_like(x64),))[1]
    tx = torch.from_numpy(nchw(x)).requires_grad_(True)
    tout = torch.nn.functional.max_pool2d(tx, 2, 2)
    tloss = (torch.from_numpy(nchw(upstream)) * tout ** 2).sum()
    (tgrad,) = torch.autograd.grad(tloss, tx, create_graph=True)
    (thvp,) = torch.autograd.grad(tgrad, tx, torch.ones_like(tx))
    np.testing.assert_array_equal(np.asarray(out), nhwc(tout.detach().numpy()))
    np.testing.assert_allclose(np.asarray(grad), nhwc(tgrad.detach().numpy()), rtol=1e-12,
                               atol=0)
    np.testing.assert_allclose(np.asarray(hvp), nhwc(thvp.numpy()), rtol=1e-12, atol=0)
    # The even split jnp.max would give differs here (a quarter in each tied element).
    assert np.count_nonzero(np.asarray(grad)) == 2 * 4 * 4 * 3

    # The ImageNet ResNets' stem keeps nn.max_pool (3x3, stride 2, padding 1): XLA's
    # select-and-scatter also picks the first maximum.
    stem_upstream = rng.standard_normal((2, 5, 5, 3))
    with jax.enable_x64(True):
        stem_grad = jax.grad(lambda x: jnp.sum(stem_upstream * nn.max_pool(
            x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))) ** 2))(jnp.asarray(x))
    tx = torch.from_numpy(nchw(x)).requires_grad_(True)
    (tstem_grad,) = torch.autograd.grad((torch.from_numpy(nchw(stem_upstream)) * torch.nn.
                                         functional.max_pool2d(tx, 3, 2, 1) ** 2).sum(), tx)
    np.testing.assert_allclose(np.asarray(stem_grad), nhwc(tstem_grad.numpy()), rtol=1e-12,
                               atol=0)

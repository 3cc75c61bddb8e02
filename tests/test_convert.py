"""Conversion from PyTorch: the released ResNet-32, torchvision-layout ResNets and VGG-9-BN
give the same logits, feature maps and BN updates as the same networks run in PyTorch; the
max-pools' gradients go where PyTorch's go, ties included."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as ref
from conftest import (RESNET32_SHA256, calibrate_bn_statistics, nchw, normalized_images,
                      randomize_bn_statistics)
from l2t_jax import convert, models

TOLERANCE = 1e-4  # float32, max abs


def _compare_eval(torch_model, flax_model, variables, images, tolerance=TOLERANCE):
    with torch.no_grad():
        torch_logits, torch_features = torch_model.eval()(torch.from_numpy(nchw(images)))
    logits, features = flax_model.apply(variables, jnp.asarray(images), train=False)
    assert len(features) == len(torch_features) == len(flax_model.feature_taps())
    np.testing.assert_allclose(np.asarray(logits), torch_logits.numpy(), rtol=0, atol=tolerance)
    for index, (ours, theirs) in enumerate(zip(features, torch_features)):
        tap = flax_model.feature_taps()[index]
        assert ours.shape[-1] == tap.channels
        assert images.shape[1] // ours.shape[1] == tap.stride
        np.testing.assert_allclose(nchw(ours), theirs.numpy(), rtol=0, atol=tolerance,
                                   err_msg=f"feature {index}")


def test_released_resnet32_through_the_command_line(released_resnet32_path, tmp_path):
    assert convert.sha256_of(released_resnet32_path) == RESNET32_SHA256
    output = os.path.join(tmp_path, "resnet32")
    convert.main(["--model", "resnet32", "--checkpoint", released_resnet32_path,
                  "--output", output, "--source_dataset", "tinyimagenet"])
    model, variables, metadata = convert.load_converted(output, expect_model="resnet32",
                                                        expect_num_classes=200)
    assert metadata["num_classes"] == 200 and metadata["recorded"]["best"] == 49.27
    assert metadata["sha256"] == RESNET32_SHA256
    _compare_eval(ref.load_released_resnet32(released_resnet32_path), model, variables,
                  normalized_images(8, 32))
    with pytest.raises(ValueError, match="has 200 classes, the config asks for 100"):
        convert.load_converted(output, expect_num_classes=100)
    with pytest.raises(ValueError, match="holds a resnet32"):
        convert.load_converted(output, expect_model="resnet20")


@pytest.mark.parametrize("depth", [34])
def test_torchvision_layout_resnet(depth, tmp_path):
    torch.manual_seed(0)
    torch_model = ref.ImageNetResNet(depth=depth, num_classes=1000)
    randomize_bn_statistics(torch_model)
    calibrate_bn_statistics(torch_model, nchw(normalized_images(8, 64, seed=5)))
    path = os.path.join(tmp_path, f"resnet{depth}.pth")
    torch.save(torch_model.state_dict(), path)     # a bare state dict, like torchvision's
    state_dict, info = convert.read_torch_checkpoint(path)
    assert info == {}
    model = models.get_model(f"resnet{depth}", 1000)
    variables = convert.flax_variables_from_torch(model, state_dict)
    _compare_eval(torch_model, model, variables, normalized_images(2, 64, seed=1))


def test_vgg9_bn():
    torch.manual_seed(1)
    torch_model = ref.VGG9BN(num_classes=100)
    randomize_bn_statistics(torch_model, seed=1)
    calibrate_bn_statistics(torch_model, nchw(normalized_images(8, 32, seed=5)))
    model = models.get_model("vgg9_bn", 100)
    variables = convert.flax_variables_from_torch(model, torch_model.state_dict())
    _compare_eval(torch_model, model, variables, normalized_images(4, 32, seed=2))


def test_train_mode_batchnorm_matches_torch():
    """Train-mode outputs and the running-stat update (unbiased variance, momentum 0.1)."""
    torch.manual_seed(2)
    torch_model = ref.VGG9BN(num_classes=10, widths=(8, 16, 16, 32, 32))
    randomize_bn_statistics(torch_model, seed=2)
    model = models.get_model("vgg9_bn", 10, widths=(8, 16, 16, 32, 32))
    variables = convert.flax_variables_from_torch(model, torch_model.state_dict())
    images = normalized_images(4, 32, seed=3)
    torch_logits, _ = torch_model.train()(torch.from_numpy(nchw(images)))
    (logits, _), updated = model.apply(variables, jnp.asarray(images), train=True,
                                       mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(logits), torch_logits.detach().numpy(), atol=1e-4)
    after = convert.torch_state_dict_from_flax(
        model, {"params": variables["params"], "batch_stats": updated["batch_stats"]})
    for key, value in torch_model.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(after[key], value.numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=key)


def test_matmul_convolution_equals_native(released_resnet32_path):
    """Both convolution implementations give the same numbers on the real networks."""
    state_dict, _ = convert.read_torch_checkpoint(released_resnet32_path)
    images = jnp.asarray(normalized_images(4, 32, seed=4))
    for name, classes, weights in [("resnet32", 200, state_dict), ("vgg9_bn", 100, None)]:
        native = models.get_model(name, classes, conv_impl="native")
        matmul = models.get_model(name, classes, conv_impl="matmul")
        variables = (convert.flax_variables_from_torch(native, weights) if weights
                     else native.init(jax.random.key(0), images, train=False))
        out_native = native.apply(variables, images, train=False)
        out_matmul = matmul.apply(variables, images, train=False)
        for a, b in zip(jax.tree.leaves(out_native), jax.tree.leaves(out_matmul)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_round_trip_and_strict_errors(released_resnet32_path):
    state_dict, _ = convert.read_torch_checkpoint(released_resnet32_path)
    model = models.get_model("resnet32", 200)
    variables = convert.flax_variables_from_torch(model, state_dict)
    back = convert.torch_state_dict_from_flax(model, variables)
    kept = {k for k in state_dict if not convert.IGNORED_TORCH_KEYS.search(k)}
    assert set(back) == kept
    for key in kept:
        np.testing.assert_array_equal(back[key], state_dict[key].numpy())

    with pytest.raises(ValueError, match=r"200 classes.*num_classes=100"):
        convert.flax_variables_from_torch(models.get_model("resnet32", 100), state_dict)
    with pytest.raises(ValueError, match=r"(?s)looks like resnet32.*no place in resnet20"):
        convert.flax_variables_from_torch(models.get_model("resnet20", 200), state_dict)
    missing = {k: v for k, v in state_dict.items() if k != "blocks4.2.bn1.running_var"}
    with pytest.raises(ValueError, match=r"(?s)missing.*blocks4\.2\.bn1\.running_var"):
        convert.flax_variables_from_torch(model, missing)
    extra = dict(state_dict, **{"blocks9.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"(?s)no place in .*blocks9\.0\.conv1\.weight"):
        convert.flax_variables_from_torch(model, extra)
    misshaped = dict(state_dict, **{"block3.conv2.weight": torch.zeros(32, 32, 1, 1)})
    with pytest.raises(ValueError, match=r"'block3\.conv2\.weight' has shape \(32, 32, 1, 1\)"):
        convert.flax_variables_from_torch(model, misshaped)


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
            return jnp.sum(upstream * models.max_pool_2x2(x) ** 2)
        x64 = jnp.asarray(x)
        out = models.max_pool_2x2(x64)
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

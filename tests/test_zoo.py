"""The model zoo (ResNet-50/101, WideResNet, MobileNetV2) against PyTorch modules written in
torch_reference.py from the published layouts: tiny-width logits and taps in eval mode and
in train mode (with the running-statistics update), full-size key coverage and shapes, the
command line for a torchvision-style ResNet-50 file, the round trip back to a PyTorch
state dict, and errors that name keys."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as ref
from helpers import calibrate_bn_statistics, nchw, normalized_images, randomize_bn_statistics
from l2t_jax import convert, models
from l2t_jax.models import torch_layout
from l2t_jax.training import converted

TOLERANCE = 1e-4  # float32, max abs

# name -> (PyTorch module at the widths of NAME:tiny, input side in px, conv_impl). ResNet-50
# runs XLA's native convolutions: its first forward pass compiles 4x faster than with im2col
# (11 s against 3 s here), and test_convolution checks that both give the same numbers;
# the other two run the CPU default ("auto"), MobileNetV2's depthwise path included.
TINY = {
    "resnet50": (lambda classes: ref.ImageNetResNet(50, classes, widths=(4, 4, 8, 8)), 64,
                 "native"),
    "wrn16_2": (lambda classes: ref.WideResNet(16, 2, classes, widths=(4, 8, 12, 16)), 32,
                "auto"),
    "mobilenet_v2": (lambda classes: ref.MobileNetV2(classes, width_mult=0.25,
                                                      round_nearest=4, last_channel=32), 64,
                     "auto"),
}


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _tiny_pair(name, seed):
    """(torch module with random BN statistics, our tiny network, its converted variables)."""
    torch.manual_seed(seed)
    build, size, conv_impl = TINY[name]
    torch_model = build(7)
    randomize_bn_statistics(torch_model, seed=seed)
    calibrate_bn_statistics(torch_model, nchw(normalized_images(8, size, seed=seed + 10)),
                            extra_variance=0.1)
    model = models.get_model(f"{name}:tiny", 7, probe_size=size, conv_impl=conv_impl)
    variables = torch_layout.flax_variables_from_torch(model, torch_model.state_dict())
    return torch_model, model, variables, size


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_logits_and_taps_match_torch(name):
    """Eval mode, float32: logits and every tap within 1e-4, taps' channels and strides as
    declared."""
    torch_model, model, variables, size = _tiny_pair(name, seed=len(name))
    images = normalized_images(3, size, seed=1)
    with torch.no_grad():
        torch_logits, torch_taps = torch_model.eval()(torch.from_numpy(nchw(images)))
    # One compiled program: op by op, the first call compiles each op (4x slower here).
    logits, taps = jax.jit(functools.partial(model.apply, train=False))(
        variables, jnp.asarray(images))
    errors = [_max_abs(logits, torch_logits)]
    assert len(taps) == len(torch_taps) == len(model.feature_taps())
    for ours, theirs, tap in zip(taps, torch_taps, model.feature_taps()):
        assert ours.shape[-1] == tap.channels and size // ours.shape[1] == tap.stride
        errors.append(_max_abs(nchw(ours), theirs))
    print(f"{name}:tiny eval float32 max abs: logits {errors[0]:.2e}, "
          f"taps {max(errors[1:]):.2e}")
    assert max(errors) <= TOLERANCE, errors
    assert float(np.std(np.asarray(logits))) > 1e-2   # not a trivially small output


def test_tiny_mobilenet_v2_train_mode_forward_matches_torch():
    """Train mode through TappedNetwork.apply(mutable=['batch_stats']): batch-statistics
    logits and taps, and the running statistics PyTorch's forward leaves, in float64. (In
    float32, normalising a nearly constant channel by a small batch's variance puts
    PyTorch's own float32 train-mode forward of these tiny networks up to 3e-4 away from
    its float64 one; float64 checks the same structure to 1e-8.) BatchNorm is the one layer
    that differs between modes; MobileNetV2 is the family with the most kinds of layers."""
    torch_model, model, variables, size = _tiny_pair("mobilenet_v2", seed=3)
    images = normalized_images(4, size, seed=2)
    # torchvision's MobileNetV2 has Dropout(0.2) before its classifier, ours none (the
    # forward pass takes no random key): compare with it off.
    torch_model.classifier[0].p = 0.0
    torch_model.double().train()
    with torch.no_grad():
        torch_logits, torch_taps = torch_model(torch.from_numpy(nchw(images)).double())
    with jax.enable_x64(True):
        variables64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
        (logits, taps), updates = jax.jit(functools.partial(
            model.apply, train=True, mutable=["batch_stats"]))(
                variables64, jnp.asarray(images, jnp.float64))
        assert logits.dtype == jnp.float64 and set(updates) == {"batch_stats"}
        errors = [_max_abs(logits, torch_logits)] + [
            _max_abs(nchw(ours), theirs) for ours, theirs in zip(taps, torch_taps)]
        print(f"mobilenet_v2:tiny train float64 max abs: {max(errors):.1e}")
        assert max(errors) <= 1e-8, errors
        after = torch_layout.torch_state_dict_from_flax(
            model, {"params": variables64["params"], "batch_stats": updates["batch_stats"]})
    before = torch_layout.torch_state_dict_from_flax(model, variables)
    stats = [k for k in torch_model.state_dict() if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 52 and all(k in after for k in stats)
    assert max(_max_abs(after[k], before[k]) for k in stats) > 1e-2   # they were updated
    for key in stats:
        np.testing.assert_allclose(after[key], torch_model.state_dict()[key].numpy(),
                                   rtol=1e-10, atol=1e-12, err_msg=key)


# Full size: torchvision's published key counts (state_dict() with num_batches_tracked) and
# parameter counts at 1000 classes pin the hand-written references to torchvision itself.
TORCHVISION_SIZES = {"resnet50": (320, 25_557_032), "resnet101": (626, 44_549_160),
                     "mobilenet_v2": (314, 3_504_872)}


def _round_trips(model, state_dict, variables):
    back = torch_layout.torch_state_dict_from_flax(model, variables)
    kept = {k for k in state_dict if not torch_layout.IGNORED_TORCH_KEYS.search(k)}
    assert set(back) == kept
    for key in kept:
        np.testing.assert_array_equal(back[key], state_dict[key].numpy(), err_msg=key)
    assert torch_layout.flax_variables_from_torch(model, back).keys() == variables.keys()


def test_full_size_resnet50_through_the_command_line_and_resnet101_keys(tmp_path):
    """python -m l2t_jax.convert --model resnet50 on a bare torchvision-layout state dict;
    ResNet-101's keys and shapes convert strictly; each round-trips; a ResNet-101 file
    given as a ResNet-50 is refused naming the keys and the architecture it looks like."""
    torch.manual_seed(0)
    resnet50 = ref.ImageNetResNet(50, 1000)
    keys, parameters = TORCHVISION_SIZES["resnet50"]
    assert len(resnet50.state_dict()) == keys
    assert sum(p.numel() for p in resnet50.parameters()) == parameters
    path = os.path.join(tmp_path, "resnet50-0676ba61.pth")
    torch.save(resnet50.state_dict(), path)
    output = os.path.join(tmp_path, "converted")
    convert.main(["--model", "resnet50", "--checkpoint", path, "--output", output])
    model, variables, metadata = converted.load_converted(output, expect_model="resnet50",
                                                        expect_num_classes=1000)
    assert [t.channels for t in model.feature_taps()] == [64, 256, 512, 1024, 2048]
    _round_trips(model, resnet50.state_dict(), variables)

    resnet101 = ref.ImageNetResNet(101, 1000).state_dict()
    assert len(resnet101) == TORCHVISION_SIZES["resnet101"][0]
    model101 = models.get_model("resnet101", 1000)
    _round_trips(model101, resnet101, torch_layout.flax_variables_from_torch(model101, resnet101))
    assert torch_layout.guess_architecture(resnet101) == "resnet101"
    # 17 more layer3 blocks of 15 keys each (3 convs, 3 BNs of 4 kept keys).
    with pytest.raises(ValueError, match=r"(?s)looks like resnet101.*255 checkpoint keys have "
                                         r"no place in resnet50: layer3\.10\.bn1\.bias"):
        torch_layout.flax_variables_from_torch(model, resnet101)


def test_full_size_wide_resnet_keys_and_shapes():
    """WRN-28-10 in RepDistiller's layout converts with strict coverage and round-trips;
    the file is recognised as wrn28_10; a missing shortcut is named."""
    torch.manual_seed(0)
    torch_model = ref.WideResNet(28, 10, 100)
    state_dict = torch_model.state_dict()
    assert "block2.layer.0.convShortcut.weight" in state_dict
    assert "block1.layer.1.convShortcut.weight" not in state_dict
    model = models.get_model("wrn28_10", 100, probe_size=32)
    assert [(t.channels, t.stride) for t in model.feature_taps()] == [
        (16, 1), (160, 1), (320, 2), (640, 4)]
    assert sum(x.size for x in jax.tree.leaves(
        model.abstract_variables()["params"])) == sum(p.numel() for p in torch_model.parameters())
    _round_trips(model, state_dict, torch_layout.flax_variables_from_torch(model, state_dict))
    assert torch_layout.guess_architecture(state_dict) == "wrn28_10"
    missing = {k: v for k, v in state_dict.items() if k != "block3.layer.0.convShortcut.weight"}
    with pytest.raises(ValueError, match=r"(?s)missing.*block3\.layer\.0\.convShortcut\.weight"):
        torch_layout.flax_variables_from_torch(model, missing)


def test_full_size_mobilenet_v2_keys_and_shapes():
    """torchvision's MobileNetV2 keys (314, 3.5M parameters) convert strictly and
    round-trip; a depthwise kernel of the wrong shape is named with both shapes."""
    torch.manual_seed(0)
    torch_model = ref.MobileNetV2(1000)
    state_dict = torch_model.state_dict()
    keys, parameters = TORCHVISION_SIZES["mobilenet_v2"]
    assert len(state_dict) == keys
    assert sum(p.numel() for p in torch_model.parameters()) == parameters
    assert state_dict["features.2.conv.1.0.weight"].shape == (96, 1, 3, 3)   # depthwise
    model = models.get_model("mobilenet_v2", 1000)
    assert [t.channels for t in model.feature_taps()] == [16, 24, 32, 96, 1280]
    _round_trips(model, state_dict, torch_layout.flax_variables_from_torch(model, state_dict))
    assert torch_layout.guess_architecture(state_dict) == "mobilenet_v2"
    bad = dict(state_dict, **{"features.2.conv.1.0.weight": torch.zeros(96, 96, 3, 3)})
    with pytest.raises(ValueError, match=r"'features\.2\.conv\.1\.0\.weight' has shape "
                                         r"\(96, 96, 3, 3\).*expects \(96, 1, 3, 3\)"):
        torch_layout.flax_variables_from_torch(model, bad)


def test_tiny_variants_and_the_registry():
    assert {"resnet50", "resnet101", "wrn16_2", "wrn28_10", "mobilenet_v2"} <= set(
        models.model_names())
    tiny = models.get_model("wrn16_2:tiny", 10, probe_size=32)
    assert [t.channels for t in tiny.feature_taps()] == [4, 8, 12, 16]
    assert tiny.candidates == (1, 2, 3)
    # Explicit overrides win over the tiny ones.
    assert [t.channels for t in models.get_model(
        "wrn16_2:tiny", 10, widths=(2, 4, 6, 8)).feature_taps()] == [2, 4, 6, 8]
    with pytest.raises(ValueError, match="unknown model 'wrn16_3'"):
        models.get_model("wrn16_3", 10)

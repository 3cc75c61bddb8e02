"""Conversion from PyTorch: the released ResNet-32, torchvision-layout ResNets and VGG-9-BN
give the same logits and feature maps as the same networks run in PyTorch; the round trip,
the strict errors, and a PyTorch file read without torch installed. (BatchNorm's train-mode
numerics and the max-pools' gradients against PyTorch's: test_models.py.)"""
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as ref
from helpers import (RESNET32_SHA256, calibrate_bn_statistics, nchw, normalized_images,
                     randomize_bn_statistics)
from l2t_jax import convert, models
from l2t_jax.models import torch_layout
from l2t_jax.training import converted

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
    assert converted.sha256_of(released_resnet32_path) == RESNET32_SHA256
    output = os.path.join(tmp_path, "resnet32")
    convert.main(["--model", "resnet32", "--checkpoint", released_resnet32_path,
                  "--output", output, "--source_dataset", "tinyimagenet"])
    model, variables, metadata = converted.load_converted(output, expect_model="resnet32",
                                                        expect_num_classes=200)
    assert metadata["num_classes"] == 200 and metadata["recorded"]["best"] == 49.27
    assert metadata["sha256"] == RESNET32_SHA256
    _compare_eval(ref.load_released_resnet32(released_resnet32_path), model, variables,
                  normalized_images(8, 32))
    with pytest.raises(ValueError, match="has 200 classes, the config asks for 100"):
        converted.load_converted(output, expect_num_classes=100)
    with pytest.raises(ValueError, match="holds a resnet32"):
        converted.load_converted(output, expect_model="resnet20")


@pytest.mark.parametrize("depth", [34])
def test_torchvision_layout_resnet(depth, tmp_path):
    torch.manual_seed(0)
    torch_model = ref.ImageNetResNet(depth=depth, num_classes=1000)
    randomize_bn_statistics(torch_model)
    calibrate_bn_statistics(torch_model, nchw(normalized_images(8, 64, seed=5)))
    path = os.path.join(tmp_path, f"resnet{depth}.pth")
    torch.save(torch_model.state_dict(), path)     # a bare state dict, like torchvision's
    state_dict, info = converted.read_torch_checkpoint(path)
    assert info == {}
    model = models.get_model(f"resnet{depth}", 1000)
    variables = torch_layout.flax_variables_from_torch(model, state_dict)
    _compare_eval(torch_model, model, variables, normalized_images(2, 64, seed=1))


def test_vgg9_bn():
    torch.manual_seed(1)
    torch_model = ref.VGG9BN(num_classes=100)
    randomize_bn_statistics(torch_model, seed=1)
    calibrate_bn_statistics(torch_model, nchw(normalized_images(8, 32, seed=5)))
    model = models.get_model("vgg9_bn", 100)
    variables = torch_layout.flax_variables_from_torch(model, torch_model.state_dict())
    _compare_eval(torch_model, model, variables, normalized_images(4, 32, seed=2))


def test_round_trip_and_strict_errors(released_resnet32_path):
    state_dict, _ = converted.read_torch_checkpoint(released_resnet32_path)
    model = models.get_model("resnet32", 200)
    variables = torch_layout.flax_variables_from_torch(model, state_dict)
    back = torch_layout.torch_state_dict_from_flax(model, variables)
    kept = {k for k in state_dict if not torch_layout.IGNORED_TORCH_KEYS.search(k)}
    assert set(back) == kept
    for key in kept:
        np.testing.assert_array_equal(back[key], state_dict[key].numpy())

    with pytest.raises(ValueError, match=r"200 classes.*num_classes=100"):
        torch_layout.flax_variables_from_torch(models.get_model("resnet32", 100), state_dict)
    with pytest.raises(ValueError, match=r"(?s)looks like resnet32.*no place in resnet20"):
        torch_layout.flax_variables_from_torch(models.get_model("resnet20", 200), state_dict)
    missing = {k: v for k, v in state_dict.items() if k != "blocks4.2.bn1.running_var"}
    with pytest.raises(ValueError, match=r"(?s)missing.*blocks4\.2\.bn1\.running_var"):
        torch_layout.flax_variables_from_torch(model, missing)
    extra = dict(state_dict, **{"blocks9.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"(?s)no place in .*blocks9\.0\.conv1\.weight"):
        torch_layout.flax_variables_from_torch(model, extra)
    misshaped = dict(state_dict, **{"block3.conv2.weight": torch.zeros(32, 32, 1, 1)})
    with pytest.raises(ValueError, match=r"'block3\.conv2\.weight' has shape \(32, 32, 1, 1\)"):
        torch_layout.flax_variables_from_torch(model, misshaped)


def test_a_pytorch_file_without_torch_names_the_extra(tmp_path, monkeypatch):
    checkpoint = tmp_path / "model.pth"
    checkpoint.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)      # `import torch` raises ImportError
    with pytest.raises(ImportError, match=r"model\.pth needs torch, which is not installed: "
                                          r"pip install 'l2t-jax\[convert\]'"):
        converted.read_torch_checkpoint(str(checkpoint))


class _WritesAMarker:
    """Unpickling this runs code: it creates the file ``path`` (what a hostile checkpoint
    could do with any command)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    """torch.load(weights_only=True): a file whose unpickling calls a function is refused
    with a message naming --allow_pickle, and nothing in it runs; with the flag it is read
    (here it then fails as not being a state dict, after the marker was written)."""
    marker = tmp_path / "ran"
    checkpoint = tmp_path / "hostile.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)},
                "payload": _WritesAMarker(str(marker))}, checkpoint)
    with pytest.raises(converted.UntrustedCheckpointError,
                       match=r"hostile\.pth holds more than tensors and numbers.*refused.*"
                             r"--allow_pickle"):
        converted.read_torch_checkpoint(str(checkpoint))
    assert not marker.exists()
    out = tmp_path / "converted"
    with pytest.raises(SystemExit, match=r"error: .*--allow_pickle"):
        convert.main(["--model", "resnet20", "--checkpoint", str(checkpoint),
                      "--output", str(out)])
    assert not marker.exists() and not out.exists()
    converted.read_torch_checkpoint(str(checkpoint), allow_pickle=True)
    assert marker.exists()          # full unpickling ran the file's code

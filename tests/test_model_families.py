"""Model families (l2t_jax.models.registry): a family registered from outside the package
converts from PyTorch, trains and exports with nothing but its module and its record; every
registered family has a ``NAME:tiny`` variant smaller than the full network.

The family here, ``toynet``, is defined in this file only: two conv-BN-ReLU stages (taps
``stage_0``, ``stage_1``), a max-pool between them, global pooling and a classifier, with
a PyTorch twin whose state-dict keys (``stages.0.conv.weight``, ...) its record maps.
"""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import nchw, normalized_images, tiny_config, write_npz_splits
from l2t_jax import export, models
from l2t_jax.models import layers, torch_layout
from l2t_jax.training import checkpoints, converted, train


# ------------------------------------------------------------------------- the family
class ToyStage(nn.Module):
    features: int
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool):
        x = layers.conv(self.features, 3, 1, 1, False, "conv", self.conv_impl)(x)
        return nn.relu(layers.BatchNorm(name="bn")(x, train))


class ToyNet(nn.Module):
    """conv-BN-ReLU (widths[0]), max-pool, conv-BN-ReLU (widths[1]), pool, ``fc``."""

    num_classes: int = 10
    widths: tuple = (16, 32)
    conv_impl: str = "auto"

    def default_taps(self):
        return ("stage_0", "stage_1")

    @nn.compact
    def __call__(self, images, train: bool):
        x = ToyStage(self.widths[0], self.conv_impl, name="stage_0")(images, train)
        x = ToyStage(self.widths[1], self.conv_impl, name="stage_1")(
            layers.max_pool_2x2(x), train)
        return layers.classifier(x, self.num_classes)


def toy_torch_module_name(module, name):
    """``stage_0 -> stages.0`` (torch's ModuleList)."""
    return name.replace("stage_", "stages.") if name.startswith("stage_") else name


def toy_recognize(shapes):
    return "toynet" if "stages.0.conv.weight" in shapes else None


TOY = models.register_family(models.ModelFamily(
    module=ToyNet, variants={"toynet": {}}, tiny={"widths": (4, 6)},
    display_names={"toynet": "ToyNet"}, torch_module_name=toy_torch_module_name,
    torch_layout=lambda module: "the test's TorchToyNet (stages.N.conv, stages.N.bn, fc)",
    recognize=toy_recognize))


class TorchToyNet(torch.nn.Module):
    def __init__(self, widths, num_classes):
        super().__init__()
        self.stages = torch.nn.ModuleList()
        channels = 3
        for width in widths:
            stage = torch.nn.Module()
            stage.conv = torch.nn.Conv2d(channels, width, 3, padding=1, bias=False)
            stage.bn = torch.nn.BatchNorm2d(width)
            self.stages.append(stage)
            channels = width
        self.fc = torch.nn.Linear(channels, num_classes)

    def forward(self, x):
        for i, stage in enumerate(self.stages):
            if i:
                x = torch.nn.functional.max_pool2d(x, 2)
            x = torch.relu(stage.bn(stage.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _randomised(module, seed):
    """A torch module with random weights and BN statistics (so swapped tensors show)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.dtype.is_floating_point:
                value = torch.randn(tensor.shape, generator=generator) * 0.3
                tensor.copy_(value.abs() + 0.5 if name.endswith("running_var") else value)
    return module.eval()


def _flax_logits(model, variables, images):
    logits, _ = model.apply(variables, jnp.asarray(images), train=False)
    return np.asarray(logits)


# ------------------------------------------------------------------------------ tests
def test_a_family_registered_outside_the_package_converts_trains_and_exports(tmp_path):
    assert "toynet" in models.model_names() and models.display_name("toynet") == "ToyNet"
    assert models.family_of("toynet:tiny") is TOY

    # A checkpoint of other widths is refused, naming the key (the family's names).
    other = tmp_path / "other.pth"
    torch.save(TorchToyNet((8, 12), num_classes=5).state_dict(), other)
    with pytest.raises(ValueError, match=r"'stages.0.conv.weight' has shape \(8, 3, 3, 3\)"):
        converted.convert_checkpoint("toynet", str(other), str(tmp_path / "no"))

    # Convert: a PyTorch checkpoint of the family -> the converted format; same logits.
    source_torch = _randomised(TorchToyNet((16, 32), num_classes=5), seed=0)
    checkpoint = tmp_path / "toynet.pth"
    torch.save({"state_dict": source_torch.state_dict(), "num_classes": 5}, checkpoint)
    assert torch_layout.guess_architecture(source_torch.state_dict()) == "toynet"
    source_dir = tmp_path / "source"
    converted.convert_checkpoint("toynet", str(checkpoint), str(source_dir))
    model, variables, _ = converted.load_converted(str(source_dir))
    images = normalized_images(2, 16, seed=1)
    with torch.no_grad():
        expected = source_torch(torch.from_numpy(nchw(images))).numpy()
    np.testing.assert_allclose(_flax_logits(model, variables, images), expected, atol=1e-4)

    # Train two steps: the converted toynet teaches toynet:tiny by feature matching.
    write_npz_splits(tmp_path / "data")
    config = tiny_config(tmp_path / "data", source_dir, method="fm", pairs="one_to_one",
                         source_model="toynet", target_model="toynet:tiny")
    config.epochs, config.steps_per_epoch = 1, 2
    workdir = tmp_path / "run"
    result = train.train_and_evaluate(config, str(workdir))
    assert result["steps"] == 2 and result["pairs"] == [[0, 0], [1, 1]]

    # Export: the trained target loads strictly into the PyTorch twin, same logits.
    output = tmp_path / "target.pth"
    export.export(str(workdir), str(output), which="last")
    target_torch = TorchToyNet(models.tiny_overrides("toynet")["widths"], num_classes=3)
    target_torch.load_state_dict(torch.load(output, weights_only=True), strict=True)
    description = json.loads((tmp_path / "target.json").read_text())
    assert description["layout"].startswith("the test's TorchToyNet")
    target = models.get_model("toynet:tiny", 3)
    restored, _ = checkpoints.restore_target(str(workdir), target, "last")
    with torch.no_grad():
        exported = target_torch.eval()(torch.from_numpy(nchw(images))).numpy()
    np.testing.assert_allclose(_flax_logits(target, restored, images), exported, atol=1e-4)


def _parameter_count(name, probe_size=32):
    network = models.get_model(name, 10, probe_size=probe_size)
    return sum(int(np.prod(leaf.shape))
               for leaf in jax.tree.leaves(network.abstract_variables()["params"]))


@pytest.mark.parametrize("name", [n for n in models.model_names() if n != "toynet"])
def test_every_family_has_a_tiny_variant_smaller_than_the_full_network(name):
    tiny, full = _parameter_count(f"{name}:tiny"), _parameter_count(name)
    assert 0 < tiny < full, (name, tiny, full)
    # The same taps, so a tiny run matches the pairs of the full one.
    assert (models.get_model(f"{name}:tiny", 10, probe_size=32).taps
            == models.get_model(name, 10, probe_size=32).taps)


def test_tiny_configs_use_the_registry_variant():
    """``NAME:tiny`` configs (configs/default.py ``tiny``) take the target's registry
    variant, for every family, not widths of their own."""
    from l2t_jax.configs import cifar100, default
    from l2t_jax.training import build
    config = cifar100.get_config("tiny")
    assert config.target_model == "vgg9_bn:tiny" and not dict(config.model_overrides.target)
    for name in ("resnet50", "wrn16_2", "mobilenet_v2"):
        variant = cifar100.get_config()
        variant.target_model, variant.pairs = name, "all_to_all"
        shrunk = default.tiny(variant)
        assert shrunk.target_model == f"{name}:tiny"
        network = build.build_networks(shrunk)[1]
        assert network.name == f"{name}:tiny"
    outside = cifar100.get_config()
    outside.target_model = "some.package:Net"
    assert default.tiny(outside).target_model == "some.package:Net"


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        models.register_family(models.ModelFamily(module=ToyNet, variants={"vgg9_bn": {}},
                                                  tiny={"widths": (2, 2)}))
    with pytest.raises(ValueError, match="no colon"):
        models.register_family(models.ModelFamily(module=ToyNet, variants={"a:b": {}},
                                                  tiny={}))
    assert os.path.basename(__file__) == "test_model_families.py"

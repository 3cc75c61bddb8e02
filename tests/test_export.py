"""Export to PyTorch (l2t_jax.export): a run's target written as a state dict loads strictly
into the PyTorch modules of tests/torch_reference.py and gives the Flax logits within 1e-4
(float32), for a CIFAR ResNet, VGG-9-BN and a torchvision-layout ResNet-18 (tiny widths);
the JSON beside it; torch missing. (The same from a trained run's last checkpoint:
test_evaluate.py.)"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as ref
from helpers import nchw, normalized_images
from l2t_jax import data, export, models
from l2t_jax.training import checkpoints

TOLERANCE = 1e-4

CASES = {
    "resnet20": ((4, 6, 8), 32, lambda w: ref.CifarResNet(depth=20, num_classes=7, widths=w)),
    "vgg9_bn": ((4, 6, 8, 8, 8), 32, lambda w: ref.VGG9BN(num_classes=7, widths=w)),
    "resnet18": ((8, 8, 16, 16), 64,
                 lambda w: ref.ImageNetResNet(depth=18, num_classes=7, widths=w)),
}


def _random_variables(model, seed):
    """Random variables of ``model``'s shapes, drawn with numpy (no compiled init): kernels
    with variance 1 / fan-in, and every BN's scale, bias and running statistics away from
    their initial values, so that dropped, swapped or mis-laid tensors would show."""
    rng = np.random.default_rng(seed)

    def draw(path, abstract):
        name, shape = getattr(path[-1], "key", ""), abstract.shape
        if name == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif name == "mean":
            value = 0.1 * rng.standard_normal(shape)
        elif name == "var":
            value = 0.5 + rng.uniform(size=shape)
        elif name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:                                   # BN and layer biases
            value = 0.1 * rng.standard_normal(shape)
        return value.astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, model.abstract_variables())


def _fake_run(workdir, name, widths, size, variables):
    """A workdir as training leaves it, as far as export reads it: config.json, best/."""
    os.makedirs(workdir)
    config = {"method": "l2t_ww", "target_model": name,
              "model_overrides": {"target": {"widths": list(widths)}},
              "data": {"name": "digits-folder", "num_classes": 7, "image_size": size,
                       "classes": [f"class{i}" for i in range(7)]}}
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)
    checkpoints.save_best(str(workdir), variables)


@pytest.mark.parametrize("name", list(CASES))
def test_exported_state_dict_gives_the_flax_logits_in_pytorch(name, tmp_path, capsys):
    widths, size, torch_module = CASES[name]
    model = models.get_model(name, 7, widths=widths)
    variables = _random_variables(model, seed=len(name))
    workdir = tmp_path / "run"
    _fake_run(workdir, name, widths, size, variables)
    output = tmp_path / "out" / "model.pth"
    export.main(["--workdir", str(workdir), "--output", str(output)])
    assert capsys.readouterr().out.split() == [str(output), str(tmp_path / "out" / "model.json")]

    state_dict = torch.load(output, weights_only=True)
    torch_model = torch_module(widths)
    torch_model.load_state_dict(state_dict, strict=True)   # every key, no extra one
    assert all(v.dtype in (torch.float32, torch.int64) for v in state_dict.values())
    images = normalized_images(4, size, seed=3)
    with torch.no_grad():
        torch_logits = torch_model.eval()(torch.from_numpy(nchw(images)))[0].numpy()
    logits = np.asarray(model.apply(variables, jnp.asarray(images), train=False)[0])
    assert np.std(logits) > 1e-2 and np.abs(logits).max() < 1e3    # a meaningful test
    np.testing.assert_allclose(torch_logits, logits, rtol=0, atol=TOLERANCE)

    description = json.loads((tmp_path / "out" / "model.json").read_text())
    assert description["model"] == name and description["num_classes"] == 7
    assert description["classes"] == [f"class{i}" for i in range(7)]
    assert description["input"]["size"] == [size, size]
    assert description["normalization"]["mean"] == data.MEAN.tolist()
    assert description["normalization"]["std"] == data.STD.tolist()
    assert description["model_overrides"] == {"widths": list(widths)}
    assert description["weights"]["which"] == "best"
    assert ("torchvision" in description["layout"]) == (name == "resnet18")


def test_missing_torch_workdir_and_checkpoint_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="no run here: .*nowhere does not exist"):
        export.main(["--workdir", str(tmp_path / "nowhere"), "--output",
                     str(tmp_path / "m.pth")])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(
        {"target_model": "vgg9_bn", "data": {"num_classes": 3, "image_size": 32}}))
    with pytest.raises(SystemExit, match="run/best does not exist: .* use --which last"):
        export.main(["--workdir", str(tmp_path / "run"), "--output", str(tmp_path / "m.pth")])
    with pytest.raises(SystemExit, match="checkpoints does not exist"):
        export.main(["--workdir", str(tmp_path / "run"), "--which", "last", "--output",
                     str(tmp_path / "m.pth")])
    monkeypatch.setitem(sys.modules, "torch", None)     # `import torch` raises ImportError
    with pytest.raises(SystemExit, match=r"needs torch, .*pip install 'l2t-jax\[convert\]'"):
        export.main(["--workdir", str(tmp_path / "run"), "--output", str(tmp_path / "m.pth")])


def test_a_target_that_does_not_build_names_the_key(tmp_path):
    """export builds the run's target with the training's builder: overrides that do not
    fit are a one-line error naming the config key."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(
        {"target_model": "vgg9_bn", "model_overrides": {"target": {"widths": [4, -6, 8, 8, 8]}},
         "data": {"num_classes": 3, "image_size": 32}}))
    with pytest.raises(SystemExit, match=r"^error: config.model_overrides.target.widths="
                                         r"\(4, -6, 8, 8, 8\): widths must be integers >= 1$"):
        export.main(["--workdir", str(tmp_path / "run"), "--output", str(tmp_path / "m.pth")])

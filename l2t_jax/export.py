"""A trained target back to PyTorch: its state dict in the reference layout, and a JSON of
how to feed it.

    python -m l2t_jax.export --workdir RUN [--which best|last] --output model.pth

writes ``model.pth`` (``torch.save`` of a plain state dict) and ``model.json`` beside it.
The keys and tensor layouts are those :mod:`l2t_jax.convert` reads, inverted with the same
rename rules (:func:`l2t_jax.models.torch_layout.torch_state_dict_from_flax`), so every
family convert knows exports too: the CIFAR ResNets and VGG-9-BN as in the authors' code (``conv1``,
``block1``, ``blocks2.0``, ...; ``features.K``, ``classifier``), the ImageNet ResNets as in
torchvision (``torchvision.models.resnet18(num_classes=K).load_state_dict(...)``). BatchNorm
layers also get ``num_batches_tracked`` (0), so a strict ``load_state_dict`` takes the file
in every torch version. The authors' classes define modules they never run (``alphas``,
extra heads); load into those with ``strict=False``.

The JSON holds what a PyTorch user needs besides the weights: the model and its class
count and names (label order), the input size and layout, the normalisation (mean/std
after scaling pixels to [0, 1]) and the evaluation resize, and where the weights came from
(workdir, best or last, step, the run's accuracies).

Needs torch (the ``[convert]`` extra); without it the command stops with the install line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping, Optional

import numpy as np

from l2t_jax import data
from l2t_jax.models import torch_layout
from l2t_jax.training import build, checkpoints, converted
from l2t_jax.training import workdir as workdir_files
from l2t_jax.evaluate import run_config


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise converted.TorchMissingError(
            "exporting to PyTorch needs torch, which is not installed: pip install "
            "'l2t-jax[convert]' (on a GPU machine, first the CPU wheel: pip install torch "
            "--index-url https://download.pytorch.org/whl/cpu)") from e
    return torch


def torch_state_dict(model, variables: Mapping[str, Any]) -> dict:
    """``model``'s Flax variables as a PyTorch state dict (torch tensors, float32 as
    trained) in the reference layout
    (:func:`l2t_jax.models.torch_layout.torch_state_dict_from_flax`), plus
    ``num_batches_tracked`` for every BatchNorm."""
    torch = _import_torch()
    arrays = torch_layout.torch_state_dict_from_flax(model, variables)
    state_dict = {key: torch.from_numpy(np.array(value, copy=True, order="C"))
                  for key, value in arrays.items()}
    for key in list(arrays):
        if key.endswith(".running_mean"):
            state_dict[key[:-len("running_mean")] + "num_batches_tracked"] = torch.tensor(
                0, dtype=torch.int64)
    return state_dict


def describe(config, model, which: str, step: Optional[int], workdir: str) -> dict:
    """The JSON written beside the state dict; ``config`` is the run's
    (:func:`l2t_jax.training.config.read_run_config`)."""
    size = int(config.data.image_size)
    result_path = workdir_files.path(workdir, workdir_files.RESULT)
    result = workdir_files.read_json(result_path) if os.path.isfile(result_path) else {}
    return {
        "model": model.name,
        "layout": torch_layout.layout_description(model),
        "model_overrides": {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in
                            dict(config.model_overrides.get("target", {})).items()},
        "num_classes": int(model.num_classes),
        "classes": list(config.data.classes) or None,
        "input": {"size": [size, size], "channels": "RGB", "layout": "NCHW float32"},
        "normalization": {"scale": "pixels / 255, then (x - mean) / std",
                          "mean": data.MEAN.tolist(), "std": data.STD.tolist()},
        "eval_resize": (f"resize to {size}x{size} (bilinear)" if size <= 64 else
                        f"resize the shorter side to {int(size * 256 / 224)} (bilinear), "
                        f"center crop {size}x{size}"),
        "output": "logits (no softmax)",
        "weights": {"workdir": os.path.abspath(workdir), "which": which, "step": step,
                    "dataset": config.data.name, "method": config.method,
                    "best_val": result.get("best_val"),
                    "test_at_best_val": result.get("test_at_best_val")},
    }


def export(workdir: str, output: str, which: str = "best") -> tuple[str, str]:
    """Writes the run's target as a PyTorch state dict to ``output`` and its description
    (:func:`describe`) to the same name with ``.json``. Returns the two paths.

    Raises:
      FileNotFoundError: no config.json, best/ or checkpoint in ``workdir``.
      converted.TorchMissingError: torch is not installed.
    """
    torch = _import_torch()
    config = run_config(workdir)
    model = build.target_model(config)
    variables, step = checkpoints.restore_target(workdir, model, which)
    state_dict = torch_state_dict(model, variables)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    torch.save(state_dict, output)
    description_path = os.path.splitext(output)[0] + ".json"
    with open(description_path, "w") as f:
        json.dump(describe(config, model, which, step, workdir), f, indent=1)
    return output, description_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m l2t_jax.export",
        description="Write a run's trained target as a PyTorch state dict (reference "
                    "layout) with a JSON of its classes, input size and normalisation.")
    parser.add_argument("--workdir", required=True, help="the run's workdir")
    parser.add_argument("--which", default="best", choices=checkpoints.WHICH,
                        help="best: the target at the best val accuracy (best/); last: the "
                             "newest checkpoint")
    parser.add_argument("--output", required=True, help="the .pth file to write")
    args = parser.parse_args(argv)
    try:
        paths = export(args.workdir, args.output, args.which)
    except (FileNotFoundError, ValueError, converted.TorchMissingError) as e:
        sys.exit(f"error: {e}")
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()

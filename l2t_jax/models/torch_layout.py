"""PyTorch state-dict keys <-> Flax variables: the renaming and layouts, both ways.

This module owns the correspondence between a network's Flax variables and the PyTorch
state dict of the layout its family follows (the authors' CIFAR ResNets and VGG,
torchvision's ResNets and MobileNetV2, RepDistiller's WRNs): each family's
``torch_module_name`` (:class:`~l2t_jax.models.registry.ModelFamily`) renames the Flax
submodules, and the leaves and tensor layouts are mapped here (conv kernels HWIO <-> OIHW,
Dense (in, out) <-> Linear (out, in)). It reads and writes no files and needs no torch
(torch tensors are read through their numpy view): :mod:`l2t_jax.training.converted` reads
``.pth`` files and writes the converted format.

Conversion is strict: every Flax variable must come from exactly one checkpoint key of the
right shape, and every checkpoint key must land somewhere (except those listed in
:data:`IGNORED_TORCH_KEYS`), else a ValueError names the keys.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import flax
import jax
import numpy as np

from l2t_jax.models import registry
from l2t_jax.models.taps import TappedNetwork

# Keys the reference's classes define but never use in a forward pass: the CIFAR ResNet's
# and VGG's ``alphas``, and the VGG class's extra heads. ``num_batches_tracked`` is BN
# bookkeeping that inference does not need.
IGNORED_TORCH_KEYS = re.compile(
    r"(^|\.)num_batches_tracked$|^(alphas|new_classifier|new_bn|w|w1|w2|w3|lwf_lyr|"
    r"outputs_branch)\.")

_LEAF_TO_TORCH = {("params", "kernel"): "weight", ("params", "bias"): "bias",
                  ("params", "scale"): "weight", ("batch_stats", "mean"): "running_mean",
                  ("batch_stats", "var"): "running_var"}


def _torch_key(model: TappedNetwork, collection: str, path: tuple[str, ...]) -> str:
    family = registry.family_of(model.module)
    rename = family.torch_module_name if family else registry.same_name
    modules = [rename(model.module, name) for name in path[:-1]]
    return ".".join(modules + [_LEAF_TO_TORCH[(collection, path[-1])]])


def _to_flax_layout(array: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    if array.ndim == 4:          # conv OIHW -> HWIO
        return np.transpose(array, (2, 3, 1, 0))
    if len(flax_shape) == 2:     # Linear (out, in) -> Dense (in, out)
        return array.T
    return array


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        return np.transpose(array, (3, 2, 0, 1))
    if array.ndim == 2:
        return array.T
    return array


def guess_architecture(keys) -> str:
    """Best guess of a registered model name from PyTorch state-dict keys, or from a state
    dict (then shapes tell a WRN's widening factor), for messages: the first family whose
    recogniser claims it."""
    shapes = ({k: tuple(getattr(v, "shape", ())) for k, v in keys.items()}
              if isinstance(keys, Mapping) else {k: () for k in keys})
    for family in registry.families():
        if family.recognize is not None:
            guess = family.recognize(shapes)
            if guess:
                return guess
    return "an unknown architecture"


def flax_variables_from_torch(model, state_dict: Mapping[str, Any],
                              model_name: Optional[str] = None) -> dict:
    """Converts a PyTorch state dict into ``{'params', 'batch_stats'}`` for ``model``.

    Args:
      model: the network the weights are for (from :func:`~l2t_jax.models.get_model`).
      state_dict: key -> array-like (torch tensors or numpy), reference layout.
      model_name: used in error messages.

    Returns:
      Nested dicts of numpy arrays, dtype as in the checkpoint.

    Raises:
      ValueError: naming every missing, unexpected or mis-shaped key; a classifier of the
        wrong size is reported as a class-count mismatch.
    """
    name = model_name or model.name
    # Copies: numpy views of torch tensors would follow later in-place updates.
    arrays = {k: np.array(v.detach().cpu().numpy() if hasattr(v, "detach") else v, copy=True)
              for k, v in state_dict.items()}
    flat = flax.traverse_util.flatten_dict(model.abstract_variables())
    converted, used, missing, misshaped = {}, set(), [], []
    for (collection, *path), abstract in flat.items():
        key = _torch_key(model, collection, tuple(path))
        if key not in arrays:
            missing.append(key)
            continue
        used.add(key)
        value = _to_flax_layout(arrays[key], abstract.shape)
        if value.shape != abstract.shape:
            misshaped.append((key, arrays[key].shape, abstract.shape))
            continue
        converted[(collection, *path)] = value
    unexpected = sorted(k for k in arrays if k not in used and not IGNORED_TORCH_KEYS.search(k))
    problems = []
    for key, got, want in misshaped:
        if path_is_classifier(key):
            problems.append(
                f"classifier {key!r} has shape {got}: the checkpoint has {got[0]} classes, "
                f"the model was built with num_classes={model.num_classes}")
        else:
            problems.append(f"{key!r} has shape {got} in the checkpoint, the model expects "
                            f"{tuple(_to_torch_layout(np.zeros(want)).shape)}")
    if missing:
        problems.append(f"{len(missing)} keys missing from the checkpoint: "
                        f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint keys have no place in {name}: "
                        f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    if problems:
        hint = ""
        if missing or unexpected:
            hint = (f" (the checkpoint looks like {guess_architecture(arrays)}; valid models: "
                    f"{', '.join(registry.model_names())})")
        raise ValueError(f"cannot load the checkpoint into {name}{hint}:\n  - "
                         + "\n  - ".join(problems))
    return flax.traverse_util.unflatten_dict(converted)


def path_is_classifier(key: str) -> bool:
    return key.split(".")[0] in ("fc", "classifier")


def torch_state_dict_from_flax(model, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of :func:`flax_variables_from_torch` (without ignored keys)."""
    flat = flax.traverse_util.flatten_dict(jax.device_get(dict(variables)))
    return {_torch_key(model, collection, tuple(path)): _to_torch_layout(np.asarray(value))
            for (collection, *path), value in flat.items()}


def layout_description(model: TappedNetwork) -> str:
    """In words: whose PyTorch module the keys of ``model`` fit."""
    family = registry.family_of(model.module)
    if family is None or family.torch_layout is None:
        return f"{model.name}, keys as l2t_jax.convert reads them"
    return family.torch_layout(model.module)

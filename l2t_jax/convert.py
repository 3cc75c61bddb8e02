"""PyTorch checkpoints to Flax, once: key mapping, coverage checks, and the converted format.

This module owns the correspondence between the reference's PyTorch state-dict keys and
this package's Flax variables, in both directions, and the on-disk format of a converted
network (an orbax checkpoint with ``variables`` = ``{'params', 'batch_stats'}`` and a JSON
``metadata`` item: model name, class count, source data set, recorded accuracy).

Command line (needs the ``[convert]`` extra for torch)::

    python -m l2t_jax.convert --model resnet32 \\
        --checkpoint tinyimagenet-200-resnet32.pth.tar --output DIR

Conversion is strict: every Flax variable must come from exactly one checkpoint key of the
right shape, and every checkpoint key must land somewhere (except those listed in
:data:`IGNORED_TORCH_KEYS`), else a ValueError names the keys.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from l2t_jax import models, zoo

# Keys the reference's classes define but never use in a forward pass: the CIFAR ResNet's
# and VGG's ``alphas``, and the VGG class's extra heads. ``num_batches_tracked`` is BN
# bookkeeping that inference does not need.
IGNORED_TORCH_KEYS = re.compile(
    r"(^|\.)num_batches_tracked$|^(alphas|new_classifier|new_bn|w|w1|w2|w3|lwf_lyr|"
    r"outputs_branch)\.")

_LEAF_TO_TORCH = {("params", "kernel"): "weight", ("params", "bias"): "bias",
                  ("params", "scale"): "weight", ("batch_stats", "mean"): "running_mean",
                  ("batch_stats", "var"): "running_var"}


def _torch_module_name(model: models.nn.Module, name: str) -> str:
    """Maps one Flax submodule name of ``model`` (the Linen module) to its PyTorch path.

    One-to-one for each model class (:func:`torch_state_dict_from_flax` relies on it):
    distinct Flax paths give distinct PyTorch keys.
    """
    if isinstance(model, zoo.WideResNet):
        # block2/layer_0/convShortcut -> block2.layer.0.convShortcut
        indexed = re.fullmatch(r"layer_(\d+)", name)
        return f"layer.{indexed.group(1)}" if indexed else name
    if isinstance(model, zoo.MobileNetV2):
        # features_3/conv_1/0 -> features.3.conv.1.0 (nn.Sequential indices).
        indexed = re.fullmatch(r"(features|conv|classifier)_(\d+)", name)
        return f"{indexed.group(1)}.{indexed.group(2)}" if indexed else name
    if name == "downsample_conv":
        return "downsample.0"
    if name == "downsample_bn":
        return "downsample.1"
    indexed = re.fullmatch(r"(blocks\d|layer\d)_(\d+)", name)
    if indexed:
        return f"{indexed.group(1)}.{indexed.group(2)}"
    if isinstance(model, models.VGG):
        if name == "fc":
            return "classifier"
        layer = re.fullmatch(r"(conv|bn)(\d+)", name)
        if layer:
            # torch's Sequential: (conv, bn, relu) per conv, one max-pool after each stage.
            k = int(layer.group(2))
            stage = int(np.searchsorted(np.cumsum(model.convs_per_stage), k, side="right"))
            return f"features.{3 * k + stage + (layer.group(1) == 'bn')}"
    return name


def _torch_key(model: models.TappedNetwork, collection: str, path: tuple[str, ...]) -> str:
    modules = [_torch_module_name(model.module, name) for name in path[:-1]]
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
    dict (then shapes tell a WRN's widening factor), for messages."""
    shapes = ({k: tuple(getattr(v, "shape", ())) for k, v in keys.items()}
              if isinstance(keys, Mapping) else {})
    keys = list(keys)
    if any(k.startswith("block1.layer.") for k in keys):
        n = len({k.split(".")[2] for k in keys if k.startswith("block1.layer.")})
        fc = shapes.get("fc.weight", ())
        k = f"{fc[1] // 64}" if len(fc) == 2 else "k"
        return f"wrn{6 * n + 4}_{k}"
    if any(k.startswith("block1.") for k in keys):
        n = len({k.split(".")[1] for k in keys if k.startswith("blocks2.")}) + 1
        return f"resnet{6 * n + 2}"
    if any(k.startswith("layer1.") for k in keys):
        n = len({k.split(".")[1] for k in keys if k.startswith("layer3.")})
        if any(k.startswith("layer1.0.conv3.") for k in keys):      # Bottleneck blocks
            return {6: "resnet50", 23: "resnet101"}.get(
                n, f"a Bottleneck ResNet with {n} layer3 blocks")
        return {2: "resnet18", 6: "resnet34"}.get(n, f"an ImageNet ResNet with {n} layer3 blocks")
    if any(re.match(r"features\.\d+\.conv\.", k) for k in keys):
        return "mobilenet_v2"
    if any(k.startswith("features.") for k in keys):
        return "a VGG"
    return "an unknown architecture"


def flax_variables_from_torch(model, state_dict: Mapping[str, Any],
                              model_name: Optional[str] = None) -> dict:
    """Converts a PyTorch state dict into ``{'params', 'batch_stats'}`` for ``model``.

    Args:
      model: the Flax module the weights are for (from :func:`models.get_model`).
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
                    f"{', '.join(models.MODEL_NAMES)})")
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


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class TorchMissingError(ImportError):
    """torch is not installed, and a PyTorch file must be read; the message says how to
    install it."""


class UntrustedCheckpointError(ValueError):
    """A PyTorch file that only full unpickling can read (which can run any code the file
    holds) was refused; the message names the flag that allows it."""


def read_torch_checkpoint(path: str, allow_pickle: bool = False) -> tuple[dict, dict]:
    """Reads a ``.pth`` / ``.pth.tar`` file: returns (state_dict, other top-level entries).

    Accepts a bare state dict (torchvision's ``resnet34-*.pth``) or the reference's
    ``{'state_dict': ..., 'num_classes': ..., 'best': ...}``. The file is read with
    ``torch.load(weights_only=True)``, which reads tensors, numbers and containers but runs
    nothing; both released files read that way.

    Raises:
      UntrustedCheckpointError: the file needs full unpickling and ``allow_pickle`` is off.
    """
    try:
        import torch
    except ImportError as e:
        raise TorchMissingError(
            f"reading the PyTorch checkpoint {path} needs torch, which is not installed: "
            "pip install 'l2t-jax[convert]' (on a GPU machine, first the CPU wheel: pip "
            "install torch --index-url https://download.pytorch.org/whl/cpu)") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    import pickle
    try:
        payload = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UntrustedCheckpointError(
            f"{path} holds more than tensors and numbers ({first_line[:200]}); reading it "
            "means full unpickling, which can run any code the file contains, so it was "
            "refused. If you trust the file, convert it with python -m l2t_jax.convert "
            "--allow_pickle ...") from None
    if isinstance(payload, dict) and "state_dict" in payload:
        info = {k: v for k, v in payload.items() if k != "state_dict"}
        return dict(payload["state_dict"]), info
    if isinstance(payload, dict) and all(hasattr(v, "shape") for v in payload.values()):
        return dict(payload), {}
    raise ValueError(f"{path!r} holds neither a state dict nor a dict with 'state_dict'")


def _json_safe(value):
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return None


def convert_checkpoint(model_name: str, checkpoint: str, output: str,
                       num_classes: Optional[int] = None,
                       source_dataset: Optional[str] = None,
                       allow_pickle: bool = False) -> dict:
    """Converts ``checkpoint`` for ``model_name`` and writes it to ``output``.

    The class count comes from ``num_classes``, else the checkpoint's ``num_classes`` entry,
    else the classifier's shape. ``allow_pickle``: see :func:`read_torch_checkpoint`.
    Returns the metadata written.
    """
    state_dict, info = read_torch_checkpoint(checkpoint, allow_pickle)
    if num_classes is None:
        num_classes = info.get("num_classes")
    if num_classes is None:
        classifier = [k for k in state_dict if path_is_classifier(k) and k.endswith("weight")]
        if not classifier:
            raise ValueError(f"{checkpoint!r} has no classifier ('fc.weight' or "
                             "'classifier.weight'); pass --num_classes")
        num_classes = int(state_dict[classifier[0]].shape[0])
    model = models.get_model(model_name, int(num_classes))
    variables = flax_variables_from_torch(model, state_dict, model_name)
    metadata = {
        "model": model_name, "num_classes": int(num_classes), "source_dataset": source_dataset,
        "converted_from": os.path.basename(checkpoint), "sha256": sha256_of(checkpoint),
        "recorded": {k: _json_safe(v) for k, v in info.items() if _json_safe(v) is not None},
    }
    save_converted(output, variables, metadata)
    return metadata


def save_converted(directory: str, variables: Mapping[str, Any], metadata: dict) -> None:
    """Writes variables and metadata as one orbax checkpoint (directory must not exist)."""
    import orbax.checkpoint as ocp
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    checkpointer.save(os.path.abspath(directory), args=ocp.args.Composite(
        variables=ocp.args.StandardSave(jax.tree.map(np.asarray, dict(variables))),
        metadata=ocp.args.JsonSave(metadata)))


def read_metadata(directory: str) -> dict:
    """The metadata of a converted network (model, num_classes, optional model_overrides,
    taps, candidates, and where it came from)."""
    import orbax.checkpoint as ocp
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no converted checkpoint at {directory!r}; create it with "
                                "python -m l2t_jax.convert")
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    return checkpointer.restore(directory, args=ocp.args.Composite(
        metadata=ocp.args.JsonRestore()))["metadata"]


def load_converted(directory: str, expect_model: Optional[str] = None,
                   expect_num_classes: Optional[int] = None):
    """Reads a converted network: returns (model, variables, metadata).

    ``metadata['model_overrides']`` (optional) holds get_model overrides such as ``widths``;
    ``metadata['taps']`` and ``['candidates']`` (optional) the network's tap names.

    Raises ValueError when the checkpoint is for another model or class count than expected.
    """
    import orbax.checkpoint as ocp
    directory = os.path.abspath(directory)
    metadata = read_metadata(directory)
    if expect_model is not None and metadata["model"] != expect_model:
        raise ValueError(f"{directory!r} holds a {metadata['model']}, the config asks for "
                         f"{expect_model}")
    if expect_num_classes is not None and metadata["num_classes"] != expect_num_classes:
        raise ValueError(f"{directory!r} has {metadata['num_classes']} classes, the config "
                         f"asks for {expect_num_classes}")
    model = models.get_model(metadata["model"], metadata["num_classes"],
                             taps=metadata.get("taps"), candidates=metadata.get("candidates"),
                             **metadata.get("model_overrides", {}))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32),
                            model.abstract_variables())
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    variables = checkpointer.restore(directory, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(abstract)))["variables"]
    return model, variables, metadata


def main(argv=None) -> None:
    import argparse
    parser = argparse.ArgumentParser(
        prog="python -m l2t_jax.convert",
        description="Convert a PyTorch checkpoint (reference layout) to a Flax checkpoint.")
    parser.add_argument("--model", required=True, choices=models.MODEL_NAMES)
    parser.add_argument("--checkpoint", required=True, help="the .pth / .pth.tar file")
    parser.add_argument("--output", required=True, help="directory to write (must not exist)")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="default: the checkpoint's num_classes, else the classifier size")
    parser.add_argument("--source_dataset", default=None,
                        help="recorded in the metadata, e.g. tinyimagenet or imagenet")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="read a file that needs full unpickling (it can run code: only "
                             "for files you trust); by default only tensors and numbers")
    args = parser.parse_args(argv)
    if os.path.exists(args.output):
        parser.error(f"--output {args.output!r} exists; choose a new directory")
    try:
        metadata = convert_checkpoint(args.model, args.checkpoint, args.output,
                                      args.num_classes, args.source_dataset,
                                      args.allow_pickle)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(metadata, indent=1))


if __name__ == "__main__":
    main()

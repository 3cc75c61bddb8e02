"""Converted networks on disk: reading PyTorch checkpoints, and the converted format.

A converted network is an orbax checkpoint with two items: ``variables`` =
``{'params', 'batch_stats'}`` and a JSON ``metadata`` (model name, class count, source data
set, where it came from, and optionally the model's overrides and taps). Sources are read
in this format (``config.source_checkpoint``); :func:`convert_checkpoint` writes it from a
``.pth`` file (through :mod:`l2t_jax.models.torch_layout`), and a training run with
``config.export_source`` writes its best target in it.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from l2t_jax import models
from l2t_jax.models import torch_layout


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


class NotACheckpointError(ValueError):
    """A file that is not a PyTorch checkpoint, or one cut short or damaged; the message
    names the file and its size."""


# What torch.save writes: a zip archive (since torch 1.6), or before that a pickle, whose
# first bytes are the PROTO opcode and a protocol number (torch used 2).
_PICKLE_PROTOCOLS = {bytes([0x80, protocol]) for protocol in range(2, 6)}


def _is_torch_file(path: str) -> bool:
    """Whether ``path`` has the form of a file torch.save wrote (its first bytes only)."""
    import zipfile
    with open(path, "rb") as f:
        head = f.read(2)
    return head in _PICKLE_PROTOCOLS or zipfile.is_zipfile(path)


def read_torch_checkpoint(path: str, allow_pickle: bool = False) -> tuple[dict, dict]:
    """Reads a ``.pth`` / ``.pth.tar`` file: returns (state_dict, other top-level entries).

    Accepts a bare state dict (torchvision's ``resnet34-*.pth``) or the reference's
    ``{'state_dict': ..., 'num_classes': ..., 'best': ...}``. The file is read with
    ``torch.load(weights_only=True)``, which reads tensors, numbers and containers but runs
    nothing; both released files read that way.

    Raises:
      NotACheckpointError: the file is not one torch.save wrote, or torch cannot read it
        (cut short, damaged).
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
    size = f"{os.path.getsize(path):,} bytes"
    if not _is_torch_file(path):
        # torch's own error for such a file would suggest full unpickling (it reports any
        # unreadable file as one the safe reader refused).
        raise NotACheckpointError(
            f"{path} is not a PyTorch checkpoint ({size}; torch.save writes a zip archive "
            "or a pickle, and this file starts as neither): check that it is the .pth file "
            "and that its download finished")
    import pickle
    try:
        payload = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        if not allow_pickle and str(e).startswith("Weights only load failed"):
            # torch's reason is one line inside several of advice: "Unsupported global:
            # GLOBAL argparse.Namespace was not an allowed global by default ...".
            reason = re.search(r"WeightsUnpickler error: (.+?)(?: was not an allowed|\n|$)",
                               str(e))
            raise UntrustedCheckpointError(
                f"{path} holds more than tensors and numbers"
                f"{f' ({reason.group(1)[:200]})' if reason else ''}; reading it means full "
                "unpickling, which can run any code the file contains, so it was refused. "
                "If you trust the file, convert it with python -m l2t_jax.convert "
                "--allow_pickle ...") from None
        raise _damaged(path, size, e) from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise _damaged(path, size, e) from None
    if isinstance(payload, dict) and "state_dict" in payload:
        info = {k: v for k, v in payload.items() if k != "state_dict"}
        return dict(payload["state_dict"]), info
    if isinstance(payload, dict) and all(hasattr(v, "shape") for v in payload.values()):
        return dict(payload), {}
    raise ValueError(f"{path!r} holds neither a state dict nor a dict with 'state_dict'")


def _damaged(path: str, size: str, error: Exception) -> NotACheckpointError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return NotACheckpointError(
        f"{path} ({size}) starts as a PyTorch checkpoint but cannot be read "
        f"({type(error).__name__}: {first_line[:200]}): it is cut short or damaged; "
        "download or copy it again")


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
        classifier = [k for k in state_dict if torch_layout.path_is_classifier(k) and k.endswith("weight")]
        if not classifier:
            raise ValueError(f"{checkpoint!r} has no classifier ('fc.weight' or "
                             "'classifier.weight'); pass --num_classes")
        num_classes = int(state_dict[classifier[0]].shape[0])
    model = models.get_model(model_name, int(num_classes))
    variables = torch_layout.flax_variables_from_torch(model, state_dict, model_name)
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

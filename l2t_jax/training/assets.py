"""The authors' released files: where to find them, how to check them, the converted cache.

``released:resnet32`` in a config names the authors' TinyImageNet ResNet-32 and
``released:resnet34-imagenet`` torchvision's ImageNet ResNet-34. Each is looked up in
``$L2T_RELEASE_DIR`` (e.g. a copy of the authors' release: ``tinyimagenet-200-resnet32.pth.tar``
and ``splits/``; put ``resnet34-b627a593.pth`` beside it), checked against its sha256,
converted to Flax once (:func:`l2t_jax.training.converted.convert_checkpoint`, needs
torch) and cached under ``$L2T_CACHE_DIR`` (default ``~/.cache/l2t_jax``).
"""
from __future__ import annotations

import os


RELEASED = {
    "resnet32": {
        "file": "tinyimagenet-200-resnet32.pth.tar",
        "url": "https://github.com/alinlab/L2T-ww/raw/master/logs/tinyimagenet-200-resnet32/"
               "0/model_best.pth.tar",
        "sha256": "049f81f8bea8504e90818d6c614f15c485ac2d891348330b433110e161f66d68",
        "model": "resnet32", "source_dataset": "tinyimagenet",
    },
    # torchvision's ImageNet weights; its file name carries the first 8 hex digits of the
    # sha256, which is what is checked.
    "resnet34-imagenet": {
        "file": "resnet34-b627a593.pth",
        "url": "https://download.pytorch.org/models/resnet34-b627a593.pth",
        "sha256": "b627a593",
        "model": "resnet34", "source_dataset": "imagenet",
    },
}


def release_dir() -> str:
    return os.environ.get("L2T_RELEASE_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "l2t_jax", "release"))


def cache_dir() -> str:
    return os.environ.get("L2T_CACHE_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "l2t_jax"))


def released_source(name: str) -> str:
    """Directory of the converted released network ``name``; converts it on first use."""
    if name not in RELEASED:
        raise ValueError(f"unknown released network {name!r}; known: {', '.join(RELEASED)}")
    entry = RELEASED[name]
    directory = os.path.join(cache_dir(), "converted", f"{name}-{entry['sha256'][:8]}")
    if os.path.isdir(directory):
        return directory
    path = os.path.join(release_dir(), entry["file"])
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"the released {name} is not at {path}. Download it and point L2T_RELEASE_DIR at "
            f"its directory:\n  curl -L -o {path} {entry['url']}\n  expected sha256 "
            f"{entry['sha256']}")
    from l2t_jax.training import converted   # JAX (and torch) only when converting
    digest = converted.sha256_of(path)
    if not digest.startswith(entry["sha256"]):
        raise ValueError(f"{path} has sha256 {digest}, expected {entry['sha256']}")
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    converted.convert_checkpoint(entry["model"], path, directory,
                                 source_dataset=entry["source_dataset"])
    return directory


def resolve_source_checkpoint(spec: str) -> str:
    """A config's source checkpoint as a converted directory: ``released:<name>`` through
    :func:`released_source`, anything else taken as a directory written by convert."""
    if spec.startswith("released:"):
        return released_source(spec.split(":", 1)[1])
    return spec

"""The experiment configs, shipped inside the package so that every install can train.

Each module has ``get_config(variant=None)`` (ml_collections); ``default`` lists every key.
The repository's ``configs/*.py`` re-export these files for ``--config=configs/NAME.py``;
:func:`resolve` lets ``--config`` name a shipped config from anywhere (``cifar100``,
``cifar100.py:tiny``), which is how a wheel or ``pip install git+...`` user runs them.

Nothing here imports JAX.
"""
from __future__ import annotations

import os

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    """The shipped experiment configs, e.g. ``['cifar100', 'cub200', ...]``."""
    return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                  if f.endswith(".py") and not f.startswith("_"))


def resolve(spec: str) -> str:
    """A ``--config`` value -> the path ml_collections loads, keeping ``:variant``.

    An existing file is taken as given. Otherwise the part before the colon names a shipped
    config, with or without ``.py`` and ``configs/`` (``cifar100``, ``configs/cifar100.py``).

    Raises:
      FileNotFoundError: neither a file nor a shipped config; the message lists them.
    """
    path, colon, variant = spec.partition(":")
    if os.path.isfile(path):
        return spec
    name = os.path.basename(path)
    name = name[:-3] if name.endswith(".py") else name
    if name in names() and os.path.normpath(os.path.dirname(path)) in (".", "configs"):
        return os.path.join(CONFIG_DIR, f"{name}.py") + colon + variant
    if name in names():
        raise FileNotFoundError(f"--config={spec}: no file {path!r}; the shipped config "
                                f"{name!r} is --config={name}{colon}{variant}")
    raise FileNotFoundError(f"--config={spec}: no file {path!r}, and {name!r} is not a "
                            f"shipped config; shipped: {', '.join(names())}")

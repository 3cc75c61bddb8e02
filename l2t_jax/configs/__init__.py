"""The experiment configs, shipped inside the package so that every install can train.

Each module has ``get_config(variant=None)`` (ml_collections) and ``VARIANTS``, the presets
its ``variant`` takes (several join with commas); ``default`` lists every key. The
repository's ``configs/*.py`` re-export these files for ``--config=configs/NAME.py``;
:func:`resolve` lets ``--config`` name a shipped config from anywhere (``cifar100``,
``cifar100.py:tiny``), which is how a wheel or ``pip install git+...`` user runs them;
:func:`load` builds the config a ``--config`` value names, as the command line does.

Nothing here imports JAX.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import types

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


class ConfigFileError(ValueError):
    """A config file that cannot give a config (no ``get_config``); the message says what
    one needs."""


def names() -> list[str]:
    """The shipped experiment configs, e.g. ``['cifar100', 'cub200', ...]``."""
    return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                  if f.endswith(".py") and not f.startswith("_"))


def module(name: str) -> types.ModuleType:
    """The shipped config ``name``'s module (``l2t_jax.configs.<name>``)."""
    if name not in names():
        raise ValueError(f"{name!r} is not a shipped config; shipped: {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}")


def variants(name: str) -> tuple[str, ...] | None:
    """The variants the shipped config ``name`` takes (its ``VARIANTS``), or None where it
    does not declare them."""
    found = getattr(module(name), "VARIANTS", None)
    return None if found is None else tuple(found)


def summary(name: str) -> str:
    """The first line of the shipped config ``name``'s docstring: what it trains."""
    doc = (module(name).__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


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


def load(spec: str):
    """The config a ``--config`` value names (:func:`resolve`), built as the command line
    builds it: the file's ``get_config(variant)``, or ``get_config()`` without a variant.

    Raises:
      FileNotFoundError: as :func:`resolve`.
      ConfigFileError: the file defines no ``get_config``.
      ValueError: the config's own (e.g. an unknown variant).
    """
    path, _, variant = resolve(spec).partition(":")
    file_spec = importlib.util.spec_from_file_location("l2t_jax_config_file", path)
    loaded = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(loaded)
    if not callable(getattr(loaded, "get_config", None)):
        raise ConfigFileError(
            f"{path} defines no get_config(): a config file's get_config(variant=None) "
            "returns an ml_collections.ConfigDict (see l2t_jax/configs/cifar100.py)")
    return loaded.get_config(variant) if variant else loaded.get_config()

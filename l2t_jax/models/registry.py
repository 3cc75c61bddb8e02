"""The model registry: one record per family of networks, and :func:`get_model`.

A family (:class:`ModelFamily`) is everything the package knows about one Linen class:
its registry names and their constructor attributes, the attributes of its ``NAME:tiny``
variants, how its Flax submodule names map to PyTorch state-dict keys (read by
:mod:`l2t_jax.models.torch_layout` for conversion and export), whose PyTorch module the
exported keys fit, how people name it, and how to recognise its PyTorch checkpoints. Each
family's module registers its record (:func:`register_family`); adding a family is its
module plus its import in ``l2t_jax/models/__init__.py`` (or one :func:`register_family`
call from a user's own code).

:func:`get_model` builds a registered name (``resnet32``), its tiny variant
(``resnet32:tiny``: the same layout at a few channels per layer, for tests and quick runs),
or any Linen classifier by import path (``package.module:Class``) as a
:class:`~l2t_jax.models.taps.TappedNetwork`. Every model's ``__call__(images, train)``
returns logits from NHWC images; each declares its taps in the paper's index order
(``default_taps()``) and the ones the matching schemes pick from
(``default_candidates()``).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn

from l2t_jax.models import convolution
from l2t_jax.models.taps import TappedNetwork, tapped

TINY_SUFFIX = ":tiny"


def same_name(module: nn.Module, name: str) -> str:
    """The default PyTorch module name of a Flax submodule: its own name."""
    return name


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What the package knows about one family of networks.

    Attributes:
      module: the Linen class; ``module(num_classes=..., **attributes)`` builds a network
        whose ``__call__(images, train)`` returns logits and which declares
        ``default_taps()``.
      variants: registry name -> constructor attributes (``{"resnet32": {"depth": 32}}``).
      tiny: constructor attributes of every variant's ``NAME:tiny``: a few channels per
        layer, keeping every structural case of the full network (a shortcut convolution
        where the full one has one, a residual where it has one).
      display_names: registry name -> how tables and messages name it (``"ResNet-32"``);
        a name not listed is shown as it is.
      torch_module_name: ``(module, flax_name) -> PyTorch name`` for one Flax submodule
        name of a built network (``"blocks2_0" -> "blocks2.0"``); one-to-one, since export
        inverts it. The default keeps the name.
      torch_layout: ``module -> words`` saying whose PyTorch module the exported keys fit
        (``"torchvision.models.resnet18 ..."``); None: "this package's own layout".
      recognize: ``{PyTorch key: shape} -> registry name or description`` when a state
        dict looks like this family, else None (for error messages).
    """

    module: type
    variants: Mapping[str, Mapping[str, Any]]
    tiny: Mapping[str, Any]
    display_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    torch_module_name: Callable[[nn.Module, str], str] = same_name
    torch_layout: Optional[Callable[[nn.Module], str]] = None
    recognize: Optional[Callable[[Mapping[str, tuple]], Optional[str]]] = None


_FAMILIES: list[ModelFamily] = []
_BY_NAME: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Adds a family; its names become valid ``config.source_model`` / ``target_model``
    values (and ``NAME:tiny``). A name another family already has raises ValueError."""
    taken = sorted(n for n in family.variants if n in _BY_NAME and _BY_NAME[n] != family)
    if taken:
        raise ValueError(f"model names already registered by another family: {taken}")
    if any(TINY_SUFFIX in n or ":" in n for n in family.variants):
        raise ValueError(f"a registry name has no colon: {list(family.variants)}")
    if family not in _FAMILIES:
        _FAMILIES.append(family)
    for name in family.variants:
        _BY_NAME[name] = family
    return family


def families() -> tuple[ModelFamily, ...]:
    """Every registered family, in registration order."""
    return tuple(_FAMILIES)


def model_names() -> tuple[str, ...]:
    """Every registry name, e.g. ``('resnet20', 'resnet32', ..., 'mobilenet_v2')``."""
    return tuple(_BY_NAME)


def family_of(model: str | nn.Module) -> Optional[ModelFamily]:
    """The family of a registry name (``NAME:tiny`` too) or of a built Linen module; None
    for a model outside the registry (an import path)."""
    if isinstance(model, str):
        return _BY_NAME.get(base_name(model))
    for family in _FAMILIES:
        if type(model) is family.module:
            return family
    return None


def base_name(name: str) -> str:
    """``"resnet32:tiny" -> "resnet32"``; other names unchanged."""
    return name[:-len(TINY_SUFFIX)] if name.endswith(TINY_SUFFIX) else name


def display_name(name: str) -> str:
    """How tables name a model: ``"resnet32" -> "ResNet-32"`` (the name itself when its
    family gives none)."""
    family = family_of(name)
    return family.display_names.get(base_name(name), name) if family else name


def tiny_overrides(name: str) -> dict:
    """The constructor attributes of ``NAME:tiny``."""
    family = family_of(name)
    if family is None:
        raise ValueError(f"model {name!r} is not registered, so it has no {TINY_SUFFIX} "
                         f"variant; registered: {', '.join(model_names())}")
    return dict(family.tiny)


def is_import_path(name: str) -> bool:
    """``package.module:Attribute`` names a model outside the registry."""
    return (isinstance(name, str) and name.count(":") == 1 and all(name.split(":"))
            and not name.endswith(TINY_SUFFIX))


def is_model_name(name: str) -> bool:
    """A registry name, its ``:tiny`` variant, or an import path."""
    return family_of(name) is not None or is_import_path(name)


def _factory(name: str) -> Callable[..., nn.Module]:
    family = family_of(name)
    if family is not None:
        attributes = dict(family.variants[base_name(name)])
        if name.endswith(TINY_SUFFIX):
            attributes.update(family.tiny)
        return lambda **kw: family.module(**{**attributes, **kw})
    if is_import_path(name):
        module_name, attribute = name.split(":")
        try:
            return getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import model {name!r}: {e}") from None
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(model_names())} "
                     f"(each also as NAME{TINY_SUFFIX}), or an import path "
                     "package.module:Class")


def get_model(name: str, num_classes: int, *, taps: str | Sequence[str] | None = None,
              candidates: str | Sequence[str] | None = None, probe_size: int = 64,
              **overrides) -> TappedNetwork:
    """Builds a network with its taps.

    Args:
      name: a registry name (:func:`model_names`: ``resnet20/32/56`` CIFAR-style,
        ``resnet18/34/50/101`` torchvision-style, ``vgg9_bn``, ``wrn{depth}_{k}``,
        ``mobilenet_v2``), one of those with ``:tiny``, or an import path
        ``package.module:Class`` of any Linen module with a ``num_classes`` attribute whose
        ``__call__(images, train)`` returns logits.
      num_classes: classifier outputs.
      taps, candidates: tap names (:func:`l2t_jax.models.taps.tapped`); None takes the
        model's own.
      probe_size: input side at which tap strides are read (the data's image size).
      **overrides: module attributes, e.g. ``widths=(4, 8, 16)`` or ``conv_impl='matmul'``
        (dropped for a model without that attribute); they win over ``:tiny``'s.

    Returns:
      A :class:`~l2t_jax.models.taps.TappedNetwork`; ``feature_taps()`` lists its taps
      (channels, stride).
    """
    factory = _factory(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if "conv_impl" in overrides:   # when built, not when first traced
        convolution.check_impl(overrides["conv_impl"])
        family = family_of(name)
        fields = getattr(family.module if family else factory, "__dataclass_fields__", None)
        if fields is not None and "conv_impl" not in fields:
            overrides.pop("conv_impl")
    # Lists (from JSON metadata or a config) as tuples: a network is hashable, part of the
    # static description of the step.
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    module = factory(num_classes=num_classes, **overrides)
    if not isinstance(module, nn.Module):
        raise ValueError(f"model {name!r} built a {type(module).__name__}, not a Linen module")
    return tapped(module, taps, candidates, name=name, probe_size=probe_size)

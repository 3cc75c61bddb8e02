"""Feature taps by name: any Flax Linen classifier as a source or a target network.

This module owns how the transfer losses read features from a network. A network is a
Linen module whose ``__call__(images, train)`` returns logits (B, num_classes) from NHWC
images; its *taps* are named points whose outputs the losses read, in a fixed order (the
indices that pair lists such as ``"4-0,9-1"`` refer to). A tap name is either

- the path of a submodule, ``"blocks2_3"`` or ``"layer4_1/conv2"``: that submodule's
  ``__call__`` output, read with Flax's ``capture_intermediates``; or
- the name of a value the model sows into its ``intermediates`` collection
  (``self.sow("intermediates", "stem", x)``), for points that are no module's output: the
  ImageNet ResNets' stem after its ReLU, VGG's max-pool inputs.

A model may declare its taps (``default_taps()``, and ``default_candidates()``, the taps the
matching schemes pick from); otherwise the config names them. A tap's channels and stride
come from ``jax.eval_shape`` at ``probe_size`` px, not from a table. Reading the taps adds
nothing to the computation (the tapped arrays are the ones the forward pass computes
anyway), so the training step's numbers do not depend on how features are exposed.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Tap:
    """One tapped feature map: channel count and stride relative to the input image."""

    channels: int
    stride: int


def _names(spec: str | Sequence[str] | None) -> Optional[tuple[str, ...]]:
    """``"a,b"`` or ``("a", "b")`` -> ``("a", "b")``; None or empty -> None."""
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = [part.strip() for part in spec.split(",")]
    names = tuple(str(name) for name in spec if str(name))
    return names or None


@dataclasses.dataclass(frozen=True)
class TappedNetwork:
    """A Linen classifier with named taps: what the transfer treats as a source or target.

    Build it with :func:`tapped` (or :func:`l2t_jax.models.get_model`). Hashable, so it can
    be part of the static :class:`~l2t_jax.transfer.bilevel.Transfer`.

    Attributes:
      module: the Linen module; ``__call__(images, train)`` returns logits.
      taps: tap names in index order (module paths joined by ``/``, or sown names).
      candidates: indices into ``taps`` that the matching schemes pick from.
      name: what messages and checkpoints call the network (a registry name).
      probe_size: input side (px) at which taps' strides and variable shapes are read.
      parts: for several sources read as one (:func:`combine`), the networks combined.
    """

    module: nn.Module
    taps: tuple[str, ...]
    candidates: tuple[int, ...]
    name: str
    probe_size: int = 64
    parts: tuple["TappedNetwork", ...] = ()

    def init(self, rng: jax.Array, images: jax.Array | jax.ShapeDtypeStruct,
             train: bool = False) -> dict:
        """The module's variables (``{'params', 'batch_stats'}``; sown values dropped).

        ``images`` may be a ``jax.ShapeDtypeStruct``: then Linen's ``lazy_init`` computes
        only the variables, not the forward pass (the same numbers, op by op, in a
        fraction of the time: no executable per layer of the forward)."""
        if isinstance(images, jax.ShapeDtypeStruct):
            variables = self.module.lazy_init(rng, images, train=train)
        else:
            variables = self.module.init(rng, images, train=train)
        return {k: v for k, v in variables.items() if k != "intermediates"}

    def apply(self, variables: PyTree, images: jax.Array, *, train: bool,
              mutable: Sequence[str] | bool = False):
        """Forward pass returning ``(logits, features)``, features a tuple of (B, H, W, C)
        maps in tap order; with ``mutable`` collections, ``((logits, features), updates)``
        as Linen's ``apply`` returns them."""
        collections = list(mutable) if mutable else []
        logits, state = self.module.apply(
            variables, images, train=train, mutable=[*collections, "intermediates"],
            capture_intermediates=functools.partial(_is_tapped, frozenset(self.taps)))
        state = dict(state)
        features = read_taps(state.pop("intermediates", {}), self.taps, self.name)
        return ((logits, features), state) if mutable else (logits, features)

    def abstract_variables(self) -> dict:
        """Shapes and dtypes of the variables, no compute."""
        return _shapes(self)[2]

    def feature_taps(self) -> tuple[Tap, ...]:
        """Channels and stride of each tap, read with ``jax.eval_shape``."""
        return _shapes(self)[0]

    def candidate_taps(self) -> tuple[int, ...]:
        return self.candidates

    @property
    def num_classes(self) -> int:
        """Classifier outputs (of the first part, for several sources: what LwF distils)."""
        return _shapes(self)[1]


def _is_tapped(names: frozenset, module: nn.Module, method_name: str) -> bool:
    """``capture_intermediates`` filter: the ``__call__`` output of a tapped submodule."""
    return method_name == "__call__" and "/".join(module.path) in names


def read_taps(intermediates: Mapping, names: Sequence[str], network: str = "the network"
              ) -> tuple[jax.Array, ...]:
    """The tapped maps out of an ``intermediates`` collection, in the order of ``names``.

    Raises:
      ValueError: a name that is neither a captured module output nor a sown value, a module
        called more than once per forward pass, or a tap that is not a (B, H, W, C) map.
    """
    features = []
    for name in names:
        node = intermediates
        for part in name.split("/"):
            if not isinstance(node, Mapping) or part not in node:
                raise ValueError(f"tap {name!r} is neither a submodule nor a sown value of "
                                 f"{network}")
            node = node[part]
        if isinstance(node, Mapping):        # a submodule: its captured outputs
            if "__call__" not in node:
                raise ValueError(f"tap {name!r} of {network} names a module whose output "
                                 "was not captured")
            node = node["__call__"]
        if len(node) != 1:
            raise ValueError(f"tap {name!r} of {network} holds {len(node)} values (the "
                             "module runs more than once per forward pass); tap one of its "
                             "calls by a submodule or a sown value instead")
        value = node[0]
        if getattr(value, "ndim", None) != 4:
            raise ValueError(f"tap {name!r} of {network} is not a (B, H, W, C) feature map "
                             f"(got {getattr(value, 'shape', type(value).__name__)})")
        features.append(value)
    return tuple(features)


def available_taps(module: nn.Module, probe_size: int = 64) -> dict[str, tuple[int, ...]]:
    """Every name a tap could use: submodule paths and sown values -> (B, H, W, C) shapes
    of 4-d outputs at ``probe_size`` px (for messages and for choosing taps)."""
    images = jax.ShapeDtypeStruct((1, probe_size, probe_size, 3), jnp.float32)

    def intermediates(images):
        variables = module.init(jax.random.key(0), images, train=False)
        variables = {k: v for k, v in variables.items() if k != "intermediates"}
        _, state = module.apply(variables, images, train=False, mutable=["intermediates"],
                                capture_intermediates=True)
        return state["intermediates"]

    found = {}

    def walk(node, path):
        for key, value in node.items():
            if key == "__call__":
                if path and len(value) == 1 and getattr(value[0], "ndim", None) == 4:
                    found["/".join(path)] = tuple(value[0].shape)
            elif isinstance(value, Mapping):
                walk(value, (*path, key))
            elif len(value) == 1 and getattr(value[0], "ndim", None) == 4:
                found["/".join((*path, key))] = tuple(value[0].shape)
    walk(jax.eval_shape(intermediates, images), ())
    return found


@functools.lru_cache(maxsize=None)
def _shapes(network: TappedNetwork):
    """(taps, num_classes, abstract variables) of a network, from one ``eval_shape``."""
    images = jax.ShapeDtypeStruct((1, network.probe_size, network.probe_size, 3), jnp.float32)

    def forward(images):
        variables = network.init(jax.random.key(0), images)
        return network.apply(variables, images, train=False), variables
    try:
        (logits, features), variables = jax.eval_shape(forward, images)
    except ValueError as e:
        if "tap " not in str(e):
            raise
        names = list(available_taps(network.module, network.probe_size))
        top = [n for n in names if "/" not in n]
        nested = [n for n in names if "/" in n]
        raise ValueError(f"{e}. Taps {network.name} can name (4-d outputs): "
                         f"{', '.join(top) or 'none'}"
                         + (f", and {len(nested)} nested paths such as {nested[0]}"
                            if nested else "")) from None
    taps = tuple(Tap(channels=f.shape[-1], stride=max(1, round(network.probe_size /
                                                                 f.shape[1])))
                 for f in features)
    return taps, int(logits.shape[-1]), variables


def tapped(module: nn.Module, taps: str | Sequence[str] | None = None,
           candidates: str | Sequence[str] | None = None, name: Optional[str] = None,
           probe_size: int = 64) -> TappedNetwork:
    """A Linen classifier with its taps.

    Args:
      module: ``__call__(images, train)`` returns logits.
      taps: tap names in index order (``"a,b"`` or a sequence); None takes the module's
        ``default_taps()``, or none when it declares none (enough for a network that
        nothing is transferred to or from: scratch, pre-training).
      candidates: the taps the matching schemes pick from (names among ``taps``); None takes
        the module's ``default_candidates()`` when its own taps are used, else every tap.
      name: for messages and checkpoints (default: the module's class name).
      probe_size: input side at which tap strides are read (the data's image size).

    Raises:
      ValueError: a repeated tap, a candidate that is no tap.
    """
    name = name or type(module).__name__
    tap_names, candidate_names = _names(taps), _names(candidates)
    if tap_names is None:
        tap_names = tuple(module.default_taps()) if hasattr(module, "default_taps") else ()
        if candidate_names is None and hasattr(module, "default_candidates"):
            candidate_names = tuple(module.default_candidates())
    if len(set(tap_names)) != len(tap_names):
        raise ValueError(f"the taps of {name} repeat a name: {list(tap_names)}")
    candidate_names = candidate_names or tap_names
    unknown = [c for c in candidate_names if c not in tap_names]
    if unknown:
        raise ValueError(f"candidate taps {unknown} of {name} are not among its taps "
                         f"{list(tap_names)}")
    return TappedNetwork(module=module, taps=tap_names,
                         candidates=tuple(tap_names.index(c) for c in candidate_names),
                         name=name, probe_size=int(probe_size))


class MultiSource(nn.Module):
    """Several frozen source modules run as one; returns the first one's logits (what LwF
    distils). Variables are ``{'params': {'sources_0': ..., 'sources_1': ...}, ...}``."""

    sources: Sequence[nn.Module]

    def __call__(self, images: jax.Array, train: bool):
        return [source(images, train) for source in self.sources][0]


def combine(networks: Sequence[TappedNetwork]) -> TappedNetwork:
    """Several source networks read as one: their taps concatenate (``sources_i/<tap>``).

    Multi-source transfer then needs nothing new downstream: a pair's source index runs over
    the concatenated taps, so each source has its own pairs, matching heads and
    meta-network heads, and the matching losses of all sources add up.
    """
    networks = tuple(networks)
    taps, candidates = [], []
    for i, network in enumerate(networks):
        candidates += [len(taps) + c for c in network.candidates]
        taps += [f"sources_{i}/{t}" for t in network.taps]
    return TappedNetwork(module=MultiSource(tuple(n.module for n in networks)),
                         taps=tuple(taps), candidates=tuple(candidates),
                         name="+".join(n.name for n in networks),
                         probe_size=max(n.probe_size for n in networks), parts=networks)

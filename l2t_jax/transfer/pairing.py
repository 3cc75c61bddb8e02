"""Source/target layer pairs: parsing, the matching schemes, validation.

A pair ``(m, n)`` matches source tap m to target tap n (indices into each network's taps,
:mod:`l2t_jax.models.taps`). Pair lists are written as in the authors' code,
``"4-0,4-1,...,14-4"``, by tap name (``"layer3-blocks4_2"``), or named by a matching scheme
(docs/semantics.md), resolved over each network's candidate taps:

- ``single``: the last source candidate with the last target candidate (14-4 for ResNet-32
  -> VGG-9, 4-4 for ResNet-34 -> ResNet-18).
- ``one_to_one``: maps of the same depth, i.e. the same output stride: each source
  candidate with the target candidate of its stride (4-0, 9-1, 14-2; 1-1, 2-2, 3-3, 4-4).
- ``all_to_all``: every source candidate with every target candidate (the authors' default
  lists, :mod:`l2t_jax.transfer.pair_lists`: 15 and 16 pairs).

Methods that attend over taps rather than weigh given pairs (AFD, SemCKD) read the pairs as
a grid of source taps x target taps (:func:`tap_grid`).
"""
from __future__ import annotations

from typing import Sequence

from l2t_jax.models.taps import Tap, TappedNetwork
from l2t_jax.transfer.pair_lists import SCHEMES

Pair = tuple[int, int]


def parse_pairs(spec: str | Sequence[Sequence[int]], source_taps: Sequence[str] = (),
                target_taps: Sequence[str] = ()) -> tuple[Pair, ...]:
    """Parses ``"m-n,m-n,..."`` (or a sequence of (m, n)) into a tuple of int pairs; m and n
    are indices, or tap names among ``source_taps`` / ``target_taps``."""
    def index(token: str, names: Sequence[str], item: str) -> int:
        if token.isdigit():
            return int(token)
        if token in names:
            return list(names).index(token)
        raise ValueError(f"bad pair {item!r} in {spec!r}: write pairs as 'source-target' "
                         "indices or tap names, e.g. '4-0,9-1'"
                         + (f"; {token!r} is no tap name" if names else ""))

    if isinstance(spec, str):
        pairs = []
        for item in spec.split(","):
            parts = [p.strip() for p in item.strip().split("-")]
            if len(parts) != 2:
                raise ValueError(f"bad pair {item!r} in {spec!r}: write pairs as "
                                 "'source-target' indices, e.g. '4-0,9-1'")
            pairs.append((index(parts[0], source_taps, item),
                          index(parts[1], target_taps, item)))
    else:
        pairs = [tuple(int(i) for i in p) for p in spec]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"pairs must be (source, target) index pairs, got {spec!r}")
    if not pairs:
        raise ValueError("the pair list is empty")
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"the pair list {spec!r} repeats a pair")
    return tuple(pairs)


def _no_taps(name: str, role: str) -> str:
    return (f"{name} declares no taps (default_taps()); name the submodules or sown values "
            f"whose outputs are matched, e.g. config.{role}_taps='stage1,stage2' "
            "(l2t_jax.models.available_taps lists them)")


def resolve_pairs(spec: str | Sequence[Sequence[int]], source_model: TappedNetwork,
                  target_model: TappedNetwork) -> tuple[Pair, ...]:
    """A scheme name (:data:`SCHEMES`) or an explicit list -> validated pairs.

    ``source_model`` and ``target_model`` are networks from :func:`l2t_jax.models.get_model`;
    schemes use their ``candidate_taps()`` and ``feature_taps()`` strides.
    """
    for network, role in ((source_model, "source"), (target_model, "target")):
        if not network.taps:
            raise ValueError(_no_taps(network.name, role))
    source_taps, target_taps = source_model.feature_taps(), target_model.feature_taps()
    source_name, target_name = source_model.name, target_model.name
    if isinstance(spec, str) and spec in SCHEMES:
        sources, targets = source_model.candidate_taps(), target_model.candidate_taps()
        if spec == "single":
            pairs = ((sources[-1], targets[-1]),)
        elif spec == "all_to_all":
            pairs = tuple((m, n) for m in sources for n in targets)
        else:
            by_stride = {target_taps[n].stride: n for n in targets}
            pairs = tuple((m, by_stride[source_taps[m].stride]) for m in sources
                          if source_taps[m].stride in by_stride)
            if not pairs:
                raise ValueError(
                    "one_to_one: no source candidate tap has the stride of a target "
                    f"candidate (source strides {[source_taps[m].stride for m in sources]}, "
                    f"target strides {[target_taps[n].stride for n in targets]})")
    else:
        names = set(source_model.taps) | set(target_model.taps)
        tokens = {t.strip() for item in spec.split(",") for t in item.split("-")} if isinstance(
            spec, str) else set()
        if isinstance(spec, str) and not any(t.isdigit() or t in names for t in tokens):
            raise ValueError(f"unknown matching scheme {spec!r}; valid: "
                             f"{', '.join(SCHEMES)} or an explicit list such as '4-0,9-1'")
        pairs = parse_pairs(spec, source_model.taps, target_model.taps)
    validate_pairs(pairs, source_taps, target_taps, source_name, target_name)
    return pairs


def validate_pairs(pairs: Sequence[Pair], source_taps: Sequence[Tap],
                   target_taps: Sequence[Tap], source_name: str = "source",
                   target_name: str = "target") -> None:
    """Raises ValueError naming the first pair whose index a network does not expose."""
    for taps, name, role in ((source_taps, source_name, "source"),
                             (target_taps, target_name, "target")):
        if pairs and not taps:
            raise ValueError(_no_taps(name, role))
    for m, n in pairs:
        if not 0 <= m < len(source_taps):
            raise ValueError(
                f"pair {m}-{n}: source index {m} is out of range; {source_name} exposes taps "
                f"0..{len(source_taps) - 1} (channels {[t.channels for t in source_taps]})")
        if not 0 <= n < len(target_taps):
            raise ValueError(
                f"pair {m}-{n}: target index {n} is out of range; {target_name} exposes taps "
                f"0..{len(target_taps) - 1} (channels {[t.channels for t in target_taps]})")


def tap_grid(pairs: Sequence[Pair], method: str = "this method") -> tuple[tuple[int, ...],
                                                                       tuple[int, ...]]:
    """The source taps and the target taps that appear in ``pairs`` (each in increasing
    order), for methods that attend over every combination of them.

    Raises:
      ValueError: naming ``config.pairs``, when the pairs are not every combination of
        those taps (such a method cannot leave a combination out).
    """
    sources = tuple(sorted({m for m, _ in pairs}))
    targets = tuple(sorted({n for _, n in pairs}))
    missing = [(m, n) for m in sources for n in targets if (m, n) not in set(pairs)]
    if missing:
        raise ValueError(
            f"config.pairs: {method} attends over every combination of the source taps "
            f"{list(sources)} and target taps {list(targets)} of its pairs; "
            f"{', '.join(f'{m}-{n}' for m, n in missing[:5])} "
            f"{'are' if len(missing) > 1 else 'is'} missing (list them all, or use the "
            "all_to_all scheme)")
    return sources, targets

"""Which examples form each split: the official train/val/test index lists of the authors'
release, checked against their sha256 sums (positions in each data set's original order,
see :class:`~l2t_jax.data.sources.Subset`), and for data without a validation split one
carved from train, stratified and seeded (:func:`carve_validation`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Sequence

import numpy as np

from l2t_jax.data.sources import DataError, Subset, source_labels

logger = logging.getLogger(__name__)

# sha256 of the release's split files (the JSON copies), from the authors' repository.
SPLIT_SHA256 = {
    "cifar100-test": "afa2e87005d73d0e17e50b919ddf77fe9bbe5ec9f82990abc5971bbc1d1ac456",
    "cifar100-train": "26d0ea6dc69457ba46773eb4e248a6357f8fe2ecfcb526977244deaa6fe87e29",
    "cifar100-val": "8dd72e3b02bc098af0c41440d5e521c2cea9e34d25f9224f253d67a3f6ae8500",
    "cub200-test": "2640906989f0cbff3df2ee8fb1e9973c779cbfd1e7f63cc739f782b57b824bdd",
    "cub200-train": "6652a4a19bfad66c6f885679675d70889cab728725fa1f92177785fb8372b66c",
    "cub200-val": "8ced24323d7cfd5adba9964f90e09cff92a84bef328d93b54c6d9c0bbadd4d2f",
    "dog-test": "ccc7ce5901ffce00384a1aef95e731fd88dc02741fa5c37b3d64b3dbd6dc3ef7",
    "dog-train": "9da16a0d13aa9655295e8641582e7c8902ab47b17df3b2c3a6bf86ffe376a777",
    "dog-val": "f7080c0d48cd317a8798547c478368cf5d463e84371bf2eeb65b2ca4a245e6a1",
    "stl10-test": "71dcbc16acae92a6530785e27c27c6685393cc75586d22cb3797cf573b028601",
    "stl10-train": "c21fab342da5295d325a9cca039a8dfd43758659b678657c229282ed3d955017",
    "stl10-val": "163d9e44c79161dd13835335284c2debf9dc010995ad870333eaa0b64743f326",
}


def official_split(release_dir: str, name: str, split: str) -> tuple[list[int], list[int]]:
    """Reads ``<release_dir>/splits/<name>-<split>.json`` after checking its sha256.

    Returns (indices, classes): positions in the data set's original order, and the class
    list the reference relabels with.
    """
    key = f"{name}-{split}"
    if key not in SPLIT_SHA256:
        raise DataError(f"no official split {key!r}; known: {', '.join(sorted(SPLIT_SHA256))}")
    path = os.path.join(release_dir, "splits", f"{key}.json")
    if not os.path.isfile(path):
        raise DataError(f"official split file {path} is missing: download split/{key} from "
                        "the authors' repository (see README, 'Assets')")
    with open(path, "rb") as f:
        content = f.read()
    digest = hashlib.sha256(content).hexdigest()
    if digest != SPLIT_SHA256[key]:
        raise DataError(f"{path} has sha256 {digest}, expected {SPLIT_SHA256[key]}: the file "
                        "is corrupt or not the official split")
    split_data = json.loads(content)
    return split_data["indices"], split_data["classes"]


def stratified_split(labels: Sequence[int], fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out): positions into ``labels``, both sorted. Of every class,
    ``round(fraction * n)`` examples are held out, at least one and at most n - 1 (a class
    of one example keeps it), chosen by a generator seeded with ``seed`` alone: the same
    labels, fraction and seed give the same split on every machine."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 20190610]))
    held_out = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(max(int(round(fraction * len(members))), 1), len(members) - 1)
        held_out.append(rng.permutation(members)[:count])
    held_out = np.sort(np.concatenate(held_out)) if held_out else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held_out)
    return kept, held_out


def carve_validation(train, val_fraction: float, split_seed: int, where: str
                     ) -> tuple[Subset, Subset]:
    """(train, val) for data without a validation split: ``val_fraction`` of every class
    of the source ``train`` held out (:func:`stratified_split`, seeded by ``split_seed``
    alone, so every run of the data selects its model on the same examples), the rest kept
    for training. ``where`` names the data in the log line.

    Raises:
      DataError: ``val_fraction`` outside (0, 1).
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"{where} has no val split and config.data.val_fraction="
                        f"{val_fraction}; set it in (0, 1) to carve a validation split from "
                        "train")
    kept, held_out = stratified_split(source_labels(train), val_fraction, split_seed)
    logger.info("%s has no val split: carved a stratified validation split from train, %d "
                "of its %d images (val_fraction %g, split_seed %d)", where, len(held_out),
                len(train), val_fraction, split_seed)
    return Subset(train, kept), Subset(train, held_out)

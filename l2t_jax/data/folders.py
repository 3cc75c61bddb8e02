"""One's own image folder ``root/{train,[val],test}/<class>/<image>``: the classes, checked
across splits (without ``val/``, :func:`l2t_jax.data.carve_validation` carves a validation
split from train).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from l2t_jax.data.sources import IMAGE_SUFFIXES, DataError, ImageFolderSource

IMAGE_FOLDER_LAYOUT = ("ROOT/train/<class>/<image>, ROOT/test/<class>/<image> and optionally "
                       "ROOT/val/<class>/<image>")


def _class_folders(directory: str) -> list[str]:
    return sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))


def image_folder_classes(root: str, num_classes: int = 0,
                         classes: Sequence[str] = ()) -> list[str]:
    """The class names of the image folder ``root`` (``train/``'s sub-folders, sorted; a
    class's label is its rank), checked against ``num_classes`` and ``classes`` when they
    are given (0 and () infer them).

    Raises:
      DataError: naming the problem: no root, no ``train/``, no class folders, or a class
        count or list other than the folder's.
    """
    if not root:
        raise DataError("config.data.data_dir is empty: set it to the image folder, e.g. "
                        f"--config.data.data_dir=ROOT with {IMAGE_FOLDER_LAYOUT}")
    if not os.path.isdir(root):
        raise DataError(f"the image folder {root!r} (config.data.data_dir) does not exist; "
                        f"expected {IMAGE_FOLDER_LAYOUT}")
    train = os.path.join(root, "train")
    if not os.path.isdir(train):
        found = ", ".join(_class_folders(root)[:6]) or "no folders"
        raise DataError(f"{root} has no train/ folder (it holds {found}); expected "
                        f"{IMAGE_FOLDER_LAYOUT}")
    found = _class_folders(train)
    if not found:
        raise DataError(f"{train} has no class folders; expected {IMAGE_FOLDER_LAYOUT}")
    if num_classes and num_classes != len(found):
        raise DataError(f"config.data.num_classes={num_classes}, but {train} has "
                        f"{len(found)} class folders ({_some(found)}); set it to "
                        f"{len(found)} or to 0 (inferred from the folder)")
    if classes and list(classes) != found:
        raise DataError(f"config.data.classes={list(classes)} differs from the class folders "
                        f"of {train} ({_some(found)}); leave it empty to infer them")
    return found


def _some(names: Sequence[str], most: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:most]) + (f" ... ({len(names)} in all)" if len(names) > most
                                      else "")


def image_folder_splits(root: str, splits: Sequence[str] = ("train", "test"),
                        skip_corrupt: bool = False, num_classes: int = 0) -> dict:
    """The splits of one's own image folder ``root/{train,[val],test}/<class>/<image>``
    named in ``splits`` (train first): every split has the class folders of ``train/``
    (labels: the folders' sorted order), and no class folder is empty. A folder without
    ``val/`` has no val split (:func:`l2t_jax.data.carve_validation` carves one from
    train).

    Raises:
      DataError: naming the folder: a missing root or split, an empty class, class folders
        that differ between splits, or ``num_classes`` other than the folder's.
    """
    classes = image_folder_classes(root, num_classes)
    sources = {}
    for split in ["train"] + [s for s in splits if s != "train"]:
        source = ImageFolderSource(root, split, skip_corrupt=skip_corrupt)
        if source.classes != classes:
            only_train = sorted(set(classes) - set(source.classes))
            only_here = sorted(set(source.classes) - set(classes))
            raise DataError(f"the class folders of {source.directory} differ from those of "
                            f"{os.path.join(root, 'train')}: only in train: "
                            f"{_some(only_train) or 'none'}; only in {split}: "
                            f"{_some(only_here) or 'none'}")
        empty = sorted(set(source.empty_classes) | {
            name for label, name in enumerate(classes)
            if not np.any(source.labels == label)})
        if empty:
            raise DataError(f"{source.directory}: class folder(s) {_some(empty)} hold no "
                            f"images (files ending in {', '.join(IMAGE_SUFFIXES)}); add "
                            "images or remove the class from every split")
        sources[split] = source
    return sources

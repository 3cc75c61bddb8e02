"""Data: random-access sources, the official splits, augmentation, and grain pipelines.

This module owns where examples come from and how they become batches:

- sources (``__len__``, ``__getitem__ -> (uint8 HWC image, int label)``): a prepared TFDS
  data set read through ``tfds.data_source`` (array_record, no TensorFlow), an image folder
  ``root/<split>/<class>/<file>``, or ``<split>.npz`` arrays;
- one's own image folder ``root/{train,[val],test}/<class>/<image>``
  (:func:`image_folder_classes`, :func:`image_folder_splits`): classes inferred from
  ``train/`` and checked across splits, and without ``val/`` a stratified, seeded
  validation split carved from train (:func:`stratified_split`);
- the official train/val/test index lists of the release (checked against sha256 sums),
  applied as positions in the data set's original order;
- augmentation and normalisation as the reference (SPEC.md), deterministic from the seed;
- grain ``MapDataset`` pipelines. Batch ``i`` of epoch ``e`` is a pure function of
  (seed, e, i), so the step counter is the whole iterator state: resuming is exact.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from typing import Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)

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
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class DataError(ValueError):
    """Missing, unprepared or malformed data; the message says what to do."""


# ----------------------------------------------------------------------------- sources
class ArraySource:
    """In-memory images (N, H, W, 3) uint8 and labels (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        images, labels = np.asarray(images), np.asarray(labels)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(f"images must be uint8 (N, H, W, 3), got {images.dtype} "
                            f"{images.shape}")
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.astype(np.int32)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


def npz_source(data_dir: str, split: str) -> ArraySource:
    path = os.path.join(data_dir, f"{split}.npz")
    if not os.path.isfile(path):
        raise DataError(f"no {split!r} split at {path}: write it with "
                        f"numpy.savez(path, images=uint8 NHWC array, labels=int array)")
    with np.load(path) as arrays:
        return ArraySource(arrays["images"], arrays["labels"])


class ImageFolderSource:
    """``root/<split>/<class>/<file>``: classes and files in sorted order (the order the
    release's CUB and Dogs index lists refer to). Images decode on access (RGB uint8).

    Empty class folders are skipped with their names recorded in ``empty_classes`` (the class
    index is still reserved, so labels match the folder order). A file that does not decode
    raises :class:`DataError` naming it, unless ``skip_corrupt``: then every file is checked
    once up front and the unreadable ones are listed in ``skipped``.

    Images of any size and any mode PIL reads decode to RGB as torchvision's ImageFolder
    loader does (``convert('RGB')``: grey levels copied to the three channels, alpha
    dropped; 16-bit grey levels are scaled to 8 bits rather than clipped); the first
    non-RGB image of the split is logged, once, in one line.
    """

    def __init__(self, root: str, split: str, skip_corrupt: bool = False):
        from PIL import Image
        self._image = Image
        self._conversion_logged = False
        directory = os.path.join(root, split)
        self.directory = directory
        if not os.path.isdir(directory):
            raise DataError(f"no {split!r} split at {directory}: expected "
                            f"{root}/{split}/<class>/<image files>")
        self.classes = sorted(d for d in os.listdir(directory)
                              if os.path.isdir(os.path.join(directory, d)))
        if not self.classes:
            raise DataError(f"{directory} has no class folders")
        self.files, labels, self.empty_classes = [], [], []
        for label, name in enumerate(self.classes):
            files = sorted(f for f in os.listdir(os.path.join(directory, name))
                           if f.lower().endswith(IMAGE_SUFFIXES))
            if not files:
                self.empty_classes.append(name)
            self.files += [os.path.join(directory, name, f) for f in files]
            labels += [label] * len(files)
        self.labels = np.asarray(labels, np.int32)
        self.skipped = []
        if skip_corrupt:
            keep = []
            for i, path in enumerate(self.files):
                try:
                    self._decode(path)
                    keep.append(i)
                except DataError:
                    self.skipped.append(path)
            self.files = [self.files[i] for i in keep]
            self.labels = self.labels[keep]
            for path in self.skipped:
                logger.warning("skipping undecodable image %s", path)
        if self.empty_classes:
            logger.warning("%s: empty class folders (labels kept in folder order): %s",
                            directory, ", ".join(self.empty_classes))
        if not self.files:
            raise DataError(f"{directory} has no readable images")

    def _decode(self, path: str) -> np.ndarray:
        try:
            with self._image.open(path) as image:
                if image.mode != "RGB" and not self._conversion_logged:
                    self._conversion_logged = True
                    logger.info("%s: converting non-RGB images to RGB as they are read "
                                "(the first: %s, mode %s%s); logged once for this split",
                                self.directory, os.path.relpath(path, self.directory),
                                image.mode, _MODE_NAMES.get(image.mode, ""))
                if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                    # 16-bit grey levels (PNG): convert('RGB') would clip them at 255.
                    grey = np.asarray(image, np.float64) / 257.0
                    grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
                    return np.repeat(grey[..., None], 3, axis=-1)
                return np.asarray(image.convert("RGB"), np.uint8)
        except Exception as e:  # PIL raises several types for bad files
            raise DataError(f"cannot decode image {path}: {e}; fix or remove it, or set "
                            "config.data.skip_corrupt = True") from None

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return self._decode(self.files[index]), self.labels[index]


_MODE_NAMES = {"L": ", grayscale", "LA": ", grayscale with alpha: alpha dropped",
               "RGBA": ", alpha dropped", "P": ", palette", "1": ", black and white",
               "CMYK": "", "I;16": ", 16-bit grayscale", "I": ", 32-bit grayscale"}


class TfdsSource:
    """A prepared TFDS data set read with ``tfds.data_source`` (array_record, no TF).

    ``order`` maps positions in the data set's original ordering (what the official index
    lists refer to) to TFDS record indices; see :func:`original_order_from_ids`.
    """

    def __init__(self, name: str, split: str, data_dir: Optional[str] = None):
        import tensorflow_datasets as tfds
        root = data_dir or os.environ.get("TFDS_DATA_DIR",
                                          os.path.expanduser("~/tensorflow_datasets"))
        prepare = (f"Prepare it once with: pip install 'l2t-jax[prepare]' && tfds build "
                   f"{name} --file_format=array_record --data_dir={root}")
        # Checked here: for a missing directory TFDS itself says the data set is "already
        # prepared ... in the TFRECORD format", which sends the user the wrong way.
        if data_dir and "://" not in data_dir and not os.path.isdir(data_dir):
            raise DataError(f"config.data.data_dir={data_dir!r} does not exist. {prepare}")
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                            download=False)
        except Exception as e:
            dataset_dir = os.path.join(root, name.split(":")[0].split("/")[0])
            if not os.path.isdir(dataset_dir):
                raise DataError(f"TFDS data set {name!r} is not prepared in {root} (no "
                                f"{dataset_dir}). {prepare}") from None
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(
                f"TFDS data set {name!r} (split {split!r}) in {dataset_dir} cannot be read "
                f"({type(e).__name__}: {first_line}). Random access needs the array_record "
                f"format; if it was built in another format: {prepare}") from None
        self.order = None
        self.labels = None      # replaces the records' labels when set (image-folder order)

    def __len__(self):
        return len(self._source)

    def record(self, index: int) -> dict:
        return self._source[index]

    def use_original_order(self) -> None:
        """Re-indexes records into the order the release's split lists refer to: CIFAR's
        ``id`` position, or for image data sets (``image/filename``) the sorted
        image-folder listing, with labels = rank of the class folder, as torchvision's
        ImageFolder gives them."""
        first = self.record(0)
        if "id" in first:
            self.order = original_order_from_ids(
                [self.record(i)["id"] for i in range(len(self))])
        elif "image/filename" in first:
            names = [self.record(i)["image/filename"] for i in range(len(self))]
            self.order, self.labels = original_order_from_filenames(names)
        else:
            raise DataError("these TFDS records carry no original position ('id' or "
                            "'image/filename'); use the npz or image-folder route")

    def __getitem__(self, index):
        if self.order is not None:
            record = self._source[int(self.order[index])]
        else:
            record = self._source[index]
        label = record["label"] if self.labels is None else self.labels[index]
        return np.asarray(record["image"], np.uint8), np.int32(label)


def original_order_from_ids(ids: Sequence[str]) -> np.ndarray:
    """Permutation from original positions to record indices, from TFDS ``id`` features
    such as ``train_00042`` (CIFAR): ``order[k]`` is the record holding original example k.
    """
    positions = np.array([int(str(i).rsplit("_", 1)[1]) for i in ids])
    if sorted(positions.tolist()) != list(range(len(positions))):
        raise DataError("the ids do not number the examples 0..N-1")
    order = np.empty(len(positions), np.int64)
    order[positions] = np.arange(len(positions))
    return order


def original_order_from_filenames(filenames: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Order and labels of an image-folder listing from ``.../<class>/<file>`` paths.

    Returns (order, labels): ``order[k]`` is the record of the k-th file when class folders
    and then files are sorted; ``labels[k]`` is the rank of its class folder.
    """
    keys = []
    for name in filenames:
        name = name.decode() if isinstance(name, bytes) else str(name)
        parts = name.replace("\\", "/").split("/")
        if len(parts) < 2:
            raise DataError(f"file name {name!r} has no class folder")
        keys.append((parts[-2], parts[-1]))
    order = np.array(sorted(range(len(keys)), key=keys.__getitem__), np.int64)
    classes = sorted({k[0] for k in keys})
    labels = np.array([classes.index(keys[i][0]) for i in order], np.int32)
    return order, labels


class Subset:
    """The examples of ``source`` at ``indices`` (positions in its original order).

    ``classes`` (optional, as in the release's split files) relabels: an example of original
    class c gets label ``classes.index(c)``, as the reference's ``FolderSubset`` does.
    """

    def __init__(self, source, indices: Sequence[int], classes: Optional[Sequence[int]] = None):
        indices = np.asarray(indices, np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(source)):
            bad = indices[(indices < 0) | (indices >= len(source))][0]
            raise DataError(f"split index {bad} is outside the data set "
                            f"(0..{len(source) - 1})")
        self.source, self.indices = source, indices
        self.relabel = None
        if classes is not None and list(classes) != list(range(len(classes))):
            self.relabel = {int(c): i for i, c in enumerate(classes)}

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        image, label = self.source[int(self.indices[index])]
        if self.relabel is not None:
            label = np.int32(self.relabel[int(label)])
        return image, label


def source_labels(source) -> np.ndarray:
    """Labels (N,) of a source, read without decoding images where the source allows."""
    if isinstance(source, Subset):
        labels = source_labels(source.source)[source.indices]
        if source.relabel is not None:
            labels = np.array([source.relabel[int(c)] for c in labels], np.int32)
        return labels
    if getattr(source, "labels", None) is not None:
        return np.asarray(source.labels, np.int32)
    if isinstance(source, TfdsSource):
        order = source.order if source.order is not None else range(len(source))
        return np.array([source.record(int(i))["label"] for i in order], np.int32)
    return np.array([source[i][1] for i in range(len(source))], np.int32)


def per_class_subset(source, examples_per_class: int, seed: int) -> Subset:
    """``examples_per_class`` examples of every class, drawn without replacement by a
    generator seeded with ``seed`` (so limited-data runs differ by seed, reproducibly).

    Raises DataError when a class has fewer examples than asked, naming it.
    """
    labels = source_labels(source)
    classes, counts = np.unique(labels, return_counts=True)
    if examples_per_class > counts.min():
        smallest = classes[np.argmin(counts)]
        raise DataError(f"config.data.train_examples_per_class={examples_per_class} is larger "
                        f"than the smallest class of the train split (class {smallest} has "
                        f"{counts.min()} examples)")
    return Subset(source, _draw_per_class(labels, classes, examples_per_class, seed, 20190509))


def _draw_per_class(labels: np.ndarray, classes: np.ndarray, count: int, seed: int,
                    stream: int) -> np.ndarray:
    """Sorted indices of ``count`` examples of every class, drawn without replacement by
    the generator of (seed, stream)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, stream]))
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), count,
                                              replace=False) for c in classes]))


def split_per_class(source, examples_per_class: int, seed: int) -> tuple[Subset, Subset]:
    """(``examples_per_class`` examples of every class, the rest), drawn without replacement
    by ``seed`` (another stream than :func:`per_class_subset`'s). Indices refer to
    ``source``, so both parts read through it.

    Raises DataError when a class would keep nothing in the rest, naming it.
    """
    labels = source_labels(source)
    classes, counts = np.unique(labels, return_counts=True)
    if examples_per_class >= counts.min():
        smallest = classes[np.argmin(counts)]
        raise DataError(f"taking {examples_per_class} examples per class leaves none of class "
                        f"{smallest} ({counts.min()} examples) in the train split")
    chosen = _draw_per_class(labels, classes, examples_per_class, seed, 20190510)
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    return Subset(source, chosen), Subset(source, rest)


# ------------------------------------------------------------- one's own image folder
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


def stratified_split(labels: Sequence[int], fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out): positions into ``labels``, both sorted. Of every class,
    ``round(fraction * n)`` examples are held out, at least one and at most n - 1 (a class
    of one example keeps it), drawn by a generator seeded with ``seed`` alone: the same
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


def image_folder_splits(root: str, splits: Sequence[str] = ("train", "val", "test"),
                        val_fraction: float = 0.1, split_seed: int = 0,
                        skip_corrupt: bool = False, num_classes: int = 0) -> dict:
    """The splits of one's own image folder ``root/{train,[val],test}/<class>/<image>``.

    Every split has the class folders of ``train/`` (labels: the folders' sorted order), and
    no class folder is empty. Without a ``val/`` folder, ``'val'`` is a stratified split of
    ``val_fraction`` of every train class (:func:`stratified_split`, seeded by
    ``split_seed``), and ``'train'`` the rest.

    Raises:
      DataError: naming the folder: a missing root or split, an empty class, class folders
        that differ between splits, or ``num_classes`` other than the folder's.
    """
    classes = image_folder_classes(root, num_classes)
    sources = {}
    for split in ["train"] + [s for s in splits if s != "train"]:
        if split == "val" and not os.path.isdir(os.path.join(root, "val")):
            continue
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
    if "val" in splits and "val" not in sources:
        train = sources["train"]
        if not 0 < val_fraction < 1:
            raise DataError(f"{root} has no val/ folder and config.data.val_fraction="
                            f"{val_fraction}; set it in (0, 1) to carve a validation split "
                            "from train")
        kept, held_out = stratified_split(train.labels, val_fraction, split_seed)
        sources["train"], sources["val"] = Subset(train, kept), Subset(train, held_out)
        logger.info("%s has no val/ folder: carved a stratified validation split from "
                    "train, %d of its %d images (val_fraction %g, split_seed %d)", root,
                    len(held_out), len(train), val_fraction, split_seed)
    return {split: sources[split] for split in ["train"] + [s for s in splits
                                                            if s != "train"]}


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


# ------------------------------------------------------------------------ augmentation
def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32, scaled to [0, 1] then normalised with the ImageNet
    mean/std."""
    return (image.astype(np.float32) / 255.0 - MEAN) / STD


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image
    if image.shape[:2] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def pad_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator,
                  hflip: bool = True, padding: int = 4) -> np.ndarray:
    """The 32-px training augmentation: zero-pad ``padding``, random crop ``size``, random
    h-flip (``hflip=False`` for data where mirroring changes the class, such as digits)."""
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top, left = rng.integers(0, padded.shape[0] - size + 1), rng.integers(
        0, padded.shape[1] - size + 1)
    crop = padded[top:top + size, left:left + size]
    return crop[:, ::-1] if hflip and rng.random() < 0.5 else crop


def random_resized_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator,
                             hflip: bool = True) -> np.ndarray:
    """torchvision's RandomResizedCrop(size) (scale 0.08-1, ratio 3/4-4/3) + h-flip."""
    height, width = image.shape[:2]
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            break
    else:  # fall back to a central crop, as torchvision does
        h, w = min(height, width), min(height, width)
        top, left = (height - h) // 2, (width - w) // 2
    crop = _resize(image[top:top + h, left:left + w], (size, size))
    return crop[:, ::-1] if hflip and rng.random() < 0.5 else crop


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Evaluation at 224: resize the shorter side to 256/224 * size, center crop ``size``."""
    height, width = image.shape[:2]
    short = int(size * 256 / 224)
    scale = short / min(height, width)
    image = _resize(image, (max(short, round(height * scale)), max(short, round(width * scale))))
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[top:top + size, left:left + size]


def _small_image(image: np.ndarray, size: int) -> np.ndarray:
    # 32-px experiments resize other sizes first (STL-10's 96 px, as the reference).
    return _resize(image, (size, size))


def train_example(example, rng: np.random.Generator, image_size: int, hflip: bool = True,
                  crop_padding: int = 4):
    """One augmented training example: (uint8 image (S, S, 3), int32 label). Normalising is
    left to :func:`normalize_batch`, once per batch."""
    image, label = example
    if image_size <= 64:
        image = pad_crop_flip(_small_image(image, image_size), image_size, rng, hflip,
                              crop_padding)
    else:
        image = random_resized_crop_flip(image, image_size, rng, hflip)
    return np.ascontiguousarray(image), np.int32(label)


def eval_example(example, image_size: int):
    """One evaluation example: (uint8 image (S, S, 3), int32 label)."""
    image, label = example
    image = (_small_image(image, image_size) if image_size <= 64
             else resize_center_crop(image, image_size))
    return np.ascontiguousarray(image), np.int32(label)


def normalize_batch(batch):
    """(uint8 images (..., S, S, 3), labels) -> (float32 normalised images, labels): the
    same numbers as normalising each image alone (element-wise float32 arithmetic)."""
    images, labels = batch
    return normalize(images), labels


def read_options(threads: int, prefetch_examples: int):
    """grain's ReadOptions: ``threads`` reading examples in parallel (-1: one per CPU core,
    at most 16; 0: in the consumer's thread), ``prefetch_examples`` read ahead."""
    import grain
    if threads < 0:
        threads = min(os.cpu_count() or 1, 16)
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch_examples)


# ---------------------------------------------------------------------------- pipelines
def train_examples(source, image_size: int, seed: int, epoch: int, hflip: bool = True,
                   crop_padding: int = 4, min_examples: int = 0):
    """Epoch ``epoch`` as a grain MapDataset of single augmented examples (uint8 image
    (S, S, 3), int32 label), in the epoch's shuffled order.

    Shuffle and augmentation depend only on (seed, epoch) and the position, so
    ``dataset[p]`` is the example at position p of that epoch, whenever and wherever (in
    whichever process or thread) it is read: batch i is positions
    ``i * B ... i * B + B - 1``, and a process of a multi-host run loads just its rows of
    each batch. An epoch holds every example once, or the fewest whole repeats of the data
    giving ``min_examples`` examples.
    """
    import grain
    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    repeats = max(1, -(-min_examples // len(source)))
    dataset = grain.MapDataset.source(source)
    if repeats > 1:
        dataset = dataset.repeat(repeats)
    return (dataset
            .shuffle(seed=epoch_seed)
            .random_map(lambda example, rng: train_example(example, rng, image_size, hflip,
                                                           crop_padding),
                        seed=epoch_seed))


def train_batches(source, batch_size: int, image_size: int, seed: int, epoch: int,
                  hflip: bool = True, crop_padding: int = 4, min_batches: int = 0):
    """Epoch ``epoch`` as a grain MapDataset of (images (B, S, S, 3) f32, labels (B,) i32):
    :func:`train_examples` in batches of ``batch_size`` (the last partial one dropped),
    normalised.

    ``dataset[i]`` is batch i of that epoch, whenever it is read; the epoch has at least
    ``min_batches`` batches (the data repeated as often as needed). The training loop reads
    the same batches through :func:`step_batches`.
    """
    return (train_examples(source, image_size, seed, epoch, hflip, crop_padding,
                           min_examples=min_batches * batch_size)
            .batch(batch_size, drop_remainder=True)
            .map(normalize_batch))


def step_batches(source, steps: Sequence[int], *, steps_per_epoch: int, batch_size: int,
                 rows: slice, image_size: int, seed: int, hflip: bool = True,
                 crop_padding: int = 4, threads: int = -1, prefetch_batches: int = 2):
    """The training loop's input pipeline: for each step s of ``steps``, in order, rows
    ``rows`` of global batch s (images (R, S, S, 3) f32, labels (R,) i32, R = len(rows)),
    as a grain IterDataset.

    Step s is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch`` of
    :func:`train_examples` (at least ``steps_per_epoch * batch_size`` examples per epoch),
    so it is a pure function of (seed, epoch, index) and equals ``train_batches(...)[i]``'s
    rows ``rows``: resuming from step s is starting ``steps`` at s, and each process reads
    only its own rows. ``threads`` read and augment examples in parallel
    (:func:`read_options`; order is kept); a background thread batches and normalises, and
    up to ``prefetch_batches`` batches are read ahead of the consumer.
    """
    import grain
    local = rows.stop - rows.start

    @functools.lru_cache(maxsize=2)
    def epoch_examples(epoch: int):
        return train_examples(source, image_size, seed, epoch, hflip, crop_padding,
                              min_examples=steps_per_epoch * batch_size)

    def example(k: int):
        j, row = _batch_and_row(k, rows)
        epoch, index = divmod(steps[j], steps_per_epoch)
        return epoch_examples(epoch)[index * batch_size + row]

    return _batched(grain.MapDataset.range(len(steps) * local).map(example), local,
                    threads, prefetch_batches)


def _batch_and_row(k: int, rows: slice) -> tuple[int, int]:
    """Element k of a stream holding rows ``rows`` of each batch: (which batch, its row)."""
    j, r = divmod(k, rows.stop - rows.start)
    return j, rows.start + r


def _batched(examples, batch_size: int, threads: int, prefetch_batches: int):
    """A MapDataset of uint8 examples, read by ``threads`` with ``prefetch_batches``
    batches ahead, as an IterDataset of normalised batches of ``batch_size`` (the last one
    partial), batched and normalised in a background thread."""
    import grain
    batches = (examples
               .to_iter_dataset(read_options(threads, max(1, prefetch_batches) * batch_size))
               .batch(batch_size)
               .map(normalize_batch))
    if prefetch_batches <= 0:
        return batches
    return grain.experimental.ThreadPrefetchIterDataset(
        batches, prefetch_buffer_size=prefetch_batches)


def eval_examples(source, image_size: int):
    """Single evaluation examples (image (S, S, 3) f32 normalised, label i32) in the
    source's order."""
    import grain
    return (grain.MapDataset.source(source)
            .map(lambda example: normalize_batch(eval_example(example, image_size))))


def eval_batches(source, image_size: int, batch_size: int, rows: slice | None = None,
                 threads: int = -1, prefetch_batches: int = 2):
    """The evaluation batches of ``source`` in order: an iterable of (images (R, S, S, 3)
    f32, labels (R,) i32, real rows of the global batch), R = len(rows) (default: the whole
    batch). Global batch j holds positions ``j * batch_size ...``; positions past the end
    are padding (zero images, label -1), so every batch has one shape (no recompiling).
    Read as :func:`step_batches` does."""
    import grain
    rows = rows if rows is not None else slice(0, batch_size)
    local = rows.stop - rows.start
    count = -(-len(source) // batch_size)
    size = (image_size, image_size, 3)

    def example(k: int):
        j, row = _batch_and_row(k, rows)
        position = j * batch_size + row
        if position < len(source):
            return eval_example(source[position], image_size)
        return np.zeros(size, np.uint8), np.int32(-1)

    batches = iter(_batched(grain.MapDataset.range(count * local).map(example), local,
                            threads, prefetch_batches))
    try:                    # a consumer that stops early closes this, and so the threads
        for j, (images, labels) in enumerate(batches):
            images[labels < 0] = 0.0        # padding rows: zero network inputs
            yield images, labels, min(batch_size, len(source) - j * batch_size)
    finally:
        batches.close()

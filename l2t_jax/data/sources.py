"""Where examples come from: random-access sources and subsets of them.

A source has ``__len__`` and ``__getitem__(i) -> (uint8 HWC image, int label)``: a prepared
TFDS data set read through ``tfds.data_source`` (array_record, no TensorFlow), an image
folder ``root/<split>/<class>/<file>``, ``<split>.npz`` arrays, or a :class:`Subset` of
another (the official splits, limited-data subsets of k examples per class).
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class DataError(ValueError):
    """Missing, unprepared or malformed data; the message says what to do."""

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


# TFDS calls a validation split "validation" (oxford_flowers102, imagenet2012, ...); this
# package calls it "val". Either name serves config.data.eval_splits' "val".
SPLIT_ALIASES = {"val": ("val", "validation")}


def stored_split_name(kind: str, data_dir: str, split: str, name: str = "") -> Optional[str]:
    """The name under which the data hold ``split`` themselves, or None: the file
    ``data_dir/<split>.npz`` (kind ``npz``), the folder ``data_dir/<split>/``
    (``image_folder``), or a split of the prepared TFDS data set ``name`` (``tfds``), where
    ``val`` is also found as TFDS's ``validation`` (None when the set is not prepared,
    which reading its train split reports)."""
    if kind == "npz":
        return split if os.path.isfile(os.path.join(data_dir, f"{split}.npz")) else None
    if kind == "image_folder":
        return split if os.path.isdir(os.path.join(data_dir, split)) else None
    if _tfds_missing_locally(name, data_dir):
        return None             # asking TFDS would log its own warnings first
    import tensorflow_datasets as tfds
    try:
        stored = tfds.builder(name, data_dir=data_dir or None).info.splits
    except Exception:  # noqa: BLE001 - tfds raises several types for unprepared data
        return None
    return next((alias for alias in SPLIT_ALIASES.get(split, (split,)) if alias in stored),
                None)


def _tfds_root(data_dir: str) -> str:
    """Where TFDS looks for prepared data sets: ``data_dir``, else ``$TFDS_DATA_DIR``, else
    ``~/tensorflow_datasets``."""
    return data_dir or os.environ.get("TFDS_DATA_DIR",
                                      os.path.expanduser("~/tensorflow_datasets"))


def _tfds_dataset_dir(name: str, data_dir: str) -> str:
    return os.path.join(_tfds_root(data_dir), name.split(":")[0].split("/")[0])


def _tfds_missing_locally(name: str, data_dir: str) -> bool:
    """Whether the TFDS data set ``name`` has no directory on a local file system (a remote
    root, ``gs://...``, is left to TFDS)."""
    return "://" not in _tfds_root(data_dir) and not os.path.isdir(
        _tfds_dataset_dir(name, data_dir))


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
        self.files, labels, self.empty_classes, others = [], [], [], []
        for label, name in enumerate(self.classes):
            listed = sorted(os.listdir(os.path.join(directory, name)))
            files = [f for f in listed if f.lower().endswith(IMAGE_SUFFIXES)]
            others += [os.path.join(name, f) for f in listed
                       if not f.lower().endswith(IMAGE_SUFFIXES)]
            if not files:
                self.empty_classes.append(name)
            self.files += [os.path.join(directory, name, f) for f in files]
            labels += [label] * len(files)
        if not self.files:
            found = (f"found {len(others)} other file(s), e.g. {others[0]}" if others
                     else "the class folders are empty")
            raise DataError(f"{directory} has no images: an image is a file ending in "
                            f"{', '.join(IMAGE_SUFFIXES)} (any case); {found}")
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
            raise DataError(f"{directory} has no readable images: all {len(self.skipped)} "
                            "failed to decode (config.data.skip_corrupt skipped them)")

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
        root, dataset_dir = _tfds_root(data_dir), _tfds_dataset_dir(name, data_dir)
        prepare = (f"Prepare it once with: pip install 'l2t-jax[prepare]' && tfds build "
                   f"{name} --file_format=array_record --data_dir={root}")
        # Checked here, before TFDS: for a missing directory TFDS says the data set is
        # "already prepared ... in the TFRECORD format", which sends the user the wrong
        # way, and for a missing data set it logs warnings before failing.
        if data_dir and "://" not in data_dir and not os.path.isdir(data_dir):
            raise DataError(f"config.data.data_dir={data_dir!r} does not exist. {prepare}")
        if _tfds_missing_locally(name, data_dir):
            raise DataError(f"TFDS data set {name!r} is not prepared in {root} (no "
                            f"{dataset_dir}). {prepare}")
        import tensorflow_datasets as tfds
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                            download=False)
        except Exception as e:
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
    """``examples_per_class`` examples of every class, sampled without replacement by a
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
    """Sorted indices of ``count`` examples of every class, sampled without replacement by
    the generator of (seed, stream)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, stream]))
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), count,
                                              replace=False) for c in classes]))


def split_per_class(source, examples_per_class: int, seed: int, *,
                    key: str = "config.data.meta_held_out_per_class",
                    split: str = "train") -> tuple[Subset, Subset]:
    """(``examples_per_class`` examples of every class, the rest), sampled without replacement
    by ``seed`` (another stream than :func:`per_class_subset`'s). Indices refer to
    ``source``, so both parts read through it.

    Raises DataError when a class would keep nothing in the rest, naming it, the config
    ``key`` that asked and the ``split`` that ``source`` is.
    """
    labels = source_labels(source)
    classes, counts = np.unique(labels, return_counts=True)
    if examples_per_class >= counts.min():
        smallest = classes[np.argmin(counts)]
        raise DataError(f"{key}={examples_per_class} leaves none of class {smallest} "
                        f"({counts.min()} examples) in the {split} split")
    chosen = _draw_per_class(labels, classes, examples_per_class, seed, 20190510)
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    return Subset(source, chosen), Subset(source, rest)

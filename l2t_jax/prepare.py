"""One-off data preparation that TFDS cannot do for us.

STL-10: the release's split lists are positions in the order of the original binary files
(``stl10_binary/{train,test}_{X,y}.bin``), and TFDS's ``stl10`` records do not carry that
position. This converts the binary files, in their order, to ``train.npz`` / ``test.npz``
for ``config.data.kind = 'npz'``::

    python -m l2t_jax.prepare stl10 --binary_dir stl10_binary --output_dir DIR

TinyImageNet (to pre-train the sources the paper used but did not release): the official
``tiny-imagenet-200`` folder keeps train images in ``train/<wnid>/images/`` and val images
in one folder labelled by ``val/val_annotations.txt``. This writes ``train.npz`` and
``val.npz`` (64x64, labels = rank of the sorted wnid)::

    python -m l2t_jax.prepare tinyimagenet --source_dir tiny-imagenet-200 --output_dir DIR
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from l2t_jax.data import DataError

STL10_SIZE = 96


def read_stl10_binary(binary_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 96, 96, 3) uint8 and labels (N,) in 0..9, in file order."""
    images_path = os.path.join(binary_dir, f"{split}_X.bin")
    labels_path = os.path.join(binary_dir, f"{split}_y.bin")
    for path in (images_path, labels_path):
        if not os.path.isfile(path):
            raise DataError(f"{path} is missing: extract stl10_binary.tar.gz (the official "
                            "STL-10 archive) and pass its stl10_binary directory")
    raw = np.fromfile(images_path, np.uint8)
    if raw.size % (3 * STL10_SIZE * STL10_SIZE):
        raise DataError(f"{images_path} is truncated ({raw.size} bytes)")
    # Each image is stored channel by channel, column-major within a channel.
    images = raw.reshape(-1, 3, STL10_SIZE, STL10_SIZE).transpose(0, 3, 2, 1)
    labels = np.fromfile(labels_path, np.uint8).astype(np.int64) - 1
    if len(labels) != len(images):
        raise DataError(f"{len(images)} images but {len(labels)} labels in {binary_dir}")
    return np.ascontiguousarray(images), labels


def prepare_stl10(binary_dir: str, output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    for split in ("train", "test"):
        images, labels = read_stl10_binary(binary_dir, split)
        np.savez(os.path.join(output_dir, f"{split}.npz"), images=images, labels=labels)
        print(f"{split}: {len(labels)} images -> {output_dir}/{split}.npz")


def _read_rgb(path: str) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), np.uint8)
    except OSError as e:
        raise DataError(f"cannot decode {path}: {e}") from None


def prepare_tinyimagenet(source_dir: str, output_dir: str) -> None:
    train_dir = os.path.join(source_dir, "train")
    annotations = os.path.join(source_dir, "val", "val_annotations.txt")
    for path in (train_dir, annotations):
        if not os.path.exists(path):
            raise DataError(f"{path} is missing: pass the extracted tiny-imagenet-200 folder "
                            "(http://cs231n.stanford.edu/tiny-imagenet-200.zip)")
    wnids = sorted(os.listdir(train_dir))
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    splits = {"train": [], "val": []}
    for wnid in wnids:
        folder = os.path.join(train_dir, wnid, "images")
        splits["train"] += [(os.path.join(folder, f), label_of[wnid])
                            for f in sorted(os.listdir(folder))]
    with open(annotations) as f:
        for line in f:
            if line.strip():
                name, wnid = line.split("\t")[:2]
                if wnid not in label_of:
                    raise DataError(f"{annotations}: {name} has class {wnid}, which has no "
                                    "train folder")
                splits["val"].append((os.path.join(source_dir, "val", "images", name),
                                      label_of[wnid]))
    os.makedirs(output_dir, exist_ok=True)
    for split, items in splits.items():
        images = np.stack([_read_rgb(path) for path, _ in items])
        labels = np.array([label for _, label in items], np.int64)
        np.savez(os.path.join(output_dir, f"{split}.npz"), images=images, labels=labels)
        print(f"{split}: {len(labels)} images, {len(wnids)} classes -> "
              f"{output_dir}/{split}.npz")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m l2t_jax.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["stl10", "tinyimagenet"])
    parser.add_argument("--binary_dir", help="stl10: the extracted stl10_binary directory")
    parser.add_argument("--source_dir", help="tinyimagenet: the tiny-imagenet-200 folder")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    needed = "binary_dir" if args.dataset == "stl10" else "source_dir"
    if not getattr(args, needed):
        parser.error(f"{args.dataset} needs --{needed}")
    try:
        if args.dataset == "stl10":
            prepare_stl10(args.binary_dir, args.output_dir)
        else:
            prepare_tinyimagenet(args.source_dir, args.output_dir)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()

"""One-off data preparation that TFDS cannot do for us.

STL-10: the release's split lists are positions in the order of the original binary files
(``stl10_binary/{train,test}_{X,y}.bin``), and TFDS's ``stl10`` records do not carry that
position. This converts the binary files, in their order, to ``train.npz`` / ``test.npz``
for ``config.data.kind = 'npz'``::

    python -m l2t_jax.prepare stl10 --binary_dir stl10_binary --output_dir DIR
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m l2t_jax.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["stl10"])
    parser.add_argument("--binary_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    try:
        prepare_stl10(args.binary_dir, args.output_dir)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()

"""Times the input pipeline (:func:`l2t_jax.data.step_batches`) and prints one JSON line.

    python -m l2t_jax.tools.bench_pipeline --image_size 32 --threads 0 1 2 [--train_steps 30]

Images per second of the training pipeline (read, decode, augment, batch, normalise) for
each ``--threads`` (0: one background thread does everything), from an image folder of
PNG (32 px) or JPEG (larger sizes: 500x375, as CUB-200's) files written to a temporary
directory, as a researcher's own data is read. With ``--train_steps N`` it also runs the
training program (:func:`l2t_jax.training.train.train_and_evaluate`, the CIFAR-100 networks,
``--method``) for N steps on that folder and reports how long the loop waited for its
batches: ``data_wait_seconds`` in total and at the worst step, against the step time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

from l2t_jax import data


def write_image_folder(root: str, image_size: int, count: int, classes: int = 10,
                       seed: int = 0) -> str:
    """``count`` images under ``root/train/<class>/`` (and 2 per class under val/ and
    test/): 32-px PNGs when ``image_size <= 64``, else 500x375 JPEGs (quality 90). Smooth
    random images, which compress and decode as photographs roughly do."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    width, height = (32, 32) if image_size <= 64 else (500, 375)
    suffix = ".png" if image_size <= 64 else ".jpg"
    coarse = (max(2, height // 16), max(2, width // 16), 3)
    for split, n in (("train", count), ("val", 2 * classes), ("test", 2 * classes)):
        for i in range(n):
            directory = os.path.join(root, split, f"c{i % classes}")
            os.makedirs(directory, exist_ok=True)
            small = Image.fromarray(rng.integers(0, 256, coarse, dtype=np.uint8))
            image = np.asarray(small.resize((width, height), Image.BICUBIC)).astype(np.int16)
            image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(os.path.join(directory, f"{i}{suffix}"), quality=90)
    return root


def images_per_second(source, image_size: int, batch_size: int, threads: int,
                      batches: int, prefetch_batches: int = 2) -> dict:
    """Reads ``batches`` + 1 batches through :func:`~l2t_jax.data.step_batches` (the first
    one, which starts the threads, is not timed): images/s and seconds per batch."""
    steps_per_epoch = len(source) // batch_size
    stream = iter(data.step_batches(
        source, range(batches + 1), steps_per_epoch=steps_per_epoch, batch_size=batch_size,
        rows=slice(0, batch_size), image_size=image_size, seed=0, threads=threads,
        prefetch_batches=prefetch_batches))
    first = time.perf_counter()
    next(stream)
    started = time.perf_counter()
    for _ in range(batches):
        images, _ = next(stream)
    seconds = time.perf_counter() - started
    stream.close()
    assert images.shape == (batch_size, image_size, image_size, 3)
    return {"threads": threads, "images_per_s": round(batches * batch_size / seconds, 1),
            "s_per_batch": round(seconds / batches, 4),
            "first_batch_s": round(started - first, 3)}


def training_wait(folder: str, image_size: int, batch_size: int, steps: int, method: str,
                  threads: int, workdir: str) -> dict:
    """Runs the training program for ``steps`` steps (one epoch) on ``folder`` with the
    CIFAR-100 networks; how long it waited for input, and its step time."""
    from l2t_jax.training import train
    from l2t_jax.training.config import default_config
    config = default_config()
    config.data.kind, config.data.name = "image_folder", "bench"
    config.data.data_dir, config.data.official_split = folder, ""
    config.data.num_classes, config.data.image_size = 0, image_size
    config.data.read_threads = threads
    config.method, config.batch_size = method, batch_size
    config.epochs, config.steps_per_epoch = 1, steps
    config.log_every_steps, config.checkpoint_every_steps = steps, steps
    config.eval_batch_size = batch_size
    result = train.train_and_evaluate(config, workdir)
    return {"method": method, "threads": threads, "steps": steps,
            "data_wait_seconds": result["data_wait_seconds"],
            "data_wait_max_step_seconds": result["data_wait_max_step_seconds"],
            "wall_seconds": result["wall_seconds"]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=10, help="timed batches per setting")
    parser.add_argument("--images", type=int, default=0,
                        help="train images in the folder (default: batch * (batches + 1))")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timings per setting (the median is reported)")
    parser.add_argument("--train_steps", type=int, default=0,
                        help="also run the training program this many steps")
    parser.add_argument("--method", default="scratch")
    parser.add_argument("--folder", default="", help="an existing folder to read instead")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or write_image_folder(
            os.path.join(scratch, "images"), args.image_size,
            args.images or args.batch * (args.batches + 1))
        source = data.ImageFolderSource(folder, "train")
        rows = []
        for threads in args.threads:
            timings = [images_per_second(source, args.image_size, args.batch, threads,
                                         args.batches) for _ in range(args.repeats)]
            median = statistics.median(t["images_per_s"] for t in timings)
            rows.append(dict(min(timings, key=lambda t: abs(t["images_per_s"] - median)),
                             repeats=[t["images_per_s"] for t in timings]))
        result = {"image_size": args.image_size, "batch": args.batch,
                  "train_images": len(source), "cpu_count": os.cpu_count(),
                  "pipeline": rows}
        if args.train_steps:
            result["training"] = training_wait(
                folder, args.image_size, args.batch, args.train_steps, args.method,
                -1, os.path.join(scratch, "run"))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

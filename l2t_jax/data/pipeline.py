"""grain pipelines from sources to batches.

Batch ``i`` of epoch ``e`` is a pure function of (seed, e, i), so the step counter is the
whole iterator state and resuming is exact. Threads read and augment examples
(:func:`read_options`); a background thread batches and normalises them.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np

from l2t_jax.data.augment import eval_example, normalize_batch, train_example

def read_options(threads: int, prefetch_examples: int):
    """grain's ReadOptions: ``threads`` reading examples in parallel (-1: one per CPU core,
    at most 16; 0: in the consumer's thread), ``prefetch_examples`` read ahead."""
    import grain
    if threads < 0:
        threads = min(os.cpu_count() or 1, 16)
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch_examples)

def train_examples(source, image_size: int, seed: int, epoch: int, hflip: bool = True,
                   crop_padding: int = 4, min_examples: int = 0, view: int = 0):
    """Epoch ``epoch`` as a grain MapDataset of single augmented examples (uint8 image
    (S, S, 3), int32 label), in the epoch's shuffled order.

    ``view`` > 0 is another augmentation of the same epoch: the same examples at every
    position (the shuffle is the epoch's), augmented by a random stream of its own
    (``config.meta_loss_batch='augment'``); view 0 is the training batches'.

    Shuffle and augmentation depend only on (seed, epoch) and the position, so
    ``dataset[p]`` is the example at position p of that epoch, whenever and wherever (in
    whichever process or thread) it is read: batch i is positions
    ``i * B ... i * B + B - 1``, and a process of a multi-host run loads just its rows of
    each batch. An epoch holds every example once, or the fewest whole repeats of the data
    giving ``min_examples`` examples.
    """
    import grain
    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    augment_seed = (epoch_seed if view == 0 else
                    int(np.random.SeedSequence([seed, epoch, view]).generate_state(1)[0]))
    repeats = max(1, -(-min_examples // len(source)))
    dataset = grain.MapDataset.source(source)
    if repeats > 1:
        dataset = dataset.repeat(repeats)
    return (dataset
            .shuffle(seed=epoch_seed)
            .random_map(lambda example, rng: train_example(example, rng, image_size, hflip,
                                                           crop_padding),
                        seed=augment_seed))


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
                 crop_padding: int = 4, threads: int = -1, prefetch_batches: int = 2,
                 view: int = 0):
    """The training loop's input pipeline: for each step s of ``steps``, in order, rows
    ``rows`` of global batch s (images (R, S, S, 3) f32, labels (R,) i32, R = len(rows)),
    as a grain IterDataset.

    Step s is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch`` of
    :func:`train_examples` (at least ``steps_per_epoch * batch_size`` examples per epoch),
    so it is a pure function of (seed, epoch, index) and equals ``train_batches(...)[i]``'s
    rows ``rows``: resuming from step s is starting ``steps`` at s, and each process reads
    only its own rows. ``threads`` read and augment examples in parallel
    (:func:`read_options`; order is kept); a background thread batches and normalises, and
    up to ``prefetch_batches`` batches are read ahead of the consumer. ``view``: which
    augmentation of the same examples (:func:`train_examples`).
    """
    import grain
    local = rows.stop - rows.start

    @functools.lru_cache(maxsize=2)
    def epoch_examples(epoch: int):
        return train_examples(source, image_size, seed, epoch, hflip, crop_padding,
                              min_examples=steps_per_epoch * batch_size, view=view)

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

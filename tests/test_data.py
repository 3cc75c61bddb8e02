"""l2t_jax.data: the image-folder source (a broken file, an empty class), the official
splits and their mapping onto TFDS's record order, the augmentation and the batches, the
per-class subsets of limited data, and what a missing TFDS data set says."""
import os

import numpy as np
import pytest

from helpers import RELEASE_DIR, one_line_error, run_main
from l2t_jax import data


def test_image_folder_with_broken_file_and_empty_class(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train",):
        for name in ("ant", "bee", "cat"):
            os.makedirs(tmp_path / split / name)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(
                tmp_path / split / "ant" / f"{i}.png")
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                tmp_path / split / "cat" / f"{i}.jpg")
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    source = data.ImageFolderSource(str(tmp_path), "train")
    assert source.classes == ["ant", "bee", "cat"] and source.empty_classes == ["bee"]
    assert source.labels.tolist() == [0, 0, 0, 2, 2, 2, 2]
    image, label = source[0]
    assert image.shape == (40, 30, 3) and image.dtype == np.uint8 and label == 0
    with pytest.raises(data.DataError, match=r"cannot decode image .*broken\.jpg"):
        source[6]                      # sorted: broken.jpg comes after 2.jpg in cat
    skipping = data.ImageFolderSource(str(tmp_path), "train", skip_corrupt=True)
    assert len(skipping) == 6 and [os.path.basename(p) for p in skipping.skipped] == ["broken.jpg"]
    images, labels = data.train_batches(skipping, 4, 32, seed=0, epoch=0)[0]
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.float32
    image, _ = data.eval_examples(skipping, 224)[0]
    assert image.shape == (224, 224, 3)
    with pytest.raises(data.DataError, match="no 'val' split at"):
        data.ImageFolderSource(str(tmp_path), "val")


def test_official_split_mapping(tmp_path):
    # TFDS stores CIFAR shuffled and keeps the original position in 'id'.
    original = np.arange(10) * 7             # example k of the original order
    record_order = np.random.default_rng(0).permutation(10)
    ids = [f"train_{k:05d}" for k in record_order]
    order = data.original_order_from_ids(ids)
    records = original[record_order]          # what the TFDS records hold
    np.testing.assert_array_equal(records[order], original)
    subset = data.Subset(data.ArraySource(np.zeros((10, 2, 2, 3), np.uint8), original),
                         [3, 0, 9])
    assert [int(subset[i][1]) for i in range(3)] == [21, 0, 63]
    with pytest.raises(data.DataError, match="split index 10 is outside"):
        data.Subset(subset.source, [1, 10])
    # The release's class lists relabel (the reference's FolderSubset).
    relabeled = data.Subset(data.ArraySource(np.zeros((3, 2, 2, 3), np.uint8), [5, 9, 5]),
                            [0, 1, 2], classes=[9, 5])
    assert [int(relabeled[i][1]) for i in range(3)] == [1, 0, 1]

    # CUB / Dogs: the lists index the sorted image-folder listing; TFDS keeps file names.
    names = ["b/2.jpg", "a/9.jpg", "b/10.jpg", "a/1.jpg"]
    order, labels = data.original_order_from_filenames(names)
    assert [names[i] for i in order] == ["a/1.jpg", "a/9.jpg", "b/10.jpg", "b/2.jpg"]
    assert labels.tolist() == [0, 0, 1, 1]

    indices, classes = data.official_split(RELEASE_DIR, "stl10", "val")
    assert len(indices) == 500 and len(set(indices)) == 500 and classes == list(range(10))
    os.makedirs(tmp_path / "splits")
    (tmp_path / "splits" / "stl10-val.json").write_text('{"classes": [], "indices": [1]}')
    with pytest.raises(data.DataError, match="sha256"):
        data.official_split(str(tmp_path), "stl10", "val")
    with pytest.raises(data.DataError, match="is missing"):
        data.official_split(str(tmp_path), "stl10", "test")


def test_augmentation_matches_the_reference_recipe():
    image = np.full((32, 32, 3), 255, np.uint8)
    crop = data.pad_crop_flip(image, 32, np.random.default_rng(3))
    assert crop.shape == (32, 32, 3) and (crop == 0).any()   # zero padding shows
    normalized = data.normalize(np.zeros((1, 1, 3), np.uint8))
    np.testing.assert_allclose(normalized[0, 0], -data.MEAN / data.STD, rtol=1e-6)
    # Batches are a pure function of (seed, epoch, index): read twice, in any order.
    source = data.ArraySource(np.random.default_rng(0).integers(
        0, 256, (16, 32, 32, 3), dtype=np.uint8), np.arange(16))
    first = data.train_batches(source, 4, 32, seed=1, epoch=2)
    again = data.train_batches(source, 4, 32, seed=1, epoch=2)
    for i in (3, 0, 2, 1):
        np.testing.assert_array_equal(first[i][0], again[i][0])
        np.testing.assert_array_equal(first[i][1], again[i][1])
    other_epoch = data.train_batches(source, 4, 32, seed=1, epoch=3)
    assert not np.array_equal(first[0][1], other_epoch[0][1])
    assert sorted(np.concatenate([first[i][1] for i in range(4)]).tolist()) == list(range(16))


class _Recording(data.ArraySource):
    """An ArraySource that records which examples were read (from any thread)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = []

    def __getitem__(self, index):
        self.read.append(int(index))
        return super().__getitem__(index)


@pytest.mark.parametrize("threads", [0, 3])
def test_step_batches_are_the_epochs_batches_rows_read_ahead_in_threads(threads):
    """The training loop's pipeline: step s is rows `rows` of batch s % spe of epoch
    s // spe (train_batches), across epoch ends, from any start step; only those rows'
    examples are read; threads and read-ahead change nothing."""
    rng = np.random.default_rng(0)
    source = _Recording(rng.integers(0, 256, (21, 32, 32, 3), dtype=np.uint8),
                        rng.integers(0, 5, 21))
    steps_per_epoch, batch, rows = 5, 4, slice(1, 3)          # 20 of 21 examples per epoch
    steps = range(3, 13)                                      # resumed at 3, epochs 0-2
    got = list(data.step_batches(source, steps, steps_per_epoch=steps_per_epoch,
                                 batch_size=batch, rows=rows, image_size=32, seed=7,
                                 threads=threads, prefetch_batches=2))
    assert len(got) == len(steps)
    reads = sorted(source.read)
    expected_reads = []
    for (images, labels), step in zip(got, steps):
        epoch, index = divmod(step, steps_per_epoch)
        whole = data.train_batches(source, batch, 32, seed=7, epoch=epoch,
                                   min_batches=steps_per_epoch)[index]
        assert images.dtype == np.float32 and images.shape == (2, 32, 32, 3)
        np.testing.assert_array_equal(images, whole[0][rows])
        np.testing.assert_array_equal(labels, whole[1][rows])
    # What step_batches read: the examples at its rows' positions, nothing else.
    for step in steps:
        epoch, index = divmod(step, steps_per_epoch)
        order = data.train_examples(source, 32, 7, epoch, min_examples=20)
        for position in range(index * batch + rows.start, index * batch + rows.stop):
            source.read = []
            order[position]
            expected_reads += source.read
    assert reads == sorted(expected_reads)


def test_another_view_holds_the_same_examples_augmented_apart():
    """view=1 (config.meta_loss_batch='augment'): every position reads the example of the
    training view (same labels), with other random crops; view 0 is unchanged."""
    rng = np.random.default_rng(0)
    source = _Recording(rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
                        rng.integers(0, 5, 16))
    first, other = (data.train_examples(source, 32, 7, 1, view=view) for view in (0, 1))
    same_pixels = 0
    for position in range(16):
        source.read = []
        image, label = first[position]
        other_image, other_label = other[position]
        assert source.read[0] == source.read[1] and label == other_label
        same_pixels += np.array_equal(image, other_image)
    assert same_pixels < 4            # 81 crops and a flip each: most views differ
    np.testing.assert_array_equal(data.train_examples(source, 32, 7, 1)[3][0],
                                  first[3][0])
    views = [list(data.step_batches(source, range(4), steps_per_epoch=2, batch_size=4,
                                    rows=slice(0, 4), image_size=32, seed=7, threads=0,
                                    view=view)) for view in (0, 1)]
    for (images, labels), (other_images, other_labels) in zip(*views):
        np.testing.assert_array_equal(labels, other_labels)
        assert not np.array_equal(images, other_images)


def test_eval_batches_pad_the_last_batch_and_split_rows():
    rng = np.random.default_rng(1)
    source = data.ArraySource(rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
                              np.arange(10))
    singles = data.eval_examples(source, 32)
    batches = list(data.eval_batches(source, 32, 4, rows=slice(2, 4), threads=2))
    assert [real for _, _, real in batches] == [4, 4, 2]
    for j, (images, labels, _) in enumerate(batches):
        for r, position in enumerate(range(4 * j + 2, 4 * j + 4)):
            if position < 10:
                np.testing.assert_array_equal(images[r], singles[position][0])
                assert labels[r] == position
            else:                                   # padding: zero input, label -1
                assert labels[r] == -1 and not images[r].any()


def test_missing_tfds_data_says_how_to_prepare(tmp_path):
    with pytest.raises(data.DataError, match="tfds build cifar100 --file_format=array_record"):
        data.TfdsSource("cifar100", "train", str(tmp_path))


def test_per_class_subset_is_seeded_and_checked():
    labels = np.repeat(np.arange(4), [5, 7, 9, 6])
    source = data.ArraySource(np.zeros((len(labels), 2, 2, 3), np.uint8), labels)
    first = data.per_class_subset(source, 3, seed=0)
    assert np.bincount(data.source_labels(first)).tolist() == [3, 3, 3, 3]
    np.testing.assert_array_equal(first.indices, data.per_class_subset(source, 3, 0).indices)
    assert not np.array_equal(first.indices, data.per_class_subset(source, 3, 1).indices)
    with pytest.raises(data.DataError, match="class 0 has 5 examples"):
        data.per_class_subset(source, 6, seed=0)


def test_missing_tfds_data_dir_says_so_and_how_to_prepare(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(data.DataError) as error:
        data.TfdsSource("cifar100", "train", str(missing))
    message = str(error.value)
    assert f"config.data.data_dir='{missing}' does not exist" in message
    assert "tfds build cifar100 --file_format=array_record" in message
    assert "TFRECORD" not in message and "already prepared" not in message
    line = one_line_error(run_main("--config=cifar100:tiny", f"--workdir={tmp_path / 'run'}",
                                 f"--config.data.data_dir={missing}"))
    assert "does not exist" in line

"""Data without a validation split of their own get one carved from train when the config
evaluates on "val" (build.load_splits, data.carve_validation): npz arrays without val.npz
and a TFDS data set without a "val" split, as one's own image folder without val/
(test_image_folder.py). Stratified, seeded by data.split_seed alone, disjoint from what
trains, and never the test data."""
import logging
import os

import numpy as np
import pytest

from helpers import load_config, tiny_config
from l2t_jax import data
from l2t_jax.training import build

CLASS_SIZES = (20, 30, 10)          # train examples of classes 0, 1, 2


@pytest.fixture(scope="module")
def npz_without_val(tmp_path_factory):
    """train.npz (classes of CLASS_SIZES, shuffled) and test.npz, no val.npz; every image
    is filled with its train position, so an image tells where it came from."""
    directory = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(3), CLASS_SIZES))
    positions = np.arange(len(labels), dtype=np.uint8)
    np.savez(directory / "train.npz", labels=labels,
             images=np.broadcast_to(positions[:, None, None, None], (len(labels), 8, 8, 3)))
    np.savez(directory / "test.npz", labels=np.arange(12) % 3,
             images=np.full((12, 8, 8, 3), 255, np.uint8))
    return directory


def _config(directory, **overrides):
    config = tiny_config(directory, "unused", **overrides)
    config.data.eval_splits = ("val", "test")
    return config


def _positions(source):
    """The train positions of a split's images (see npz_without_val)."""
    return [int(source[i][0][0, 0, 0]) for i in range(len(source))]


def test_npz_without_val_carves_a_stratified_seeded_val_split(npz_without_val, caplog):
    config = _config(npz_without_val)
    assert not data.has_split("npz", str(npz_without_val), "val")
    with caplog.at_level(logging.INFO, logger="l2t_jax.data"):
        splits = build.load_splits(config)
    assert list(splits) == ["train", "val", "test"]
    assert (f"{npz_without_val} has no val split: carved a stratified validation split "
            "from train, 6 of its 60 images (val_fraction 0.1, split_seed 0)") in caplog.text
    train, val = _positions(splits["train"]), _positions(splits["val"])
    assert not set(train) & set(val) and sorted(train + val) == list(range(60))
    assert 255 not in train + val and set(_positions(splits["test"])) == {255}
    # Stratified: round(0.1 * n) of each class, with the data's own labels.
    assert np.bincount(data.source_labels(splits["val"])).tolist() == [2, 3, 1]
    assert np.bincount(data.source_labels(splits["train"])).tolist() == [18, 27, 9]
    # split_seed alone draws it: the run's seed does not move it, another split_seed does.
    assert _positions(build.load_splits(_config(npz_without_val, seed=7))["val"]) == val
    other = _config(npz_without_val)
    other.data.split_seed = 1
    assert _positions(build.load_splits(other)["val"]) != val
    larger = _config(npz_without_val)
    larger.data.val_fraction = 0.5
    assert np.bincount(data.source_labels(build.load_splits(larger)["val"])).tolist() == [
        10, 15, 5]


def test_limited_and_held_out_data_come_from_the_carved_train_part(npz_without_val):
    """train_examples_per_class and the held-out meta split draw from what is left after
    val is carved: no val image trains theta or phi."""
    config = _config(npz_without_val, meta_loss_batch="held_out")
    config.data.train_examples_per_class, config.data.meta_held_out_per_class = 8, 2
    splits = build.load_splits(config)
    val = set(_positions(splits["val"]))
    train, meta = set(_positions(splits["train"])), set(_positions(splits["meta"]))
    assert len(train) == 3 * 6 and len(meta) == 3 * 2 and len(val) == 6
    assert not (train | meta) & val and not train & meta


def test_npz_with_val_uses_its_own(npz_without_val, tmp_path, caplog):
    for name in ("train.npz", "test.npz"):
        os.symlink(npz_without_val / name, tmp_path / name)
    np.savez(tmp_path / "val.npz", labels=np.arange(6) % 3,
             images=np.full((6, 8, 8, 3), 200, np.uint8))
    with caplog.at_level(logging.INFO, logger="l2t_jax.data"):
        splits = build.load_splits(_config(tmp_path))
    assert "carved" not in caplog.text
    assert set(_positions(splits["val"])) == {200} and len(splits["train"]) == 60


def test_a_config_evaluating_on_test_alone_carves_nothing(npz_without_val):
    config = _config(npz_without_val)
    config.data.eval_splits = ("test",)
    splits = build.load_splits(config)
    assert list(splits) == ["train", "test"] and len(splits["train"]) == 60


def test_pretrain_cifar10_selects_on_val_carved_from_cifar10_train(tmp_path):
    """The shipped config on TFDS (mock records of cifar10's train and test splits, which
    have no val split): val is 10% of every class of train, disjoint from what trains."""
    import tensorflow_datasets as tfds
    config = load_config("pretrain_cifar10", "tiny")
    assert tuple(config.data.eval_splits) == ("val", "test")
    with tfds.testing.mock_data(num_examples=60, policy=tfds.testing.MockPolicy.USE_CODE):
        assert not data.has_split("tfds", config.data.data_dir, "val", "cifar10")
        splits = build.load_splits(config)
        everything = data.TfdsSource("cifar10", "train")
        labels = data.source_labels(everything)
    assert isinstance(splits["val"], data.Subset) and splits["val"].source is \
        splits["train"].source
    assert not set(splits["val"].indices) & set(splits["train"].indices)
    assert len(splits["val"]) + len(splits["train"]) == len(everything) == 60
    counts = np.bincount(labels, minlength=10)
    expected = [min(max(round(0.1 * n), 1), n - 1) for n in counts if n]
    held_out = np.bincount(data.source_labels(splits["val"]), minlength=10)
    assert held_out[counts > 0].tolist() == expected
    assert len(splits["test"]) == 60

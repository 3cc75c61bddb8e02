"""Data without a validation split of their own get one carved from train when the config
evaluates on "val" (build.load_splits, data.carve_validation): npz arrays without val.npz
and a TFDS data set without a "val" split, as one's own image folder without val/
(test_image_folder.py). Stratified, seeded by data.split_seed alone, disjoint from what
trains, and never the test data. The images that data.meta_val_per_class moves out of val
(the same for every method and seed) and the meta batches of meta_loss_batch='val'."""
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
    assert data.stored_split_name("npz", str(npz_without_val), "val") is None
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


def test_pretrain_cifar10_selects_on_val_carved_from_cifar10_train(mock_tfds):
    """The shipped config on TFDS (mock records of cifar10's train and test splits, which
    have no val split): val is 10% of every class of train, disjoint from what trains."""
    config = load_config("pretrain_cifar10", "tiny")
    assert tuple(config.data.eval_splits) == ("val", "test")
    with mock_tfds("cifar10", num_examples=60):
        assert data.stored_split_name("tfds", config.data.data_dir, "val", "cifar10") is None
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


def _whole_val(directory):
    """The val split of :func:`_meta_val_config` before any image moves out of it."""
    config = _config(directory)
    config.data.val_fraction = 0.5
    return config


def _meta_val_config(directory, **overrides):
    """_config with a val split of half of every class (10, 15, 5) and 3 images per class
    of it moved out for the meta loss."""
    config = _config(directory, **overrides)
    config.data.val_fraction = 0.5
    config.data.meta_val_per_class = 3
    return config


def test_meta_val_images_leave_val_alike_for_every_method_and_seed(npz_without_val):
    """data.meta_val_per_class: that many val images per class leave val, drawn with
    data.split_seed alone: every method and seed keeps the same val, and only
    meta_loss_batch='val' has them as its meta split; train is untouched."""
    whole = build.load_splits(_whole_val(npz_without_val))
    runs = {(method, batch, seed): build.load_splits(_meta_val_config(
                npz_without_val, method=method, meta_loss_batch=batch, seed=seed))
            for method, batch, seed in (("scratch", "same", 0), ("fm", "same", 3),
                                        ("l2t_ww", "same", 1), ("l2t_ww", "val", 0),
                                        ("l2t_ww", "val", 5))}
    vals = {key: _positions(splits["val"]) for key, splits in runs.items()}
    assert len({tuple(v) for v in vals.values()}) == 1
    val = set(next(iter(vals.values())))
    metas = {key: _positions(splits["meta"]) for key, splits in runs.items() if key[1] == "val"}
    assert len({tuple(m) for m in metas.values()}) == 1
    meta = set(next(iter(metas.values())))
    assert not meta & val and meta | val == set(_positions(whole["val"]))
    assert np.bincount(data.source_labels(runs[("l2t_ww", "val", 0)]["meta"])).tolist() == [
        3, 3, 3]
    assert np.bincount(data.source_labels(runs[("scratch", "same", 0)]["val"])).tolist() == [
        7, 12, 2]
    assert all("meta" not in splits for key, splits in runs.items() if key[1] != "val")
    for splits in runs.values():
        assert _positions(splits["train"]) == _positions(whole["train"])
    other = _meta_val_config(npz_without_val, meta_loss_batch="val")
    other.data.split_seed = 1         # moves val itself, and so the meta split
    assert set(_positions(build.load_splits(other)["meta"])) != meta




def test_a_meta_val_count_that_empties_a_val_class_names_the_key(npz_without_val):
    config = _meta_val_config(npz_without_val, meta_loss_batch="val")
    config.data.meta_val_per_class = 5           # class 2 has 5 val images
    with pytest.raises(data.DataError, match=r"^config\.data\.meta_val_per_class=5 leaves "
                                             r"none of class 2 \(5 examples\) in the val"):
        build.load_splits(config)


def test_the_val_meta_batches_are_the_moved_val_images(npz_without_val):
    """The training loop's inputs with meta_loss_batch='val': each step's meta batch holds
    images of the meta split only (the images tell their train position), the training
    batch none of val's or the meta split's."""
    from l2t_jax.training import parallel, train
    config = _meta_val_config(npz_without_val, meta_loss_batch="val")
    config.data.read_threads, config.data.prefetch_batches = 0, 0
    splits = build.load_splits(config)
    inputs = train._StepInputs(config, splits, parallel.make_mesh(), steps_per_epoch=3,
                               start=0, total_steps=6, schedule=train.PhiSchedule())
    meta, val = set(_positions(splits["meta"])), set(_positions(splits["val"]))
    try:
        for step in range(6):
            images, labels, meta_images, meta_labels = inputs.next(step)
            seen = _decoded_positions(meta_images)
            assert seen <= meta and len(meta_labels) == config.batch_size
            assert not _decoded_positions(images) & (meta | val)
    finally:
        inputs.close()


def _decoded_positions(images) -> set:
    """The train positions of a batch's (normalised, cropped) images: the centre pixel
    holds the value the image was filled with (npz_without_val)."""
    centre = np.asarray(images)[:, images.shape[1] // 2, images.shape[2] // 2, 0]
    return set(np.rint((centre * data.STD[0] + data.MEAN[0]) * 255).astype(int).tolist())


def test_a_tfds_validation_split_is_val_and_nothing_is_carved(mock_tfds, monkeypatch):
    """A TFDS set that names its validation split ``validation`` (mock records; the mock's
    builder lists no splits, so a builder listing train/validation/test stands in for the
    prepared set's): val is read from it, and train keeps every record."""
    import types

    import tensorflow_datasets as tfds
    config = load_config("pretrain_cifar10", "tiny")
    splits_on_disk = {"train": None, "validation": None, "test": None}
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: types.SimpleNamespace(
        info=types.SimpleNamespace(splits=splits_on_disk)))
    read = []
    real_source = data.TfdsSource

    def recording_source(name, split, data_dir=None):
        read.append(split)
        return real_source(name, split, data_dir)
    monkeypatch.setattr(data, "TfdsSource", recording_source)
    with mock_tfds("cifar10", num_examples=30):
        assert data.stored_split_name("tfds", config.data.data_dir, "val", "cifar10") == \
            "validation"
        splits = build.load_splits(config)
    assert read == ["train", "validation", "test"]
    assert not isinstance(splits["train"], data.Subset) and len(splits["train"]) == 30
    assert len(splits["val"]) == 30

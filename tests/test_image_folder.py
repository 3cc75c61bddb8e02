"""One's own image folder (configs/image_folder.py, data.image_folder_splits): classes
inferred from train/ and checked, a stratified seeded val split carved when there is no
val/, grayscale / RGBA / mixed-size images, and the one-line errors. The folders are
sklearn's real digits saved as PNG files (digits.write_digits_image_folder)."""
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from helpers import load_config, one_line_error, run_main
from l2t_jax import data
from l2t_jax.tools import digits
from l2t_jax.training import build
from l2t_jax.training.config import validate_config

CLASSES = ["one", "two", "zero"]            # digits 0, 1, 2 by folder name, sorted


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two digit folders of the same images: without val/ (12 train / 4 test per class) and
    with val/ (3 per class)."""
    root = tmp_path_factory.mktemp("folders")
    without_val = str(root / "no_val")
    assert digits.write_digits_image_folder(without_val, digits=(0, 1, 2), train_per_class=12,
                                          test_per_class=4) == {"train": 36, "test": 12}
    with_val = str(root / "with_val")
    digits.write_digits_image_folder(with_val, digits=(0, 1, 2), train_per_class=12,
                                   test_per_class=4, val_per_class=3)
    return without_val, with_val


def _config(root, variant="small,tiny", **data_overrides):
    config = load_config("image_folder", variant)
    config.data.data_dir = root
    for key, value in data_overrides.items():
        config.data[key] = value
    return config


def _files(source):
    """The file of every example of a split (through a carved Subset too)."""
    if isinstance(source, data.Subset):
        return [source.source.files[i] for i in source.indices]
    return list(source.files)


def test_without_val_the_classes_are_inferred_and_val_is_carved_stratified_and_seeded(
        folders, caplog):
    root = folders[0]
    config = _config(root)
    assert config.data.num_classes == 0 and config.data.classes == ()
    resolved = build.resolve_data(config)
    assert list(resolved.data.classes) == CLASSES and resolved.data.num_classes == 3
    assert config.data.num_classes == 0          # a copy: the caller's config is unchanged
    validate_config(resolved)
    assert build.build_networks(resolved)[1].num_classes == 3
    with caplog.at_level(logging.INFO, logger="l2t_jax.data"):
        splits = build.load_splits(resolved)
    assert "carved a stratified validation split from train, 3 of its 36 images" in caplog.text
    train, val, test = (_files(splits[s]) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (33, 3, 12)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(_files(data.ImageFolderSource(root, "train")))
    # Stratified: one of each class's 12 (round(0.1 * 12) = 1), with the folder's labels.
    assert sorted(data.source_labels(splits["val"]).tolist()) == [0, 1, 2]
    assert [os.path.basename(os.path.dirname(f)) for f in val] == CLASSES
    assert np.bincount(data.source_labels(splits["train"])).tolist() == [11, 11, 11]
    # The same seed gives the same split; the run's own seed does not move it; another
    # split_seed and another fraction do.
    resolved.seed = 5
    assert _files(build.load_splits(resolved)["val"]) == val
    assert _files(build.load_splits(_config(root, split_seed=1))["val"]) != val
    larger = build.load_splits(_config(root, val_fraction=0.25))["val"]
    assert np.bincount(data.source_labels(larger)).tolist() == [3, 3, 3]


def test_with_val_the_folder_is_used_as_it_is(folders, caplog):
    root = folders[1]
    with caplog.at_level(logging.INFO, logger="l2t_jax.data"):
        splits = build.load_splits(build.resolve_data(_config(root)))
    assert "carved" not in caplog.text
    assert {s: len(v) for s, v in splits.items()} == {"train": 36, "val": 9, "test": 12}
    assert all(isinstance(v, data.ImageFolderSource) for v in splits.values())
    assert all(f.startswith(os.path.join(root, "val")) for f in _files(splits["val"]))
    assert splits["val"].classes == CLASSES


def test_grayscale_rgba_and_mixed_sizes_become_rgb_with_one_log_line(folders, caplog):
    root = folders[0]
    modes, sizes = set(), set()
    source = data.ImageFolderSource(root, "train")
    with caplog.at_level(logging.INFO, logger="l2t_jax.data"):
        for i, path in enumerate(source.files):
            image, label = source[i]
            with Image.open(path) as stored:
                modes.add(stored.mode)
                sizes.add(stored.size)
                expected = np.asarray(stored)
            assert image.dtype == np.uint8 and image.shape == expected.shape[:2] + (3,)
            if expected.ndim == 2:                  # grayscale: the level in each channel
                expected = np.repeat(expected[..., None], 3, axis=-1)
            np.testing.assert_array_equal(image, expected[..., :3])    # RGBA: alpha dropped
    assert modes == {"L", "RGB", "RGBA"} and len(sizes) == 5
    conversions = [r for r in caplog.records if "converting non-RGB images" in r.message]
    assert len(conversions) == 1, caplog.text               # not one per image
    assert "mode L, grayscale" in conversions[0].getMessage()
    # Every size gives one network input size, in evaluation and in training batches.
    evaluated = data.eval_examples(source, 32)
    assert {evaluated[i][0].shape for i in range(len(source))} == {(32, 32, 3)}
    images, labels = data.train_batches(source, 12, 32, seed=0, epoch=0)[0]
    assert images.shape == (12, 32, 32, 3) and np.isfinite(images).all()
    # 16-bit grayscale is scaled to 8 bits, not clipped at 255 as convert('RGB') would.
    sixteen = os.path.join(os.path.dirname(root), "sixteen")
    os.makedirs(os.path.join(sixteen, "train", "a"))
    Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16)).save(
        os.path.join(sixteen, "train", "a", "0.png"))
    decoded = data.ImageFolderSource(sixteen, "train")[0][0]
    assert decoded[0, :, 0].tolist() == [0, 100, 255]


def test_num_classes_is_checked_and_mistakes_are_clear_errors(folders, tmp_path):
    root = folders[0]
    assert build.resolve_data(_config(root, num_classes=3)).data.num_classes == 3
    with pytest.raises(data.DataError, match=r"config.data.num_classes=4, but .*/train has 3 "
                                             r"class folders \(one, two, zero\)"):
        build.resolve_data(_config(root, num_classes=4))
    with pytest.raises(data.DataError, match=r"config.data.classes=\['zero', 'one', 'two'\] "
                                             "differs"):
        build.resolve_data(_config(root, classes=("zero", "one", "two")))
    with pytest.raises(data.DataError, match="config.data.data_dir is empty"):
        build.resolve_data(_config(""))
    with pytest.raises(data.DataError, match=r"'/nowhere/images' .* does not exist; expected "
                                             "ROOT/train/<class>/<image>"):
        build.resolve_data(_config("/nowhere/images"))
    # An empty class folder, in train or in test.
    broken = str(tmp_path / "broken")
    shutil.copytree(root, broken)
    os.makedirs(os.path.join(broken, "train", "three"))
    os.makedirs(os.path.join(broken, "test", "three"))
    config = build.resolve_data(_config(broken))
    with pytest.raises(data.DataError, match=r"broken/train: class folder\(s\) three hold no "
                                             "images"):
        build.load_splits(config)
    # Train and test with different classes.
    shutil.rmtree(os.path.join(broken, "train", "three"))
    shutil.rmtree(os.path.join(broken, "test", "zero"))
    with pytest.raises(data.DataError, match=r"class folders of .*broken/test differ from "
                                             r"those of .*broken/train: only in train: zero; "
                                             "only in test: three"):
        build.load_splits(build.resolve_data(_config(broken)))
    # Through the command line: one line, before anything compiles.
    error = one_line_error(run_main("--config=image_folder:small,tiny",
                                    f"--workdir={tmp_path / 'run'}",
                                    "--config.data.data_dir=/nowhere/images"))
    assert "/nowhere/images" in error and "does not exist" in error
    error = one_line_error(run_main("--config=image_folder:small,tiny",
                                    f"--workdir={tmp_path / 'run'}",
                                    f"--config.data.data_dir={root}",
                                    "--config.data.num_classes=7"))
    assert "config.data.num_classes=7, but" in error and "has 3 class folders" in error


def test_both_settings_validate_and_pair_all_to_all(folders):
    for variant, source, target, size, pairs in (("tiny", "resnet34", "resnet18:tiny", 64, 16),
                                                 ("small", "resnet32", "vgg9_bn", 32, 15)):
        config = build.resolve_data(_config(folders[0], variant))
        validate_config(config)
        assert (config.source_model, config.target_model) == (source, target)
        assert config.data.image_size == size and config.batch_size == (
            8 if variant == "tiny" else 16)      # tiny's batch; the small-data recipe's
        assert len(build.build_transfer(config).pairs) == pairs

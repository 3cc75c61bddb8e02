"""The paper's configs against what the authors stated, and model selection never on test.

The authors answered two questions about their runs in their repository's issue tracker:
- alinlab/L2T-ww#4 (Stanford40): 10% of the 4,000 training images held out for validation
  (3,600 for training), meta learning rate 1e-3, meta weight decay 1e-4, beta 0.5, T 2.
- alinlab/L2T-ww#6 (CIFAR-100 and STL-10): a VGG-9 with BatchNorm as the target, the
  appendix's hyperparameters (SGD 0.1 at batch 128), 10% of the training data held out for
  validation, random padding and flips.
No JAX is imported: configs are plain data.
"""
import importlib

import numpy as np
import pytest

from l2t_jax import configs

# The reference's ImageNet-size pair list (ResNet-34 -> ResNet-18; its README's default).
AUTHORS_IMAGENET_PAIRS = "4-4,4-3,4-2,4-1,3-4,3-3,3-2,3-1,2-4,2-3,2-2,2-1,1-4,1-3,1-2,1-1"
# The reference README's CIFAR-100 / STL-10 pair list (ResNet-32 -> VGG-9).
AUTHORS_CIFAR_PAIRS = "4-0,4-1,4-2,4-3,4-4,9-0,9-1,9-2,9-3,9-4,14-0,14-1,14-2,14-3,14-4"


def shipped(name, variant=None):
    return importlib.import_module(f"l2t_jax.configs.{name}").get_config(variant)


def stratified_split():
    """data's stratified_split, wherever the package keeps it."""
    for module in ("l2t_jax.data.folders", "l2t_jax.data"):
        try:
            found = getattr(importlib.import_module(module), "stratified_split", None)
        except ImportError:
            continue
        if found is not None:
            return found
    raise AssertionError("no stratified_split in l2t_jax.data")


def test_stanford40_is_the_authors_setting():
    """alinlab/L2T-ww#4: 'We used 10% of training images for validation, i.e., we used 3600
    images for training. ... we used meta_lr=1e-3 and meta_wd=1e-4. Other parameters are
    same as other experiments, e.g., beta=0.5 and T=2.'"""
    for variant in (None, "tiny"):
        config = shipped("stanford40", variant)
        assert config.meta_learning_rate == 1e-3
        assert config.meta_weight_decay == 1e-4
        assert config.beta == 0.5
        assert config.T == 2
        assert config.data.val_fraction == 0.1
        assert config.data.eval_splits[0] == "val" and "test" in config.data.eval_splits
        # Its own image folder, no official split: val is carved from train/.
        assert (config.data.kind, config.data.official_split) == ("image_folder", "")
        assert config.data.num_classes == 40
    full = shipped("stanford40")
    assert (full.method, full.source_model, full.target_model) == ("l2t_ww", "resnet34",
                                                                   "resnet18")
    assert (full.batch_size, full.epochs, full.data.image_size) == (64, 200, 224)
    assert full.pairs == AUTHORS_IMAGENET_PAIRS


def test_mit67_carves_the_same_validation_split():
    for variant in (None, "tiny"):
        config = shipped("mit67", variant)
        assert config.data.val_fraction == 0.1
        assert config.data.eval_splits[0] == "val" and "test" in config.data.eval_splits
        assert (config.data.kind, config.data.official_split) == ("image_folder", "")
        assert config.data.num_classes == 67
    full = shipped("mit67")
    # The reference code's defaults (the authors named another value for Stanford40 only).
    assert (full.meta_learning_rate, full.meta_weight_decay, full.beta, full.T) == (
        1e-4, 1e-4, 0.5, 2)
    assert full.pairs == AUTHORS_IMAGENET_PAIRS
    assert (full.batch_size, full.epochs, full.data.image_size) == (64, 200, 224)


@pytest.mark.parametrize("name, classes, per_class, train, val", [
    ("stanford40", 40, 100, 3600, 400),     # alinlab/L2T-ww#4: 3,600 for training
    ("mit67", 67, 80, 4824, 536),           # TrainImages.txt: 80 per class
])
def test_the_carved_validation_split_has_the_stated_size(name, classes, per_class, train,
                                                         val):
    config = shipped(name)
    labels = np.repeat(np.arange(classes), per_class)
    kept, held_out = stratified_split()(labels, config.data.val_fraction,
                                        config.data.split_seed)
    assert (len(kept), len(held_out)) == (train, val)
    assert not set(kept) & set(held_out)
    # Stratified: the same share of every class.
    np.testing.assert_array_equal(np.bincount(labels[held_out]), val // classes)
    # The steps per epoch the docs give (the loop drops the last partial batch).
    assert train // config.batch_size == {"stanford40": 56, "mit67": 75}[name]


@pytest.mark.parametrize("name", ["cifar100", "stl10"])
def test_cifar_and_stl10_follow_the_authors_answer(name):
    """alinlab/L2T-ww#6: VGG-9 with BN; the appendix's hyperparameters (0.1, not rescaled
    for the batch of 128); 10% of the training data for validation (the release's split
    lists: 45,000 / 5,000 and 4,500 / 500); random padding and flips."""
    config = shipped(name)
    assert (config.source_model, config.target_model) == ("resnet32", "vgg9_bn")
    assert config.batch_size == 128
    assert config.learning_rate * config.batch_size / config.lr_reference_batch_size == 0.1
    assert (config.data.crop_padding, config.data.hflip, config.data.image_size) == (4, True,
                                                                                     32)
    assert config.data.official_split == name   # train / val / test from the split lists
    assert config.data.eval_splits[0] == "val"
    assert config.pairs in (AUTHORS_CIFAR_PAIRS, "all_to_all")
    assert (config.meta_learning_rate, config.meta_weight_decay, config.beta, config.T) == (
        1e-4, 1e-4, 0.5, 2)


def _training_configs():
    """(name, variant, config) of every shipped config that trains one run; the programs
    (the demo, the study) build their runs' configs themselves and are skipped."""
    found = []
    for name in configs.names():
        if name == "default":
            continue
        for variant in (None, "tiny"):
            config = shipped(name, variant)
            if "program" in config:
                break
            found.append((name, variant, config))
    return found


def test_no_shipped_config_selects_its_model_on_test():
    """The reported number is test accuracy at the best accuracy on the first evaluation
    split ('val' when present): val must be there, first, and not the test data."""
    problems = []
    for name, variant, config in _training_configs():
        label = name + (f":{variant}" if variant else "")
        splits = tuple(config.data.eval_splits)
        if not splits or splits[0] != "val":
            problems.append(f"{label}: eval_splits={splits} (needs 'val' first)")
            continue
        if config.data.official_split:
            continue        # val is the release's own list, drawn from the training data
        if config.data.kind == "image_folder" and not 0 < config.data.val_fraction < 1:
            problems.append(f"{label}: an image folder without val/ cannot carve one "
                            f"(val_fraction={config.data.val_fraction})")
    assert not problems, "configs that select on test:\n" + "\n".join(problems)
    assert {name for name, _, _ in _training_configs()} >= {
        "cifar100", "stl10", "cub200", "dogs", "mit67", "stanford40", "image_folder"}

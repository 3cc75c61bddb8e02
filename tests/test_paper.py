"""l2t_jax.tools.paper (no JAX): the paper's numbers and names as data, the row labels that name
its rows (l2t_jax.transfer.methods.row_label), and the reference's default pair lists."""
import os

import pytest

from helpers import REPO_ROOT
from l2t_jax.tools import paper
from l2t_jax.transfer import methods, pair_lists


@pytest.mark.parametrize("method, scheme, label", [
    ("scratch", None, "Scratch"), ("scratch", "all_to_all", "Scratch"), ("lwf", None, "LwF"),
    ("at", "one_to_one", "AT (one-to-one)"), ("lwf_at", "one_to_one", "LwF+AT (one-to-one)"),
    ("fm", "single", "FM (single)"), ("fm", "one_to_one", "FM (one-to-one)"),
    ("l2t_w", "single", "L2T-w (single)"), ("l2t_w", "one_to_one", "L2T-w (one-to-one)"),
    ("l2t_ww", "all_to_all", "L2T-ww (all-to-all)"), ("fm", "all_to_all", "FM (all-to-all)"),
    ("l2t_ww", "4-0,9-1", "L2T-ww (4-0,9-1)"), ("l2t_ww", [[4, 0], [9, 1]], "L2T-ww (4-0,9-1)"),
    ("l2t_ww", "4-0,4-1,4-2,4-3,4-4", "L2T-ww (5 pairs)"), ("new_method", None, "new_method"),
])
def test_row_label(method, scheme, label):
    assert methods.row_label(method, scheme) == label


def test_paper_tables_hold_the_spec_numbers():
    assert list(paper.PAPER_RESULTS) == list(paper.PAPER_ROWS)
    assert len(paper.PAPER_ROWS) == 9
    assert paper.PAPER_RESULTS["Scratch"]["CIFAR-100"] == (67.69, 0.22)
    assert paper.PAPER_RESULTS["L2T-ww (all-to-all)"]["Stanford Dogs"] == (78.08, 0.96)
    assert paper.PAPER_RESULTS["L2T-w (single)"]["Stanford40"] == (46.25, 3.66)
    multi = paper.PAPER_MULTI_SOURCE
    assert [multi["L2T-ww (all-to-all)"][c][0] for c in paper.MULTI_SOURCE_COLUMNS] == [
        78.31, 79.35, 79.80, 80.52]
    assert [multi["FM (one-to-one)"][c][0] for c in paper.MULTI_SOURCE_COLUMNS] == [
        76.38, 77.45, 77.69, 77.15]


def test_dataset_columns():
    assert [paper.dataset_column(d) for d in (
        "cifar100", "stl10", "caltech_birds2011", "mit67", "stanford40", "stanford_dogs",
        "digits")] == list(paper.PAPER_COLUMNS) + ["digits"]


def test_second_source_labels():
    label = paper.second_source_label
    assert label([]) == "none"
    assert label([{"model": "resnet20", "num_classes": 200}]) == "+ TinyImageNet ResNet-20"
    assert label([{"model": "resnet32", "num_classes": 200}]) == "+ TinyImageNet ResNet-32"
    assert label([{"model": "resnet32", "num_classes": 10}]) == "+ CIFAR-10 ResNet-32"
    assert label(["resnet32"]) == "+ ResNet-32"


def test_pair_lists_are_defined_once():
    """The authors' default pair lists are written in l2t_jax.transfer.pair_lists only; the
    default config imports them."""
    from l2t_jax.configs import default
    assert default.CIFAR_PAIRS is pair_lists.CIFAR_PAIRS
    assert default.IMAGENET_PAIRS is pair_lists.IMAGENET_PAIRS
    assert len(pair_lists.CIFAR_PAIRS.split(",")) == 15
    assert len(pair_lists.IMAGENET_PAIRS.split(",")) == 16
    package = os.path.join(REPO_ROOT, "l2t_jax")
    holders = []
    for directory, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(directory, name)) as f:
                    text = f.read()
                if pair_lists.CIFAR_PAIRS in text or pair_lists.IMAGENET_PAIRS in text:
                    holders.append(os.path.relpath(os.path.join(directory, name), REPO_ROOT))
    assert holders == [os.path.join("l2t_jax", "transfer", "pair_lists.py")], holders

"""l2t_jax.transfer.pairing: the matching schemes (single, one-to-one, all-to-all) resolved to the
pairs of each network family, and explicit pair lists."""
import pytest

from l2t_jax import models
from l2t_jax.transfer import pair_lists, pairing


def test_matching_schemes():
    resnet32, vgg = models.get_model("resnet32", 200), models.get_model("vgg9_bn", 100)
    assert pairing.resolve_pairs("single", resnet32, vgg) == ((14, 4),)
    assert pairing.resolve_pairs("one_to_one", resnet32, vgg) == ((4, 0), (9, 1), (14, 2))
    assert pairing.resolve_pairs("all_to_all", resnet32, vgg) == pairing.parse_pairs(
        pair_lists.CIFAR_PAIRS)
    resnet34, resnet18 = models.get_model("resnet34", 1000), models.get_model("resnet18", 200)
    assert pairing.resolve_pairs("single", resnet34, resnet18) == ((4, 4),)
    assert pairing.resolve_pairs("one_to_one", resnet34, resnet18) == (
        (1, 1), (2, 2), (3, 3), (4, 4))
    assert sorted(pairing.resolve_pairs("all_to_all", resnet34, resnet18)) == sorted(
        pairing.parse_pairs(pair_lists.IMAGENET_PAIRS))
    assert pairing.resolve_pairs("9-1,4-0", resnet32, vgg) == ((9, 1), (4, 0))
    with pytest.raises(ValueError, match="unknown matching scheme 'one-to-one'"):
        pairing.resolve_pairs("one-to-one", resnet32, vgg)

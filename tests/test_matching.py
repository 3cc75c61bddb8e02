"""l2t_jax.matching: the matching schemes (single, one-to-one, all-to-all) resolved to the
pairs of each network family, and explicit pair lists."""
import pytest

from l2t_jax import matching, models


def test_matching_schemes():
    resnet32, vgg = models.get_model("resnet32", 200), models.get_model("vgg9_bn", 100)
    assert matching.resolve_pairs("single", resnet32, vgg) == ((14, 4),)
    assert matching.resolve_pairs("one_to_one", resnet32, vgg) == ((4, 0), (9, 1), (14, 2))
    assert matching.resolve_pairs("all_to_all", resnet32, vgg) == matching.parse_pairs(
        matching.CIFAR_PAIRS)
    resnet34, resnet18 = models.get_model("resnet34", 1000), models.get_model("resnet18", 200)
    assert matching.resolve_pairs("single", resnet34, resnet18) == ((4, 4),)
    assert matching.resolve_pairs("one_to_one", resnet34, resnet18) == (
        (1, 1), (2, 2), (3, 3), (4, 4))
    assert sorted(matching.resolve_pairs("all_to_all", resnet34, resnet18)) == sorted(
        matching.parse_pairs(matching.IMAGENET_PAIRS))
    assert matching.resolve_pairs("9-1,4-0", resnet32, vgg) == ((9, 1), (4, 0))
    with pytest.raises(ValueError, match="unknown matching scheme 'one-to-one'"):
        matching.resolve_pairs("one-to-one", resnet32, vgg)

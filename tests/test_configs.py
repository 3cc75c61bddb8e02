"""l2t_jax.configs and the shipped experiment configs: every config (and its tiny variant)
validates and builds its networks and pairs; short config names resolve to the shipped
files. (Running them: test_train.test_every_experiment_config_runs_two_steps.)"""
import os

import pytest

from helpers import REPO_ROOT, load_config
from l2t_jax import configs
from l2t_jax.training import build
from l2t_jax.training.config import validate_config

CONFIGS = ("cifar100", "stl10", "cub200", "dogs", "mit67", "stanford40")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_experiment_config_builds(name):
    for variant in (None, "tiny"):
        config = load_config(name, variant)
        validate_config(config)
        transfer = build.build_transfer(config)
        assert len(transfer.pairs) == (15 if config.source_model == "resnet32" else 16)
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        load_config(name, "huge")


def test_short_config_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
    shipped = os.path.join(configs.CONFIG_DIR, "stl10.py")
    monkeypatch.chdir(REPO_ROOT)            # a file that exists is taken as given
    assert configs.resolve("configs/stl10.py:tiny") == "configs/stl10.py:tiny"
    monkeypatch.chdir(tmp_path)             # elsewhere the same words name the shipped file
    assert configs.resolve("configs/stl10.py:tiny") == shipped + ":tiny"
    assert configs.resolve("stl10") == shipped
    assert configs.resolve("stl10.py:plus_resnet20,tiny") == shipped + ":plus_resnet20,tiny"
    with pytest.raises(FileNotFoundError, match="the shipped config 'cifar100' is "
                                                "--config=cifar100:tiny"):
        configs.resolve("nowhere/cifar100.py:tiny")
    with pytest.raises(FileNotFoundError, match="shipped: cifar100, cub200"):
        configs.resolve("cifar10")
    assert configs.resolve("./configs/stl10.py") == shipped


def _declared_variants():
    """(name, variant) for every variant every shipped config declares; a config without
    VARIANTS fails the test below."""
    return [(name, variant) for name in configs.names()
            for variant in (configs.variants(name) or ())]


@pytest.mark.parametrize("name", configs.names())
def test_every_config_declares_the_variants_it_takes(name):
    """``--help`` lists ``VARIANTS``: they must be what ``get_config`` accepts, which its
    error for an unknown variant lists."""
    declared = configs.variants(name)
    assert declared, f"l2t_jax/configs/{name}.py declares no VARIANTS"
    with pytest.raises(ValueError, match="unknown variant 'no_such_variant'") as error:
        configs.load(f"{name}:no_such_variant")
    assert str(error.value).split("valid: ")[1].split(", ") == list(declared)


@pytest.mark.parametrize("name,variant", _declared_variants())
def test_every_declared_variant_builds(name, variant):
    """Each variant of ``--help`` gives a config; a training config's validates and builds
    its networks and pairs (the programs, demo and study, build their runs' configs)."""
    config = configs.load(f"{name}:{variant}")
    if config.get("program"):
        assert config.program == name and config.variant == variant
        return
    if config.data.num_classes == 0:      # an image folder's: counted from the folder
        config.data.num_classes = 5
    validate_config(config)
    transfer = build.build_transfer(config)
    assert transfer.target_model is not None

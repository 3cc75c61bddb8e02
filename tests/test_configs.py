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

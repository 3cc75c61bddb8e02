"""l2t_jax.build: config validation (errors naming the key), the learning-rate schedules,
and a PyTorch file given as the source."""
import ml_collections
import numpy as np
import pytest

from helpers import tiny_config, write_npz_splits
from l2t_jax import build, train


def test_config_errors_name_the_key(tiny_assets):
    config = tiny_config(tiny_assets / "data", tiny_assets / "source")
    with pytest.raises(ValueError, match="unknown config key 'lr'"):
        bad = ml_collections.ConfigDict(config.to_dict())
        bad.lr = 0.1
        build.validate_config(bad)
    for key, value, message in [
            ("target_model", "vgg11", "config.target_model='vgg11' is not a model"),
            ("T", -1, "config.T must be >= 0"),
            ("pairs", "8-5", "target index 5 is out of range"),
            ("batch_size", 0, "config.batch_size must be >= 1")]:
        bad = ml_collections.ConfigDict(config.to_dict())
        bad[key] = value
        with pytest.raises(ValueError, match=message):
            build.validate_config(bad)


def test_step_schedule_is_multistep_lr():
    rates = build.step_learning_rate(0.1, 8, 10, (0.5, 0.75), 0.1)
    values = [float(rates(epoch * 10)) for epoch in range(8)]
    np.testing.assert_allclose(values, [0.1] * 4 + [0.01] * 2 + [0.001] * 2, rtol=1e-6)


def test_a_pytorch_file_as_source_says_to_convert_it(tmp_path):
    checkpoint = tmp_path / "resnet20.pth"
    checkpoint.write_bytes(b"not read")
    write_npz_splits(tmp_path / "data")
    config = tiny_config(tmp_path / "data", checkpoint)
    with pytest.raises(ValueError, match=r"is a file; the source must be converted once: "
                                         r"python -m l2t_jax.convert --model resnet20"):
        train.train_and_evaluate(config, str(tmp_path / "run"))

"""l2t_jax.training.build: config validation (errors naming the key), the learning-rate schedules,
and a PyTorch file given as the source."""
import ml_collections
import numpy as np
import pytest

from helpers import tiny_config, write_npz_splits
from l2t_jax.training import build, train
from l2t_jax.training.config import validate_config
from l2t_jax.transfer import optim


def test_config_errors_name_the_key(tiny_assets):
    config = tiny_config(tiny_assets / "data", tiny_assets / "source")
    with pytest.raises(ValueError, match="unknown config key 'lr'"):
        bad = ml_collections.ConfigDict(config.to_dict())
        bad.lr = 0.1
        validate_config(bad)
    for key, value, message in [
            ("target_model", "vgg11", "config.target_model='vgg11' is not a model"),
            ("T", -1, "config.T must be >= 0"),
            ("pairs", "8-5", "target index 5 is out of range"),
            ("batch_size", 0, "config.batch_size must be >= 1")]:
        bad = ml_collections.ConfigDict(config.to_dict())
        bad[key] = value
        with pytest.raises(ValueError, match=message):
            validate_config(bad)


# The paper's experiments and the authors' source pre-training: theta's rate is 0.1
# (docs/semantics.md; the reference's train scripts), at each config's own batch size.
PAPER_CONFIGS = ("cifar100", "stl10", "cub200", "dogs", "mit67", "stanford40",
                 "pretrain_tinyimagenet", "pretrain_cifar10")


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_keep_their_exact_learning_rate(name):
    from l2t_jax import configs
    import importlib
    config = importlib.import_module(f"l2t_jax.configs.{name}").get_config()
    assert build.base_learning_rate(config) == 0.1
    assert configs.resolve(name).endswith(f"{name}.py")


def test_other_batch_sizes_scale_the_rate_linearly():
    from l2t_jax.configs import cifar100, cub200
    config = cifar100.get_config()
    config.batch_size = 32                      # 0.1 per 128 examples
    assert build.base_learning_rate(config) == pytest.approx(0.025)
    images = cub200.get_config()
    images.batch_size = 16                      # 0.1 per 64 examples (the 224-px rows)
    assert build.base_learning_rate(images) == pytest.approx(0.025)
    config.lr_reference_batch_size = 0          # as given
    assert build.base_learning_rate(config) == 0.1
    schedule = build.learning_rate_schedule(cifar100.get_config(variant="tiny"), 2)
    # tiny: batch 8 -> 0.1 * 8 / 128, cosine over 2 epochs (epoch 0 at half of it).
    np.testing.assert_allclose(float(schedule(0)), 0.1 * 8 / 128 / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="lr_reference_batch_size must be >= 0"):
        bad = cifar100.get_config()
        bad.lr_reference_batch_size = -1
        validate_config(bad)


def test_the_image_folder_config_is_the_study_recipe_scaled_to_its_batch():
    from l2t_jax.configs import image_folder, study
    recipe = study.get_config()
    for variant in (None, "small"):
        config = image_folder.get_config(variant)
        assert (config.batch_size, config.learning_rate, config.meta_learning_rate,
                config.T, config.beta, config.epochs * config.steps_per_epoch) == (
            recipe.batch_size, recipe.learning_rate, recipe.meta_learning_rate, recipe.T,
            recipe.beta, recipe.epochs * recipe.steps_per_epoch)
        assert build.base_learning_rate(config) == pytest.approx(0.02)
        config.batch_size = 32                       # 0.02 per 16 images
        assert build.base_learning_rate(config) == pytest.approx(0.04)
    paper = image_folder.get_config("paper_recipe")
    assert build.base_learning_rate(paper) == pytest.approx(0.05)   # 0.1 per 64, batch 32
    assert (paper.epochs, paper.steps_per_epoch, paper.meta_learning_rate) == (200, -1, 1e-4)


def test_the_demo_keeps_its_rates():
    from l2t_jax.tools import digits
    from l2t_jax.configs import demo as demo_config
    config = demo_config.get_config()
    spec = config.source_specs[config.source]
    target = digits.target_run_config(config, "data", spec, "source", "fm:one_to_one", 5, 0)
    source = digits.source_run_config(config, "data", spec)
    assert build.base_learning_rate(target) == config.learning_rate == 0.02   # the study's
    assert target.batch_size == 16 and target.epochs * target.steps_per_epoch == 300
    assert build.base_learning_rate(source) == 0.1 and source.batch_size == 64


def test_step_schedule_is_multistep_lr():
    rates = optim.step_learning_rate(0.1, 8, 10, (0.5, 0.75), 0.1)
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

"""Feature taps by name (l2t_jax/models/taps.py): a Flax model defined only here, with its taps
named in the config, is a target and then a source of the training program."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config, write_npz_splits
from l2t_jax import models
from l2t_jax.models import taps
from l2t_jax.training import build, train


class Stage(nn.Module):
    """conv3x3 (stride 2 after the first stage), Flax's own BatchNorm, ReLU."""

    features: int
    stride: int

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(self.features, (3, 3), strides=self.stride, name="conv")(x)
        return nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))


class PlainNet(nn.Module):
    """A network written as a Flax user would: it knows nothing of l2t_jax, returns logits
    only, and declares no taps. Its stages are submodules; one extra point is sown."""

    num_classes: int
    widths: tuple = (4, 8)

    @nn.compact
    def __call__(self, images, train):
        x = images
        for i, width in enumerate(self.widths):
            x = Stage(width, 1 if i == 0 else 2, name=f"stage{i + 1}")(x, train)
        self.sow("intermediates", "before_pool", x * 2.0)
        return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


PLAIN_NET = f"{__name__}:PlainNet"


def test_taps_by_module_path_and_sown_name_read_the_forward_pass():
    network = models.get_model(PLAIN_NET, 3, taps="stage1,stage2/conv,before_pool",
                               probe_size=32)
    assert [(t.channels, t.stride) for t in network.feature_taps()] == [(4, 1), (8, 2), (8, 2)]
    assert network.num_classes == 3 and network.candidate_taps() == (0, 1, 2)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    variables = network.init(jax.random.key(0), images)
    assert set(variables) == {"params", "batch_stats"}
    (logits, features), updates = network.apply(variables, images, train=True,
                                                mutable=["batch_stats"])
    assert set(updates) == {"batch_stats"}
    # The same maps recomputed by hand from the variables: stage1, the second conv's
    # output (before its BN) and the sown value (twice the last stage's output).
    stage1 = Stage(4, 1).apply({"params": variables["params"]["stage1"],
                                "batch_stats": variables["batch_stats"]["stage1"]},
                               images, True, mutable=["batch_stats"])[0]
    conv2 = nn.Conv(8, (3, 3), strides=2).apply(
        {"params": variables["params"]["stage2"]["conv"]}, stage1)
    np.testing.assert_allclose(features[0], stage1, rtol=1e-6)
    np.testing.assert_allclose(features[1], conv2, rtol=1e-6)
    stage2 = nn.relu(nn.BatchNorm(use_running_average=False).apply(
        {"params": variables["params"]["stage2"]["bn"],
         "batch_stats": variables["batch_stats"]["stage2"]["bn"]}, conv2,
        mutable=["batch_stats"])[0])
    np.testing.assert_allclose(features[2], 2.0 * stage2, rtol=1e-5, atol=1e-6)
    head = variables["params"]["head"]
    np.testing.assert_allclose(logits, stage2.mean(axis=(1, 2)) @ head["kernel"] + head["bias"],
                               rtol=1e-5, atol=1e-6)


class NoBatchNormNet(nn.Module):
    """GroupNorm instead of BatchNorm: no batch_stats collection at all."""

    num_classes: int

    @nn.compact
    def __call__(self, images, train):
        x = nn.relu(nn.GroupNorm(num_groups=2)(nn.Conv(4, (3, 3), name="conv")(images)))
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


def test_a_network_without_batch_norm_traces_through_the_step():
    """Traced, not compiled (jax.eval_shape): the step reads no batch_stats it lacks."""
    from l2t_jax.transfer import bilevel
    source = models.get_model("resnet20", 5, widths=(4, 6, 8))
    target = models.get_model(f"{__name__}:NoBatchNormNet", 3, taps="conv")
    transfer = bilevel.make_transfer(source, target, ((2, 0), (8, 0)), inner_steps=1)
    state = bilevel.init_state(transfer, jax.random.key(0), (32, 32, 3))
    assert state.batch_stats == {}
    source_variables = source.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
    new_state, metrics = jax.eval_shape(
        lambda s, v, x, y: bilevel.train_step(transfer, lambda step: 0.1, s, v, x, y),
        state, source_variables, jnp.zeros((4, 32, 32, 3)), jnp.zeros((4,), jnp.int32))
    assert new_state.batch_stats == {} and metrics["meta_loss"].shape == ()


def test_tap_errors_name_what_can_be_tapped():
    untapped = models.get_model(PLAIN_NET, 3)     # enough for scratch or pre-training
    assert untapped.taps == () and untapped.feature_taps() == ()
    from l2t_jax.transfer import pairing
    with pytest.raises(ValueError, match=r"declares no taps .*config.target_taps="):
        pairing.resolve_pairs("one_to_one", models.get_model("resnet20", 5), untapped)
    with pytest.raises(ValueError, match=r"'stage9' is neither a submodule nor a sown value"
                                         r".*before_pool, stage1, stage2, and 4 nested paths such as stage1/bn"):
        models.get_model(PLAIN_NET, 3, taps="stage1,stage9").feature_taps()
    with pytest.raises(ValueError, match="candidate taps \\['stage3'\\]"):
        models.get_model(PLAIN_NET, 3, taps="stage1,stage2", candidates="stage3")
    with pytest.raises(ValueError, match="not a \\(B, H, W, C\\) feature map"):
        models.get_model(PLAIN_NET, 3, taps="head").feature_taps()
    assert "stage2/bn" in taps.available_taps(PlainNet(3), 32)


def test_schemes_work_over_named_taps():
    """Strides from eval_shape: one_to_one pairs the taps of equal stride."""
    from l2t_jax.transfer import pairing
    source = models.get_model(PLAIN_NET, 5, taps="stage1,stage2/conv,before_pool",
                              candidates="stage1,before_pool", probe_size=32)
    target = models.get_model(PLAIN_NET, 3, widths=(6, 6, 6), taps="stage1,stage2,stage3",
                              probe_size=32)
    assert [t.stride for t in target.feature_taps()] == [1, 2, 4]
    assert pairing.resolve_pairs("one_to_one", source, target) == ((0, 0), (2, 1))
    assert pairing.resolve_pairs("single", source, target) == ((2, 2),)
    assert len(pairing.resolve_pairs("all_to_all", source, target)) == 2 * 3


def test_paper_indices_map_to_the_declared_tap_names():
    resnet32 = models.get_model("resnet32", 10)
    assert resnet32.taps[4] == "blocks2_3" and resnet32.candidate_taps() == (4, 9, 14)
    assert models.get_model("resnet18", 10).taps == ("stem", "layer1", "layer2", "layer3",
                                                     "layer4")
    from l2t_jax.transfer import pairing
    vgg = models.get_model("vgg9_bn", 10)
    assert (pairing.resolve_pairs("blocks2_3-stage0,14-stage4", resnet32, vgg)
            == pairing.resolve_pairs("4-0,14-4", resnet32, vgg))


def test_a_test_only_model_trains_as_target_then_as_source(tmp_path):
    """Two steps with PlainNet as the target (exported as a source), then two L2T-ww steps
    with that PlainNet as the source and another PlainNet as the target, pairs by name."""
    write_npz_splits(tmp_path / "data", sizes=(("train", 16), ("val", 8), ("test", 8)))
    pretrain = tiny_config(tmp_path / "data", tmp_path / "unused", method="scratch",
                           target_model=PLAIN_NET, target_taps="stage1,stage2",
                           export_source=True)
    pretrain.model_overrides.target = {}
    pretrain.epochs, pretrain.steps_per_epoch = 1, 2
    result = train.train_and_evaluate(pretrain, str(tmp_path / "pretrain"))
    assert result["steps"] == 2 and result["target"] == PLAIN_NET

    config = tiny_config(tmp_path / "data", tmp_path / "pretrain" / "source",
                         source_model=PLAIN_NET, source_num_classes=3,
                         target_model=PLAIN_NET, target_taps="stage1,stage2",
                         pairs="stage1-stage1,stage2-stage1,stage2-stage2")
    config.model_overrides.source, config.model_overrides.target = {}, {"widths": (6, 6)}
    config.epochs, config.steps_per_epoch = 1, 2
    transfer = build.build_transfer(config)
    assert transfer.pairs == ((0, 0), (1, 0), (1, 1))
    assert transfer.source_model.taps == ("stage1", "stage2")   # from the exported metadata
    workdir = tmp_path / "transfer"
    result = train.train_and_evaluate(config, str(workdir))
    assert result["steps"] == 2 and result["pairs"] == [[0, 0], [1, 0], [1, 1]]
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train_lines = [r for r in records if "train/meta_loss" in r]
    assert len(train_lines) == 2
    assert all(np.isfinite(r["train/transfer"]) and r["train/transfer"] > 0
               for r in train_lines)
    weights = json.load(open(workdir / "transfer_weights.json"))
    assert weights["source_tap_names"] == ["stage1", "stage2"]
    assert weights["source_taps"] == [4, 8] and weights["target_taps"] == [6, 6]

"""AFD and SemCKD as methods (l2t_jax/transfer/afd.py, semckd.py): each trains its own
module jointly with a target defined only here (named taps), through the training program,
reports its attention per pair, and its config keys are checked. (Their math against the
authors' code: test_afd.py, test_semckd.py.)"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import final_params, one_line_error, run_main, tiny_config
from l2t_jax.configs import cifar100
from l2t_jax.training import build, train
from l2t_jax.training import config as run_config
from l2t_jax.transfer import bilevel, pairing, terms


class TapNet(nn.Module):
    """A target written as a Flax user would, declaring its taps: two stages by submodule
    path and a third by a sown value (32, 16 and 8 px at 32-px inputs)."""

    num_classes: int

    def default_taps(self):
        return ("stage1", "stage2", "last")

    @nn.compact
    def __call__(self, images, train):
        x = images
        for i, (width, stride) in enumerate(((4, 1), (6, 2), (8, 2))):
            x = nn.Conv(width, (3, 3), strides=stride, name=f"stage{i + 1}")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, name=f"bn{i + 1}")(x))
        self.sow("intermediates", "last", x)
        return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


TAP_NET = f"{__name__}:TapNet"
# Gradients that are zero in exact arithmetic (test_afd.py says why): in float32 they hold
# rounding noise, so whether they move says nothing.
AFD_ZERO_GRADIENTS = ("linear']['bias']", "['bilinear']['bn']['bias']")


def _leaves(tree):
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _unmoved(before, after, ignore=()):
    before, after = _leaves(before), _leaves(after)
    assert before.keys() == after.keys()
    return sorted(k for k in before if np.array_equal(before[k], after[k])
                  and not any(k.endswith(i) for i in ignore))


@pytest.mark.parametrize("method,options", [("afd", {"afd_qk_dim": 16}),
                                            ("semckd", {"semckd_factor": 2})])
def test_each_method_trains_its_module_with_the_target(method, options, tiny_assets,
                                                       tmp_path):
    """Two steps of the training program, tiny ResNet-20 source -> TapNet, all_to_all over
    3 x 3 taps, at a constant learning rate and without weight decay (so what moves had a
    gradient): the method's own parameters (theta[method], shaped by its config keys and
    the batch) and the target's move at both steps; the step logs the attention per pair
    (a distribution over target taps per source tap for AFD, over source taps per target
    tap for SemCKD) and the transfer loss is the method's term; the module's BatchNorm
    statistics are not kept in the state."""
    config = tiny_config(tiny_assets / "data", tiny_assets / "source", method=method,
                         target_model=TAP_NET, pairs="all_to_all", weight_decay=0.0,
                         lr_schedule="step", lr_decay_at=(1.0,), **options)
    config.model_overrides.target = {}
    config.epochs, config.steps_per_epoch = 1, 2
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["steps"] == 2 and result["method"] == method

    transfer = build.build_transfer(config)
    pairs = transfer.pairs
    assert pairs == tuple((m, n) for m in (2, 5, 8) for n in (0, 1, 2)) and (
        transfer.batch_size == 8)
    before = jax.device_get(bilevel.init_state(transfer, jax.random.key(config.seed),
                                               (32, 32, 3)))
    (_, step1), (_, step2) = final_params(tmp_path, 1), final_params(tmp_path, 2)
    own = [state[method] for state in (before.target_params, step1["target_params"],
                                       step2["target_params"])]
    if method == "afd":       # d = 16 for 3 source taps, 3 target taps
        assert own[0]["p_source"].shape == (3, 16) and own[0]["p_target"].shape == (3, 16)
        ignore = AFD_ZERO_GRADIENTS
    else:                     # the MLPs' width: batch 8 -> 2 * (8 // 2) -> 8 // 2
        assert own[0]["query_0"]["linear1"]["kernel"].shape == (8, 8)
        assert own[0]["key_2"]["linear2"]["kernel"].shape == (8, 4)
        assert len([k for k in own[0] if k.startswith("regressor_")]) == len(pairs)
        ignore = ()
    assert _unmoved(own[0], own[1], ignore) == [] and _unmoved(own[1], own[2], ignore) == []
    model = [state["model"] for state in (before.target_params, step1["target_params"],
                                          step2["target_params"])]
    assert _unmoved(model[0], model[1]) == [] and _unmoved(model[1], model[2]) == []
    assert set(step2["batch_stats"]) == {"bn1", "bn2", "bn3"}     # the target's alone

    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")
             if "train/ce" in line]
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert line[f"train/{method}"] > 0
        np.testing.assert_allclose(line["train/transfer"], line[f"train/{method}"], rtol=1e-6)
        attention = np.array([line[f"train/pair_attention/{i}"] for i in range(len(pairs))])
        assert f"train/pair_attention/{len(pairs)}" not in line
        assert np.all((attention > 0) & (attention < 1))
        side = 0 if method == "afd" else 1      # AFD: per source tap; SemCKD: per target
        for tap in {pair[side] for pair in pairs}:
            np.testing.assert_allclose(
                sum(a for a, pair in zip(attention, pairs) if pair[side] == tap), 1.0,
                rtol=1e-5)


def test_attention_per_pair_follows_the_pair_order():
    """(B, T, S) attention over the pairs' taps -> the batch mean of each pair's entry, in
    the order the pairs are listed (not the grid's), and a list that leaves a combination
    of its taps out is refused."""
    attention = jnp.arange(2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 3)   # B=2, T=2, S=3
    pairs = ((7, 3), (1, 0), (4, 3), (7, 0), (1, 3), (4, 0))   # sources 1, 4, 7; targets 0, 3
    mean = np.mean(np.asarray(attention), axis=0)
    expected = [mean[[0, 3].index(n), [1, 4, 7].index(m)] for m, n in pairs]
    np.testing.assert_array_equal(terms.per_pair(attention, pairs), expected)
    with pytest.raises(ValueError, match=r"config.pairs: AFD attends over every combination "
                                         r"of the source taps \[1, 4\] and target taps "
                                         r"\[0, 3\] of its pairs; 4-0 is missing"):
        pairing.tap_grid(((1, 0), (1, 3), (4, 3)), "AFD")


@pytest.mark.parametrize("method", ["afd", "semckd"])
def test_the_cifar100_config_takes_each_method(method):
    """--config.method=afd / semckd over the released ResNet-32 -> VGG-9 taps: all_to_all
    (the config's 15 pairs) with the authors' defaults and the config's batch."""
    config = cifar100.get_config()
    config.method = method
    run_config.validate_config(config)
    transfer = build.build_transfer(config)
    assert len(transfer.pairs) == 15 and transfer.batch_size == config.batch_size == 128
    assert dict(transfer.options) == ({"afd_weight": 200.0, "afd_qk_dim": 128}
                                      if method == "afd" else
                                      {"semckd_weight": 400.0, "semckd_factor": 4})


@pytest.mark.parametrize("method,key,value,message", [
    ("afd", "afd_weight", -1.0, r"config.afd_weight must be finite and >= 0, got -1.0"),
    ("afd", "afd_weight", float("nan"), r"config.afd_weight must be finite"),
    ("afd", "afd_qk_dim", 0, r"config.afd_qk_dim must be an integer >= 1, got 0"),
    ("afd", "pairs", "4-0,4-1,9-1",
     r"config.pairs: AFD attends over every combination .* 9-0 is missing"),
    ("semckd", "semckd_weight", float("inf"), r"config.semckd_weight must be finite"),
    ("semckd", "semckd_factor", 0, r"config.semckd_factor must be an integer >= 1, got 0"),
    ("semckd", "semckd_factor", 256, r"config.semckd_factor=256 leaves SemCKD's embeddings "
                                     r"empty at config.batch_size=128"),
])
def test_bad_values_of_their_keys_name_the_key(method, key, value, message):
    config = cifar100.get_config()
    config.method = method
    config[key] = value
    with pytest.raises(ValueError, match=message):
        run_config.validate_config(config)


def test_a_bad_value_on_the_command_line_is_a_one_line_error(tmp_path):
    error = one_line_error(run_main("--config=cifar100", f"--workdir={tmp_path}",
                                    "--config.method=semckd", "--config.semckd_factor=0"))
    assert "config.semckd_factor must be an integer >= 1, got 0" in error

"""The paper's methods over the shared step: what each builds and trains, how its loss is
composed, and every method (and two sources) running through the training program on small
data, with limited data. (The matching schemes: test_matching.py; the per-class subsets:
test_data.py; the step schedule: test_build.py.)"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import final_params, tiny_config, tiny_networks, write_npz_splits, write_tiny_source
from l2t_jax.training import build, train
from l2t_jax.training.config import validate_config
from l2t_jax.transfer import bilevel, losses, methods, pairing


def _setup(method, scheme):
    source, target = tiny_networks()
    pairs = pairing.resolve_pairs(scheme, source, target)
    transfer = build.method_transfer(method, source, target, pairs, inner_steps=1)
    rng = jax.random.key(0)
    state = bilevel.init_state(transfer, rng, (32, 32, 3))
    source_variables = source.init(jax.random.fold_in(rng, 1), jnp.zeros((1, 32, 32, 3)),
                                   train=False)
    images = jax.random.normal(jax.random.fold_in(rng, 2), (4, 32, 32, 3))
    return transfer, state, source_variables, images, jnp.arange(4) % 3


def _changed(before, after):
    return {path for path, a, b in zip(
        [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(before)],
        jax.tree.leaves(before), jax.tree.leaves(after)) if not np.array_equal(a, b)}


def test_baseline_losses_are_the_sum_of_their_terms():
    """lwf_at's transfer loss = at_weight * AT over its pairs + lwf_weight * KD(T=2) of the
    LwF head against the source logits, computed here from the networks' outputs."""
    transfer, state, source_variables, images, labels = _setup("lwf_at", "one_to_one")
    batch = bilevel.batch_constants(transfer, state, source_variables, images, labels)
    ce, values, _, _, _ = bilevel.target_losses(transfer, state.target_params,
                                                state.batch_stats, batch, transfer.terms)
    assert list(values) == ["attention", "distillation"]
    transfer_loss = bilevel.total(values)
    source_logits, source_features = transfer.source_model.apply(source_variables, images,
                                                                  train=False)
    (logits, target_features), _ = transfer.target_model.apply(
        {"params": state.target_params["model"], "batch_stats": state.batch_stats}, images,
        train=True, mutable=["batch_stats"])
    at = losses.attention_transfer_loss([source_features[m] for m, _ in transfer.pairs],
                                        [target_features[n] for _, n in transfer.pairs], 500.0)
    lwf_logits = target_features[-1].mean(axis=(1, 2)) @ state.target_params["lwf_head"][
        "fc"]["kernel"] + state.target_params["lwf_head"]["fc"]["bias"]
    kd = losses.distillation_loss(lwf_logits, source_logits, 2.0)
    assert float(at) > 0 and float(kd) > 0
    np.testing.assert_allclose(transfer_loss, at + kd, rtol=1e-5)
    np.testing.assert_allclose(ce, losses.cross_entropy(logits, labels), rtol=1e-6)


@pytest.fixture(scope="module")
def method_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    write_npz_splits(root / "data", sizes=(("train", 30), ("val", 8), ("test", 8)))
    write_tiny_source(str(root / "source"))
    return root


PAPER_ROWS = [("scratch", "single"), ("lwf", "single"), ("at", "one_to_one"),
              ("lwf_at", "one_to_one"), ("fm", "single"), ("fm", "one_to_one"),
              ("l2t_w", "single"), ("l2t_w", "one_to_one"), ("l2t_ww", "all_to_all")]


@pytest.fixture(scope="module")
def paper_row_run(method_assets, tmp_path_factory):
    """run(method, scheme) -> (config, workdir, result) of that paper row through the
    training program: tiny_config's networks, T = 1, 4 training images per class, 2 epochs
    of 1 step (the cosine schedule trains epoch 0 at lr 0.05, epoch 1 at 0) and a checkpoint
    at every step. Each row runs once per module: the parameter test and the program test
    below read the same run (compiling a method's step is most of a run's time)."""
    runs = {}

    def run(method, scheme):
        if (method, scheme) not in runs:
            config = tiny_config(method_assets / "data", method_assets / "source",
                                 method=method, pairs=scheme, T=1)
            config.epochs, config.steps_per_epoch = 2, 1
            config.data.train_examples_per_class = 4        # 12 images
            workdir = tmp_path_factory.mktemp(f"{method}-{scheme}")
            runs[(method, scheme)] = (config, workdir,
                                      train.train_and_evaluate(config, str(workdir)))
        return runs[(method, scheme)]
    return run


def _train_lines(workdir):
    return [json.loads(line) for line in open(workdir / "metrics.jsonl") if "train/ce" in line]


@pytest.mark.parametrize("method,scheme", [
    ("scratch", "single"), ("lwf", "single"), ("at", "one_to_one"), ("lwf_at", "one_to_one"),
    ("fm", "one_to_one"), ("l2t_w", "one_to_one"), ("l2t_ww", "all_to_all")])
def test_each_method_builds_and_trains_exactly_its_parameters(method, scheme, paper_row_run):
    """What the method builds, and what the program's first step of it changes: the
    initial state (made from the run's seed, as train_and_evaluate makes it) against the
    run's checkpoint of step 1."""
    config, workdir, _ = paper_row_run(method, scheme)
    transfer = build.build_transfer(config)
    before = jax.device_get(bilevel.init_state(transfer, jax.random.key(config.seed),
                                               (32, 32, 3)))
    spec = methods.METHODS[method]
    assert (transfer.source_model is None) == (method == "scratch")
    assert ("heads" in before.target_params) == ("feature_matching" in spec.terms)
    assert ("lwf_head" in before.target_params) == ("distillation" in spec.terms)
    assert (transfer.meta_networks is not None) == spec.meta_networks
    assert tuple(t.name for t in transfer.terms) == spec.terms
    if not spec.meta_networks:
        assert before.meta_params == {}
    step, after = final_params(workdir, 1)
    metrics = _train_lines(workdir)[0]
    assert step == 1 and metrics["step"] == 1
    np.testing.assert_allclose(metrics["train/learning_rate"], 0.05, rtol=1e-6)
    # theta moves everywhere (SGD with weight decay touches every parameter).
    assert _changed(before.target_params, after["target_params"]) == _changed(
        before.target_params, jax.tree.map(lambda a: a + 1, before.target_params))
    meta_changed = _changed(before.meta_params, after.get("meta_params", {}))
    names = {p.split("'")[1] for p in meta_changed}
    pair_weights = [k for k in metrics if k.startswith("train/pair_weights/")]
    if method == "l2t_w":        # f only: lambda = 1 is fixed, there is no g to move
        assert names and all(n.startswith("what_") for n in names)
        assert pair_weights == []
    elif method == "l2t_ww":
        assert any(n.startswith("where_") for n in names)
        assert any(n.startswith("what_") for n in names)
        assert len(pair_weights) == len(transfer.pairs) == 15
    else:
        assert meta_changed == set() and "train/meta_loss" not in metrics
    assert (metrics["train/transfer"] == 0.0) == (method == "scratch")
    for term in spec.terms:      # each term logged under its own name, summing to transfer
        assert metrics[f"train/{term}"] > 0
    np.testing.assert_allclose(sum(metrics[f"train/{t}"] for t in spec.terms),
                               metrics["train/transfer"], rtol=1e-6)


@pytest.mark.parametrize("method,scheme", PAPER_ROWS)
def test_every_paper_row_runs_two_steps_with_limited_data(method, scheme, paper_row_run):
    _, workdir, result = paper_row_run(method, scheme)
    assert result["method"] == method and result["train_examples"] == 12
    assert result["scheme"] == scheme
    expected_pairs = {"single": 1, "one_to_one": 3, "all_to_all": 15}[scheme]
    assert len(result["pairs"]) == (0 if method in ("scratch", "lwf") else expected_pairs)
    assert [line["step"] for line in _train_lines(workdir)] == [1, 2]
    assert (workdir / "transfer_weights.json").exists() == method.startswith("l2t")


def test_two_sources_add_their_own_pairs_heads_and_meta_networks(method_assets, tmp_path):
    config = tiny_config(method_assets / "data", method_assets / "source", pairs="all_to_all",
                         T=1)
    config.extra_sources = ({"model": "resnet20:tiny", "num_classes": 5,
                             "checkpoint": str(method_assets / "source"),
                             "pairs": "one_to_one"},)
    config.epochs, config.steps_per_epoch = 1, 2
    transfer = build.build_transfer(config)
    assert len(transfer.source_model.parts) == 2
    # The second source's taps follow the first's 9: its one-to-one pairs are offset by 9.
    assert transfer.pairs[15:] == ((11, 0), (14, 1), (17, 2))
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["extra_sources"] == ["resnet20:tiny"] and len(result["pairs"]) == 18
    weights = json.load(open(tmp_path / "transfer_weights.json"))
    assert len(weights["pair_weights"]) == 18 and len(weights["source_taps"]) == 18

    bad = tiny_config(method_assets / "data", method_assets / "source")
    bad.extra_sources = ({"model": "resnet20", "num_classes": 5, "checkpoint": "x",
                          "pairs": "9-0"},)
    with pytest.raises(ValueError, match=r"extra_sources\[0\].pairs: pair 9-0"):
        validate_config(bad)

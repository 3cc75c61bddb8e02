"""What a finished run learned about where to transfer (transfer_weights.json,
l2t_jax/training/results.py) for L2T-ww, AFD and SemCKD, on tiny runs, and the pictures
drawn from it (l2t_jax/tools/weight_plots.py): the attention recomputed here from the final
checkpoint by the authors' modules themselves equals the file's, with its normalisation;
the heat maps and the comparison figure hold the file's numbers. Also: the demo's
all-methods grid and the image-folder config take AFD and SemCKD."""
import json
import os

import numpy as np
import pytest

from helpers import final_params, tiny_config
from l2t_jax import data
from l2t_jax.configs import demo as demo_config
from l2t_jax.tools import digits, plots, weight_plots
from l2t_jax.training import build, results, train
from l2t_jax.training.config import validate_config
from l2t_jax.transfer import afd, semckd, terms

# A 2 x 2 grid of taps that are not neighbours (source 2 and 8, target 0 and 4), listed in
# an order that is not the grid's: the file must follow the pairs' order.
PAIRS = "8-4,2-0,8-0,2-4"
PAIR_LIST = [[8, 4], [2, 0], [8, 0], [2, 4]]
SOURCE_GRID, TARGET_GRID = (2, 8), (0, 4)
VAL_IMAGES = 12          # helpers.write_npz_splits' val split
# Each method at a batch size that takes another branch of the read-out's batching: AFD at
# 16 > 12 val images (the split repeated to one batch), SemCKD at 4 (three whole batches),
# L2T-ww at eval_batch_size 8 (a whole batch and one of 4 real rows).
RUNS = {"afd": dict(batch_size=16, afd_qk_dim=8),
        "semckd": dict(batch_size=4, semckd_factor=2),
        "l2t_ww": dict(T=1)}


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory):
    """{method: (config, workdir)}: two steps of each, on PAIRS."""
    root = tmp_path_factory.mktemp("where")
    finished = {}
    for method, overrides in RUNS.items():
        config = tiny_config(tiny_assets / "data", tiny_assets / "source", method=method,
                             pairs=PAIRS, **overrides)
        config.epochs, config.steps_per_epoch = 1, 2
        workdir = str(root / method)
        train.train_and_evaluate(config, workdir)
        finished[method] = (config, workdir)
    return finished


def _weights(workdir):
    with open(os.path.join(workdir, "transfer_weights.json")) as f:
        return json.load(f)


def _attention_from_checkpoint(config, workdir, batches, batch_size):
    """The mean attention per (target tap, source tap) of the grid, recomputed from the
    final checkpoint: the val images in order (repeated past the split's end), the source
    in eval mode, the target and the method's own module (afd.AFD / semckd.SemCKD, applied
    directly) in train mode, batch by batch. (T, S) in grid order."""
    transfer = build.build_transfer(config)
    source_variables = build.load_source_variables(config, transfer)
    _, state = final_params(workdir)
    theta = state["target_params"]
    val = build.load_splits(config)["val"]
    examples = data.eval_examples(val, config.data.image_size)
    images = np.stack([examples[int(p) % len(val)][0]
                       for p in range(batches * batch_size)])
    total = 0.0
    for b in range(batches):
        x = images[b * batch_size:(b + 1) * batch_size]
        _, source_features = transfer.source_model.apply(source_variables, x, train=False)
        (_, target_features), _ = transfer.target_model.apply(
            {"params": theta["model"], "batch_stats": state["batch_stats"]}, x, train=True,
            mutable=["batch_stats"])
        source = [source_features[m] for m in SOURCE_GRID]
        target = [target_features[n] for n in TARGET_GRID]
        shapes = [[(f.shape[3], f.shape[1], f.shape[2]) for f in side]
                  for side in (source, target)]
        module = (afd.AFD(*shapes, qk_dim=config.afd_qk_dim) if config.method == "afd" else
                  semckd.SemCKD(*shapes, batch_size=batch_size, factor=config.semckd_factor))
        (_, attention), _ = module.apply({"params": theta[config.method]}, source, target,
                                         True, mutable=["batch_stats"])
        total = total + np.mean(np.asarray(attention, np.float64), axis=0)
    return total / batches


@pytest.mark.parametrize("method,batches,sums_over", [("afd", 1, "target_taps"),
                                                      ("semckd", 3, "source_taps")])
def test_the_attention_of_each_method_is_its_modules_mean_per_pair(runs, method, batches,
                                                                    sums_over):
    config, workdir = runs[method]
    weights = _weights(workdir)
    batch_size = config.batch_size
    assert weights["method"] == method and weights["pairs"] == PAIR_LIST
    assert weights["pair_weights"] is None and weights["channel_weights"] is None
    assert weights["source_taps"] == [4, 4, 4, 6, 6, 6, 8, 8, 8]
    assert weights["target_taps"] == [4, 6, 8, 8, 8]
    where = weights["where"]
    assert where["key"] == "pair_attention" and where["normalised_over"] == sums_over
    assert where["split"] == "val" and where["batch_size"] == batch_size
    assert where["images"] == batches * batch_size
    side = "target" if sums_over == "target_taps" else "source"
    assert f"a softmax over the {side} taps" in where["description"]
    assert f"({min(VAL_IMAGES, batches * batch_size)} distinct)" in where["description"]

    grid = _attention_from_checkpoint(config, workdir, batches, batch_size)
    expected = [grid[TARGET_GRID.index(n), SOURCE_GRID.index(m)] for m, n in PAIR_LIST]
    np.testing.assert_allclose(weights["pair_attention"], expected, rtol=2e-5, atol=1e-6)
    # The normalisation the file names: AFD's weights of a source tap's pairs sum to one
    # (over target taps), SemCKD's of a target tap's pairs (over source taps); not both.
    attention = dict(zip(map(tuple, PAIR_LIST), weights["pair_attention"]))
    per_source = [sum(attention[(m, n)] for n in TARGET_GRID) for m in SOURCE_GRID]
    per_target = [sum(attention[(m, n)] for m in SOURCE_GRID) for n in TARGET_GRID]
    normalised, other = ((per_source, per_target) if sums_over == "target_taps"
                         else (per_target, per_source))
    np.testing.assert_allclose(normalised, 1.0, rtol=1e-5)
    assert not np.allclose(other, 1.0, rtol=1e-3)


def test_every_term_reporting_attention_has_its_normalisation_recorded():
    """(The tiny runs above check that what is recorded is what the modules compute.)"""
    reporting = {name for name, term in terms.TERMS.items()
                 if "pair_attention" in term.metrics}
    assert reporting == set(results.ATTENTION_NORMALISATION) == {"afd", "semckd"}


def test_l2t_ww_records_its_unnormalised_pair_weights(runs):
    config, workdir = runs["l2t_ww"]
    weights = _weights(workdir)
    assert weights["method"] == "l2t_ww" and weights["pairs"] == PAIR_LIST
    assert weights["pair_attention"] is None
    assert len(weights["pair_weights"]) == 4 and len(weights["channel_weights"]) == 4
    assert [len(c) for c in weights["channel_weights"]] == [8, 4, 8, 4]
    # The 12 val images in batches of eval_batch_size 8: every real row, no padding.
    assert weights["where"] == {
        "key": "pair_weights", "normalised_over": None, "split": "val", "images": 12,
        "description": "L2T-ww's pair weight lambda (relu6 of g's output) per pair, the "
                       "mean over 12 val images; not normalised: each pair's lambda is its "
                       "own (0 switches the pair off)"}
    assert config.eval_batch_size == 8


def test_the_pictures_hold_the_files_numbers(runs, tmp_path, capsys):
    """Each run's own pictures (the attention heat map is pair_attention.png), the
    comparison's panels against each file, and the command line's where_compare.png."""
    expected = {"afd": ["learning_curves.png", "pair_attention.png"],
                "semckd": ["learning_curves.png", "pair_attention.png"],
                "l2t_ww": ["channel_weights.png", "learning_curves.png", "pair_weights.png"]}
    for method, (_, workdir) in runs.items():
        written = plots.plot_workdir(workdir, str(tmp_path / method))
        assert sorted(os.path.basename(p) for p in written) == expected[method]
        for path in written:
            assert os.path.getsize(path) > 10_000

    labels = {"L2T-ww": "l2t_ww", "AFD": "afd", "SemCKD": "semckd"}
    panels = weight_plots.where_panels({label: runs[m][1] for label, m in labels.items()})
    assert [p.label for p in panels] == list(labels)
    for panel in panels:
        weights = _weights(runs[labels[panel.label]][1])
        assert panel.where == weights["where"] and panel.runs == 1
        assert panel.grid.source_rows == list(SOURCE_GRID)
        for (m, n), value in zip(PAIR_LIST, weights[weights["where"]["key"]]):
            assert panel.grid.value(m, n) == value
        assert np.isnan(panel.grid.value(2, 1))         # target tap 1: in no pair
    path = weight_plots.plot_where_compare({label: runs[m][1] for label, m in labels.items()},
                                           str(tmp_path / "where.png"))
    assert os.path.getsize(path) > 20_000

    out = tmp_path / "cli"
    plots.main([f"--workdir={runs['afd'][1]}", f"--out={out}",
                *(f"--compare={label}={runs[m][1]}" for label, m in labels.items())])
    assert os.path.getsize(out / "where_compare.png") > 20_000
    assert str(out / "where_compare.png") in capsys.readouterr().out


def test_the_demo_grid_of_every_method_includes_afd_and_semckd():
    """demo:all_methods: the paper's nine rows, then AFD and SemCKD on all-to-all pairs;
    their run configs validate, with the demo's batch and 3 x 5 pairs."""
    config = demo_config.get_config("all_methods")
    assert config.methods[-2:] == ("afd:all_to_all", "semckd:all_to_all")
    assert len(config.methods) == 11
    source = config.source_specs[config.source]
    for entry in config.methods[-2:]:
        run = digits.target_run_config(config, "DATA", source, "SOURCE", entry, 10, 0)
        validate_config(run)
        transfer = build.build_transfer(run)
        assert run.method == entry.split(":")[0] and run.pairs == "all_to_all"
        assert transfer.batch_size == config.batch_size and len(transfer.pairs) == 15


def test_the_image_folder_config_trains_afd_and_semckd(tmp_path):
    """--config.method=afd / semckd with image_folder:small,tiny (the released ResNet-32 ->
    a tiny VGG-9-BN, all-to-all): one step each, and the attention file of the run."""
    folder = str(tmp_path / "digits")
    digits.write_digits_image_folder(folder, digits=(0, 1, 2), train_per_class=12,
                                     test_per_class=4)
    from helpers import load_config
    for method in ("afd", "semckd"):
        config = load_config("image_folder", "small,tiny")
        config.data.data_dir = folder
        config.method = method
        config.epochs, config.steps_per_epoch = 1, 1
        result = train.train_and_evaluate(config, str(tmp_path / method))
        assert result["method"] == method and result["steps"] == 1
        assert len(result["pairs"]) == 15
        weights = _weights(str(tmp_path / method))
        assert len(weights["pair_attention"]) == 15
        assert np.all(np.isfinite(weights["pair_attention"]))

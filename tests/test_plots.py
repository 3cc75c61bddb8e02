"""l2t_jax.tools.plots on fake workdirs (no JAX): the files exist, are PNGs of some size, the
heat map puts each pair's weight in its (source tap, target tap) cell, and the limited-data
figure draws a grid's runs."""
import json
import math
import os

import numpy as np
import pytest
from matplotlib.figure import Figure

from helpers import write_limited_runs
from l2t_jax.tools import plots, summaries

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The CIFAR setting: ResNet-32's 15 taps -> VGG-9-BN's 5, all-to-all over taps 4, 9, 14.
SOURCE_TAPS = [16] * 5 + [32] * 5 + [64] * 5
TARGET_TAPS = [64, 128, 256, 512, 512]
PAIRS = [[m, n] for m in (4, 9, 14) for n in range(5)]
STEPS_PER_EPOCH, EPOCHS, LOG_EVERY = 100, 6, 20


def softmax(logits):
    e = np.exp(logits - logits.max())
    return e / e.sum()


def make_workdir(path, method="l2t_ww", seed=0, final_accuracy=70.0, with_weights=True):
    """A finished run's files as train.py writes them; returns the workdir and the pair
    weights written to transfer_weights.json."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    meta = method in ("l2t_w", "l2t_ww")
    learns_where = method == "l2t_ww"
    pairs = PAIRS if method == "l2t_ww" else [[4, 0], [9, 1], [14, 2]]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"method": method, "pairs": "all_to_all" if learns_where else "one_to_one",
                   "seed": seed, "data": {"name": "cifar100", "train_examples_per_class": 0},
                   "extra_sources": []}, f)
    final_pair_weights = rng.uniform(0.2, 2.0, len(pairs)).round(3).tolist()
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step in range(LOG_EVERY, STEPS_PER_EPOCH * EPOCHS + 1, LOG_EVERY):
            progress = step / (STEPS_PER_EPOCH * EPOCHS)
            line = {"step": step, "train/ce": 4.0 * (1 - 0.7 * progress) + rng.normal(0, 0.05),
                    "train/matching": 1.0 - 0.5 * progress, "train/learning_rate": 0.1}
            if meta:
                for i, (m, _) in enumerate(pairs):
                    line[f"train/channel_weight_entropy/{i}"] = math.log(SOURCE_TAPS[m]) * (
                        1 - 0.3 * progress * (i + 1) / len(pairs))
            if learns_where:
                for i, w in enumerate(final_pair_weights):
                    line[f"train/pair_weights/{i}"] = 1.0 + (w - 1.0) * progress
            f.write(json.dumps(line) + "\n")
            if step % STEPS_PER_EPOCH == 0:
                epoch = step // STEPS_PER_EPOCH
                accuracy = final_accuracy * (1 - math.exp(-epoch / 2)) + rng.normal(0, 0.3)
                f.write(json.dumps({"step": step, "eval/val": accuracy + 1,
                                    "eval/test": accuracy}) + "\n")
    if meta and with_weights:
        channel_weights = [softmax(rng.normal(0, 0.3 + 0.2 * i, SOURCE_TAPS[m])).tolist()
                           for i, (m, _) in enumerate(pairs)]
        with open(os.path.join(path, "transfer_weights.json"), "w") as f:
            json.dump({"pairs": pairs, "source_taps": SOURCE_TAPS, "target_taps": TARGET_TAPS,
                       "pair_weights": final_pair_weights if learns_where else None,
                       "channel_weights": channel_weights}, f)
    return str(path), final_pair_weights


def assert_png(path, min_bytes=10_000):
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, path
    assert os.path.getsize(path) > min_bytes, (path, os.path.getsize(path))


def test_plot_workdir_l2t_ww_writes_all_pictures(tmp_path):
    workdir, _ = make_workdir(tmp_path / "run")
    written = plots.plot_workdir(workdir, str(tmp_path / "out"))
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["channel_weights.png", "learning_curves.png", "pair_weights.png"]
    for path in written:
        assert_png(path)


def test_heat_map_puts_each_weight_in_its_cell(tmp_path):
    workdir, pair_weights = make_workdir(tmp_path / "run")
    path = plots.plot_pair_weights(workdir, str(tmp_path / "pair_weights.png"))
    assert path == str(tmp_path / "pair_weights.png")
    assert_png(path)
    grid = plots.pair_weight_grid(plots.load_transfer_weights(workdir))
    assert grid.source_rows == [4, 9, 14]
    assert grid.matrix.shape == (3, 5)
    assert grid.row_labels == ["S4 (16 ch)", "S9 (32 ch)", "S14 (64 ch)"]
    assert grid.col_labels[0] == "T0 (64 ch)" and grid.col_labels[3] == "T3 (512 ch)"
    for (m, n), weight in zip(PAIRS, pair_weights):
        assert grid.value(m, n) == weight
    # Pair 9-3 is the 9th pair (index 8): row 1 (S9), column 3.
    assert grid.matrix[1, 3] == pair_weights[8]

    # What is drawn: the image's cell (row 1, column 3) and the text written at (3, 1).
    ax = Figure().subplots()
    image = plots.draw_pair_weight_heat_map(ax, grid)
    assert image.get_array()[1, 3] == pair_weights[8]
    texts = {(t.get_position()[1], t.get_position()[0]): t.get_text() for t in ax.texts}
    assert texts[(1, 3)] == f"{pair_weights[8]:.2f}"
    assert len(texts) == 15
    assert [t.get_text() for t in ax.get_yticklabels()] == grid.row_labels
    assert ax.get_xticklabels()[3].get_text() == "T3\n(512 ch)"


def test_heat_map_leaves_cells_without_a_pair_empty(tmp_path):
    weights = {"pairs": [[2, 1], [4, 4]], "source_taps": [64, 64, 128, 256, 512],
               "target_taps": [64, 64, 128, 256, 512], "pair_weights": [0.5, 1.5],
               "channel_weights": None}
    grid = plots.pair_weight_grid(weights)
    assert grid.source_rows == [2, 4]
    assert grid.matrix[0, 1] == 0.5 and grid.matrix[1, 4] == 1.5
    assert np.isnan(grid.matrix).sum() == 2 * 5 - 2
    assert np.isnan(grid.value(3, 3))


def test_l2t_w_run_has_channel_but_no_pair_picture(tmp_path, capsys):
    workdir, _ = make_workdir(tmp_path / "run", method="l2t_w")
    written = plots.plot_workdir(workdir, str(tmp_path / "out"))
    assert sorted(os.path.basename(p) for p in written) == [
        "channel_weights.png", "learning_curves.png"]
    assert "no pair weights" in capsys.readouterr().out


def test_unfinished_run_plots_entropy_from_metrics_alone(tmp_path):
    workdir, _ = make_workdir(tmp_path / "run", with_weights=False)
    written = plots.plot_workdir(workdir, str(tmp_path / "out"))
    assert sorted(os.path.basename(p) for p in written) == [
        "channel_weights.png", "learning_curves.png"]


def test_scratch_run_yields_only_learning_curves(tmp_path, capsys):
    workdir, _ = make_workdir(tmp_path / "run", method="scratch")
    written = plots.plot_workdir(workdir, str(tmp_path / "out"))
    assert [os.path.basename(p) for p in written] == ["learning_curves.png"]
    assert_png(written[0])
    assert "no meta-networks" in capsys.readouterr().out


def test_learning_curves_over_seeds(tmp_path):
    runs = {"Scratch": [make_workdir(tmp_path / f"s{s}", "scratch", s, 60.0)[0]
                        for s in range(3)],
            "L2T-ww (all-to-all)": [make_workdir(tmp_path / f"w{s}", "l2t_ww", s, 70.0)[0]
                                    for s in range(3)]}
    path = plots.plot_learning_curves(runs, str(tmp_path / "curves.png"))
    assert_png(path)


def test_mean_band_aligns_runs_on_steps():
    x, mean, std, count = plots._mean_band([(np.array([1, 2]), np.array([1.0, 3.0])),
                                            (np.array([1, 2, 3]), np.array([3.0, 5.0, 7.0]))])
    np.testing.assert_array_equal(x, [1, 2, 3])
    np.testing.assert_array_equal(mean, [2.0, 4.0, 7.0])
    np.testing.assert_allclose(std[:2], [math.sqrt(2), math.sqrt(2)])
    assert np.isnan(std[2]) and count.tolist() == [2, 2, 1]


def test_resumed_run_keeps_the_last_value_of_a_repeated_step():
    records = [{"step": 20, "train/ce": 3.0}, {"step": 40, "train/ce": 2.0},
               {"step": 40, "train/ce": 1.5}]
    steps, values = plots.metric_series(records, "train/ce")
    assert steps.tolist() == [20, 40] and values.tolist() == [3.0, 1.5]


def test_missing_and_malformed_files_are_named(tmp_path):
    workdir, _ = make_workdir(tmp_path / "run")
    os.remove(os.path.join(workdir, "metrics.jsonl"))
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plots.plot_workdir(workdir, str(tmp_path / "out"))

    workdir, _ = make_workdir(tmp_path / "run2")
    with open(os.path.join(workdir, "transfer_weights.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="transfer_weights.json"):
        plots.plot_pair_weights(workdir, str(tmp_path / "p.png"))

    workdir, _ = make_workdir(tmp_path / "run3")
    weights_path = os.path.join(workdir, "transfer_weights.json")
    with open(weights_path) as f:
        weights = json.load(f)
    weights["pair_weights"] = weights["pair_weights"][:-1]
    with open(weights_path, "w") as f:
        json.dump(weights, f)
    with pytest.raises(ValueError, match="transfer_weights.json.*14 pair_weights for 15"):
        plots.plot_pair_weights(workdir, str(tmp_path / "p.png"))
    weights["pair_weights"] = [[w] for w in weights["pair_weights"]] + [[1.0]]
    with open(weights_path, "w") as f:
        json.dump(weights, f)
    with pytest.raises(ValueError, match="transfer_weights.json: pair_weights must be one"):
        plots.plot_pair_weights(workdir, str(tmp_path / "p.png"))

    workdir, _ = make_workdir(tmp_path / "run4")
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write("garbage\n{\"step\": 9999}\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line \d+"):
        plots.plot_workdir(workdir, str(tmp_path / "out4"))


def test_truncated_last_metrics_line_is_skipped(tmp_path):
    workdir, _ = make_workdir(tmp_path / "run", method="scratch")
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 620, "train/c')   # a run killed mid-write
    assert len(plots.plot_workdir(workdir, str(tmp_path / "out"))) == 1


def test_command_line(tmp_path):
    workdir, _ = make_workdir(tmp_path / "run")
    other, _ = make_workdir(tmp_path / "scratch", method="scratch")
    plots.main([f"--workdir={workdir}", f"--compare=Scratch={other}",
                f"--compare=L2T-ww={workdir}"])
    for name in ("learning_curves.png", "pair_weights.png", "channel_weights.png",
                 "learning_curves_compare.png"):
        assert_png(os.path.join(workdir, "plots", name))


def test_limited_data_figure(tmp_path):
    write_limited_runs(tmp_path)
    results = summaries.collect_results(str(tmp_path))
    path = plots.plot_limited_data(results, str(tmp_path / "limited.png"))
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert os.path.getsize(path) > 10_000
    with pytest.raises(ValueError, match="train_examples_per_class > 0"):
        plots.plot_limited_data(summaries.select_table(results, "main"),
                                str(tmp_path / "none.png"))

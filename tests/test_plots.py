"""The pictures (l2t_jax.tools.weight_plots, metric_plots, figures, and the command line
l2t_jax.tools.plots) on fake workdirs (no JAX): the files exist, are PNGs of some size, the
heat map puts each pair's weight in its (source tap, target tap) cell, AFD's and SemCKD's
attention is drawn like L2T-ww's lambda with its normalisation in the titles and beside it
in the comparison figure, and the limited-data figure draws a grid's runs. (Real runs'
files: test_transfer_weights.py.)"""
import json
import math
import os

import numpy as np
import pytest
from matplotlib.figure import Figure

from helpers import write_limited_runs
from l2t_jax.tools import figures, metric_plots, plots, summaries, weight_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The CIFAR setting: ResNet-32's 15 taps -> VGG-9-BN's 5, all-to-all over taps 4, 9, 14.
SOURCE_TAPS = [16] * 5 + [32] * 5 + [64] * 5
TARGET_TAPS = [64, 128, 256, 512, 512]
PAIRS = [[m, n] for m in (4, 9, 14) for n in range(5)]
STEPS_PER_EPOCH, EPOCHS, LOG_EVERY = 100, 6, 20


def softmax(logits):
    e = np.exp(logits - logits.max())
    return e / e.sum()


# What AFD's and SemCKD's attention sums to one over (training.results.transfer_weights).
ATTENTION_NORMALISED_OVER = {"afd": "target_taps", "semckd": "source_taps"}


def fake_attention(method, rng):
    """Mean attention per pair of PAIRS, normalised as the method's is: AFD over the
    target taps of each source tap, SemCKD over the source taps of each target tap."""
    grid = rng.uniform(0.2, 1.0, (3, 5))                     # source rows x target columns
    grid /= grid.sum(axis=1 if method == "afd" else 0, keepdims=True)
    return [float(grid[(4, 9, 14).index(m), n]) for m, n in PAIRS]


def make_workdir(path, method="l2t_ww", seed=0, final_accuracy=70.0, with_weights=True):
    """A finished run's files as train.py writes them; returns the workdir and the per-pair
    weights written to transfer_weights.json (lambda, or AFD's / SemCKD's attention).
    L2T-w's and L2T-ww's files have no ``where``, as the files written before it."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    meta = method in ("l2t_w", "l2t_ww")
    learns_where = method == "l2t_ww"
    attends = method in ATTENTION_NORMALISED_OVER
    pairs = PAIRS if learns_where or attends else [[4, 0], [9, 1], [14, 2]]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"method": method,
                   "pairs": "all_to_all" if learns_where or attends else "one_to_one",
                   "seed": seed, "data": {"name": "cifar100", "train_examples_per_class": 0},
                   "extra_sources": []}, f)
    final_pair_weights = (fake_attention(method, rng) if attends else
                          rng.uniform(0.2, 2.0, len(pairs)).round(3).tolist())
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
            if attends:
                for i, w in enumerate(final_pair_weights):
                    line[f"train/pair_attention/{i}"] = 0.2 + (w - 0.2) * progress
            f.write(json.dumps(line) + "\n")
            if step % STEPS_PER_EPOCH == 0:
                epoch = step // STEPS_PER_EPOCH
                accuracy = final_accuracy * (1 - math.exp(-epoch / 2)) + rng.normal(0, 0.3)
                f.write(json.dumps({"step": step, "eval/val": accuracy + 1,
                                    "eval/test": accuracy}) + "\n")
    if attends and with_weights:
        with open(os.path.join(path, "transfer_weights.json"), "w") as f:
            json.dump({"method": method, "pairs": pairs, "source_taps": SOURCE_TAPS,
                       "target_taps": TARGET_TAPS, "pair_weights": None,
                       "pair_attention": final_pair_weights, "channel_weights": None,
                       "where": {"key": "pair_attention",
                                 "normalised_over": ATTENTION_NORMALISED_OVER[method],
                                 "split": "val", "images": 64, "batch_size": 64,
                                 "description": "..."}}, f)
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
    path = weight_plots.plot_pair_weights(workdir, str(tmp_path / "pair_weights.png"))
    assert path == str(tmp_path / "pair_weights.png")
    assert_png(path)
    grid = weight_plots.pair_weight_grid(weight_plots.load_transfer_weights(workdir))
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
    image = weight_plots.draw_pair_weight_heat_map(ax, grid)
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
    grid = weight_plots.pair_weight_grid(weights)
    assert grid.source_rows == [2, 4]
    assert grid.matrix[0, 1] == 0.5 and grid.matrix[1, 4] == 1.5
    assert np.isnan(grid.matrix).sum() == 2 * 5 - 2
    assert np.isnan(grid.value(3, 3))


@pytest.mark.parametrize("method,sums_to_one,text", [
    ("afd", 1, "normalised over target taps: each source tap's row sums to 1"),
    ("semckd", 0, "normalised over source taps: each target tap's column sums to 1")])
def test_attention_is_drawn_like_lambda_with_its_normalisation(tmp_path, capsys, method,
                                                               sums_to_one, text):
    """AFD's / SemCKD's run: pair_attention.png (no channel picture, no note about one);
    its heat map holds the file's attention (rows or columns summing to one, as the title
    says) and its curves the logged train/pair_attention/<i>."""
    workdir, attention = make_workdir(tmp_path / "run", method=method)
    written = plots.plot_workdir(workdir, str(tmp_path / "out"))
    assert sorted(os.path.basename(p) for p in written) == ["learning_curves.png",
                                                            "pair_attention.png"]
    for path in written:
        assert_png(path)
    assert "channel" not in capsys.readouterr().out

    fig = weight_plots.pair_weights_figure(workdir)
    heat, curves = fig.axes[:2]
    assert heat.get_title() == f"Where: mean attention at the end of training\n({text})"
    assert curves.get_title() == f"Where: attention during training\n({text})"
    drawn = np.asarray(heat.images[0].get_array())
    grid = weight_plots.pair_weight_grid(weight_plots.load_transfer_weights(workdir),
                                         "pair_attention")
    np.testing.assert_array_equal(drawn, grid.matrix)
    for (m, n), value in zip(PAIRS, attention):
        assert drawn[(4, 9, 14).index(m), n] == value
    np.testing.assert_allclose(drawn.sum(axis=sums_to_one), 1.0)
    assert not np.allclose(drawn.sum(axis=1 - sums_to_one), 1.0)
    lines = curves.get_lines()
    assert [line.get_label() for line in lines] == [f"S{m}→T{n}" for m, n in PAIRS]
    np.testing.assert_allclose([line.get_ydata()[-1] for line in lines], attention)


def test_a_file_without_where_is_l2t_ww_unnormalised_lambda(tmp_path):
    workdir, pair_weights = make_workdir(tmp_path / "run")
    weights = weight_plots.load_transfer_weights(workdir)
    assert "where" not in weights
    assert weight_plots.where_of(weights) == {"key": "pair_weights", "normalised_over": None}
    fig = weight_plots.pair_weights_figure(workdir)
    assert fig.axes[0].get_title() == ("Where: mean pair weight λ at the end of training\n"
                                       "(not normalised)")
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array()[1, 3], pair_weights[8])
    l2t_w, _ = make_workdir(tmp_path / "l2t_w", method="l2t_w")
    assert weight_plots.where_of(weight_plots.load_transfer_weights(l2t_w)) is None
    with pytest.raises(ValueError, match="no per-pair weights"):
        weight_plots.pair_weights_figure(l2t_w)


def test_the_comparison_puts_lambda_beside_the_attention(tmp_path, capsys):
    """Seeds averaged cell by cell, each panel titled with its normalisation; a label whose
    runs learn no per-pair weights, or have no file, is left out with a note; a label's
    runs on different pairs are refused."""
    runs = {"L2T-ww": [make_workdir(tmp_path / f"w{s}", "l2t_ww", s)[0] for s in (0, 1)],
            "AFD": [make_workdir(tmp_path / f"a{s}", "afd", s)[0] for s in (0, 1)],
            "SemCKD": make_workdir(tmp_path / "s0", "semckd")[0],
            "FM": make_workdir(tmp_path / "fm", "fm")[0],
            "L2T-w": make_workdir(tmp_path / "l2t_w", "l2t_w")[0]}
    panels = weight_plots.where_panels(runs)
    notes = capsys.readouterr().out
    assert "FM: no transfer_weights.json" in notes and "L2T-w: no per-pair weights" in notes
    assert [(p.label, p.runs, p.where["key"], p.where["normalised_over"]) for p in panels] == [
        ("L2T-ww", 2, "pair_weights", None), ("AFD", 2, "pair_attention", "target_taps"),
        ("SemCKD", 1, "pair_attention", "source_taps")]
    for panel, dirs in zip(panels, (runs["L2T-ww"], runs["AFD"], [runs["SemCKD"]])):
        files = [weight_plots.load_transfer_weights(d) for d in dirs]
        for i, (m, n) in enumerate(PAIRS):
            expected = np.mean([f[panel.where["key"]][i] for f in files])
            assert panel.grid.value(m, n) == pytest.approx(expected, rel=1e-12)

    fig = weight_plots.where_compare_figure(panels)
    axes = fig.axes[:3]
    assert [ax.get_title() for ax in axes] == [
        "L2T-ww: pair weight λ, mean of 2 runs\n(not normalised)",
        "AFD: attention, mean of 2 runs\n(normalised over target taps: each source tap's "
        "row sums to 1)",
        "SemCKD: attention\n(normalised over source taps: each target tap's column sums "
        "to 1)"]
    for ax, panel in zip(axes, panels):
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), panel.grid.matrix)
    assert_png(weight_plots.plot_where_compare(runs, str(tmp_path / "where.png")))

    other = make_workdir(tmp_path / "other", "afd", 2)[0]
    weights_path = os.path.join(other, "transfer_weights.json")
    with open(weights_path) as f:
        weights = json.load(f)
    weights["pairs"], weights["pair_attention"] = weights["pairs"][:3], weights[
        "pair_attention"][:3]
    with open(weights_path, "w") as f:
        json.dump(weights, f)
    with pytest.raises(ValueError, match="AFD: its runs .* differ in pairs"):
        weight_plots.where_panels({"AFD": [runs["AFD"][0], other]})
    with pytest.raises(ValueError, match="none of the runs to compare"):
        weight_plots.plot_where_compare({"FM": runs["FM"]}, str(tmp_path / "none.png"))


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
    path = metric_plots.plot_learning_curves(runs, str(tmp_path / "curves.png"))
    assert_png(path)


def test_mean_band_aligns_runs_on_steps():
    x, mean, std, count = metric_plots._mean_band(
        [(np.array([1, 2]), np.array([1.0, 3.0])),
         (np.array([1, 2, 3]), np.array([3.0, 5.0, 7.0]))])
    np.testing.assert_array_equal(x, [1, 2, 3])
    np.testing.assert_array_equal(mean, [2.0, 4.0, 7.0])
    np.testing.assert_allclose(std[:2], [math.sqrt(2), math.sqrt(2)])
    assert np.isnan(std[2]) and count.tolist() == [2, 2, 1]


def test_resumed_run_keeps_the_last_value_of_a_repeated_step():
    records = [{"step": 20, "train/ce": 3.0}, {"step": 40, "train/ce": 2.0},
               {"step": 40, "train/ce": 1.5}]
    steps, values = figures.metric_series(records, "train/ce")
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
        weight_plots.plot_pair_weights(workdir, str(tmp_path / "p.png"))

    workdir, _ = make_workdir(tmp_path / "run3")
    weights_path = os.path.join(workdir, "transfer_weights.json")
    with open(weights_path) as f:
        weights = json.load(f)
    weights["pair_weights"] = weights["pair_weights"][:-1]
    with open(weights_path, "w") as f:
        json.dump(weights, f)
    with pytest.raises(ValueError, match="transfer_weights.json.*14 pair_weights for 15"):
        weight_plots.plot_pair_weights(workdir, str(tmp_path / "p.png"))
    weights["pair_weights"] = [[w] for w in weights["pair_weights"]] + [[1.0]]
    with open(weights_path, "w") as f:
        json.dump(weights, f)
    with pytest.raises(ValueError, match="transfer_weights.json: pair_weights must be one"):
        weight_plots.plot_pair_weights(workdir, str(tmp_path / "p.png"))

    workdir, _ = make_workdir(tmp_path / "run5", method="afd")
    weights_path = os.path.join(workdir, "transfer_weights.json")
    with open(weights_path) as f:
        weights = json.load(f)
    for change, message in (
            ({"pair_attention": weights["pair_attention"][:-1]},
             r"transfer_weights.json: 14 pair_attention for 15 pairs"),
            ({"where": dict(weights["where"], key="channel_weights")},
             r"transfer_weights.json: 'where' must name a per-pair key the file holds"),
            ({"where": dict(weights["where"], key="pair_weights")},
             r"transfer_weights.json: 'where' must name a per-pair key the file holds"),
            ({"where": dict(weights["where"], normalised_over="rows")},
             r"where.normalised_over must be one of \[None, 'target_taps', 'source_taps', "
             r"'unknown'\], got 'rows'")):
        with open(weights_path, "w") as f:
            json.dump(dict(weights, **change), f)
        with pytest.raises(ValueError, match=message):
            weight_plots.load_transfer_weights(workdir)

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


def test_command_line(tmp_path, capsys):
    workdir, _ = make_workdir(tmp_path / "run")
    other, _ = make_workdir(tmp_path / "scratch", method="scratch")
    plots.main([f"--workdir={workdir}", f"--compare=Scratch={other}",
                f"--compare=L2T-ww={workdir}"])
    for name in ("learning_curves.png", "pair_weights.png", "channel_weights.png",
                 "learning_curves_compare.png", "where_compare.png"):
        assert_png(os.path.join(workdir, "plots", name))
    # Runs without per-pair weights only: no comparison of where, a note says so.
    plots.main([f"--workdir={other}", f"--compare=Scratch={other}"])
    assert not os.path.exists(os.path.join(other, "plots", "where_compare.png"))
    assert "no run to compare has per-pair weights" in capsys.readouterr().out


def test_limited_data_figure(tmp_path):
    write_limited_runs(tmp_path)
    results = summaries.collect_results(str(tmp_path))
    path = metric_plots.plot_limited_data(results, str(tmp_path / "limited.png"))
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert os.path.getsize(path) > 10_000
    with pytest.raises(ValueError, match="train_examples_per_class > 0"):
        metric_plots.plot_limited_data(summaries.select_table(results, "main"),
                                       str(tmp_path / "none.png"))


def test_a_log_scale_train_metric_shows_the_geometric_mean_and_a_positive_band(
        tmp_path, monkeypatch):
    """Two seeds whose meta-gradient norms differ by 100x: on the log axis the line is
    their geometric mean and the band stays above zero (a mean ± std band would dip below
    it); a logged 0 (theta's rate at its end) is left out rather than drawn at -inf."""
    norms = {"a": [1e-1, 1e-3, 0.0], "b": [1e-3, 1e-5, 1e-6]}
    dirs = []
    for name, values in norms.items():
        path = tmp_path / name
        path.mkdir()
        with open(path / "metrics.jsonl", "w") as f:
            for step, value in zip((10, 20, 30), values):
                f.write(json.dumps({"step": step, "train/meta_grad_norm": value}) + "\n")
        dirs.append(str(path))
    drawn = {}

    def keep(fig, path):
        drawn["figure"] = fig
        return path
    monkeypatch.setattr(figures, "save", keep)
    metric_plots.plot_train_metric({"L2T-ww": dirs}, "train/meta_grad_norm",
                                   str(tmp_path / "norm.png"), "meta-gradient norm",
                                   log_y=True)
    ax = drawn["figure"].axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [1e-2, 1e-4, 1e-6], rtol=1e-9)
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() > 0 and "geometric mean" in ax.get_title()

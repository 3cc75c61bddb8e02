"""The offline demo and the offline study (l2t_jax/tools/demo.py, l2t_jax/tools/study.py): the demo's
data design, its Colab notebook executed headless at the smallest setting (the whole demo
pipeline: source pre-training, the grid of target runs, the table and the pictures), and the
study's grids, statistics and report.

One file, so that one test worker runs both end-to-end tests (pytest-xdist --dist=loadfile):
study:smoke has demo:smallest's networks, run length and T, and its runs load the
notebook's compiled programs from the session's compilation cache instead of compiling
them beside it.
"""
import csv
import json
import math
import os

import numpy as np
import pytest

from helpers import REPO_ROOT
from l2t_jax.tools import demo, study
from l2t_jax.configs import study as study_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_digits_tasks_are_disjoint_deterministic_and_sized(tmp_path):
    sizes = demo.write_digits_data(str(tmp_path / "a"), split_seed=0)
    again = demo.write_digits_data(str(tmp_path / "b"), split_seed=0)
    other = demo.write_digits_data(str(tmp_path / "c"), split_seed=1)
    assert sizes == again == other
    assert sizes["target/val"] == 5 * demo.TARGET_VAL_PER_CLASS
    assert sizes["target/test"] == 5 * demo.TARGET_TEST_PER_CLASS
    assert sum(sizes.values()) == 1797          # every bundled digit used once
    load = lambda root, split: np.load(os.path.join(root, split + ".npz"))
    for split in ("train", "val", "test"):
        first, second = load(tmp_path / "a/target", split), load(tmp_path / "b/target", split)
        np.testing.assert_array_equal(first["images"], second["images"])
        assert set(first["labels"].tolist()) == {0, 1, 2, 3, 4}     # digits 5-9 relabelled
        assert first["images"].shape[1:] == (8, 8, 3) and first["images"].dtype == np.uint8
    assert not np.array_equal(load(tmp_path / "a/target", "test")["images"],
                              load(tmp_path / "c/target", "test")["images"])
    # Source and target images are different scans (no image in both tasks).
    source = load(tmp_path / "a/source", "train")["images"].reshape(-1, 192)
    target = load(tmp_path / "a/target", "train")["images"].reshape(-1, 192)
    assert not {row.tobytes() for row in source} & {row.tobytes() for row in target}


def test_bad_demo_settings_are_clear_errors():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "demo_config", os.path.join(REPO_ROOT, "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.examples_per_class = (5, 500)
    with pytest.raises(ValueError, match="examples_per_class: 500 is outside"):
        demo.validate_demo_config(config)
    config = module.get_config()
    config.methods = ("fitnets",)
    with pytest.raises(ValueError, match="unknown method 'fitnets'"):
        demo.validate_demo_config(config)


def test_notebook_runs_the_smallest_demo_offline(tmp_path, monkeypatch):
    """Executes experiments/l2t_ww_demo.ipynb (what CI runs), then checks what the demo
    wrote: the table, the CSV, every picture, and that the table's numbers are the mean and
    std of the runs' own result.json files."""
    import nbclient
    import nbformat
    workdir = tmp_path / "demo"
    monkeypatch.setenv("L2T_DEMO_WORKDIR", str(workdir))
    monkeypatch.setenv("L2T_DEMO_VARIANT", "smallest")
    notebook = nbformat.read(os.path.join(REPO_ROOT, "experiments", "l2t_ww_demo.ipynb"),
                             as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(REPO_ROOT,
                                                                         "experiments")}}
                            ).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "pair_weights.png" in outputs and "learning_curves_epc5.png" in outputs

    for name in ("results.md", "results.csv", "pair_weights.png", "channel_weights.png",
                 "learning_curves_epc5.png"):
        assert (workdir / name).exists(), name
    for name in ("pair_weights.png", "channel_weights.png", "learning_curves_epc5.png"):
        content = (workdir / name).read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 10_000, name

    rows = {row["row"]: row for row in csv.DictReader(open(workdir / "results.csv"))}
    slugs = {"Scratch": "scratch", "FM (one-to-one)": "fm-one_to_one",
             "L2T-ww (all-to-all)": "l2t_ww-all_to_all"}
    assert set(rows) == set(slugs)
    for label, slug in slugs.items():
        accuracies = []
        for seed in (0, 1):
            run = workdir / "runs" / slug / "epc5" / f"seed{seed}"
            result = json.load(open(run / "result.json"))
            # The run's number is its own evaluation log at the best val epoch.
            evals = [json.loads(line) for line in open(run / "metrics.jsonl")
                     if '"eval/test"' in line]
            best = max(evals, key=lambda line: line["eval/val"])
            assert result["test_at_best_val"] == best["eval/test"]
            assert result["train_examples"] == 25 and result["seed"] == seed
            accuracies.append(result["test_at_best_val"])
        assert int(rows[label]["n"]) == 2
        np.testing.assert_allclose(float(rows[label]["mean"]), np.mean(accuracies))
        np.testing.assert_allclose(float(rows[label]["std"]), np.std(accuracies, ddof=1),
                                   atol=1e-9)
        assert f"{np.mean(accuracies):.2f}" in (workdir / "results.md").read_text()


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
    d = study.paired_difference([71.0, 72.0, 73.0], [70.0, 70.0, 70.0])
    # differences 1, 2, 3: mean 2, sample std 1, t(0.975, 2 dof) = 4.302653
    assert d["n"] == 3 and d["mean"] == pytest.approx(2.0) and d["std"] == pytest.approx(1.0)
    half = 4.302653 / math.sqrt(3)
    assert d["low"] == pytest.approx(2.0 - half, rel=1e-6)
    assert d["high"] == pytest.approx(2.0 + half, rel=1e-6)
    with pytest.raises(ValueError, match="two equal lists of >= 2 values"):
        study.paired_difference([1.0], [2.0])


def test_grids_share_cells_and_directories_name_every_setting():
    config = study_config.get_config()
    main = set(study.grid_cells(config, "main"))
    sensitivity = study.grid_cells(config, "sensitivity")
    # The recipe's own point of the sensitivity grid is the main grid's run.
    shared = [c for c in sensitivity if c in main]
    assert len(shared) == len(config.sensitivity_seeds)
    assert all(dict(c.settings) == {"learning_rate": config.learning_rate} for c in shared)
    # Every budget of the demo source, the released one's own three.
    assert {c.examples_per_class for c in main if c.source == "released_resnet32"} == {1, 5, 25}
    assert {c.examples_per_class for c in main if c.source == "demo_resnet20"} == set(
        config.examples_per_class)
    cell = study.Cell("demo_resnet20", "l2t_ww:all_to_all", 5, 3,
                      study._settings(config, meta_update_every=2))
    assert cell.directory("R") == ("R/demo_resnet20/l2t_ww-all_to_all/epc5/"
                                   f"learning_rate={config.learning_rate:g}_"
                                   "meta_update_every=2/seed3")
    cells = study.all_cells(config)
    assert len(cells) == len(set(cells))
    assert study._shard(cells, "1/2") == cells[1::2]
    with pytest.raises(ValueError, match="expected 'i/n'"):
        study._shard(cells, "2/2")
    config.grids = ("main", "ablation")
    with pytest.raises(ValueError, match="unknown grid 'ablation'"):
        study.run_study(config, "/nonexistent")


def test_held_out_cells_take_their_share_of_the_budget():
    config = study_config.get_config()
    cell = study.Cell("demo_resnet20", "l2t_ww:all_to_all", 10, 0,
                      study._settings(config, meta_loss_batch="held_out"))
    run = study.cell_config(config, "DATA", "SOURCE", cell)
    assert run.meta_loss_batch == "held_out" and run.data.meta_held_out_per_class == 2
    assert run.data.train_examples_per_class == 10 and run.learning_rate == config.learning_rate
    assert run.source_model == "resnet20" and run.model_overrides.source.widths == (8, 16, 32)
    released = study.cell_config(config, "DATA", "SOURCE", study.Cell(
        "released_resnet32", "fm:one_to_one", 1, 0, study._settings(config)))
    assert released.source_num_classes == 200 and "source" not in released.model_overrides


def test_the_smoke_study_runs_every_grid_and_reports_the_runs_numbers(tmp_path):
    """study:smoke: every grid end to end (demo source pre-trained, runs, report); the
    report's numbers are the runs' own; a second start runs nothing."""
    config = study_config.get_config("smoke")
    workdir = str(tmp_path / "study")
    outcome = study.run_study(config, workdir)
    cells = study.all_cells(config)
    assert outcome["cells"] == len(cells)
    report = open(outcome["report"]).read()
    for heading in ("## Recipe", "## Main: source demo_resnet20", "Paired differences",
                    "## Meta loss on held-out", "## phi every k-th", "## Sensitivity"):
        assert heading in report
    assert f"{len(cells)} of {len(cells)} runs finished" in report
    runs = os.path.join(workdir, "runs")
    tests = {}
    for cell in study.grid_cells(config, "main"):
        with open(os.path.join(cell.directory(runs), "result.json")) as f:
            tests.setdefault((cell.entry, cell.examples_per_class), []).append(
                json.load(f)["test_at_best_val"])
    with open(os.path.join(workdir, "report", "main.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(tests)
    for row in rows:
        entry = {"Scratch": "scratch", "L2T-ww (all-to-all)": "l2t_ww:all_to_all"}[row["method"]]
        values = tests[entry, int(row["examples_per_class"])]
        assert float(row["mean"]) == pytest.approx(sum(values) / len(values))
    with open(os.path.join(workdir, "report", "paired.csv")) as f:
        paired = list(csv.DictReader(f))
    (row,) = [r for r in paired if r["b"] == "Scratch"]
    differences = [a - b for a, b in zip(tests["l2t_ww:all_to_all", 2], tests["scratch", 2])]
    assert float(row["mean"]) == pytest.approx(sum(differences) / len(differences))
    assert float(row["low"]) <= float(row["mean"]) <= float(row["high"])
    assert os.path.isfile(os.path.join(workdir, "report", "limited_data.png"))
    again = study.run_study(config, workdir)
    assert again["cells"] == len(cells)
    for cell in cells:       # nothing ran again: one start per run in its metrics log
        with open(os.path.join(cell.directory(runs), "metrics.jsonl")) as f:
            assert sum('"run"' in line for line in f) == 1

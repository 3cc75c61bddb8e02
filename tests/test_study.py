"""The offline study's runner (l2t_jax/study.py): its grids, statistics and report."""
import csv
import json
import math
import os

import pytest

from l2t_jax import study
from l2t_jax.configs import study as study_config


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

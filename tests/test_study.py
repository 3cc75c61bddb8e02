"""The offline demo and the offline study (l2t_jax/tools/demo.py, study.py, study_report.py,
digits.py): the digits tasks' data design, the demo's Colab notebook executed headless at the
smallest setting (the whole demo pipeline: source pre-training, the grid of target runs, the
table and the pictures), and the study's grids, runs, statistics and report.

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
from l2t_jax.tools import demo, digits, study, study_report
from l2t_jax.configs import demo as demo_config, study as study_config
from l2t_jax.training.config import validate_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_digits_tasks_are_disjoint_deterministic_and_sized(tmp_path):
    sizes = digits.write_digits_data(str(tmp_path / "a"), split_seed=0)
    again = digits.write_digits_data(str(tmp_path / "b"), split_seed=0)
    other = digits.write_digits_data(str(tmp_path / "c"), split_seed=1)
    assert sizes == again == other
    assert sizes["target/val"] == 5 * digits.TARGET_VAL_PER_CLASS
    assert sizes["target/test"] == 5 * digits.TARGET_TEST_PER_CLASS
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
    config = module.get_config()
    config.source = "resnet56"
    with pytest.raises(ValueError, match="config.source='resnet56'; valid: demo_resnet20"):
        demo.validate_demo_config(config)


def test_the_demo_and_the_study_build_their_runs_alike():
    """A demo run and the study cell of the same method, budget and seed have one config
    (digits.target_run_config), and the commands name the program, its preset and the
    run."""
    demo_settings = demo_config.get_config()
    config = study_config.get_config()
    cell = study.Cell("demo_resnet20", "fm:one_to_one", 5, 2, study.cell_settings(config))
    demo_run = [r for r in demo.runs(demo_settings, "W", digits.Prepared(
        "DATA", {}, {"demo_resnet20": "SOURCE"}, {})) if r.directory == "fm-one_to_one/epc5/seed2"]
    assert demo_run[0].build_config().to_dict() == study.cell_config(
        config, "DATA", "SOURCE", cell).to_dict()
    assert demo_run[0].command == ("python", "-m", "l2t_jax.main", "--config=demo",
                                   "--workdir=W", "--config.only=fm-one_to_one/epc5/seed2")


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
            # The run's numbers are its own evaluation log's: at the best val epoch, and the
            # last epoch's, which the table reports.
            evals = [json.loads(line) for line in open(run / "metrics.jsonl")
                     if '"eval/test"' in line]
            best = max(evals, key=lambda line: line["eval/val"])
            assert result["test_at_best_val"] == best["eval/test"]
            assert result["test_last"] == evals[-1]["eval/test"]
            assert result["train_examples"] == 25 and result["seed"] == seed
            accuracies.append(result["test_last"])
        assert int(rows[label]["n"]) == 2
        np.testing.assert_allclose(float(rows[label]["mean"]), np.mean(accuracies))
        np.testing.assert_allclose(float(rows[label]["std"]), np.std(accuracies, ddof=1),
                                   atol=1e-9)
        assert f"{np.mean(accuracies):.2f}" in (workdir / "results.md").read_text()


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
    d = study_report.paired_difference([71.0, 72.0, 73.0], [70.0, 70.0, 70.0])
    # differences 1, 2, 3: mean 2, sample std 1, t(0.975, 2 dof) = 4.302653
    assert d["n"] == 3 and d["mean"] == pytest.approx(2.0) and d["std"] == pytest.approx(1.0)
    half = 4.302653 / math.sqrt(3)
    assert d["low"] == pytest.approx(2.0 - half, rel=1e-6)
    assert d["high"] == pytest.approx(2.0 + half, rel=1e-6)
    with pytest.raises(ValueError, match="two equal lists of >= 2 values"):
        study_report.paired_difference([1.0], [2.0])


def _record(grid, entry, seed, test, k=2, **settings):
    """A study record (study.load_records) of a finished run with test accuracy ``test`` at
    the last epoch (the report's number; the accuracies at the best val are others)."""
    values = {"learning_rate": 0.02, "meta_loss_batch": "same", "meta_update_every": 1,
              "meta_learning_rate": 1e-2, "T": 1, "meta_gradient_batches": 1,
              "meta_temperature": 1.0, "meta_freeze_after": 1.0, "objective": "",
              **settings}
    result = None if test is None else {"test_last": test, "val_last": test + 1,
                                        "test": test - 7, "best_val": test + 2,
                                        "wall_seconds": 10.0 + seed, "history": []}
    return {"grid": grid, "source": "demo_resnet20", "entry": entry, "examples_per_class": k,
            "seed": seed, **values, "directory": f"/{grid}/{entry}/{k}/{settings}/{seed}",
            "result": result}


def test_report_rows_are_the_records_numbers_paired_by_seed():
    config = study_config.get_config("smoke")
    config.seeds = (0, 1, 2)
    records = [_record("main", "scratch", s, t) for s, t in ((0, 60.0), (1, 62.0), (2, 61.0))]
    # L2T-ww's seed 1 did not finish: the differences pair seeds 0 and 2 only.
    records += [_record("main", "l2t_ww:all_to_all", s, t)
                for s, t in ((0, 65.0), (1, None), (2, 64.0))]
    (main_scratch, main_l2t) = study_report.main_rows(config, records)
    assert main_scratch["test"] == [60.0, 62.0, 61.0] and main_l2t["test"] == [65.0, 64.0]
    assert main_l2t["seconds"] == [10.0, 12.0]
    (paired,) = study_report.paired_rows(config, records)
    assert (paired["a"], paired["b"]) == ("l2t_ww:all_to_all", "scratch")
    assert paired["difference"]["n"] == 2 and paired["difference"]["mean"] == pytest.approx(4.0)
    (csv_row,) = study_report.paired_csv_rows([paired])
    assert csv_row["a"] == "L2T-ww (all-to-all)" and csv_row["b"] == "Scratch"
    assert [r["n"] for r in study_report.main_csv_rows([main_scratch, main_l2t])] == [3, 2]
    # Sections select their grid's records by the settings: held-out against same batch.
    records += [_record("meta_batch", "l2t_ww:all_to_all", s, t, meta_loss_batch=batch)
                for s in (0, 1) for batch, t in (("same", 70.0 + s), ("held_out", 73.0 + 2 * s))]
    config.meta_batch_examples_per_class = (2,)
    (row,) = study_report.meta_batch_rows(config, records)
    assert row["same"] == [70.0, 71.0] and row["held_out"] == [73.0, 75.0]
    assert row["difference"]["mean"] == pytest.approx(3.5)
    lines = "\n".join(study_report.main_lines(config, records, [main_scratch, main_l2t],
                                              [paired]))
    assert "| Scratch | 61.00 ± 1.00 (3) | 11 |" in lines
    assert "| L2T-ww (all-to-all) − Scratch | +4.00 [" in lines


def test_the_meta_screen_chooses_on_val_and_the_objectives_pair_with_the_main_grid():
    """The screen's rows are the runs' last-epoch val accuracies per objective, rate and
    budget, and each objective's rate is its best mean val (test plays no part); the
    objectives' rows pair each seed with the main grid's FM and same-batch L2T-ww."""
    config = study_config.get_config("smoke")
    config.screen_meta_learning_rates = (1e-3, 1e-2)
    config.screen_examples_per_class = (2, 10)
    config.seeds = (0, 1, 2)
    records = []
    # val: mean val 71 at 1e-3 and 73 at 1e-2, though its test is best at 1e-3.
    for rate, k, seed, test in ((1e-3, 2, 100, 70.0), (1e-3, 10, 100, 70.0),
                                (1e-2, 2, 100, 72.0), (1e-2, 10, 100, 72.0)):
        records.append(_record("meta_screen", "l2t_ww:all_to_all", seed, test, k=k,
                               objective="val", meta_loss_batch="val",
                               meta_learning_rate=rate))
        records[-1]["result"]["test_last"] = 90.0 if rate == 1e-3 else 50.0
    records.append(_record("meta_screen", "l2t_ww:all_to_all", 100, 60.0, k=2,
                           objective="same", meta_learning_rate=1e-3))
    rows = study_report.screen_rows(config, records)
    (val_low,) = [r for r in rows
                  if (r["objective"], r["meta_learning_rate"]) == ("val", 1e-3)]
    assert val_low["val"] == {2: [71.0], 10: [71.0]} and val_low["all"] == [71.0, 71.0]
    assert study_report.screen_choice(rows) == {"val": 1e-2, "same": 1e-3}
    lines = "\n".join(study_report.screen_lines(config, rows))
    assert "| val | 0.01 | 73.00 ± 0.00 (1) | 73.00 ± 0.00 (1) | **73.00** |" in lines
    # The objectives against the main grid, paired by seed.
    config.meta_objective_learning_rates = {"val": 1e-2}
    for seed, (fm, same, val) in enumerate(((60.0, 62.0, 65.0), (61.0, 62.0, 63.0),
                                            (59.0, 64.0, 66.0))):
        records += [_record("main", "fm:one_to_one", seed, fm),
                    _record("main", "l2t_ww:all_to_all", seed, same),
                    _record("meta_objective", "l2t_ww:all_to_all", seed, val,
                            objective="val", meta_loss_batch="val")]
    (row,) = study_report.objective_rows(config, records)
    assert row["test"] == [65.0, 63.0, 66.0] and row["examples_per_class"] == 2
    assert row["differences"]["fm:one_to_one"]["mean"] == pytest.approx(14.0 / 3)
    assert row["differences"]["l2t_ww:all_to_all"]["mean"] == pytest.approx(2.0)
    assert row["differences"]["fm:all_to_all"] is None          # not in this grid
    lines = "\n".join(study_report.objective_lines(config, [row], []))
    assert "| L2T-ww (val) − L2T-ww (all-to-all) | +2.00 [" in lines


def test_the_meta_grids_name_their_objectives_in_the_run_directories():
    config = study_config.get_config()
    screen = study.grid_cells(config, "meta_screen")
    assert len(screen) == (len(config.screen_objectives)
                           * len(config.screen_meta_learning_rates)
                           * len(config.screen_examples_per_class) * len(config.screen_seeds))
    assert {c.seed for c in screen}.isdisjoint(config.seeds)
    (cell,) = [c for c in screen
               if (c.objective, c.examples_per_class, c.seed) == ("val_mean8", 2, 100)
               and dict(c.settings).get("meta_learning_rate") == 1e-3]
    assert cell.directory == ("demo_resnet20/l2t_ww-all_to_all/epc2/learning_rate=0.02_"
                              "meta_gradient_batches=8_meta_learning_rate=0.001_"
                              "meta_loss_batch=val/seed100")
    run = study.cell_config(config, "DATA", "SOURCE", cell)
    assert (run.meta_loss_batch, run.meta_gradient_batches, run.meta_learning_rate,
            run.data.meta_val_per_class) == ("val", 8, 1e-3, 15)
    for objective in config.screen_objectives:    # every objective's cell is a valid run
        (first, *_) = [c for c in screen if c.objective == objective]
        validate_config(study.cell_config(config, "DATA", "SOURCE", first))
    config.meta_objective_learning_rates = {"val": 3e-3, "temperature4": 1e-3}
    cells = study.grid_cells(config, "meta_objective")
    assert len(cells) == 2 * len(study.grid_cells(config, "main")) // len(config.methods)
    assert {dict(c.settings).get("meta_temperature") for c in cells} == {None, 4.0}
    config.meta_objectives.val.meta_momentum = 0.5
    with pytest.raises(ValueError, match=r"config.meta_objectives.val: \['meta_momentum'\] "
                                         "are not settings"):
        study.grid_cells(config, "meta_objective")


def test_grids_share_cells_and_directories_name_every_setting():
    config = study_config.get_config()
    main = set(study.grid_cells(config, "main"))
    sensitivity = study.grid_cells(config, "sensitivity")
    # The recipe's own point of the sensitivity grid is the main grid's run.
    shared = [c for c in sensitivity if c in main]
    assert len(shared) == len(config.sensitivity_seeds)
    assert all(dict(c.settings) == {"learning_rate": config.learning_rate} for c in shared)
    # Every budget for both sources; a source may name budgets of its own.
    assert {c.examples_per_class for c in main} == set(config.examples_per_class)
    config.source_specs.released_resnet32.examples_per_class = (1, 5, 25)
    own = set(study.grid_cells(config, "main"))
    assert {c.examples_per_class for c in own if c.source == "released_resnet32"} == {1, 5, 25}
    assert {c.examples_per_class for c in own if c.source == "demo_resnet20"} == set(
        config.examples_per_class)
    cell = study.Cell("demo_resnet20", "l2t_ww:all_to_all", 5, 3,
                      study.cell_settings(config, meta_update_every=2))
    assert cell.directory == ("demo_resnet20/l2t_ww-all_to_all/epc5/"
                              f"learning_rate={config.learning_rate:g}_"
                              "meta_update_every=2/seed3")
    cells = study.all_cells(config)
    assert len(cells) == len(set(cells))
    runs = study.runs(config, "W")
    assert [r.directory for r in runs] == [c.directory for c in cells]
    assert runs[0].command[-1] == f"--config.only={cells[0].directory}"
    config.grids = ("main", "ablation")
    with pytest.raises(ValueError, match="unknown grid 'ablation'"):
        study.run_study(config, "/nonexistent")


def test_held_out_cells_take_their_share_of_the_budget():
    config = study_config.get_config()
    cell = study.Cell("demo_resnet20", "l2t_ww:all_to_all", 10, 0,
                      study.cell_settings(config, meta_loss_batch="held_out"))
    run = study.cell_config(config, "DATA", "SOURCE", cell)
    assert run.meta_loss_batch == "held_out" and run.data.meta_held_out_per_class == 2
    assert run.data.train_examples_per_class == 10 and run.learning_rate == config.learning_rate
    assert run.source_model == "resnet20" and run.model_overrides.source.widths == (8, 16, 32)
    released = study.cell_config(config, "DATA", "SOURCE", study.Cell(
        "released_resnet32", "fm:one_to_one", 1, 0, study.cell_settings(config)))
    assert released.source_num_classes == 200 and "source" not in released.model_overrides


def test_the_smoke_study_runs_every_grid_and_reports_the_runs_numbers(tmp_path):
    """study:smoke: every grid end to end (demo source pre-trained, runs, report); the
    report's numbers are the runs' own; a second start, a dry run and ``only`` run
    nothing; shards split the cells."""
    config = study_config.get_config("smoke")
    workdir = str(tmp_path / "study")
    # A dry run prints every cell's command and makes nothing, not even the data.
    config.dry_run = True
    assert study.run_study(config, workdir) == {"cells": len(study.all_cells(config)),
                                                "report": None}
    assert not os.path.exists(workdir)
    config.dry_run = False
    outcome = study.run_study(config, workdir)
    cells = study.all_cells(config)
    assert outcome["cells"] == len(cells)
    report = open(outcome["report"]).read()
    for heading in ("## Recipe", "## Main: source demo_resnet20", "Paired differences",
                    "## Meta loss on held-out", "## phi every k-th", "## Sensitivity",
                    "## Meta objectives: the screen", "## Meta objectives: source"):
        assert heading in report
    assert f"{len(cells)} of {len(cells)} runs finished" in report
    # The objective that trains phi on val labels says so beside its numbers.
    assert (f"L2T-ww (val) trains phi on {config.meta_val_per_class} val images per class"
            in report)
    runs = os.path.join(workdir, "runs")
    tests = {}
    for cell in study.grid_cells(config, "main"):
        with open(os.path.join(runs, cell.directory, "result.json")) as f:
            tests.setdefault((cell.entry, cell.examples_per_class), []).append(
                json.load(f)["test_last"])
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
    assert os.path.isdir(os.path.join(workdir, "sources", "demo_resnet20", "source"))
    again = study.run_study(config, workdir)
    assert again["cells"] == len(cells)
    config.shard = "1/2"                        # every other cell, and no report
    assert study.run_study(config, workdir) == {"cells": len(cells[1::2]), "report": None}
    config.shard, config.only = "", cells[2].directory
    assert study.run_study(config, workdir) == {"cells": 1, "report": None}
    for cell in cells:       # nothing ran again: one start per run in its metrics log
        with open(os.path.join(runs, cell.directory, "metrics.jsonl")) as f:
            assert sum('"run"' in line for line in f) == 1


def test_the_report_draws_where_each_learned_association_method_transfers(tmp_path):
    """The main grid's L2T-ww, AFD and SemCKD runs at the probe's budget: one picture per
    source with each method's per-pair weights averaged over its seeds, the same grids
    the weight_plots module computes from the runs' transfer_weights.json."""
    from test_plots import make_workdir
    from l2t_jax.tools import weight_plots
    config = study_config.get_config("smoke")
    config.methods = ("scratch", "l2t_ww:all_to_all", "afd:all_to_all", "semckd:all_to_all")
    config.seeds = (0, 1)
    records, groups = [], {}
    for entry in config.methods[1:]:
        method = entry.split(":")[0]
        for seed in config.seeds:
            directory = str(tmp_path / method / f"seed{seed}")
            make_workdir(directory, method=method, seed=seed)
            record = _record("main", entry, seed, 70.0, k=config.probe_examples_per_class)
            records.append(dict(record, directory=directory))
            groups.setdefault(study_report.label(entry), []).append(directory)
    lines = study_report._where_compare(config, records, str(tmp_path / "report"))
    name = f"where_demo_resnet20_epc{config.probe_examples_per_class}.png"
    assert lines == [f"![where each method transfers, demo_resnet20, "
                     f"{config.probe_examples_per_class} per class]({name})"]
    assert os.path.getsize(tmp_path / "report" / name) > 10_000
    panels = weight_plots.where_panels(groups)
    assert [p.label for p in panels] == ["L2T-ww (all-to-all)", "AFD (all-to-all)",
                                         "SemCKD (all-to-all)"]
    # Without a second method there is nothing to put side by side.
    config.methods = ("scratch", "l2t_ww:all_to_all")
    assert study_report._where_compare(config, records, str(tmp_path / "other")) == []

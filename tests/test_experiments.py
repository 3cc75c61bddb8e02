"""l2t_jax.experiments on fake workdirs (no JAX): grids and commands, collecting and
summarizing results against the paper, Markdown/CSV output, the limited-data figure, and the
two command-line scripts."""
import importlib.util
import json
import math
import os

import pytest

from l2t_jax import experiments

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATASETS = {"cifar100": "cifar100", "stl10": "stl10", "cub200": "caltech_birds2011",
            "digits": "digits"}


def write_run(root, relative, method, scheme, dataset, seed, test, examples_per_class=0,
              extra_sources=(), config_only=False):
    """A finished workdir: config.json and result.json as train.py writes them. With
    config_only, result.json leaves out what config.json knows (an older trainer's)."""
    workdir = os.path.join(str(root), relative)
    os.makedirs(workdir, exist_ok=True)
    extra = [dict(e) for e in extra_sources]
    config = {"method": method, "pairs": scheme or "4-0,9-1", "seed": seed,
              "data": {"name": dataset, "train_examples_per_class": examples_per_class},
              "source_model": "resnet32", "target_model": "vgg9_bn", "extra_sources": extra}
    result = {"test_at_best_val": test, "best_val": test + 1.0, "best_epoch": 7, "steps": 800,
              "dataset": dataset, "source": "resnet32", "target": "vgg9_bn", "seed": seed}
    if not config_only:
        result.update(method=method, scheme=scheme or "4-0,9-1", pairs=[[4, 0], [9, 1]],
                      train_examples_per_class=examples_per_class,
                      extra_sources=[e["model"] for e in extra], wall_seconds=12.5)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump(result, f)
    return workdir


# Known accuracies: (method, scheme, dataset) -> one value per seed.
MAIN_RESULTS = {
    ("l2t_ww", "all_to_all", "cifar100"): [70.0, 72.0, 74.0],
    ("scratch", None, "cifar100"): [67.0, 68.0],
    ("fm", "one_to_one", "stl10"): [75.0, 77.0, 79.0],
    ("lwf", None, "stl10"): [68.5],
    ("fm", "single", "cub200"): [47.0, 48.0],
    ("fm", "one_to_one", "digits"): [90.0, 91.0, 95.0],
    ("fm", "all_to_all", "digits"): [92.0],
}


@pytest.fixture
def main_root(tmp_path):
    root = tmp_path / "runs"
    for (method, scheme, target), values in MAIN_RESULTS.items():
        for seed, value in enumerate(values):
            slug = method if scheme is None else f"{method}-{scheme}"
            write_run(root, f"main/{target}/{slug}/epc_all/seed{seed}", method, scheme,
                      DATASETS[target], seed, value)
    # An unfinished run (no result.json) and a workdir's bulky subdirectories are ignored.
    os.makedirs(root / "main/stl10/l2t_ww-all_to_all/epc_all/seed0/checkpoints/100")
    return str(root)


def cell(rows, row, column, **keys):
    matches = [r for r in rows if r["row"] == row and r["column"] == column
               and all(r[k] == v for k, v in keys.items())]
    assert len(matches) == 1, (row, column, keys, rows)
    return matches[0]


# ----------------------------------------------------------------------------- naming
@pytest.mark.parametrize("method, scheme, label", [
    ("scratch", None, "Scratch"), ("scratch", "all_to_all", "Scratch"), ("lwf", None, "LwF"),
    ("at", "one_to_one", "AT (one-to-one)"), ("lwf_at", "one_to_one", "LwF+AT (one-to-one)"),
    ("fm", "single", "FM (single)"), ("fm", "one_to_one", "FM (one-to-one)"),
    ("l2t_w", "single", "L2T-w (single)"), ("l2t_w", "one_to_one", "L2T-w (one-to-one)"),
    ("l2t_ww", "all_to_all", "L2T-ww (all-to-all)"), ("fm", "all_to_all", "FM (all-to-all)"),
    ("l2t_ww", "4-0,9-1", "L2T-ww (4-0,9-1)"), ("l2t_ww", [[4, 0], [9, 1]], "L2T-ww (4-0,9-1)"),
    ("l2t_ww", "4-0,4-1,4-2,4-3,4-4", "L2T-ww (5 pairs)"), ("new_method", None, "new_method"),
])
def test_row_label(method, scheme, label):
    assert experiments.row_label(method, scheme) == label


def test_paper_tables_hold_the_spec_numbers():
    assert list(experiments.PAPER_RESULTS) == list(experiments.PAPER_ROWS)
    assert len(experiments.PAPER_ROWS) == 9
    assert experiments.PAPER_RESULTS["Scratch"]["CIFAR-100"] == (67.69, 0.22)
    assert experiments.PAPER_RESULTS["L2T-ww (all-to-all)"]["Stanford Dogs"] == (78.08, 0.96)
    assert experiments.PAPER_RESULTS["L2T-w (single)"]["Stanford40"] == (46.25, 3.66)
    multi = experiments.PAPER_MULTI_SOURCE
    assert [multi["L2T-ww (all-to-all)"][c][0] for c in experiments.MULTI_SOURCE_COLUMNS] == [
        78.31, 79.35, 79.80, 80.52]
    assert [multi["FM (one-to-one)"][c][0] for c in experiments.MULTI_SOURCE_COLUMNS] == [
        76.38, 77.45, 77.69, 77.15]


def test_dataset_columns():
    assert [experiments.dataset_column(d) for d in (
        "cifar100", "stl10", "caltech_birds2011", "mit67", "stanford40", "stanford_dogs",
        "digits")] == list(experiments.PAPER_COLUMNS) + ["digits"]


def test_second_source_labels():
    label = experiments.second_source_label
    assert label([]) == "none"
    assert label([{"model": "resnet20", "num_classes": 200}]) == "+ TinyImageNet ResNet-20"
    assert label([{"model": "resnet32", "num_classes": 200}]) == "+ TinyImageNet ResNet-32"
    assert label([{"model": "resnet32", "num_classes": 10}]) == "+ CIFAR-10 ResNet-32"
    assert label(["resnet32"]) == "+ ResNet-32"


# ------------------------------------------------------------------------------- grids
def test_grid_sizes():
    main = experiments.table_runs("main", "runs", seeds=[0, 1], targets=["cifar100"])
    assert len(main) == 9 * 2
    assert [r.label for r in main[:9]] == list(experiments.PAPER_ROWS)
    assert len(experiments.table_runs("main", "runs", seeds=[0, 1, 2])) == 9 * 6 * 3
    assert len(experiments.table_runs("multisource", "runs", seeds=[0, 1, 2])) == 4 * 2 * 3
    limited = experiments.table_runs("limited", "runs", seeds=[0, 1, 2])
    assert len(limited) == 3 * 4 * 3
    assert {r.examples_per_class for r in limited} == {25, 50, 100, 250}
    assert len(experiments.table_runs("limited", "runs", seeds=[0], targets=["stl10", "cifar100"],
                                      examples_per_class=[10, 20])) == 3 * 2 * 2
    # Every workdir distinct, and seed-major: all seed-0 runs come first.
    assert len({r.workdir for r in limited}) == len(limited)
    assert [r.seed for r in main] == [0] * 9 + [1] * 9


def test_method_selection():
    def rows(methods, table="main"):
        return [r.label for r in experiments.table_runs(table, "runs", [0], ["stl10"]
                                                        if table != "multisource" else None,
                                                        methods=methods)]
    assert rows(["fm"]) == ["FM (single)", "FM (one-to-one)"]
    assert rows(["l2t_ww", "fm-one_to_one"]) == ["FM (one-to-one)", "L2T-ww (all-to-all)"]
    assert rows(["Scratch"]) == ["Scratch"]
    with pytest.raises(ValueError, match="not a row of the limited table"):
        rows(["lwf"], "limited")
    with pytest.raises(ValueError, match="unknown target"):
        experiments.table_runs("main", "runs", [0], targets=["imagenet"])
    with pytest.raises(ValueError, match="unknown second source"):
        experiments.table_runs("multisource", "runs", [0], targets=["plus_vgg"])
    with pytest.raises(ValueError, match="> 0 for the limited"):
        experiments.table_runs("limited", "runs", [0], examples_per_class=[0, 25])
    with pytest.raises(ValueError, match="unknown table"):
        experiments.table_runs("ablation", "runs", [0])


def test_command_is_exact():
    run = [r for r in experiments.table_runs("main", "runs", seeds=[1], targets=["stl10"])
           if r.label == "FM (one-to-one)"][0]
    assert experiments.command(run) == (
        "python -m l2t_jax.main --config=stl10 "
        "--workdir=runs/main/stl10/fm-one_to_one/epc_all/seed1 "
        "--config.method=fm --config.pairs=one_to_one --config.seed=1")
    scratch = experiments.table_runs("limited", "runs", seeds=[0], methods=["scratch"],
                                     examples_per_class=[25], extra_overrides=["epochs=2"])[0]
    assert experiments.command(scratch) == (
        "python -m l2t_jax.main --config=stl10 "
        "--workdir=runs/limited/stl10/scratch/epc25/seed0 --config.method=scratch "
        "--config.seed=0 --config.data.train_examples_per_class=25 --config.epochs=2")
    multi = experiments.table_runs("multisource", "runs", seeds=[2], methods=["l2t_ww"],
                                   targets=["plus_cifar10_resnet32"])[0]
    assert experiments.command(multi) == (
        "python -m l2t_jax.main --config=stl10:plus_cifar10_resnet32 "
        "--workdir=runs/multisource/stl10-plus_cifar10_resnet32/l2t_ww-all_to_all/epc_all/seed2 "
        "--config.method=l2t_ww --config.pairs=all_to_all --config.seed=2")


def test_run_grid_skips_finished_runs_and_stops_on_failure(tmp_path, capsys):
    runs = experiments.table_runs("main", str(tmp_path), seeds=[0], targets=["cifar100"],
                                  methods=["scratch", "lwf", "fm"])
    assert len(runs) == 4
    write_run(tmp_path, os.path.relpath(runs[1].workdir, tmp_path), "lwf", None, "cifar100",
              0, 69.0)
    called = []

    def runner(args):   # stands in for the training program
        called.append(args)
        workdir = next(a.split("=", 1)[1] for a in args if a.startswith("--workdir="))
        if len(called) == 3:
            return 1
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "result.json"), "w") as f:
            f.write("{}")
        return 0

    with pytest.raises(experiments.GridError, match=r"run 4/4 failed with exit code 1"):
        experiments.run_grid(runs, runner=runner)
    out = capsys.readouterr().out
    assert f"[2/4] skip (finished, has result.json): {runs[1].workdir}" in out
    assert "run 1/4 (" in out and f"\n  {experiments.command(runs[0])}" in out
    assert "run 3/4 (" in out and "ETA" in out.split("run 3/4 (")[1].splitlines()[0]
    assert len(called) == 3
    assert called[0][1:3] == ["-m", "l2t_jax.main"]
    assert called[0][3] == "--config=cifar100"
    assert called[0][4] == f"--workdir={os.path.abspath(runs[0].workdir)}"
    assert called[0][5:] == ["--config.method=scratch", "--config.seed=0"]
    assert [experiments.is_finished(r.workdir) for r in runs] == [True, True, True, False]

    # Again: the three finished runs are skipped, the failed one runs.
    called.clear()
    report = experiments.run_grid(runs, runner=lambda args: called.append(args) or 0)
    assert len(called) == 1 and len(report["skipped"]) == 3 and report["ran"] == [runs[3]]


def test_run_grid_dry_run_prints_commands(tmp_path, capsys):
    runs = experiments.table_runs("main", str(tmp_path), seeds=[0, 1], targets=["stl10"],
                                  methods=["l2t_ww"])
    write_run(tmp_path, os.path.relpath(runs[0].workdir, tmp_path), "l2t_ww", "all_to_all",
              "stl10", 0, 78.0)
    report = experiments.run_grid(runs, dry_run=True,
                                  runner=lambda args: pytest.fail("dry run ran something"))
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [experiments.command(runs[1])]
    assert "skip" in captured.err and report["pending"] == [runs[1]]


# --------------------------------------------------------------------------- summaries
def test_collect_and_summarize_main(main_root):
    results = experiments.collect_results(main_root)
    assert len(results) == sum(len(v) for v in MAIN_RESULTS.values())
    rows = experiments.summarize(experiments.select_table(results, "main"))

    l2t = cell(rows, "L2T-ww (all-to-all)", "CIFAR-100")
    assert (l2t["n"], l2t["mean"], l2t["std"]) == (3, 72.0, 2.0)
    assert l2t["paper_mean"] == 70.96 and l2t["paper_std"] == 0.61
    assert l2t["diff"] == pytest.approx(72.0 - 70.96)
    assert l2t["seeds"] == [0, 1, 2]

    scratch = cell(rows, "Scratch", "CIFAR-100")
    assert scratch["mean"] == 67.5 and scratch["std"] == pytest.approx(math.sqrt(0.5))
    assert scratch["diff"] == pytest.approx(67.5 - 67.69)

    fm = cell(rows, "FM (one-to-one)", "STL-10")
    assert (fm["mean"], fm["std"], fm["paper_mean"]) == (77.0, 2.0, 76.38)
    single = cell(rows, "LwF", "STL-10")
    assert (single["n"], single["mean"], single["std"]) == (1, 68.5, 0.0)   # n = 1: std 0
    cub = cell(rows, "FM (single)", "CUB200")
    assert cub["mean"] == 47.5 and cub["paper_mean"] == 47.60

    demo = cell(rows, "FM (one-to-one)", "digits")
    assert demo["mean"] == 92.0 and demo["std"] == pytest.approx(math.sqrt(7.0))
    assert demo["paper_mean"] is None and demo["diff"] is None
    assert cell(rows, "FM (all-to-all)", "digits")["n"] == 1

    # Paper order: rows first, then columns.
    order = [(r["row"], r["column"]) for r in rows]
    assert order == [("Scratch", "CIFAR-100"), ("LwF", "STL-10"), ("FM (single)", "CUB200"),
                     ("FM (one-to-one)", "STL-10"), ("FM (one-to-one)", "digits"),
                     ("L2T-ww (all-to-all)", "CIFAR-100"), ("FM (all-to-all)", "digits")]


def test_markdown_in_the_paper_layout(main_root):
    rows = experiments.summarize(experiments.collect_results(main_root))
    text = experiments.to_markdown(rows, title="Main")
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    assert header == "| method | CIFAR-100 | STL-10 | CUB200 | digits |"
    labels = [line.split("|")[1].strip() for line in lines
              if line.startswith("| ") and not line.startswith("| method")]
    assert labels == ["Scratch", "LwF", "FM (single)", "FM (one-to-one)",
                      "L2T-ww (all-to-all)", "FM (all-to-all)"]
    l2t_line = next(line for line in lines if line.startswith("| L2T-ww"))
    assert l2t_line == ("| L2T-ww (all-to-all) | 72.00 ± 2.00 (3) [paper 70.96; Δ +1.04] "
                        "| - | - | - |")
    fm_line = next(line for line in lines if line.startswith("| FM (one-to-one)"))
    assert fm_line.endswith(
        "| - | 77.00 ± 2.00 (3) [paper 76.38; Δ +0.62] | - | 92.00 ± 2.65 (3) |")
    assert "sample std" in text


def test_csv_round_trips(main_root, tmp_path):
    rows = experiments.summarize(experiments.collect_results(main_root))
    path = experiments.to_csv(rows, str(tmp_path / "out" / "table.csv"))
    assert experiments.read_csv(path) == rows
    with open(path) as f:
        assert f.readline().strip() == ("row,column,n,mean,std,paper_mean,paper_std,diff,"
                                        "seeds")


def test_multi_source_columns_and_paper_numbers(tmp_path):
    sources = {"none": [], "+ TinyImageNet ResNet-20": [
        {"model": "resnet20", "num_classes": 200, "checkpoint": "a", "pairs": "all_to_all"}],
        "+ CIFAR-10 ResNet-32": [
        {"model": "resnet32", "num_classes": 10, "checkpoint": "b", "pairs": "all_to_all"}]}
    for i, (name, extra) in enumerate(sources.items()):
        for seed, value in enumerate([79.0 + i, 81.0 + i]):
            write_run(tmp_path, f"multisource/s{i}/l2t_ww/seed{seed}", "l2t_ww", "all_to_all",
                      "stl10", seed, value, extra_sources=extra)
    results = experiments.select_table(experiments.collect_results(str(tmp_path)),
                                       "multisource")
    rows = experiments.summarize(results, by=experiments.TABLE_GROUPING["multisource"])
    assert [r["second_source"] for r in rows] == list(sources)
    cifar = cell(rows, "L2T-ww (all-to-all)", "STL-10", second_source="+ CIFAR-10 ResNet-32")
    assert cifar["mean"] == 82.0 and cifar["std"] == pytest.approx(math.sqrt(2))
    assert cifar["paper_mean"] == 80.52 and cifar["paper_std"] is None
    assert cifar["diff"] == pytest.approx(82.0 - 80.52)
    text = experiments.to_markdown(rows)
    assert "| method | none | + TinyImageNet ResNet-20 | + CIFAR-10 ResNet-32 |" in text
    assert "Target data set: STL-10." in text
    # Single-source and multi-source runs are never averaged together by mistake.
    with pytest.raises(ValueError, match="mixes runs with different second_source"):
        experiments.summarize(results, by=("row", "column"))
    assert experiments.summarize(results) == rows   # by=None separates them by itself


def test_limited_table_and_figure(tmp_path):
    accuracy = {"scratch": 40.0, "fm": 45.0, "l2t_ww": 55.0}
    schemes = {"scratch": None, "fm": "one_to_one", "l2t_ww": "all_to_all"}
    for size in (25, 50, 100, 250):
        for method, base in accuracy.items():
            for seed, noise in enumerate((-1.0, 1.0)):
                write_run(tmp_path, f"limited/stl10/{method}/epc{size}/seed{seed}", method,
                          schemes[method], "stl10", seed,
                          base + 10 * math.log10(size) + noise, examples_per_class=size)
    write_run(tmp_path, "main/stl10/scratch/epc_all/seed0", "scratch", None, "stl10", 0, 65.0)
    results = experiments.collect_results(str(tmp_path))
    limited = experiments.select_table(results, "limited")
    assert len(limited) == 4 * 3 * 2
    rows = experiments.summarize(limited, by=experiments.TABLE_GROUPING["limited"])
    low = cell(rows, "L2T-ww (all-to-all)", "STL-10", examples_per_class=25)
    assert low["mean"] == pytest.approx(55.0 + 10 * math.log10(25))
    assert low["std"] == pytest.approx(math.sqrt(2)) and low["paper_mean"] is None
    text = experiments.to_markdown(rows)
    assert "| method | 25 / class | 50 / class | 100 / class | 250 / class |" in text
    path = experiments.plot_limited_data(results, str(tmp_path / "limited.png"))
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert os.path.getsize(path) > 10_000
    with pytest.raises(ValueError, match="train_examples_per_class > 0"):
        experiments.plot_limited_data(experiments.select_table(results, "main"),
                                      str(tmp_path / "none.png"))


def test_default_grouping_keeps_settings_apart(tmp_path):
    """The offline demo's layout (runs/<method-scheme>/epc<k>/seed<s>, data set "digits")
    summarized with by=None: one column per label budget, nothing averaged across them."""
    for k, base in ((5, 60.0), (25, 80.0)):
        for entry, method, scheme, gain in (("scratch", "scratch", None, 0.0),
                                            ("l2t_ww-all_to_all", "l2t_ww", "all_to_all", 5.0)):
            for seed in (0, 1):
                write_run(tmp_path, f"runs/{entry}/epc{k}/seed{seed}", method, scheme,
                          "digits", seed, base + gain + 2 * seed, examples_per_class=k)
    results = experiments.collect_results(str(tmp_path / "runs"))
    rows = experiments.summarize(results)
    assert [(r["row"], r["examples_per_class"], r["mean"]) for r in rows] == [
        ("Scratch", 5, 61.0), ("Scratch", 25, 81.0),
        ("L2T-ww (all-to-all)", 5, 66.0), ("L2T-ww (all-to-all)", 25, 86.0)]
    text = experiments.to_markdown(rows)
    assert "| method | 5 / class | 25 / class |" in text
    assert "Target data set: digits." in text and "[paper" not in text
    with pytest.raises(ValueError, match="mixes runs with different examples_per_class"):
        experiments.summarize(results, by=("row", "column"))


def test_older_result_json_is_completed_from_config_json(tmp_path):
    workdir = write_run(tmp_path, "a", "fm", "single", "mit67", 3, 55.0, config_only=True)
    result = experiments.load_result(workdir)
    assert (result["row"], result["column"], result["seed"], result["examples_per_class"],
            result["second_source"]) == ("FM (single)", "MIT67", 3, 0, "none")


def test_unreadable_result_is_named(tmp_path):
    workdir = write_run(tmp_path, "a", "fm", "single", "mit67", 0, 55.0)
    with open(os.path.join(workdir, "result.json"), "w") as f:
        f.write("{")
    with pytest.raises(ValueError, match="result.json is not valid JSON"):
        experiments.collect_results(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        experiments.collect_results(str(tmp_path / "missing"))


# ---------------------------------------------------------------------- the scripts
def load_script(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO_ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summarize_script_writes_the_tables(main_root, tmp_path, capsys):
    out = tmp_path / "report"
    load_script("summarize").main([f"--root={main_root}", f"--out={out}"])
    printed = capsys.readouterr().out
    assert "| L2T-ww (all-to-all) | 72.00 ± 2.00 (3)" in printed
    assert (out / "table.md").read_text().startswith("## Main table")
    assert experiments.read_csv(str(out / "table.csv"))[0]["row"] == "Scratch"


def test_run_table_script_dry_run(tmp_path, capsys):
    load_script("run_table").main(["--table=main", f"--root={tmp_path}", "--seeds=0,1",
                                   "--targets=cifar100", "--dry_run"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 18 and all(line.startswith("python -m l2t_jax.main") for line in lines)

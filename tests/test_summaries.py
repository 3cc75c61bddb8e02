"""l2t_jax.tools.summaries on fake workdirs (no JAX): collecting and summarizing results against
the paper, Markdown/CSV output, and the summarize script. The fake workdirs
(helpers.write_run) serve test_tables.py and test_plots.py too."""
import math
import os

import pytest

from helpers import load_script, write_limited_runs, write_run
from l2t_jax.tools import summaries

DATASETS = {"cifar100": "cifar100", "stl10": "stl10", "cub200": "caltech_birds2011",
            "digits": "digits"}


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


def test_collect_and_summarize_main(main_root):
    results = summaries.collect_results(main_root)
    assert len(results) == sum(len(v) for v in MAIN_RESULTS.values())
    rows = summaries.summarize(summaries.select_table(results, "main"))

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
    rows = summaries.summarize(summaries.collect_results(main_root))
    text = summaries.to_markdown(rows, title="Main")
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
    rows = summaries.summarize(summaries.collect_results(main_root))
    path = summaries.to_csv(rows, str(tmp_path / "out" / "table.csv"))
    assert summaries.read_csv(path) == rows
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
    results = summaries.select_table(summaries.collect_results(str(tmp_path)),
                                     "multisource")
    rows = summaries.summarize(results, by=summaries.TABLE_GROUPING["multisource"])
    assert [r["second_source"] for r in rows] == list(sources)
    cifar = cell(rows, "L2T-ww (all-to-all)", "STL-10", second_source="+ CIFAR-10 ResNet-32")
    assert cifar["mean"] == 82.0 and cifar["std"] == pytest.approx(math.sqrt(2))
    assert cifar["paper_mean"] == 80.52 and cifar["paper_std"] is None
    assert cifar["diff"] == pytest.approx(82.0 - 80.52)
    text = summaries.to_markdown(rows)
    assert "| method | none | + TinyImageNet ResNet-20 | + CIFAR-10 ResNet-32 |" in text
    assert "Target data set: STL-10." in text
    # Single-source and multi-source runs are never averaged together by mistake.
    with pytest.raises(ValueError, match="mixes runs with different second_source"):
        summaries.summarize(results, by=("row", "column"))
    assert summaries.summarize(results) == rows   # by=None separates them by itself


def test_limited_table(tmp_path):
    write_limited_runs(tmp_path)
    results = summaries.collect_results(str(tmp_path))
    limited = summaries.select_table(results, "limited")
    assert len(limited) == 4 * 3 * 2
    rows = summaries.summarize(limited, by=summaries.TABLE_GROUPING["limited"])
    low = cell(rows, "L2T-ww (all-to-all)", "STL-10", examples_per_class=25)
    assert low["mean"] == pytest.approx(55.0 + 10 * math.log10(25))
    assert low["std"] == pytest.approx(math.sqrt(2)) and low["paper_mean"] is None
    text = summaries.to_markdown(rows)
    assert "| method | 25 / class | 50 / class | 100 / class | 250 / class |" in text


def test_default_grouping_keeps_settings_apart(tmp_path):
    """The offline demo's layout (runs/<method-scheme>/epc<k>/seed<s>, data set "digits")
    summarized with by=None: one column per label budget, nothing averaged across them."""
    for k, base in ((5, 60.0), (25, 80.0)):
        for entry, method, scheme, gain in (("scratch", "scratch", None, 0.0),
                                            ("l2t_ww-all_to_all", "l2t_ww", "all_to_all", 5.0)):
            for seed in (0, 1):
                write_run(tmp_path, f"runs/{entry}/epc{k}/seed{seed}", method, scheme,
                          "digits", seed, base + gain + 2 * seed, examples_per_class=k)
    results = summaries.collect_results(str(tmp_path / "runs"))
    rows = summaries.summarize(results)
    assert [(r["row"], r["examples_per_class"], r["mean"]) for r in rows] == [
        ("Scratch", 5, 61.0), ("Scratch", 25, 81.0),
        ("L2T-ww (all-to-all)", 5, 66.0), ("L2T-ww (all-to-all)", 25, 86.0)]
    text = summaries.to_markdown(rows)
    assert "| method | 5 / class | 25 / class |" in text
    assert "Target data set: digits." in text and "[paper" not in text
    with pytest.raises(ValueError, match="mixes runs with different examples_per_class"):
        summaries.summarize(results, by=("row", "column"))


def test_the_last_epochs_accuracy_is_summarized_on_request(main_root, tmp_path):
    """accuracy='test_last' averages result.json's last-epoch test accuracy (the offline
    demo's and study's number) and the caption says so; the default stays the paper's
    test accuracy at the best val; a run without it is named."""
    results = summaries.collect_results(main_root)
    rows = summaries.summarize(summaries.select_table(results, "main"), accuracy="test_last")
    l2t = cell(rows, "L2T-ww (all-to-all)", "CIFAR-100")
    assert (l2t["n"], l2t["mean"], l2t["std"]) == (3, 69.0, 2.0)
    text = summaries.to_markdown(rows, accuracy="test_last")
    assert "of the test accuracy (%) at the last epoch;" in text
    assert "at the best validation accuracy" in summaries.to_markdown(
        summaries.summarize(summaries.select_table(results, "main")))
    older = write_run(tmp_path, "old", "fm", "single", "mit67", 3, 55.0, config_only=True)
    with pytest.raises(ValueError, match=f"1 run.* have no test_last .* e.g. {older}"):
        summaries.summarize([summaries.load_result(older)], accuracy="test_last")
    with pytest.raises(ValueError, match="accuracy='best'; valid: test, test_last"):
        summaries.summarize(results, accuracy="best")


def test_older_result_json_is_completed_from_config_json(tmp_path):
    workdir = write_run(tmp_path, "a", "fm", "single", "mit67", 3, 55.0, config_only=True)
    result = summaries.load_result(workdir)
    assert (result["row"], result["column"], result["seed"], result["examples_per_class"],
            result["second_source"]) == ("FM (single)", "MIT67", 3, 0, "none")


def test_unreadable_result_is_named(tmp_path):
    workdir = write_run(tmp_path, "a", "fm", "single", "mit67", 0, 55.0)
    with open(os.path.join(workdir, "result.json"), "w") as f:
        f.write("{")
    with pytest.raises(ValueError, match="result.json is not valid JSON"):
        summaries.collect_results(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        summaries.collect_results(str(tmp_path / "missing"))


def test_summarize_script_writes_the_tables(main_root, tmp_path, capsys):
    out = tmp_path / "report"
    load_script("summarize").main([f"--root={main_root}", f"--out={out}"])
    printed = capsys.readouterr().out
    assert "| L2T-ww (all-to-all) | 72.00 ± 2.00 (3)" in printed
    assert (out / "table.md").read_text().startswith("## Main table")
    assert summaries.read_csv(str(out / "table.csv"))[0]["row"] == "Scratch"

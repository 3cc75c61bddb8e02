"""The offline demo: its data design, and the Colab notebook executed headless at the
smallest setting (which runs the whole demo pipeline: source pre-training, the grid of
target runs, the table and the pictures)."""
import csv
import json
import os

import numpy as np
import pytest

from helpers import REPO_ROOT
from l2t_jax import demo

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

"""The benchmark tools: ``python -m l2t_jax.tools.bench`` on tiny networks (its FLOP count grows
with the simulated step: XLA counts what the loop unrolls; AFD's and SemCKD's steps; what it
says before compiling) and the tables of ``experiments/bench_compare.py`` from given runs."""
import importlib.util
import json
import math
import os
import sys
import types
from pathlib import Path

import pytest

from l2t_jax.models import xla_workarounds
from l2t_jax.tools import bench
from l2t_jax.transfer import pair_lists

# A small graph (compile time dominates): ResNet-20 with 3 pairs, tiny widths.
TINY = ["--source", "resnet20", "--source_widths", "4,4,8", "--pairs", "2-0,5-1,8-4",
        "--target_widths", "4,4,8,8,8", "--batch", "2", "--warmup", "0", "--iters", "1"]


def test_bench_reports_flops_memory_and_the_floor(capsys):
    # (--phases is left out: it compiles four more programs.)
    # (T = 0 and 1: each simulated step adds a quarter to the compilation.)
    one = bench.main(TINY + ["--T", "0", "--peak"])
    two = bench.main(TINY + ["--T", "1"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [one, two]
    for result in (one, two):
        assert result["step_s_median"] > 0 and result["compile_s"] > 0
        assert result["peak_rss_steps_gib"] > 0 and result["xla_temp_gib"] > 0
        assert result["pairs"] == 3 and result["unroll"] and math.isfinite(result["final_ce"])
        assert xla_workarounds.YNN_FUSION_SETTING in result["xla_flags"].split()
    # One simulated step adds its forward + backward and their reverse pass: more than a
    # tenth of the T=0 iteration (an un-counted loop body would add nothing).
    assert two["xla_flops_per_iter"] > 1.1 * one["xla_flops_per_iter"]
    assert one["flop_floor_s"] == pytest.approx(
        one["xla_flops_per_iter"] / (one["matmul_peak_gflop_s"] * 1e9), rel=0.01)
    scratch = bench.main(["--mode", "scratch", "--target_widths", "4,4,8,8,8", "--batch",
                          "2", "--warmup", "0", "--iters", "1"])
    assert scratch["pairs"] == 0 and scratch["T"] is None
    assert scratch["xla_flops_per_iter"] < one["xla_flops_per_iter"] / 5
    # A baseline of the table: its own terms and pair scheme (FM: one-to-one), no phi.
    fm = bench.main(TINY + ["--mode", "fm"])
    assert fm["pairs"] == 3 and fm["T"] is None and fm["mode"] == "fm"
    assert scratch["xla_flops_per_iter"] < fm["xla_flops_per_iter"] < one["xla_flops_per_iter"]
    with pytest.raises(SystemExit):
        bench.main(["--mode", "scratch", "--phases"])


def test_afd_and_semckd_steps_are_timed_on_their_pairs(capsys):
    """--mode afd / semckd: the method's step with its module (more FLOPs than the CE step
    alone) on a 2 x 2 grid of taps. SemCKD's module is built for the benchmark's batch (at
    the Transfer's default batch of 1 its check refuses: 1 // 4 leaves no embedding)."""
    grid = ["--pairs", "2-0,2-4,8-0,8-4", "--batch", "8"]
    scratch = bench.main(["--mode", "scratch", "--target_widths", "4,4,8,8,8", "--batch",
                          "8", "--warmup", "0", "--iters", "1"])
    for mode in ("afd", "semckd"):
        result = bench.main(TINY + ["--mode", mode] + grid)
        assert (result["mode"], result["pairs"], result["scheme"], result["batch"],
                result["T"]) == (mode, 4, "2-0,2-4,8-0,8-4", 8, None)
        assert result["xla_flops_per_iter"] > scratch["xla_flops_per_iter"]
        assert math.isfinite(result["final_ce"])
    assert "bench: semckd step, resnet20 (200 classes) -> vgg9_bn (100 classes), " \
           "4 pairs, batch 8," in capsys.readouterr().err


def test_each_method_times_its_own_scheme_unless_pairs_are_given():
    schemes = {mode: bench.pair_scheme(bench.parse_args(["--mode", mode]))
               for mode in ("l2t", "fm", "at", "afd", "semckd", "scratch")}
    assert schemes == {"l2t": pair_lists.CIFAR_PAIRS, "fm": "one_to_one",
                       "at": "one_to_one", "afd": "all_to_all", "semckd": "all_to_all",
                       "scratch": None}
    args = bench.parse_args(["--mode", "fm", "--pairs", "all_to_all", "--source", "resnet20",
                             "--source_widths", "4,4,8", "--target_widths", "4,4,8,8,8"])
    transfer, _, _ = bench.build(args)
    assert transfer.pairs == tuple((m, n) for m in (2, 5, 8) for n in range(5))
    with pytest.raises(SystemExit):
        bench.parse_args(["--mode", "scratch", "--pairs", "all_to_all"])


def test_without_flags_it_says_what_it_will_run_first(monkeypatch, capsys):
    """The defaults time the full CIFAR-100 setting (a minute on a CPU): one line on stderr
    says so, and how to shrink it, before anything is built or compiled (here building
    fails at once, after the line)."""
    def no_building(args):
        raise RuntimeError("building")
    monkeypatch.setattr(bench, "build", no_building)
    with pytest.raises(RuntimeError, match="building"):
        bench.main([])
    captured = capsys.readouterr()
    assert captured.out == ""          # stdout: the JSON line alone, when there is one
    assert captured.err.splitlines() == [
        "bench: l2t step, resnet32 (200 classes) -> vgg9_bn (100 classes), 15 pairs, "
        "batch 64, T=2, 32 px, float32, random source weights: building and compiling, "
        "then 1 warm-up + 5 timed iterations (about a minute or more on a CPU; smaller: "
        "--batch 8 --iters 1 --T 1, or narrow networks: --source_widths 4,4,8 "
        "--target_widths 4,4,8,8,8)"]


def _load_compare():
    path = Path(__file__).parent.parent / "experiments" / "bench_compare.py"
    spec = importlib.util.spec_from_file_location("bench_compare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_tables_put_each_run_in_its_row(tmp_path):
    compare = _load_compare()
    ours = lambda s, peak_rss, **extra: dict(step_s_median=s, peak_rss_steps_gib=peak_rss,
                                             compile_s=30.0, xla_temp_gib=1.0, **extra)
    theirs = lambda s, rss_mib: dict(sec_per_iter_median=s, peak_rss_mib=rss_mib,
                                     info={"phase_median_s": {"5_meta_backward": s / 2}})
    floor = dict(xla_flops_per_iter=6e11, achieved_gflop_s=100.0, matmul_peak_gflop_s=200.0,
                 flop_floor_s=3.0, step_over_floor=2.0, phases_s={"meta_backward": 2.5})
    pipeline = lambda *rows, **extra: dict(pipeline=[
        dict(threads=t, images_per_s=r, s_per_batch=round(64 / r, 4), repeats=[r])
        for t, r in rows], **extra)
    records = {"official T=2": theirs(6.0, 2048),
               "official T=2 phases": theirs(7.0, 2048), "ours T=2": ours(5.0, 3.0, **floor),
               "official scratch b=64": theirs(0.6, 1024), "ours scratch b=64": ours(0.4, 1.5),
               "ours fm b=64": ours(0.75, 1.75),
               "official T=1": theirs(3.0, 1500), "ours T=1 remat=none": ours(2.0, 2.5),
               "ours T=2 remat=dots": ours(5.5, 2.0),
               "compile T=2 cold": dict(compile_s=40.0, hits=0, seconds=0.0),
               "compile T=2 warm": dict(compile_s=10.0, hits=8, seconds=30.5),
               "first step cifar100:tiny": dict(
                   cold=dict(compile_started=8.0, step_program_ready=40.0, first_step=41.5,
                             total_s=60.0),
                   warm=dict(compile_started=8.0, step_program_ready=12.0, first_step=13.0,
                             total_s=30.0)),
               "pipeline 32px": pipeline((0, 1000.0), (2, 1600.0), training=dict(
                   method="scratch", steps=30, data_wait_seconds=0.01,
                   data_wait_max_step_seconds=0.002)),
               "pipeline 224px": pipeline((0, 100.0), (2, 190.0))}
    args = types.SimpleNamespace(T=[2], curve_T=[1, 2], remat=["none", "dots"],
                                 baselines=["scratch", "fm"], baseline_batches=[64])
    compare.write_tables(records, args, tmp_path)
    table = (tmp_path / "side_by_side.md").read_text()
    assert "| L2T-ww T=2 | 6.000 | 5.000 | 1.20x | 2.00 | 3.00 | 30 |" in table
    assert "| scratch b=64 (authors': CE step) | 0.600 | 0.400 | 1.50x | 1.00 | 1.50 | 30 |" in table
    assert "| fm b=64 (authors': CE step) | 0.600 | 0.750 | 0.80x | 1.00 | 1.75 | 30 |" in table
    assert "| T=2 full size, warm cache | 10.0 | 8 | 30.5 |" in table
    assert "| cold | 8.0 | 40.0 | 41.5 | 60.0 |" in table
    assert "| 32 px | 2 | 1600.0 | 0.04 | [1600.0] |" in table
    assert "at most 0.002 s at a step" in table
    assert "| 224 px | 0 | 100.0 | 0.64 | [100.0] |" in table
    assert "| 2 | 600 | 100.0 | 200.0 | 3.00 | 2.00 |" in table
    assert "| 2 | 5_meta_backward | 3.50 | |" in table
    assert "| 2 | meta_backward | | 2.50 |" in table
    curve = (tmp_path / "curve.md").read_text()
    assert "| 1 | l2t-jax remat=none | 2.00 | 2.50 |" in curve
    assert "| 2 | l2t-jax remat=none | 5.00 | 3.00 |" in curve   # the side-by-side run
    assert "| 2 | l2t-jax remat=dots | 5.50 | 2.00 |" in curve
    assert "| 2 | authors' | 6.00 | 2.00 |" in curve
    assert (tmp_path / "time_memory_vs_T.png").stat().st_size > 10_000


def test_each_run_records_how_busy_the_machine_was(tmp_path):
    """_run: the process's JSON line, with the load average around it and the CPU cores
    other processes used meanwhile (at most the machine's cores)."""
    compare = _load_compare()
    spin = ("import json, time\nend = time.process_time() + 0.5\n"
            "while time.process_time() < end: pass\nprint(json.dumps({'x': 1}))")
    record = compare._run([sys.executable, "-c", spin], tmp_path / "log.txt")
    assert record["x"] == 1 and set(record) == {"x", "load_before", "load_after",
                                                "others_cpu_cores"}
    assert 0.0 <= record["others_cpu_cores"] <= os.cpu_count()
    assert (tmp_path / "log.txt").read_text().startswith('{"x": 1}')


def test_the_association_table_puts_each_method_against_the_first(tmp_path):
    """Section 6 (learned association): one row per --association entry that ran, in that
    order, with its seconds against the first row's and how busy the machine was."""
    compare = _load_compare()
    step = lambda s, pairs, **extra: dict(
        step_s_median=s, step_s_min=s * 0.9, step_s_max=s * 1.2, pairs=pairs,
        images_per_s=round(64 / s, 2), peak_rss_steps_gib=1.5, xla_temp_gib=0.2,
        xla_flops_per_iter=3e10, compile_s=20.0, setting="resnet32->vgg9_bn", device="cpu",
        iters=5, others_cpu_cores=0.03, load_before=0.4, load_after=1.9, **extra)
    args = types.SimpleNamespace(association=list(compare.ASSOCIATION), association_batch=64,
                                 association_T=2)
    names = [compare.association_run(e, 64, 2)[0] for e in compare.ASSOCIATION]
    assert names == ["association fm:one_to_one b=64", "association fm:all_to_all b=64",
                     "association l2t_ww:all_to_all T=2 b=64",
                     "association afd:all_to_all b=64", "association semckd:all_to_all b=64"]
    assert compare.association_run("l2t_ww:all_to_all", 64, 2)[1] == [
        "--mode", "l2t", "--T", "2", "--pairs", "all_to_all"]
    assert compare.association_run("semckd:all_to_all", 64, 2)[1] == [
        "--mode", "semckd", "--pairs", "all_to_all"]
    records = dict(zip(names, [step(1.0, 3), step(1.5, 15), step(8.0, 15), step(1.1, 15)]))
    compare.write_association_table(records, args, tmp_path)       # SemCKD not run (yet)
    table = (tmp_path / "association.md").read_text()
    assert table.startswith("Batch 64, resnet32->vgg9_bn, cpu; 5 timed steps per row.")
    assert "| method | pairs | s / step (median; min-max) | × FM (one-to-one) |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| FM (one-to-one)", "| FM (all-to-all)", "| L2T-ww (all-to-all), T=2",
        "| AFD (all-to-all)"]
    assert rows[3].startswith("| L2T-ww (all-to-all), T=2 | 15 | 8.000 (7.200-9.600) | 8.00 "
                              "| 8.0 | 1.5 | 0.2 | 30.0 | 20 | 0.03 | 0.4 / 1.9 |")

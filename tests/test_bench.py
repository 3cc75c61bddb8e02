"""The benchmark tools: ``python -m l2t_jax.tools.bench`` on tiny networks (its FLOP count grows
with the simulated step: XLA counts what the loop unrolls) and the tables of
``experiments/bench_compare.py`` from given runs."""
import importlib.util
import json
import math
import types
from pathlib import Path

import pytest

from l2t_jax.models import xla_workarounds
from l2t_jax.tools import bench

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

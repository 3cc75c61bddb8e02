"""Runs the benchmarks of BENCHMARKS.md and writes their tables and plot.

    L2T_OFFICIAL_DIR=<authors' checkout> L2T_RELEASE_DIR=<release assets> \\
    python experiments/bench_compare.py --official_bench PATH/official_l2t_step.py \\
        --out runs/bench

Every number comes from a separate process, run one after the other (never two at once):
  1. side by side: the authors' loop and ``python -m l2t_jax.tools.bench`` at each ``--T``
     (batch 64, the CIFAR-100 setting), then both scratch steps; ours with ``--peak``
     (large-matmul FLOP/s and the FLOP floor) and ``--phases``, the authors' phase split in
     a run of its own (it synchronises between phases, which slows the iteration);
  2. the baselines (``--baselines``: scratch, FM, AT, LwF) at each ``--baseline_batches``
     against the authors' plain CE step at the same batch;
  3. compiles: the full-size T=2 step with an empty and then a warm compilation cache
     (``compile_cache_check.py``), and ``cifar100:tiny``'s seconds to its first step, cold
     and warm (``first_step_time.py``);
  4. the input pipeline (``python -m l2t_jax.tools.bench_pipeline``): images/s at 32 and 224 px
     against read threads, and the 32-px training loop's waits for data;
  5. the curve: ours for each T in ``--curve_T`` and each remat policy (remat=none unrolls
     the simulated steps, as by default; remat runs them in a scan loop), ours with a scan
     loop and no remat (``--no-scan`` leaves it out), and the authors' loop at the same T:
     seconds per iteration and peak memory against T;
  6. learned association (``--association``): at the CIFAR-100 setting and batch
     ``--association_batch``, the steps of FM (one-to-one and all-to-all), L2T-ww (T =
     ``--association_T``), AFD and SemCKD (all-to-all): seconds per step and peak memory.
``--sections`` runs some of these (the authors' loop, ``--official_bench``, is needed only
by 1, 2 and 5):

    python experiments/bench_compare.py --sections association --out runs/bench_association

Each run also records how busy the machine was: the load average before and after it and
the CPU cores other processes used while it ran (``others_cpu_cores``; timings are
meaningful only near 0). ``--quiet_load L`` waits before each run until the 1-minute load
average is below L (the previous run's own load decays within a minute or two).
Appends each run's JSON line to OUT/runs.jsonl (a rerun skips runs already there), then
writes OUT/side_by_side.md, OUT/curve.md and OUT/time_memory_vs_T.png (sections 1-5) and
OUT/association.md (section 6).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from l2t_jax.transfer import methods  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parent
SECTIONS = ("side_by_side", "baselines", "compiles", "pipeline", "curve", "association")
OFFICIAL_SECTIONS = ("side_by_side", "baselines", "curve")   # need the authors' loop
# Section 6's default rows: FM both ways, L2T-ww and the two attention methods.
ASSOCIATION = ("fm:one_to_one", "fm:all_to_all", "l2t_ww:all_to_all", "afd:all_to_all",
               "semckd:all_to_all")


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_until_quiet(max_load: float, poll_s: float = 15.0) -> None:
    """Returns once the 1-minute load average is below ``max_load`` (0: at once)."""
    while max_load and os.getloadavg()[0] >= max_load:
        print(f"  waiting: load average {os.getloadavg()[0]:.2f} >= {max_load}", flush=True)
        time.sleep(poll_s)


def _run(command: list[str], log: Path) -> dict:
    """Runs one benchmark process; returns the JSON object of its last '{' line, with how
    busy the machine was around it: ``load_before`` / ``load_after`` (1-minute load
    averages) and ``others_cpu_cores`` (CPU seconds spent by every other process while it
    ran, per wall second)."""
    print("+", " ".join(command), flush=True)
    lock = os.environ.get("L2T_BENCH_LOCK")   # a file to flock: nothing else runs meanwhile
    load_before = os.getloadavg()[0]
    busy, own, wall = _busy_cpu_seconds(), _children_cpu_seconds(), time.monotonic()
    done = subprocess.run(["flock", lock, *command] if lock else command,
                          capture_output=True, text=True)
    others = ((_busy_cpu_seconds() - busy) - (_children_cpu_seconds() - own)) / (
        time.monotonic() - wall)
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"{command[:3]} failed (rc {done.returncode}); see {log}")
    return dict(json.loads(lines[-1]), load_before=round(load_before, 2),
                load_after=round(os.getloadavg()[0], 2),
                others_cpu_cores=round(max(others, 0.0), 2))


def association_run(entry: str, batch: int, inner_steps: int) -> tuple[str, list[str]]:
    """Section 6's run of ``entry`` (``method:scheme``): its name in runs.jsonl and the
    ``l2t_jax.tools.bench`` arguments that time it."""
    method, _, scheme = entry.partition(":")
    if method == "l2t_ww":
        return (f"association {entry} T={inner_steps} b={batch}",
                ["--mode", "l2t", "--T", str(inner_steps), "--pairs", scheme or "all_to_all"])
    return (f"association {entry} b={batch}",
            ["--mode", method] + (["--pairs", scheme] if scheme else []))


def _key(record: dict) -> str:
    return record["name"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official_bench", default="",
                        help="path of official_l2t_step.py (reads L2T_OFFICIAL_DIR); needed "
                             "by the sections " + ", ".join(OFFICIAL_SECTIONS))
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="which parts to run (module docstring); default all")
    parser.add_argument("--out", required=True)
    parser.add_argument("--T", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--curve_T", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--remat", nargs="+", default=["none", "dots", "full"])
    parser.add_argument("--iters", type=int, default=5, help="timed iterations, side by side")
    parser.add_argument("--curve_iters", type=int, default=3, help="timed iterations, curve")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--source_checkpoint", default="released:resnet32")
    parser.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True,
                        help="also the scan loop without remat at each curve T > 1")
    parser.add_argument("--baselines", nargs="+", default=["scratch", "fm", "at", "lwf"],
                        help="our baseline steps, against the authors' CE step")
    parser.add_argument("--baseline_batches", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--tables_only", action="store_true",
                        help="write the tables from OUT/runs.jsonl, run nothing")
    parser.add_argument("--plan_only", action="store_true", help="print the runs, run none")
    parser.add_argument("--pipeline_threads", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--association", nargs="+", default=list(ASSOCIATION),
                        metavar="METHOD:SCHEME",
                        help="section 6's rows: l2t_ww or a method without meta-networks, "
                             "on a pair scheme (the first row is the others' reference)")
    parser.add_argument("--association_batch", type=int, default=64)
    parser.add_argument("--association_T", type=int, default=2,
                        help="L2T-ww's simulated steps in section 6")
    parser.add_argument("--quiet_load", type=float, default=0.0,
                        help="before each run, wait until the 1-minute load average is "
                             "below this (0: do not wait)")
    args = parser.parse_args(argv)
    sections = set(args.sections)
    timed = {"l2t_ww"} | {name for name, row in methods.METHODS.items()
                          if not row.meta_networks}
    wrong = [e for e in args.association if e.partition(":")[0] not in timed]
    if wrong:
        parser.error(f"--association {' '.join(wrong)}: the benchmark times "
                     f"{', '.join(sorted(timed))}")
    if sections & set(OFFICIAL_SECTIONS) and not args.official_bench and not (
            args.tables_only):
        parser.error(f"--official_bench is needed by the sections {', '.join(OFFICIAL_SECTIONS)}"
                     " (or run --sections compiles pipeline association)")

    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    runs_file = out / "runs.jsonl"
    records = {}
    if runs_file.exists():
        for line in runs_file.read_text().splitlines():
            if line.strip():
                records[_key(json.loads(line))] = json.loads(line)

    def official(iters, batch=64):
        return [sys.executable, args.official_bench, "--batch", str(batch), "--iters",
                str(iters), "--warmup", "2"]

    def ours(iters, batch=64):
        return [sys.executable, "-m", "l2t_jax.tools.bench", "--batch", str(batch), "--iters",
                str(iters), "--warmup", str(args.warmup), "--source_checkpoint",
                args.source_checkpoint]

    plan = []
    for t in args.T if "side_by_side" in sections else ():
        plan.append((f"official T={t}", official(args.iters) + ["--T", str(t)]))
        # The authors' phase split synchronises between phases: timed in a run of its own.
        plan.append((f"official T={t} phases",
                     official(args.iters) + ["--T", str(t), "--phases"]))
        plan.append((f"ours T={t}", ours(args.iters) + ["--T", str(t), "--peak", "--phases"]))
    for batch in args.baseline_batches if "baselines" in sections else ():
        plan.append((f"official scratch b={batch}",
                     official(args.iters, batch) + ["--mode", "scratch"]))
        for baseline in args.baselines:
            plan.append((f"ours {baseline} b={batch}",
                         ours(args.iters, batch) + ["--mode", baseline]))
    # Compiles, cold and warm (the per-user cache), and a :tiny config's first step.
    cache = out / "compile_cache"
    for run in ("cold", "warm") if "compiles" in sections else ():
        plan.append((f"compile T=2 {run}", [sys.executable, str(EXPERIMENTS /
                                                             "compile_cache_check.py"),
                                           str(cache)]))
    if "compiles" in sections:
        plan.append(("first step cifar100:tiny", [sys.executable, str(EXPERIMENTS /
                                                                      "first_step_time.py")]))
    # The input pipeline: images/s against read threads; the 32-px training loop's waits.
    if "pipeline" in sections:
        plan.append(("pipeline 32px", [sys.executable, "-m", "l2t_jax.tools.bench_pipeline",
                                       "--image_size", "32", "--train_steps", "30",
                                       "--images", "1984", "--threads",
                                       *map(str, args.pipeline_threads)]))
        plan.append(("pipeline 224px", [sys.executable, "-m", "l2t_jax.tools.bench_pipeline",
                                        "--image_size", "224", "--batches", "4", "--threads",
                                        *map(str, args.pipeline_threads)]))
    for t in args.curve_T if "curve" in sections else ():
        if t not in args.T:
            plan.append((f"official T={t}", official(args.curve_iters) + ["--T", str(t)]))
        for remat in args.remat:
            if remat == "none" and t in args.T:
                continue
            plan.append((f"ours T={t} remat={remat}",
                         ours(args.curve_iters) + ["--T", str(t), "--remat", remat]))
        if t > 1 and args.scan:   # the unrolled default against the scan loop, no remat
            plan.append((f"ours T={t} scan", ours(args.curve_iters) + ["--T", str(t),
                                                                     "--no-unroll"]))
    for entry in args.association if "association" in sections else ():
        name, mode = association_run(entry, args.association_batch, args.association_T)
        plan.append((name, ours(args.iters, args.association_batch) + mode))

    if args.tables_only:
        write_tables(records, args, out)
        write_association_table(records, args, out)
        return
    if args.plan_only:
        for name, command in plan:
            print(name, "|", " ".join(command[1:]))
        return
    if "compile T=2 cold" not in records:
        shutil.rmtree(cache, ignore_errors=True)
    for name, command in plan:
        if name in records:
            continue
        wait_until_quiet(args.quiet_load)
        record = _run(command, out / "logs" / (name.replace(" ", "_").replace("=", "") + ".txt"))
        record["name"] = name
        record["command"] = " ".join(command[1:])
        records[name] = record
        with runs_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
    if sections - {"association"}:
        write_tables(records, args, out)
    if "association" in sections:
        write_association_table(records, args, out)


def _seconds(record: dict) -> float:
    return record.get("step_s_median", record.get("sec_per_iter_median"))


def _memory_gib(record: dict) -> float:
    """Peak RSS while stepping: ours after compiling, the authors' whole process."""
    if "peak_rss_mib" in record:
        return record["peak_rss_mib"] / 1024
    return record["peak_rss_steps_gib"]


def write_tables(records: dict, args, out: Path) -> None:
    rows = ["| setting | authors' loop s/iter | l2t-jax s/iter | speed-up | authors' peak RSS "
            "(GiB) | l2t-jax peak RSS steps (GiB) | l2t-jax compile (s) |",
            "|---|---|---|---|---|---|---|"]
    for label, theirs, mine in ([(f"L2T-ww T={t}", f"official T={t}", f"ours T={t}")
                                 for t in args.T]
                                + [(f"{baseline} b={batch} (authors': CE step)",
                                    f"official scratch b={batch}", f"ours {baseline} b={batch}")
                                   for batch in args.baseline_batches
                                   for baseline in args.baselines]):
        if theirs not in records or mine not in records:
            continue                         # not run (yet): the table leaves it out
        a, b = records[theirs], records[mine]
        rows.append(f"| {label} | {_seconds(a):.3f} | {_seconds(b):.3f} | "
                    f"{_seconds(a) / _seconds(b):.2f}x | {_memory_gib(a):.2f} | "
                    f"{_memory_gib(b):.2f} | {b['compile_s']:.0f} |")
    compiles = ["", "| run | lower + compile (s) | cache hits | compile seconds saved |",
                "|---|---|---|---|"]
    for run in ("cold", "warm"):
        if f"compile T=2 {run}" not in records:
            continue
        c = records[f"compile T=2 {run}"]
        compiles.append(f"| T=2 full size, {run} cache | {c['compile_s']} | {c['hits']} | "
                        f"{c['seconds']:.1f} |")
    first = records.get("first step cifar100:tiny", {})
    compiles += ["", "| cifar100:tiny | " + " | ".join(
        ["compile started (s)", "step program ready (s)", "first step (s)", "process (s)"])
                 + " |", "|---|---|---|---|---|"]
    for run in ("cold", "warm") if first else ():
        f = first[run]
        compiles.append(f"| {run} | {f.get('compile_started')} | "
                        f"{f.get('step_program_ready')} | {f.get('first_step')} | "
                        f"{f['total_s']} |")
    pipeline = ["", "| pipeline | read threads | images/s (median of repeats) | s / batch of "
                "64 | repeats |", "|---|---|---|---|---|"]
    for size in (32, 224):
        p = records.get(f"pipeline {size}px", {"pipeline": []})
        for row in p["pipeline"]:
            pipeline.append(f"| {size} px | {row['threads']} | {row['images_per_s']} | "
                            f"{row['s_per_batch']} | {row['repeats']} |")
        if "training" in p:
            t = p["training"]
            pipeline.append(f"| {size} px training loop ({t['method']}, {t['steps']} steps) "
                            f"| auto | waited {t['data_wait_seconds']} s in all, at most "
                            f"{t['data_wait_max_step_seconds']} s at a step | | |")
    rows += compiles + pipeline
    floors = ["", "| T | XLA GFLOP / iter | achieved GFLOP/s | large-matmul GFLOP/s | FLOP floor "
              "(s) | step / floor |", "|---|---|---|---|---|---|"]
    for t in [t for t in args.T if f"ours T={t}" in records]:
        b = records[f"ours T={t}"]
        floors.append(f"| {t} | {b['xla_flops_per_iter'] / 1e9:.0f} | {b['achieved_gflop_s']} "
                      f"| {b['matmul_peak_gflop_s']} | {b['flop_floor_s']:.2f} | "
                      f"{b['step_over_floor']:.2f} |")
    phases = ["", "| T | phase | authors' s | l2t-jax s |", "|---|---|---|---|"]
    for t in [t for t in args.T if {f"ours T={t}", f"official T={t} phases"} <= set(records)]:
        mine = records[f"ours T={t}"].get("phases_s", {})
        theirs = records[f"official T={t} phases"]["info"]["phase_median_s"]
        for name, seconds in mine.items():
            phases.append(f"| {t} | {name} | | {seconds:.2f} |")
        for name, seconds in theirs.items():
            phases.append(f"| {t} | {name} | {seconds:.2f} | |")
    (out / "side_by_side.md").write_text("\n".join(rows + floors + phases) + "\n")

    curve = ["| T | implementation | s / iter | peak RSS steps (GiB) | XLA temp (GiB) | "
             "compile (s) |", "|---|---|---|---|---|---|"]
    series = {}
    for t in args.curve_T:
        entries = [("authors'", records.get(f"official T={t}"))]
        for remat in args.remat:
            name = f"ours T={t}" if remat == "none" and t in args.T else (
                f"ours T={t} remat={remat}")
            entries.append((f"l2t-jax remat={remat}", records.get(name)))
        entries.append(("l2t-jax scan loop", records.get(f"ours T={t} scan")))
        for label, record in entries:
            if record is None:
                continue
            series.setdefault(label, []).append((t, _seconds(record), _memory_gib(record)))
            curve.append(f"| {t} | {label} | {_seconds(record):.2f} | "
                         f"{_memory_gib(record):.2f} | {record.get('xla_temp_gib', '')} | "
                         f"{record.get('compile_s', '')} |")
    (out / "curve.md").write_text("\n".join(curve) + "\n")

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for label, points in series.items():
        ts, seconds, memory = zip(*points)
        style = "k--o" if label == "authors'" else "-o"
        time_axis.plot(ts, seconds, style, label=label)
        memory_axis.plot(ts, memory, style, label=label)
    time_axis.set(xlabel="T (simulated steps)", ylabel="seconds per iteration",
                  title="time per iteration (batch 64)")
    memory_axis.set(xlabel="T (simulated steps)", ylabel="peak RSS while training (GiB)",
                    title="memory")
    for axis in (time_axis, memory_axis):
        axis.set_xticks(args.curve_T)
        axis.grid(alpha=0.3)
    memory_axis.legend()
    figure.tight_layout()
    figure.savefig(out / "time_memory_vs_T.png", dpi=120)
    print((out / "side_by_side.md").read_text())
    print((out / "curve.md").read_text())


def write_association_table(records: dict, args, out: Path) -> None:
    """OUT/association.md: section 6's rows that ran, in ``--association`` order, each
    against the first (its seconds per step over the first's)."""
    header = ("| method | pairs | s / step (median; min-max) | × {reference} | images / s | "
              "peak RSS while stepping (GiB) | XLA temp (GiB) | GFLOP / step | compile (s) | "
              "other processes' CPU (cores) | load before / after |")
    found = []
    for entry in args.association:
        name, _ = association_run(entry, args.association_batch, args.association_T)
        if name in records:
            method, _, scheme = entry.partition(":")
            label = methods.row_label(method, scheme)
            if method == "l2t_ww":
                label += f", T={args.association_T}"
            found.append((label, records[name]))
    if not found:
        return
    reference = found[0][1]["step_s_median"]
    rows = [header.format(reference=found[0][0]), "|---" * 11 + "|"]
    for label, r in found:
        rows.append(
            f"| {label} | {r['pairs']} | {r['step_s_median']:.3f} ({r['step_s_min']:.3f}-"
            f"{r['step_s_max']:.3f}) | {r['step_s_median'] / reference:.2f} | "
            f"{r['images_per_s']} | {r['peak_rss_steps_gib']} | {r['xla_temp_gib']} | "
            f"{r['xla_flops_per_iter'] / 1e9:.1f} | {r['compile_s']:.0f} | "
            f"{r.get('others_cpu_cores', '')} | {r.get('load_before', '')} / "
            f"{r.get('load_after', '')} |")
    text = (f"Batch {args.association_batch}, {found[0][1]['setting']}, "
            f"{found[0][1]['device']}; {found[0][1]['iters']} timed steps per row.\n\n"
            + "\n".join(rows) + "\n")
    (out / "association.md").write_text(text)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

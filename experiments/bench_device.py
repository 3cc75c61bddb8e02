#!/usr/bin/env python
"""The accelerator benchmark: every measurement in turn, each within a
time budget, into one JSON file and one markdown table.

    experiments/bench_device.sh OUT_DIR [--budget_s 450] [--item_budget_s 150] [--smoke]
    python experiments/bench_device.py --out OUT_DIR [same flags]

Measurements (they run in the order ours_T2, precision_T2, scratch, imagenet_T2,
authors_T2, ours_T1, ours_T5, ours_T{2,1,5}_remat_full, ours_T2_highest, authors_T1,
authors_T5: the first ones matter most; what the budget does not reach is recorded as
skipped, with the reason):
  ours_T{1,2,5}, ours_T{1,2,5}_remat_full: ``python -m l2t_jax.tools.bench`` (the jitted training step,
      ``train.step_program``), the CIFAR-100 setting (ResNet-32 with 200 classes ->
      VGG-9-BN with 100 classes, the 15 pairs, batch 64, random 32x32 inputs), at T = 1,
      2, 5, without remat (unrolled, the default) and with ``--remat full``;
  precision_T2: the meta-gradient (``jax.value_and_grad`` of ``bilevel.meta_objective``)
      of the same setting at T = 2, under the default matmul precision and under
      ``jax.default_matmul_precision("highest")``, each compiled on its own; their
      differences and a recommended default precision (TF32 on NVIDIA GPUs can change
      second-order gradients). Nothing here changes the library's precision;
  scratch: a plain CE step of VGG-9-BN (no source, no matching);
  imagenet_T2: the 224-px step, ResNet-34 (1000 classes) -> ResNet-18 (200 classes), the
      16 ImageNet pairs, batch 64, T = 2;
  authors_T2 (T1, T5): the authors' PyTorch loop (a timing harness, ``--official_bench``,
      through ``experiments/official_step_cuda.py``) on the same GPU, where torch with CUDA,
      the harness and the authors' checkout (``L2T_OFFICIAL_DIR``) are found;
  ours_T2_highest: the step of ours_T2 with ``JAX_DEFAULT_MATMUL_PRECISION=highest`` (what
      the recommendation would cost).

Each measurement runs in a process of its own (peak device memory, ``peak_bytes_in_use`` of
``device.memory_stats()``, is a peak over the life of a process), started with a timeout of
``min(--item_budget_s, what is left of --budget_s)``; a process past its timeout is killed
and recorded as ``timeout``. OUT_DIR/bench_device.json and OUT_DIR/bench_device.md are
rewritten after every measurement, so a run stopped early leaves what it measured;
OUT_DIR/logs/ holds each process's output.

``--smoke`` shrinks every network to tiny widths, batch 2, one timed step (the CPU test,
``tests/test_bench_device.py``); its numbers mean nothing.

Worker modes (one process each, started by the driver): ``--worker info`` prints the
environment, ``--worker precision -- BENCH_ARGS`` the precision comparison.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

SELF = str(Path(__file__).resolve())
REPO = Path(SELF).parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from l2t_jax.training import provenance
from l2t_jax.transfer import pair_lists  # noqa: E402  (neither imports jax)

# The meta-gradient's relative change (default vs highest) above which "highest" is the
# recommended default precision.
PRECISION_THRESHOLD = 1e-3
# A measurement is not started with less than this much of the total budget left.
MIN_START_S = 20.0

# bench.py's settings: full size, and the smoke run's tiny networks (a CIFAR ResNet-8 of
# 4-8 channels -> a 2-stage VGG of 4 channels, 2 pairs; XLA:CPU compiles the second-order
# step of even these in tens of seconds, most of a smoke run).
CIFAR_FULL: list[str] = []            # bench.py's defaults: the CIFAR-100 setting
TINY_TARGET = ["--target_widths", "4,4", "--target_overrides", '{"convs_per_stage": [1, 1]}']
CIFAR_SMOKE = ["--source", "l2t_jax.models.cifar_resnet:CifarResNet", "--source_overrides",
               '{"depth": 8}', "--source_widths", "4,4,8", "--pairs", "0-0,2-1",
               *TINY_TARGET]
SCRATCH_SMOKE = TINY_TARGET
IMAGENET_FULL = ["--source", "resnet34", "--source_classes", "1000", "--target", "resnet18",
                 "--num_classes", "200", "--pairs", pair_lists.IMAGENET_PAIRS, "--image_size",
                 "224"]
IMAGENET_SMOKE = ["--source", "resnet34", "--source_classes", "10", "--source_widths",
                  "4,4,8,8", "--target", "resnet18", "--num_classes", "10",
                  "--target_widths", "4,4,8,8", "--pairs", pair_lists.IMAGENET_PAIRS,
                  "--image_size", "32"]


def plan(args) -> list[dict]:
    """The measurements in the order they run: name, kind, description, settings, argv."""
    smoke = args.smoke
    size = (["--batch", "2", "--iters", "1", "--warmup", "0"] if smoke else
            ["--batch", str(args.batch), "--iters", str(args.iters), "--warmup",
             str(args.warmup)])
    common = size + ["--jit_init"]
    source = ["--source_checkpoint", args.source_checkpoint] if args.source_checkpoint else []
    cifar = (CIFAR_SMOKE if smoke else CIFAR_FULL) + source
    cifar_setting = "resnet8 (tiny)->vgg 2-stage (tiny)" if smoke else "resnet32->vgg9_bn"
    batch = 2 if smoke else args.batch

    def ours(t, remat="none", env=None, name=None, description=None):
        suffix = "" if remat == "none" else f"_remat_{remat}"
        return dict(name=name or f"ours_T{t}{suffix}", kind="bench",
                    description=description or (
                        f"l2t-jax step, T={t}, " + ("unrolled, no remat" if remat == "none"
                                                    else f"remat={remat} (scan loop)")),
                    settings=dict(setting=cifar_setting, batch=batch, image_size=32, T=t,
                                  remat=remat, precision=(env or {}).get(
                                      "JAX_DEFAULT_MATMUL_PRECISION", "default")),
                    argv=common + cifar + ["--T", str(t), "--remat", remat], env=env or {})

    def authors(t):
        return dict(name=f"authors_T{t}", kind="official",
                    description=f"the authors' PyTorch loop, T={t}, on the same device",
                    # the authors' networks have no tiny variant: smoke shrinks the batch
                    settings=dict(setting="resnet32->vgg9_bn", batch=batch, image_size=32,
                                  T=t, remat=None, precision="torch default"),
                    argv=["--batch", str(batch), "--T", str(t), "--iters",
                          "1" if smoke else str(args.iters), "--warmup",
                          "1" if smoke else str(max(args.warmup, 2)), "--check", "1"])

    remat = args.remat
    items = [
        ours(2),
        dict(name="precision_T2", kind="precision",
             description="meta-gradient, default matmul precision vs 'highest', T=2",
             settings=dict(setting=cifar_setting, batch=batch, image_size=32, T=2,
                           remat="none", precision="default vs highest"),
             argv=(["--batch", str(batch)] + cifar + ["--T", "2", "--jit_init"]),
             repeats=2 if smoke else 3),
        dict(name="scratch", kind="bench", description="plain CE step of VGG-9-BN (no source)",
             settings=dict(setting="vgg 2-stage (tiny)" if smoke else "vgg9_bn", batch=batch,
                           image_size=32, T=None, remat="none", precision="default"),
             argv=common + (SCRATCH_SMOKE if smoke else []) + ["--mode", "scratch"]),
        dict(name="imagenet_T2", kind="bench",
             description="224-px step, ResNet-34 -> ResNet-18, 16 pairs, T=2",
             settings=dict(setting=("resnet34 (tiny)->resnet18 (tiny)" if smoke
                                    else "resnet34->resnet18"),
                           batch=batch, image_size=32 if smoke else 224, T=2, remat="none",
                           precision="default"),
             argv=common + (IMAGENET_SMOKE if smoke else IMAGENET_FULL) + ["--T", "2"]),
        authors(2),
        ours(1),
        ours(5),
        ours(2, remat), ours(1, remat), ours(5, remat),
        ours(2, env={"JAX_DEFAULT_MATMUL_PRECISION": "highest"}, name="ours_T2_highest",
             description="l2t-jax step, T=2, JAX_DEFAULT_MATMUL_PRECISION=highest"),
        authors(1),
        authors(5),
    ]
    return items


# ----------------------------------------------------------------------------- processes

def _child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_process(command: list[str], timeout: float, log: Path, env: dict | None = None
                ) -> tuple[str, dict | None, float, str]:
    """Runs ``command`` in its own process group, killed (the group) after ``timeout``
    seconds. Returns (status, the JSON object of its last '{' line on stdout, wall seconds,
    reason): status ok, timeout or failed."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=_child_env(env), cwd=str(REPO),
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)   # the group this call started
        stdout, stderr = process.communicate()
        timed_out = True
    wall = time.perf_counter() - start
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(" ".join(command) + "\n--- stdout ---\n" + stdout + "\n--- stderr ---\n"
                   + stderr)
    if timed_out:
        return "timeout", None, wall, f"killed after its budget of {timeout:.0f} s"
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if process.returncode or not lines:
        tail = (stderr.strip().splitlines() or ["no output"])[-1][:300]
        return "failed", None, wall, f"exit status {process.returncode}: {tail}"
    try:
        return "ok", json.loads(lines[-1]), wall, ""
    except json.JSONDecodeError as e:
        return "failed", None, wall, f"its last JSON line does not parse: {e}"


def official_availability(args) -> tuple[str | None, str]:
    """(path of the authors' step harness, '') where their loop can run on CUDA here, else
    (None, why not). Checks the files first, then torch (in a process of its own)."""
    candidates = ([args.official_bench] if args.official_bench else
                  [str(REPO.parent / "shared" / "bench" / "official_l2t_step.py"),
                   str(REPO / "shared" / "bench" / "official_l2t_step.py")])
    harness = next((c for c in candidates if os.path.isfile(c)), None)
    if harness is None:
        return None, f"the harness official_l2t_step.py is not at {' or '.join(candidates)}"
    official_dir = os.environ.get("L2T_OFFICIAL_DIR", "/tmp/l2t-official")
    if not os.path.isfile(os.path.join(official_dir, "train_l2t_ww.py")):
        return None, (f"the authors' checkout is not at {official_dir} (set "
                      "L2T_OFFICIAL_DIR; github:alinlab/L2T-ww)")
    # The authors' CIFAR ResNet imports torchvision's blocks; the harness imports it too.
    probe = ("import json, torch, torchvision; print(json.dumps({'torch': torch.__version__, "
             "'cuda': torch.cuda.is_available()}))")
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        return None, "importing torch took over 120 s"
    if done.returncode:
        return None, "torch or torchvision is not importable: " + (
            done.stderr.strip().splitlines() or ["?"])[-1][:200]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    if not found["cuda"]:
        return None, f"torch {found['torch']} has no CUDA device (torch.cuda.is_available())"
    return harness, ""


def summarise(item: dict, result: dict | None) -> dict:
    """The table's fields from a process's JSON (bench.py's, the precision worker's, or the
    authors' harness's)."""
    fields = dict.fromkeys(("step_s_median", "step_s_min", "step_s_max", "compile_s",
                            "peak_device_memory_gib", "xla_temp_gib", "images_per_s",
                            "iters"))
    if not result:
        return fields
    if item["kind"] == "bench":
        fields.update({key: result.get(key) for key in fields})
    elif item["kind"] == "official":
        peak = result.get("cuda_peak_memory_bytes")
        fields.update(step_s_median=result.get("sec_per_iter_median"),
                      step_s_min=result.get("sec_per_iter_min"),
                      step_s_max=result.get("sec_per_iter_max"),
                      images_per_s=result.get("images_per_s"), iters=result.get("iters"),
                      peak_device_memory_gib=(round(peak / 2**30, 3) if peak is not None
                                              else None))
    elif item["kind"] == "precision":
        default = result["runs"]["default"]
        fields.update(step_s_median=default["seconds_median"],
                      step_s_min=default["seconds_min"], step_s_max=default["seconds_max"],
                      compile_s=default["compile_s"], iters=default["calls"],
                      peak_device_memory_gib=result.get("peak_device_memory_gib"))
    return fields


def _finite(value):
    """NaN and infinities as None: the JSON file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def drive(args) -> dict:
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {
        "benchmark": "experiments/bench_device.py",
        "command": " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else "",
                             *sys.argv[1:]]),
        "smoke": args.smoke,
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": args.budget_s, "item_budget_s": args.item_budget_s,
        "git": provenance.git_commit(),
        "environment": None,
        "measurements": {},
        "precision_threshold": PRECISION_THRESHOLD,
        "recommended_default_precision": None,
    }
    left = lambda: args.budget_s - (time.perf_counter() - started)
    min_start = 0.0 if args.smoke else MIN_START_S

    status, info, _, reason = run_process(
        [sys.executable, SELF, "--worker", "info"], min(60.0, max(left(), 1.0)),
        out / "logs" / "info.txt")
    report["environment"] = info if status == "ok" else {"status": status, "reason": reason}
    device_kind = (info or {}).get("device_kind")
    official = None   # (harness or None, reason), looked up once

    items = plan(args)
    selected = set(args.only.split(",")) if args.only else None
    for item in items:
        record = {key: item.get(key) for key in ("name", "kind", "description", "settings")}
        record.update(status="skipped", reason="", command=None, wall_s=None,
                      budget_s=None, device=device_kind, result=None)
        remaining = left()
        command = None
        if selected is not None and item["name"] not in selected:
            record["reason"] = "not selected (--only)"
        elif remaining < max(min_start, 1.0):
            record["reason"] = (f"total budget spent: {max(remaining, 0):.0f} s of "
                                f"{args.budget_s:.0f} s left")
        elif item["kind"] == "bench":
            command = [sys.executable, "-m", "l2t_jax.tools.bench", *item["argv"]]
        elif item["kind"] == "precision":
            command = [sys.executable, SELF, "--worker", "precision", "--repeats",
                       str(item["repeats"]), "--", *item["argv"]]
        elif item["kind"] == "official":
            if official is None:
                official = official_availability(args)
            harness, why = official
            if harness is None:
                record["reason"] = why
            else:
                command = [sys.executable, str(REPO / "experiments" / "official_step_cuda.py"),
                           "--official_bench", harness, "--", *item["argv"]]
        if command is not None:
            budget = min(args.item_budget_s, remaining)
            shown = ["python", *(os.path.relpath(c, REPO) if c.startswith(str(REPO) + os.sep)
                                 else c for c in command[1:])]
            record["command"] = " ".join([*(f"{k}={v}" for k, v in item.get("env", {}).items()),
                                          shlex.join(shown)])
            print(f"[bench_device] {item['name']} (budget {budget:.0f} s): "
                  f"{record['command']}", flush=True)
            status, result, wall, reason = run_process(
                command, budget, out / "logs" / f"{item['name']}.txt", item.get("env"))
            record.update(status=status, reason=reason, wall_s=round(wall, 1),
                          budget_s=round(budget, 1), result=result)
            if result and result.get("device"):
                record["device"] = result["device"]
        else:
            print(f"[bench_device] {item['name']}: skipped ({record['reason']})", flush=True)
        record.update(summarise(item, record["result"]))
        report["measurements"][item["name"]] = record
        if item["kind"] == "precision" and record["result"]:
            report["recommended_default_precision"] = record["result"]["recommendation"]
        report["total_wall_s"] = round(time.perf_counter() - started, 1)
        write(report, out)
    report["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")
    write(report, out)
    print((out / "bench_device.md").read_text(), flush=True)
    return report


# ----------------------------------------------------------------------------- outputs

def _number(value, digits=3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 or abs(value) >= 1e5 else (
            f"{value:.{digits}f}".rstrip("0").rstrip("."))
    return str(value)


def markdown(report: dict) -> str:
    env = report.get("environment") or {}
    versions = env.get("versions") or {}
    git = report.get("git") or {}
    lines = [
        "# Accelerator benchmark" + (" (SMOKE: tiny networks, numbers mean nothing)"
                                     if report["smoke"] else ""),
        "",
        f"- device: {env.get('device_kind')} (backend {env.get('backend')}, "
        f"{env.get('device_count')} device(s)); host {env.get('host')}, {env.get('cpu')}",
        f"- jax {versions.get('jax')}, jaxlib {versions.get('jaxlib')}, flax "
        f"{versions.get('flax')}; commit {git.get('commit')}"
        + (" (uncommitted changes)" if git.get("dirty") else ""),
        f"- command: `{report['command']}`; started {report['started_utc']}, "
        f"{report.get('total_wall_s')} s of the {report['budget_s']:.0f} s budget "
        f"({report['item_budget_s']:.0f} s at most per measurement)",
        "",
        "| measurement | setting | batch | image | T | remat | precision | status | "
        "s/step median (min-max) | compile (s) | peak device memory (GiB) | XLA temp (GiB) "
        "| images/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["measurements"].items():
        s = m["settings"]
        status = m["status"] + (f": {m['reason']}" if m["reason"] else "")
        step = ""
        if m["step_s_median"] is not None:
            step = (f"{_number(m['step_s_median'], 4)} ({_number(m['step_s_min'], 4)}-"
                    f"{_number(m['step_s_max'], 4)})")
        lines.append(
            f"| {name} | {s['setting']} | {s['batch']} | {s['image_size']} | "
            f"{_number(s['T'])} | {_number(s['remat'])} | {s['precision']} | "
            f"{status.replace('|', '/')} | {step} | {_number(m['compile_s'], 1)} | "
            f"{_number(m['peak_device_memory_gib'])} | {_number(m['xla_temp_gib'])} | "
            f"{_number(m['images_per_s'], 1)} |")
    lines.append("")
    lines.append("precision_T2's time is one call of the meta-gradient program (source, real "
                 "step, simulated steps, meta-gradient; no Adam step), not a training step.")
    precision = (report["measurements"].get("precision_T2") or {}).get("result")
    lines += ["", "## Meta-gradient: default matmul precision vs `highest`", ""]
    if not precision:
        lines.append("not measured (see precision_T2's status above)")
    else:
        c = precision["comparison"]
        d, h = precision["runs"]["default"], precision["runs"]["highest"]
        lines += [
            "| quantity | value |", "|---|---|",
            f"| meta loss, default / highest | {d['meta_loss']!r} / {h['meta_loss']!r} |",
            f"| meta loss, relative difference | {_number(c['meta_loss_rel_diff'])} |",
            f"| meta-gradient norm, default / highest | {d['grad_norm']!r} / "
            f"{h['grad_norm']!r} |",
            f"| relative difference of the norms | {_number(c['grad_norm_rel_diff'])} |",
            f"| norm of the difference / norm (highest) | {_number(c['grad_diff_norm_rel'])} |",
            f"| max abs difference over leaves | {_number(c['max_abs_diff'])} |",
            f"| max over leaves of max abs difference / max abs (highest) | "
            f"{_number(c['max_leaf_rel_diff'])} ({c['max_leaf_rel_diff_leaf']}) |",
            f"| repeated call, default: norm of the difference / norm | "
            f"{_number(c['repeat_default_diff_norm_rel'])} |",
            f"| repeated call, highest: norm of the difference / norm | "
            f"{_number(c['repeat_highest_diff_norm_rel'])} |",
            f"| meta-gradient program s/call, default / highest | "
            f"{_number(d['seconds_median'], 4)} / {_number(h['seconds_median'], 4)} |",
            f"| compile s, default / highest | {_number(d['compile_s'], 1)} / "
            f"{_number(h['compile_s'], 1)} |",
            f"| recommended default precision | **{precision['recommendation']}** "
            f"({precision['recommendation_rule']}) |",
        ]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    (out / "bench_device.json").write_text(json.dumps(_finite(report), indent=1) + "\n")
    (out / "bench_device.md").write_text(markdown(report))


# ----------------------------------------------------------------------------- workers

def worker_info() -> dict:
    import jax
    metadata = provenance.run_metadata()
    stats = jax.devices()[0].memory_stats() or {}
    metadata.update(memory_stats_available="peak_bytes_in_use" in stats,
                    device_memory_limit_bytes=stats.get("bytes_limit"),
                    default_matmul_precision=jax.config.jax_default_matmul_precision,
                    compilation_cache_dir=os.environ.get("JAX_COMPILATION_CACHE_DIR"),
                    xla_python_client_preallocate=os.environ.get(
                        "XLA_PYTHON_CLIENT_PREALLOCATE"))
    return metadata


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def worker_precision(bench_argv: list[str], repeats: int) -> dict:
    """The meta-gradient of one iteration under the default matmul precision and under
    'highest': each program traced, compiled and called inside its precision's context
    (the setting is part of jit's cache key); their differences."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from l2t_jax.models import convolution
    from l2t_jax.tools import bench
    from l2t_jax.transfer import bilevel

    bench_args = bench.parse_args(bench_argv)
    transfer, state, source_variables = bench.build(bench_args)
    images, labels = bench._random_batches(bench_args, 1)[0]
    learning_rate = jnp.float32(0.1)

    def meta_loss_and_grad(state, source_variables, images, labels):
        objective = bilevel.meta_objective(transfer, state, source_variables, images, labels,
                                           learning_rate)
        (loss, _), grads = jax.value_and_grad(objective, has_aux=True)(state.meta_params)
        return loss, grads

    runs, outputs = {}, {}
    for precision in ("default", "highest"):
        # default: no setting at all, as the library and training run.
        context = (contextlib.nullcontext() if precision == "default"
                   else jax.default_matmul_precision(precision))
        with context:
            start = time.perf_counter()
            compiled = jax.jit(meta_loss_and_grad).lower(
                state, source_variables, images, labels).compile()
            compile_s = time.perf_counter() - start
            results, seconds = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                result = jax.block_until_ready(compiled(state, source_variables, images,
                                                        labels))
                seconds.append(time.perf_counter() - start)
                results.append(jax.tree.map(lambda a: np.asarray(a, np.float64), result))
        loss, grads = results[0]
        flat = np.concatenate([g.ravel() for g in jax.tree.leaves(grads)])
        runs[precision] = dict(
            compile_s=round(compile_s, 2), calls=repeats,
            # the first call includes loading the program: the rest are timed
            seconds_median=float(np.median(seconds[1:] if repeats > 1 else seconds)),
            seconds_min=min(seconds[1:] if repeats > 1 else seconds),
            seconds_max=max(seconds[1:] if repeats > 1 else seconds),
            meta_loss=float(loss), grad_norm=float(np.linalg.norm(flat)),
            finite=bool(np.isfinite(flat).all() and np.isfinite(loss)))
        outputs[precision] = results

    def flatten(grads):
        return np.concatenate([g.ravel() for g in jax.tree.leaves(grads)])

    (loss_d, grads_d), (loss_h, grads_h) = outputs["default"][0], outputs["highest"][0]
    leaves = {jax.tree_util.keystr(path): (d, h) for (path, d), h in zip(
        jax.tree_util.tree_flatten_with_path(grads_d)[0], jax.tree.leaves(grads_h))}
    per_leaf = {name: dict(max_abs_diff=float(np.max(np.abs(d - h))),
                           rel_diff=float(np.max(np.abs(d - h)) / max(np.max(np.abs(h)),
                                                                       1e-30)))
                for name, (d, h) in leaves.items()}
    worst = max(per_leaf, key=lambda name: per_leaf[name]["rel_diff"])
    flat_d, flat_h = flatten(grads_d), flatten(grads_h)

    def repeat_difference(precision):
        if len(outputs[precision]) < 2:
            return None
        a, b = flatten(outputs[precision][0][1]), flatten(outputs[precision][1][1])
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))

    comparison = dict(
        meta_loss_abs_diff=abs(float(loss_d) - float(loss_h)),
        meta_loss_rel_diff=_relative(float(loss_d), float(loss_h)),
        grad_norm_rel_diff=_relative(runs["default"]["grad_norm"],
                                     runs["highest"]["grad_norm"]),
        grad_diff_norm_rel=float(np.linalg.norm(flat_d - flat_h)
                                 / max(np.linalg.norm(flat_h), 1e-30)),
        max_abs_diff=max(v["max_abs_diff"] for v in per_leaf.values()),
        max_leaf_rel_diff=per_leaf[worst]["rel_diff"], max_leaf_rel_diff_leaf=worst,
        repeat_default_diff_norm_rel=repeat_difference("default"),
        repeat_highest_diff_norm_rel=repeat_difference("highest"),
        leaves=len(per_leaf), parameters=int(flat_h.size), per_leaf=per_leaf)
    rule = (f"'highest' if the meta-gradient norm's relative difference between the two "
            f"exceeds {PRECISION_THRESHOLD:g}, else 'default'")
    if not (runs["default"]["finite"] and runs["highest"]["finite"]):
        recommendation = "undetermined (a non-finite meta-gradient)"
    elif comparison["grad_norm_rel_diff"] > PRECISION_THRESHOLD:
        recommendation = "highest"
    else:
        recommendation = "default"
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return dict(
        setting=f"{bench_args.source}->{bench_args.target}", batch=bench_args.batch,
        T=bench_args.T, pairs=len(transfer.pairs),
        conv_impl=convolution.resolve_impl(bench_args.conv_impl),
        source_checkpoint=bench_args.source_checkpoint or "random weights",
        device=device.device_kind, backend=jax.default_backend(),
        library_default_matmul_precision=jax.config.jax_default_matmul_precision,
        runs=runs, comparison=comparison, recommendation=recommendation,
        recommendation_rule=rule, threshold=PRECISION_THRESHOLD,
        peak_device_memory_gib=(round(stats["peak_bytes_in_use"] / 2**30, 3)
                                if "peak_bytes_in_use" in stats else None))


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output directory (driver)")
    parser.add_argument("--budget_s", type=float,
                        default=float(os.environ.get("BENCH_BUDGET_S", 450)),
                        help="total seconds for all measurements (env BENCH_BUDGET_S; "
                             "default 450: the issue's 8 minutes with room to start)")
    parser.add_argument("--item_budget_s", type=float,
                        default=float(os.environ.get("BENCH_ITEM_BUDGET_S", 150)),
                        help="at most this many seconds per measurement (process start, "
                             "build, compile, steps)")
    parser.add_argument("--smoke", action="store_true",
                        default=os.environ.get("BENCH_SMOKE", "") not in ("", "0"),
                        help="tiny networks, batch 2, one step (env BENCH_SMOKE=1)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--remat", default="full",
                        help="the remat policy of the 'with remat' rows (bench.py --remat)")
    parser.add_argument("--source_checkpoint", default="",
                        help="bench.py --source_checkpoint for the CIFAR rows (e.g. "
                             "released:resnet32); default: random source weights")
    parser.add_argument("--official_bench", default="",
                        help="path of a timing harness of the authors' loop, official_l2t_step.py "
                             "(default: shared/bench/ beside the repository, if any)")
    parser.add_argument("--only", default="",
                        help="comma-separated measurement names to run (the others are "
                             "recorded as not selected)")
    parser.add_argument("--worker", choices=("info", "precision"), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("bench_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None and not args.out:
        parser.error("--out is required")
    if args.remat == "none":
        parser.error("--remat names the policy of the rows with remat: dots or full")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker == "info":
        print(json.dumps(_finite(worker_info())))
    elif args.worker == "precision":
        print(json.dumps(_finite(worker_precision(args.bench_args, args.repeats))))
    else:
        drive(args)


if __name__ == "__main__":
    main()

"""How long a run takes to stop after SIGTERM (or SIGINT), and how many steps it runs first.

    PYTHONPATH=. python experiments/preemption_latency.py --out runs/preemption [--sizes tiny,fm]

For each size and each point (``step``: in the middle of a training step; ``eval``: during
the second epoch-end evaluation (0.3 s into it); ``save``: during a checkpoint save) one run of
``python -m l2t_jax.main`` in its own process, with a hook (below) that:

- records when each training step *finishes on the device* (a watcher thread blocks on each
  step's metrics in order: the Python loop may have dispatched further), and
- sends the signal from a thread at the chosen point.

It reports the step finished on the device when the signal came, the step of the
checkpoint the run saved, their difference (the steps run after the signal), and the
seconds from the signal to the process's exit. Data: random npz arrays; the source: a
random ResNet-20 (what matters here is the step's cost, not what it learns). Sizes:
``tiny`` (helpers.tiny_config's networks, FM, batch 8) and ``fm`` (the demo's FM run: VGG-9
widths 16-32 from a ResNet-20 of widths 8-32, batch 32). The CPU may be shared: the steps
are the result, the seconds indicative.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

HOOK = r"""
import json, os, queue, signal, sys, threading, time
import jax
from absl import app
from l2t_jax import main
from l2t_jax.training import checkpoints, evaluation, train

point, out = os.environ["L2T_POINT"], os.environ["L2T_OUT"]
signum = getattr(signal, os.environ.get("L2T_SIGNAL", "SIGTERM"))
after = int(os.environ["L2T_AFTER_STEP"])
finished, record = queue.Queue(), {"finished": {}, "point": point}

def watch():           # the time each step finishes on the device, in step order
    while True:
        step, metrics = finished.get()
        jax.block_until_ready(metrics)
        record["finished"][step] = time.time()

threading.Thread(target=watch, daemon=True).start()

def send(delay):
    def later():
        time.sleep(delay)
        done = list(record["finished"])
        record["signal_time"] = time.time()
        record["finished_at_signal"] = max(done) if done else 0
        os.kill(os.getpid(), signum)
    threading.Thread(target=later, daemon=True).start()

_compile = train.compile_with_notice
def compile_with_notice(*args, **kwargs):
    compiled = _compile(*args, **kwargs)
    calls = [0]
    def step(state, *rest):
        state, metrics = compiled(state, *rest)
        calls[0] += 1
        finished.put((calls[0], metrics))      # fresh runs: call k is step k
        if point == "step" and calls[0] == after:
            # half a step after this one started: the mean step time so far
            times = sorted(list(record["finished"].values()))
            send(0.5 * (times[-1] - times[0]) / max(len(times) - 1, 1) if len(times) > 1 else 0.2)
        return state, metrics
    return step
train.compile_with_notice = compile_with_notice

_evaluate = evaluation.evaluate
def evaluate(*args, **kwargs):
    record["evaluations"] = record.get("evaluations", 0) + 1
    # the 3rd evaluation: epoch 1's first split (the first one also compiles the program)
    if point == "eval" and record["evaluations"] == 3:
        send(0.3)
    return _evaluate(*args, **kwargs)
evaluation.evaluate = evaluate

_save = checkpoints.Checkpoints.save
def save(self, step, state, progress):
    if point == "save" and step >= after and "sent" not in record:
        record["sent"] = True
        send(0.05)
    record.setdefault("saves", []).append(step)
    return _save(self, step, state, progress)
checkpoints.Checkpoints.save = save

def dump():
    record["exit_time"] = time.time()
    with open(out, "w") as f:
        json.dump(record, f)
import atexit
atexit.register(dump)
app.run(main.main, flags_parser=main.parse_flags)
"""


# size -> (source model, its overrides, target model, its overrides)
NETWORKS = {"tiny": ("resnet20:tiny", {}, "vgg9_bn:tiny", {}),
            "fm": ("resnet20", {"widths": (8, 16, 32)}, "vgg9_bn",
                   {"widths": (16, 16, 32, 32, 32)})}


def write_assets(root: str, size: str, n_train: int, n_eval: int):
    import helpers
    import jax
    import jax.numpy as jnp

    from l2t_jax import models
    from l2t_jax.training import converted
    helpers.write_npz_splits(os.path.join(root, "data"),
                             sizes=(("train", n_train), ("val", n_eval), ("test", n_eval)))
    source_model, source_overrides = NETWORKS[size][:2]
    model = models.get_model(source_model, 5, **source_overrides)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    converted.save_converted(os.path.join(root, "source"), variables, {
        "model": source_model, "num_classes": 5, "model_overrides": source_overrides})


def config_for(size: str, root: str):
    import helpers
    import ml_collections
    config = helpers.tiny_config(os.path.join(root, "data"), os.path.join(root, "source"),
                                 method="fm", pairs="one_to_one", learning_rate=0.002)
    # The defaults' bookkeeping: a log line every 20 steps, a
    # checkpoint every 500 steps and at the end of each epoch.
    config.log_every_steps, config.checkpoint_every_steps = 20, 500
    config.epochs, config.steps_per_epoch = 3, 40
    source_model, source_overrides, target_model, target_overrides = NETWORKS[size]
    config.source_model, config.target_model = source_model, target_model
    config.model_overrides = ml_collections.ConfigDict(
        {"source": source_overrides, "target": target_overrides})
    if size == "fm":
        config.batch_size, config.eval_batch_size = 32, 32
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="tiny,fm")
    parser.add_argument("--points", default="step,eval,save")
    parser.add_argument("--signal", default="SIGTERM")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import helpers
    rows = []
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(args.out, "xla_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    hook = os.path.join(args.out, "hook.py")
    with open(hook, "w") as f:
        f.write(HOOK)
    for size in args.sizes.split(","):
        root = os.path.join(args.out, f"assets-{size}")
        if not os.path.exists(root):
            write_assets(root, size, 40 * 32, 512 if size == "tiny" else 2048)
        config_file = helpers.write_config_file(
            config_for(size, root), __import__("pathlib").Path(args.out) / f"{size}.py")
        for point in args.points.split(","):
            workdir = os.path.join(args.out, f"run-{size}-{point}-{args.label}")
            subprocess.run(["rm", "-rf", workdir])
            record_path = workdir + ".json"
            started = time.time()
            done = subprocess.run(
                [sys.executable, hook, f"--config={config_file}", f"--workdir={workdir}"],
                cwd=REPO, env=dict(env, L2T_POINT=point, L2T_OUT=record_path,
                                   L2T_SIGNAL=args.signal,
                                   L2T_AFTER_STEP="25" if point != "eval" else "0"),
                capture_output=True, text=True)
            record = json.load(open(record_path))
            saved = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))
                     if n.isdigit()]
            finished = {int(k): v for k, v in record["finished"].items()}
            step_s = ((max(finished.values()) - min(finished.values())) /
                      max(len(finished) - 1, 1))
            row = {"size": size, "point": point, "label": args.label,
                   "exit_status": done.returncode,
                   "finished_at_signal": record.get("finished_at_signal"),
                   "saved_step": max(saved) if saved else None,
                   "steps_after_signal": (max(saved) - record["finished_at_signal"]
                                          if saved and "finished_at_signal" in record
                                          else None),
                   "seconds_to_exit": round(record["exit_time"] - record["signal_time"], 2)
                   if "signal_time" in record else None,
                   "seconds_per_step": round(step_s, 3),
                   "wall_s": round(time.time() - started, 1)}
            print(json.dumps(row), flush=True)
            if done.returncode not in (130, 143):
                print(done.stderr[-3000:])
            rows.append(row)
    with open(os.path.join(args.out, f"latency-{args.label}.jsonl"), "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Seconds from starting the training program to its first step, cold and warm.

    python experiments/first_step_time.py [--config cifar100:tiny] [--cache DIR]

Runs ``python -m l2t_jax.main --config=CONFIG`` on small random npz arrays of the config's
image size (written to a temporary directory; the config's data set is not needed), with
the compilation cache in ``--cache`` (default: a fresh temporary directory), twice: cold
(an empty cache) and warm (the cache the first run wrote). Reports for each the seconds
from the process's start to the log lines that matter (state initialised, step compiled,
step 1 done) and prints one JSON line (the goal: a ``:tiny`` config's first step within
30 s).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

MARKS = {"compile_started": "compiling the training step",
         "step_program_ready": r"(compiled|loaded) the training step",
         "first_step": r"step 1/\d+ "}


def write_arrays(directory: str, image_size: int, num_classes: int) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 256), ("val", 32), ("test", 32)):
        np.savez(os.path.join(directory, f"{split}.npz"),
                 images=rng.integers(0, 256, (count, image_size, image_size, 3), np.uint8),
                 labels=rng.integers(0, num_classes, count))


def timed_run(command: list[str], env: dict) -> dict:
    """Runs ``command``; seconds from its start to the first line matching each mark."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    seen, lines = {}, []
    for line in process.stdout:
        lines.append(line)
        for name, pattern in MARKS.items():
            if name not in seen and re.search(pattern, line):
                seen[name] = round(time.perf_counter() - started, 1)
    process.wait()
    if process.returncode:
        raise RuntimeError(f"{command} failed ({process.returncode}):\n{''.join(lines[-30:])}")
    return {**seen, "total_s": round(time.perf_counter() - started, 1)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cifar100:tiny")
    parser.add_argument("--cache", default="", help="compilation cache (default: fresh)")
    parser.add_argument("--image_size", type=int, default=32, help="the config's input size")
    parser.add_argument("--num_classes", type=int, default=100)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        write_arrays(scratch, args.image_size, args.num_classes)
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=args.cache or os.path.join(
            scratch, "cache"))
        runs = {}
        for name in ("cold", "warm"):
            command = [sys.executable, "-m", "l2t_jax.main", f"--config={args.config}",
                       f"--workdir={os.path.join(scratch, name)}",
                       "--config.data.kind=npz", f"--config.data.data_dir={scratch}",
                       "--config.data.official_split="]
            runs[name] = timed_run(command, env)
    result = {"config": args.config, **runs, "command": " ".join(sys.argv)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

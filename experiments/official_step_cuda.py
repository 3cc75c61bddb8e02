#!/usr/bin/env python
"""Runs the authors' loop of ``official_l2t_step.py`` (a CPU harness, kept unchanged) on a
CUDA device, for ``experiments/bench_device.py``.

    L2T_OFFICIAL_DIR=<authors' checkout> python experiments/official_step_cuda.py \\
        --official_bench PATH/official_l2t_step.py [--device cuda] -- \\
        --batch 64 --T 2 --iters 10 --warmup 3

The harness is imported as a module and its builders wrapped, not edited:
  - ``build_l2t`` gets a ``torch`` whose ``torch.device(...)`` is the CUDA device, so the
    networks, heads and meta-networks it moves ``.to(device)`` land there (the optimisers
    hold the same parameter objects; the authors' MetaSGD with ``cpu=T>2`` keeps its
    snapshots on the host, as their own GPU runs do);
  - ``run_scratch``'s target network is moved to the device;
  - ``make_batches`` builds the same batches (same generator), then copies them to the
    device, before the timed loop;
  - each timed iteration ends with ``torch.cuda.synchronize()``, so its wall time covers
    its kernels.
Prints the harness's JSON line with ``device``, ``cuda_peak_memory_bytes``
(``torch.cuda.max_memory_allocated``) and ``cuda_peak_reserved_bytes`` added.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official_bench", required=True, help="official_l2t_step.py")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("harness_args", nargs="*", help="the harness's own flags, after --")
    args = parser.parse_args(argv)

    import torch
    device = torch.device(args.device)
    spec = importlib.util.spec_from_file_location("official_l2t_step", args.official_bench)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)

    class OnDevice:
        """``torch``, except that ``torch.device(...)`` is ``device``."""

        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def device(*_args, **_kwargs):
            return device

    def synchronised(iteration):
        def timed(data):
            iteration(data)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return timed

    build_l2t, run_l2t, run_scratch = harness.build_l2t, harness.run_l2t, harness.run_scratch
    make_batches = harness.make_batches
    harness.build_l2t = lambda a, torch_, *rest: build_l2t(a, OnDevice(), *rest)

    def run_l2t_on_device(*a, **k):
        iteration, *rest = run_l2t(*a, **k)
        return (synchronised(iteration), *rest)

    def run_scratch_on_device(a, torch_, F, check_model):
        iteration, *rest = run_scratch(a, torch_, F, lambda ns: check_model(ns).to(device))
        return (synchronised(iteration), *rest)

    harness.run_l2t, harness.run_scratch = run_l2t_on_device, run_scratch_on_device
    harness.make_batches = lambda *a, **k: [[t.to(device) for t in batch]
                                            for batch in make_batches(*a, **k)]

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        harness.main(args.harness_args)
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("{")]
    if not lines:
        sys.exit("the harness printed no JSON line")
    result = json.loads(lines[-1])
    result["device"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else str(device))
    if device.type == "cuda":
        result["cuda_peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        result["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

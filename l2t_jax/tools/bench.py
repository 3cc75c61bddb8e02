"""Times the jitted L2T-ww step (or another method's step) and prints one JSON line.

    python -m l2t_jax.tools.bench --batch 64 --T 2 --iters 5
        [--mode scratch|fm|at|lwf|lwf_at|afd|semckd] [--pairs all_to_all]
        [--remat dots] [--no-unroll] [--phases] [--peak]

Default setting: the CIFAR-100 experiment's networks (ResNet-32 with 200 classes ->
VGG-9-BN with 100 classes, the 15 pairs), random inputs, and random source weights unless
``--source_checkpoint`` is given (the step's cost does not depend on them). A method other
than L2T-ww (``--mode``) takes its own pair scheme (FM one-to-one, AFD and SemCKD
all-to-all) unless ``--pairs`` names one (``--mode fm --pairs all_to_all``). It first says
on stderr what it is about to time and how to make that smaller: at the defaults on a CPU,
compiling takes about a minute and L2T-ww's iterations several seconds each.

The JSON line holds compile seconds; seconds per iteration (median, min, max over
``--iters`` after ``--warmup``); images/s; peak RSS with the compiler
(``peak_rss_compile_gib``) and while stepping (``peak_rss_steps_gib``: after compiling, the
compiler's freed memory goes back to the OS and the kernel's peak counter is reset, so this
is what training needs); XLA's buffer sizes from ``memory_analysis``; peak device memory on
an accelerator; XLA's FLOP count of one iteration and the achieved FLOP/s; versions and
device. ``--peak`` adds the FLOP/s of a large matrix product on the same device and the FLOP
floor (the iteration's FLOPs at that rate). ``--phases`` adds a split of the iteration by
phase (see :func:`phase_seconds`). ``--source_overrides`` / ``--target_overrides`` set other
attributes of the networks (JSON, e.g. a CIFAR ResNet's depth), for tiny smoke runs
(``experiments/bench_device.py --smoke``).
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from l2t_jax import models
from l2t_jax.models import convolution
from l2t_jax.training import assets, converted, parallel, train
from l2t_jax.transfer import bilevel, methods, pair_lists, pairing
from l2t_jax.training import build as build_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _overrides(widths: str, attributes: str = "") -> dict:
    """A network's overrides: ``--*_widths`` (comma-separated) and ``--*_overrides`` (a JSON
    object of module attributes, e.g. '{"depth": 8}'; widths given there win)."""
    overrides = {"widths": tuple(int(w) for w in widths.split(","))} if widths else {}
    if attributes:
        overrides.update(json.loads(attributes))
    return overrides


def pair_scheme(args) -> str | None:
    """The pairs timed: ``--pairs``, else the 15 CIFAR pairs for L2T-ww and the method's
    own scheme for the others (None: a method without pairs)."""
    if args.pairs:
        return args.pairs
    return pair_lists.CIFAR_PAIRS if args.mode == "l2t" else methods.get_method(
        args.mode).scheme


def build(args) -> tuple:
    """Returns (transfer, state, source_variables) for the parsed arguments."""
    target = models.get_model(args.target, args.num_classes, conv_impl=args.conv_impl,
                              **_overrides(args.target_widths, args.target_overrides))
    rng = jax.random.key(args.seed)
    size = args.image_size
    if args.mode == "scratch":
        transfer = bilevel.make_transfer(None, target, (), terms=(), meta_networks=False)
        source_variables = {}
    else:
        source = models.get_model(args.source, args.source_classes, conv_impl=args.conv_impl,
                                  **_overrides(args.source_widths, args.source_overrides))
        if args.mode == "l2t":
            transfer = bilevel.make_transfer(
                source, target, pairing.resolve_pairs(pair_scheme(args), source, target),
                inner_steps=args.T, remat=args.remat, unroll_inner=args.unroll,
                conv_impl=args.conv_impl)
        else:                     # a row of the table, on its pairs or its own scheme
            method = methods.get_method(args.mode)
            pairs = (pairing.resolve_pairs(pair_scheme(args), source, target)
                     if method.uses_pairs else ())
            # batch_size: the terms' own parts are built for it (SemCKD's embeddings).
            transfer = build_lib.method_transfer(method, source, target, pairs,
                                                 conv_impl=args.conv_impl,
                                                 batch_size=args.batch)
        if args.source_checkpoint:
            _, source_variables, _ = converted.load_converted(
                assets.resolve_source_checkpoint(args.source_checkpoint),
                expect_model=args.source, expect_num_classes=args.source_classes)
        else:
            source_init = functools.partial(source.init, train=False)
            source_variables = (jax.jit(source_init) if args.jit_init else source_init)(
                jax.random.fold_in(rng, 1), jnp.zeros((1, size, size, 3)))
    state = bilevel.init_state(transfer, rng, (size, size, 3), jit=args.jit_init)
    dtype = DTYPES[args.dtype]
    cast = functools.partial(jax.tree.map, lambda a: a.astype(dtype)
                             if jnp.issubdtype(a.dtype, jnp.floating) else a)
    return transfer, cast(state), cast(source_variables)


def _random_batches(args, count: int) -> list:
    keys = jax.random.split(jax.random.key(args.seed + 1), count)
    size = args.image_size
    return [(jax.random.normal(k, (args.batch, size, size, 3)).astype(DTYPES[args.dtype]),
             jax.random.randint(k, (args.batch,), 0, args.num_classes)) for k in keys]


def _seconds(run: Callable, calls: Sequence[tuple], warmup: int) -> list[float]:
    """Wall seconds of ``run(*call)`` per call, results awaited, the first ``warmup`` dropped."""
    times = []
    for i, call in enumerate(calls):
        start = time.perf_counter()
        jax.block_until_ready(run(*call))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _reset_peak_rss() -> bool:
    """Returns the compiler's freed memory to the OS (glibc's malloc_trim) and resets the
    kernel's peak-RSS counter of this process (Linux >= 4.0); False where unsupported."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_gib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _peak_rss_gib() -> float:
    """Peak RSS of this process since the last reset (VmHWM), else since its start."""
    peak = _proc_status_gib("VmHWM")
    return peak if peak is not None else (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def _current_rss_gib() -> float | None:
    return _proc_status_gib("VmRSS")


def matmul_peak_flops(size: int = 2048, repeats: int = 7) -> float:
    """FLOP/s of a large float32 matrix product (size x size) on the default device, best
    of ``repeats``: the rate the step's matrix products could reach at best here."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    product = jax.jit(jnp.matmul)
    best = min(_seconds(product, [(a, b)] * (repeats + 1), warmup=1))
    return 2.0 * size ** 3 / best


def phase_seconds(transfer: bilevel.Transfer, state: bilevel.TrainState,
                  source_variables, batches: Sequence[tuple], warmup: int,
                  step_seconds: float) -> dict:
    """Median seconds of each phase of one L2T-ww iteration, by differences of prefixes.

    Each prefix of the iteration is jitted and timed on its own (no donation), and a phase
    is the difference of two consecutive prefixes:
      source: the source network's forward pass and its resized maps;
      real_step: step 1 (forward + backward of the target, SGD);
      simulation_forward: the T simulated steps' forward + backward (prefix with T steps
        minus the prefix with T = 0);
      adaptation_forward: the CE step and the meta loss's forward pass;
      meta_backward: the reverse pass through all of it to phi and phi's Adam step
        (``step_seconds`` minus the forward prefix).
    XLA optimises each prefix alone, so the split is approximate; it sums to the step.
    """
    learning_rate = jnp.float32(0.1)

    def batch_prefix(state, source_variables, images, labels):
        return bilevel.batch_constants(transfer, state, source_variables, images, labels)

    def real_prefix(state, source_variables, images, labels):
        batch = batch_prefix(state, source_variables, images, labels)
        return bilevel.real_step(transfer, state, batch, learning_rate)

    def forward_prefix(transfer, state, source_variables, images, labels):
        objective = bilevel.meta_objective(transfer, state, source_variables, images, labels,
                                           learning_rate)
        return objective(state.meta_params)

    prefixes = {
        "source": batch_prefix,
        "real": real_prefix,
        "forward_t0": functools.partial(forward_prefix,
                                        dataclasses.replace(transfer, inner_steps=0)),
        "forward": functools.partial(forward_prefix, transfer),
    }
    medians = {}
    for name, prefix in prefixes.items():
        compiled = jax.jit(prefix).lower(state, source_variables, *batches[0]).compile()
        calls = [(state, source_variables, *batch) for batch in batches]
        medians[name] = statistics.median(_seconds(compiled, calls, warmup))
    return {
        "source": medians["source"],
        "real_step": medians["real"] - medians["source"],
        "simulation_forward": medians["forward"] - medians["forward_t0"],
        "adaptation_forward": medians["forward_t0"] - medians["real"],
        "meta_backward": step_seconds - medians["forward"],
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m l2t_jax.tools.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    baselines = tuple(name for name, row in methods.METHODS.items()
                      if not row.meta_networks and name != "scratch")
    parser.add_argument("--mode", default="l2t", choices=("l2t", "scratch") + baselines,
                        help="l2t: the L2T-ww iteration; scratch: a plain CE step of the "
                             "target alone (no source, no matching); a method of the "
                             "table without meta-networks (" + ", ".join(baselines) + "): "
                             "its step, on --pairs or its own pair scheme")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--T", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--remat", default="none", choices=tuple(bilevel.REMAT_POLICIES))
    parser.add_argument("--unroll", action=argparse.BooleanOptionalAction, default=True,
                        help="unroll the T simulated steps (default, as configs/default.py; "
                             "ignored under --remat) or run them as a scan loop (--no-unroll)")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                        help="dtype of parameters and inputs (bfloat16: timing only)")
    parser.add_argument("--conv_impl", default="auto", choices=convolution.CONV_IMPLS)
    parser.add_argument("--jit_init", action="store_true",
                        help="initialise the networks in one compiled program each (as "
                             "config.jit_init): less resident memory while stepping")
    parser.add_argument("--source", default="resnet32")
    parser.add_argument("--source_classes", type=int, default=200)
    parser.add_argument("--source_widths", default="", help="e.g. 8,16,16 (default: full)")
    parser.add_argument("--source_overrides", default="",
                        help='module attributes of the source as JSON, e.g. \'{"depth": 8}\' '
                             "(tiny smoke runs)")
    parser.add_argument("--target", default="vgg9_bn")
    parser.add_argument("--target_widths", default="")
    parser.add_argument("--target_overrides", default="",
                        help="module attributes of the target as JSON, e.g. "
                             '\'{"convs_per_stage": [1, 1]}\'')
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--pairs", default="",
                        help="a pair scheme (single, one_to_one, all_to_all) or list "
                             "('4-0,9-1'); default: the 15 CIFAR pairs for l2t, the method's "
                             "own scheme otherwise")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", action="store_true",
                        help="also time the iteration's phases (l2t mode; compiles 4 more "
                             "programs)")
    parser.add_argument("--peak", action="store_true",
                        help="also measure a large matmul's FLOP/s and the FLOP floor")
    parser.add_argument("--source_checkpoint", default="",
                        help="converted source (directory or released:resnet32); default: "
                             "random weights, whose matching loss can diverge to NaN within "
                             "a few iterations (the time per iteration is the same)")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    if args.phases and args.mode != "l2t":
        parser.error("--phases needs --mode l2t")
    if args.pairs and args.mode == "scratch":
        parser.error("--pairs: scratch matches no feature maps")
    return args


def announcement(args) -> str:
    """One line saying what :func:`main` is about to build, compile and time, and how to
    shrink it (printed on stderr first: at the defaults on a CPU, a minute passes before
    the JSON line)."""
    target = f"{args.target} ({args.num_classes} classes)"
    pairs = methods.scheme_text(pair_scheme(args))       # "15 pairs", "all-to-all", "4-0"
    what = (f"{args.mode} step of {target}" if args.mode == "scratch" else
            f"{args.mode} step, {args.source} ({args.source_classes} classes) -> {target}, "
            + (pairs if pairs.endswith(" pairs") else f"{pairs} pairs"))
    t = f", T={args.T}" if args.mode == "l2t" else ""
    weights = ("" if args.mode == "scratch" else f", source {args.source_checkpoint}"
               if args.source_checkpoint else ", random source weights")
    narrow = ("" if args.mode == "scratch" else "--source_widths 4,4,8 ") + (
        "--target_widths 4,4,8,8,8")
    return (f"bench: {what}, batch {args.batch}{t}, {args.image_size} px, {args.dtype}"
            f"{weights}: building and compiling, then {args.warmup} warm-up + {args.iters} "
            "timed iterations (about a minute or more on a CPU; smaller: --batch 8 --iters 1"
            + (" --T 1" if args.mode == "l2t" else "") + f", or narrow networks: {narrow})")


def main(argv=None) -> dict:
    args = parse_args(argv)
    print(announcement(args), file=sys.stderr, flush=True)
    transfer, state, source_variables = build(args)
    # The program training runs (train.step_program), on a one-device mesh.
    mesh = parallel.make_mesh(jax.devices()[:1])
    step = train.step_program(transfer, lambda _: 0.1, mesh)
    state, source_variables = parallel.replicate(mesh, (state, source_variables))
    batches = [parallel.global_batch(mesh, *batch)
               for batch in _random_batches(args, args.warmup + args.iters)]

    start = time.perf_counter()
    compiled = step.lower(state, source_variables, *batches[0]).compile()
    compile_seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    memory = compiled.memory_analysis()
    peak_rss_with_compile = _peak_rss_gib()
    peak_rss_reset = _reset_peak_rss()
    rss_before_steps = _current_rss_gib()

    times, metrics = [], None
    for i, (images, labels) in enumerate(batches):
        start = time.perf_counter()
        state, metrics = compiled(state, source_variables, images, labels)
        jax.block_until_ready((state, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    device = jax.devices()[0]
    device_stats = device.memory_stats() or {}
    gib = lambda n: round(n / 2**30, 3)
    result = {
        "mode": args.mode,
        "setting": (f"{args.target}" if args.mode == "scratch"
                    else f"{args.source}->{args.target}"),
        "pairs": len(transfer.pairs), "scheme": pair_scheme(args), "batch": args.batch,
        "T": args.T if args.mode == "l2t" else None,
        "remat": args.remat, "unroll": args.unroll and args.remat == "none",
        "jit_init": args.jit_init,
        "dtype": args.dtype,
        "conv_impl": convolution.resolve_impl(args.conv_impl),
        "compile_s": round(compile_seconds, 2),
        "step_s_median": round(median, 3), "step_s_min": round(min(times), 3),
        "step_s_max": round(max(times), 3), "iters": len(times),
        "images_per_s": round(args.batch / median, 2),
        "peak_rss_compile_gib": round(peak_rss_with_compile, 3),
        "rss_before_steps_gib": round(rss_before_steps, 3),
        "peak_rss_steps_gib": round(_peak_rss_gib(), 3) if peak_rss_reset else None,
        "xla_temp_gib": gib(memory.temp_size_in_bytes) if memory else None,
        "xla_argument_gib": gib(memory.argument_size_in_bytes) if memory else None,
        "peak_device_memory_gib": (gib(device_stats["peak_bytes_in_use"])
                                   if "peak_bytes_in_use" in device_stats else None),
        "xla_flops_per_iter": flops, "achieved_gflop_s": round(flops / median / 1e9, 1),
        "jax": jax.__version__, "device": device.device_kind,
        "devices": jax.device_count(), "machine": platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),   # xla_workarounds' flag included
        "final_ce": float(metrics["ce"]),
    }
    if args.peak:
        peak = matmul_peak_flops()
        result.update(matmul_peak_gflop_s=round(peak / 1e9, 1),
                      flop_floor_s=float(f"{flops / peak:.4g}"),
                      step_over_floor=float(f"{median * peak / flops:.3g}"))
    if args.phases:
        # Fresh state: the timed loop donated the one above (only its values changed).
        _, state, source_variables = build(args)
        phases = phase_seconds(transfer, state, source_variables, batches, args.warmup,
                               median)
        result["phases_s"] = {name: round(seconds, 3) for name, seconds in phases.items()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""Times the jitted L2T-ww step and prints one JSON line.

    python -m l2t_jax.bench --batch 64 --T 2 --iters 5

Default setting: the CIFAR-100 experiment's networks (ResNet-32 with 200 classes ->
VGG-9-BN with 100 classes, the 15 pairs), random inputs, and random source weights unless
``--source_checkpoint`` is given (the step's cost does not depend on them). Reports compile seconds, seconds per iteration (median, min, max over
``--iters`` after ``--warmup``), images/s, peak RSS, XLA's FLOP count of one iteration and
the achieved FLOP/s, versions and device.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp

from l2t_jax import assets, bilevel, convert, convolution, matching, models


def build(args) -> tuple:
    source = models.get_model(args.source, args.source_classes, conv_impl=args.conv_impl)
    target = models.get_model(args.target, args.num_classes, conv_impl=args.conv_impl)
    transfer = bilevel.make_transfer(source, target, matching.parse_pairs(args.pairs),
                                     inner_steps=args.T, remat=args.remat,
                                     conv_impl=args.conv_impl)
    rng = jax.random.key(args.seed)
    size = args.image_size
    state = bilevel.init_state(transfer, rng, (size, size, 3))
    if args.source_checkpoint:
        _, source_variables, _ = convert.load_converted(
            assets.resolve_source_checkpoint(args.source_checkpoint),
            expect_model=args.source, expect_num_classes=args.source_classes)
    else:
        source_variables = source.init(jax.random.fold_in(rng, 1),
                                       jnp.zeros((1, size, size, 3)), train=False)
    return transfer, state, source_variables


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m l2t_jax.bench", description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--T", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--conv_impl", default="auto", choices=convolution.CONV_IMPLS)
    parser.add_argument("--source", default="resnet32")
    parser.add_argument("--source_classes", type=int, default=200)
    parser.add_argument("--target", default="vgg9_bn")
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--pairs", default=matching.CIFAR_PAIRS)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source_checkpoint", default="",
                        help="converted source (directory or released:resnet32); default: "
                             "random weights, whose matching loss can diverge to NaN within "
                             "a few iterations (the time per iteration is the same)")
    args = parser.parse_args(argv)

    transfer, state, source_variables = build(args)
    step = bilevel.jit_train_step(transfer, lambda _: 0.1)
    keys = jax.random.split(jax.random.key(args.seed + 1), args.warmup + args.iters)
    batches = [(jax.random.normal(k, (args.batch, args.image_size, args.image_size, 3)),
                jax.random.randint(k, (args.batch,), 0, args.num_classes)) for k in keys]

    start = time.perf_counter()
    compiled = step.lower(state, source_variables, *batches[0]).compile()
    compile_seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

    times = []
    for i, (images, labels) in enumerate(batches):
        start = time.perf_counter()
        state, metrics = compiled(state, source_variables, images, labels)
        jax.block_until_ready((state, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    result = {
        "setting": f"{args.source}->{args.target}", "pairs": len(transfer.pairs),
        "batch": args.batch, "T": args.T, "remat": args.remat,
        "conv_impl": convolution.resolve_impl(args.conv_impl),
        "compile_s": round(compile_seconds, 2),
        "step_s_median": round(median, 3), "step_s_min": round(min(times), 3),
        "step_s_max": round(max(times), 3), "iters": len(times),
        "images_per_s": round(args.batch / median, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "xla_flops_per_iter": flops, "achieved_gflop_s": round(flops / median / 1e9, 1),
        "jax": jax.__version__, "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(), "machine": platform.machine(),
        "final_meta_loss": float(metrics["meta_loss"]),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

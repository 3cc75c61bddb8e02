"""XLA's cost of one training iteration of a config, from shapes alone: nothing runs.

    python -m l2t_jax.tools.step_cost cifar100 stl10 cub200 dogs mit67 stanford40

For each config (a shipped name or a file, with ``:variant``) this builds the run's networks
and transfer without weights or data, compiles the training program's bilevel step (the
program :mod:`l2t_jax.training.train` runs at every iteration that updates phi, on one
device, at the config's batch and image size) and prints one JSON line with XLA's cost
analysis of it: ``flops`` (floating-point operations of one iteration, a fact of the
program, not of the machine), ``bytes_accessed`` and ``transcendentals``.

Convolutions are counted as XLA's own (``conv_impl='native'``, what a GPU or TPU runs) unless
``--conv_impl`` says otherwise: the default ``auto`` means im2col matrix products on a CPU,
which XLA counts a little differently. Compiling a 224-px step on a CPU takes minutes.
"""
from __future__ import annotations

import argparse
import json
import time

import jax

from l2t_jax import configs
from l2t_jax.models import convolution
from l2t_jax.training import build, parallel, train
from l2t_jax.training.config import validate_config

# The class count an image folder's config infers from the folder (``data.num_classes`` 0);
# it only sizes the classifier, a negligible part of the step.
FOLDER_CLASSES = 10


def step_cost(config) -> dict:
    """XLA's cost analysis of ``config``'s compiled bilevel step (the L2T-ww iteration, or
    a baseline's step): ``{'flops', 'bytes_accessed', 'transcendentals'}`` for one
    iteration of ``config.batch_size`` images of ``config.data.image_size`` pixels, on one
    device; ``compile_s`` is the compile's wall time. The program is the one the training
    loop compiles (its own step program, state and arguments), built from shapes."""
    config = config.copy_and_resolve_references()
    if config.data.num_classes == 0:
        config.data.num_classes = FOLDER_CLASSES
    validate_config(config)
    transfer = build.build_transfer(config)
    mesh = parallel.make_mesh(jax.devices()[:1])
    held_out = train.has_meta_batch(config)
    program = train.step_program(
        transfer, build.learning_rate_schedule(config, max(config.steps_per_epoch, 1)), mesh,
        config.on_nonfinite, update_phi=True, held_out_meta=held_out)
    source = ({} if transfer.source_model is None
              else transfer.source_model.abstract_variables())
    arguments = train._step_arguments(config, train._abstract_state(config, transfer, mesh),
                                      mesh, source, held_out)
    started = time.perf_counter()
    compiled = program.lower(*arguments).compile()
    compile_seconds = time.perf_counter() - started
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost["flops"]),
            "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
            "transcendentals": float(cost.get("transcendentals", float("nan"))),
            "compile_s": round(compile_seconds, 1)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m l2t_jax.tools.step_cost",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", metavar="CONFIG",
                        help="a shipped config's name or a config file, with :variant")
    parser.add_argument("--conv_impl", default="native", choices=convolution.CONV_IMPLS,
                        help="the convolutions counted (default native: XLA's own)")
    args = parser.parse_args(argv)
    rows = []
    for spec in args.configs:
        config = configs.load(spec)
        config.conv_impl = args.conv_impl
        row = {"config": spec, "method": config.method, "T": config.T,
               "batch_size": config.batch_size, "image_size": config.data.image_size,
               "source": config.source_model, "target": config.target_model,
               **step_cost(config), "conv_impl": args.conv_impl,
               "backend": jax.default_backend(), "jax": jax.__version__}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()

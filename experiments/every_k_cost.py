"""What phi every k-th iteration costs: the two step programs of ``config.meta_update_every``
timed side by side at the offline study's setting (configs/study.py: the demo's ResNet-20
source -> VGG-9-BN, all-to-all pairs, batch 16, T = 2), and the seconds per iteration they
give for each k: (full step + (k - 1) x phi-fixed step) / k.

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
      taskset -c 0 python experiments/every_k_cost.py [--rounds 5] [--steps 20]

The programs are timed in alternating rounds in one process, so a load that changes over
the run moves both alike. Random inputs and an untrained source: time does not depend on
the values. Prints a markdown table.
"""
import argparse
import statistics
import time

import jax
import numpy as np

from l2t_jax.tools import study
from l2t_jax.training import build, parallel, train
from l2t_jax.transfer import bilevel
from l2t_jax.configs import study as study_config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per program per round")
    parser.add_argument("--every_k", default="1,2,5,10")
    args = parser.parse_args(argv)
    config = study_config.get_config()
    cell = study.Cell(config.probe_source, "l2t_ww:all_to_all", config.probe_examples_per_class,
                      0, study.cell_settings(config))
    run = study.cell_config(config, "unused", "unused", cell)
    transfer = build.build_transfer(run)
    mesh = parallel.make_mesh()
    size = run.data.image_size
    rng = jax.random.key(0)
    state = parallel.replicate(mesh, bilevel.init_state(transfer, rng, (size, size, 3),
                                                        jit=True))
    source_variables = parallel.replicate(mesh, jax.jit(lambda r: transfer.source_model.init(
        r, jax.numpy.zeros((1, size, size, 3)), train=False))(rng))
    images = np.random.default_rng(0).normal(size=(run.batch_size, size, size, 3)).astype(
        np.float32)
    labels = np.arange(run.batch_size, dtype=np.int32) % run.data.num_classes
    batch = parallel.global_batch(mesh, images, labels)
    schedule = build.learning_rate_schedule(run, 10)
    programs = {}
    for update in (True, False):
        jitted = train.step_program(transfer, schedule, mesh, update_phi=update)
        programs[update] = jitted.lower(state, source_variables, *batch).compile()
    seconds = {True: [], False: []}
    for _ in range(args.rounds):
        for update in (True, False):
            started = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = programs[update](state, source_variables, *batch)
            jax.block_until_ready(metrics)
            seconds[update].append((time.perf_counter() - started) / args.steps)
    full, fixed = (statistics.median(seconds[u]) for u in (True, False))
    print(f"full step (phi updated) {full * 1e3:.1f} ms, phi-fixed step {fixed * 1e3:.1f} ms "
          f"(medians of {args.rounds} rounds of {args.steps} steps; ratio {full / fixed:.2f})")
    print("\n| k | seconds per iteration | relative to k = 1 |\n|---|---|---|")
    for k in (int(v) for v in args.every_k.split(",")):
        per = (full + (k - 1) * fixed) / k
        print(f"| {k} | {per:.4f} | {per / full:.2f} |")


if __name__ == "__main__":
    main()

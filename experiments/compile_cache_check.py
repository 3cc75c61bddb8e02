#!/usr/bin/env python
"""Cold vs warm compile of the full-size CIFAR-100 L2T-ww step (T=2, batch 64) through the
training program's compile path with the per-user compilation cache (l2t_jax.training.compile_cache).

    python experiments/compile_cache_check.py CACHE_DIR    # twice: cold, then warm

Prints {"compile_s": lower + compile seconds, "hits": cache hits, "seconds": compile time
the hits saved (jax's estimate)}. BENCHMARKS.md, "Compiles"."""
import json, sys, time
import jax, jax.numpy as jnp
from l2t_jax.training import build, compile_cache, parallel, train
from l2t_jax.training.config import default_config
from l2t_jax.transfer import bilevel
compile_cache.enable(sys.argv[1])
config = default_config()
config.batch_size = 64
transfer = build.build_transfer(config)
mesh = parallel.make_mesh()
state = bilevel.init_state(transfer, jax.random.key(0), (32, 32, 3), jit=True)
source = transfer.source_model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
images, labels = jnp.zeros((64, 32, 32, 3)), jnp.zeros((64,), jnp.int32)
program = train.step_program(transfer, build.learning_rate_schedule(config, 390), mesh)
started = time.time()
train.compile_with_notice("training step", program, state, source, images, labels, notify=False)
print(json.dumps({"compile_s": round(time.time() - started, 1), **compile_cache.saved()}))

"""How the matmul convolution and the package's XLA flags compile on XLA:CPU.

The numbers of both convolution paths are compared on the real networks in
``test_convert.py``; these tests pin what makes the CPU step fast and deterministic.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from l2t_jax import convolution, xla_workarounds


def test_second_order_matmul_convolution_compiles_without_transposes():
    """The meta-gradient differentiates through a gradient. XLA folds the transposes of
    reverse-mode differentiation into a dot only when its operands are rank 2; a rank-4
    patch product compiles this to 4 transposes (measured), and the L2T-ww step to 353
    more than the rank-2 product, 8-15% of its time (BENCHMARKS.md)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 4)), jnp.float32)
    kernel = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 4, 8)), jnp.float32)

    def inner_loss(kernel, x):
        return jnp.sum(jnp.tanh(convolution.conv2d_matmul(x, kernel, 1, 1)) ** 2)

    def outer_loss(kernel, x):   # the loss after one differentiable SGD step, like the step's
        step = kernel - 0.1 * jax.grad(inner_loss)(kernel, x)
        return inner_loss(step, x)

    hlo = jax.jit(jax.grad(outer_loss)).lower(kernel, x).compile().as_text()
    assert hlo.count(" transpose(") == 0, [l for l in hlo.splitlines() if " transpose(" in l]


YNN_PROBE = """
import os, sys
if sys.argv[1] == "import":
    import l2t_jax
import jax, jax.numpy as jnp
hlo = jax.jit(lambda x: jnp.sum(jnp.exp(x), axis=0)).lower(jnp.ones((64, 64))).compile().as_text()
print(os.environ.get("XLA_FLAGS", ""), "|", "__ynn_fusion" in hlo)
"""


def test_import_turns_off_ynnpack_reduce_fusions():
    """``import l2t_jax`` keeps XLA:CPU from compiling reductions into YNNPACK fusions (the
    meta-gradient differed between processes with them; see ``xla_workarounds``). The
    same probe without the import shows the fusion, so the check can tell them apart."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    results = {}
    for mode in ("import", "plain"):
        out = subprocess.run([sys.executable, "-c", YNN_PROBE, mode], env=env, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[mode] = out
    flag = xla_workarounds.YNN_FUSION_SETTING
    assert results["import"] == f"{flag} | False", results
    assert results["plain"] == "| True", results
    # This test process imported l2t_jax before any computation too (conftest, then tests).
    assert flag in os.environ["XLA_FLAGS"].split()


def test_a_user_choice_of_the_flag_is_kept(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"{xla_workarounds.YNN_FUSION_FLAG}=dot")
    assert xla_workarounds.apply() is False
    assert os.environ["XLA_FLAGS"] == f"{xla_workarounds.YNN_FUSION_FLAG}=dot"

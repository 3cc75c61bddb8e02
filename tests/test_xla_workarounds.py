"""l2t_jax.models.xla_workarounds: the package's XLA flag (no YNNPACK reduce fusions on XLA:CPU)
is set by importing the networks or the training program, a user's own setting of it is
kept, and the modules without JAX do not load it."""
import os
import subprocess
import sys

from l2t_jax.models import xla_workarounds

YNN_PROBE = """
import os, sys
if sys.argv[1] == "import":
    import l2t_jax.models      # any module that builds networks
import jax, jax.numpy as jnp
hlo = jax.jit(lambda x: jnp.sum(jnp.exp(x), axis=0)).lower(jnp.ones((64, 64))).compile().as_text()
print(os.environ.get("XLA_FLAGS", ""), "|", "__ynn_fusion" in hlo)
"""


def test_import_turns_off_ynnpack_reduce_fusions():
    """Importing the networks (``l2t_jax.models``, through ``convolution``) keeps XLA:CPU from compiling reductions into YNNPACK fusions (the
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


JAX_FREE_PROBE = """
import sys
import l2t_jax, l2t_jax.configs, l2t_jax.configs.cifar100, l2t_jax.tools.tables
import l2t_jax.training.logs, l2t_jax.transfer.methods, l2t_jax.transfer.pair_lists
import l2t_jax.tools.paper, l2t_jax.tools.summaries, l2t_jax.training.workdir
print(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "optax")))
"""


def test_modules_without_jax_do_not_load_it_and_training_sets_the_flag():
    """``import l2t_jax`` and the JAX-free modules (methods, summaries, configs, ...) load no
    jax; the modules that train set the XLA flag before any backend starts."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", JAX_FREE_PROBE], env=env, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    assert out == "[]", out
    flags = subprocess.run(
        [sys.executable, "-c", "import os, l2t_jax.training.train; print(os.environ['XLA_FLAGS'])"],
        env=env, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    assert xla_workarounds.YNN_FUSION_SETTING in flags.split()

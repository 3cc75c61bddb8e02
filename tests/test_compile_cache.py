"""The per-user compilation cache (l2t_jax/training/compile_cache.py): a second process loads what
the first compiled, and says so; 'off' writes nothing."""
import json
import os
import subprocess
import sys

from helpers import REPO_ROOT

PROGRAM = """
import json, sys
if sys.argv[2:] == ["hide-filelock"]:
    sys.modules["filelock"] = None   # import filelock raises ImportError
import jax, jax.numpy as jnp
from l2t_jax.training import compile_cache
directory = compile_cache.enable(sys.argv[1])
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
f(jnp.ones((16, 16))).block_until_ready()
print(json.dumps({"directory": directory, "enabled": jax.config.jax_enable_compilation_cache,
                  **compile_cache.saved()}))
"""


def _run(argument, tmp_path, *flags):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=os.pathsep.join([REPO_ROOT, env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", PROGRAM, argument, *flags], env=env,
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_a_second_process_loads_the_program_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first = _run(str(cache), tmp_path)
    assert first["directory"] == str(cache) and first["enabled"] and first["hits"] == 0
    assert os.listdir(cache)
    second = _run(str(cache), tmp_path)
    assert second["hits"] >= 1   # (seconds saved can be < 0 for a program this small)


def test_the_cache_works_without_filelock(tmp_path):
    """jax fails every cache read and write when its size cap is set and filelock is
    missing (a bare install once lacked it): then enable() leaves the cap unset."""
    cache = tmp_path / "cache"
    _run(str(cache), tmp_path, "hide-filelock")
    assert os.listdir(cache)
    assert _run(str(cache), tmp_path, "hide-filelock")["hits"] >= 1


def test_off_writes_no_cache(tmp_path):
    result = _run("off", tmp_path)
    assert result["directory"] is None and result["enabled"] is False
    assert result["hits"] == 0

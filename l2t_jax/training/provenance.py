"""Where a result came from: package and library versions, git commit, devices.

:func:`run_metadata` is written into ``result.json`` (key ``run``) and into the first record
of ``metrics.jsonl`` of every start of a run (a resumed run adds one), so that a number can
be traced to the code and the machine that produced it.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

# Distributions whose versions decide numbers or file formats.
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> dict | None:
    """``{'commit': sha, 'dirty': bool}`` of the checkout whose ``l2t_jax/`` this package
    is, or None (a wheel or ``pip install .``, even into a venv inside a checkout; no
    git)."""
    directory = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # l2t_jax/
    try:
        top = subprocess.run(["git", "-C", directory, "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, timeout=10)
        if top.returncode != 0:
            return None
        # Only when this package's files are the checkout's own: a wheel installed under
        # some repository (a site-packages in a .venv inside it, this one's included) must
        # not report that repository's commit.
        if (os.path.realpath(os.path.join(top.stdout.strip(), "l2t_jax"))
                != os.path.realpath(directory)):
            return None
        commit = subprocess.run(["git", "-C", directory, "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(["git", "-C", directory, "status", "--porcelain",
                                 "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def run_metadata() -> dict:
    """Versions, commit and devices of this process (starts jax's backends).

    Returns:
      ``{'l2t_jax': version, 'git': {'commit', 'dirty'} or None, 'python': '3.11.7',
      'versions': {distribution: version}, 'backend': 'cpu', 'device_kind': ...,
      'device_count': global devices, 'local_device_count': ..., 'process_count': ...,
      'xla_flags': XLA_FLAGS, 'host': platform node, 'cpu': CPU model and vector ISA}``.
    """
    import jax
    import l2t_jax
    devices = jax.devices()
    return {
        "l2t_jax": l2t_jax.__version__,
        "git": git_commit(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in LIBRARIES},
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "host": platform.node(),
        "cpu": _cpu_model(),
    }


# The widest vector instruction set decides how XLA:CPU orders float sums (README, "How
# reproducible these numbers are"); the first of these the CPU has is recorded.
_VECTOR_ISAS = ("avx512f", "avx2", "avx", "sse4_2", "asimd")


def _cpu_model() -> str:
    """The CPU's model name and widest vector instruction set (Linux, e.g. ``"Intel(R)
    Xeon(R) Processor, avx512f"``), else what ``platform`` knows: results on the CPU depend
    on its instruction set."""
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                if model and flags:
                    break
    except OSError:
        pass
    isa = next((name for name in _VECTOR_ISAS if name in flags), None)
    return f"{model}, {isa}" if isa else model

"""XLA flags this package sets before the first computation, and why.

Owns one workaround: XLA:CPU's YNNPACK *reduce* fusions are turned off
(``--xla_cpu_experimental_ynn_fusion_type=-reduce`` appended to ``XLA_FLAGS``). With them
on (jaxlib 0.10.2), the second-order L2T-ww step built from rank-2 matrix products gave a
different meta-gradient from one process to the next (once 5e10 instead of 2.2e4) while
every forward value agreed; with them off it agreed in every run. Turning off only the
reduce kind keeps YNNPACK's dot and element-wise fusions, which the step's speed needs
(see BENCHMARKS.md, "What was tried").

XLA reads its flags once, when the first backend starts, so the flag must be in the
environment before that. ``import l2t_jax`` applies it; a process that ran a jax
computation before importing this package gets a warning instead. A user who sets
``xla_cpu_experimental_ynn_fusion_type`` in ``XLA_FLAGS`` keeps their own value.
"""
from __future__ import annotations

import os
import warnings

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_FUSION_VALUE = "-reduce"
YNN_FUSION_SETTING = f"{YNN_FUSION_FLAG}={YNN_FUSION_VALUE}"   # as it appears in XLA_FLAGS
# The first jaxlib with YNNPACK fusions and the flag; an older XLA aborts on unknown flags.
FIRST_JAXLIB_WITH_FLAG = (0, 8, 1)


def _jaxlib_version() -> tuple[int, ...]:
    import jaxlib.version
    return tuple(int(part) for part in jaxlib.version.__version__.split(".")[:3]
                 if part.isdigit())


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge
        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):   # private API: assume not started
        return False


def apply() -> bool:
    """Appends the YNNPACK reduce-fusion flag to ``XLA_FLAGS`` if it can still take effect.

    Returns:
      True when the flag is in ``XLA_FLAGS`` (appended now, or already there with the
      value this package wants); False when it was not applied (older jaxlib, the user
      chose another value, or a backend had already started: that case warns).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if YNN_FUSION_FLAG in flags:
        return YNN_FUSION_SETTING in flags.split()
    if _jaxlib_version() < FIRST_JAXLIB_WITH_FLAG:
        return False
    if _backends_started():
        import jax
        if jax.default_backend() != "cpu":   # the flag only concerns XLA:CPU
            return False
        warnings.warn(
            "l2t_jax was imported after jax started its backends, so XLA:CPU's YNNPACK "
            "reduce fusions stay on; on the CPU the meta-gradient may then differ between "
            "runs. Import l2t_jax before the first jax computation, or start the process "
            f"with XLA_FLAGS={YNN_FUSION_SETTING}.", RuntimeWarning,
            stacklevel=3)
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {YNN_FUSION_SETTING}".strip()
    return True

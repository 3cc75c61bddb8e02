"""l2t-jax: "Learning What and Where to Transfer" (L2T-ww, ICML 2019) in JAX/Flax.

Modules: ``models`` (networks with feature taps), ``convolution`` (native or matmul convs),
``losses`` (pure loss functions), ``matching`` (pairs and 1x1 regressors), ``meta``
(what/where meta-networks), ``bilevel`` (the jit-compiled training iteration),
``convert`` (PyTorch checkpoints to Flax), ``xla_workarounds`` (XLA flags set at import).
"""
from l2t_jax import xla_workarounds as _xla_workarounds

__version__ = "0.1.0"

# Before any jax computation: XLA reads its flags when the first backend starts.
_xla_workarounds.apply()

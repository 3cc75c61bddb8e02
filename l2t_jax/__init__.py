"""l2t-jax: "Learning What and Where to Transfer" (L2T-ww, ICML 2019) in JAX/Flax.

Importing the package does nothing but define ``__version__``: the modules that need no JAX
(``methods``, ``configs``, ``workdir``, ``logs``, the summaries) load without it. The XLA
flags this package needs (``xla_workarounds``) are set when the first module that builds a
network is imported (``convolution``, imported by ``models``), before any computation.
"""
__version__ = "0.1.0"

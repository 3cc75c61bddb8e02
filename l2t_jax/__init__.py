"""l2t-jax: "Learning What and Where to Transfer" (L2T-ww, ICML 2019) in JAX/Flax.

Modules: ``models`` (networks with feature taps), ``convolution`` (native or matmul convs),
``losses`` (pure loss functions), ``matching`` (pairs and 1x1 regressors), ``meta``
(what/where meta-networks), ``bilevel`` (the jit-compiled training iteration),
``convert`` (PyTorch checkpoints to Flax).
"""

__version__ = "0.1.0"

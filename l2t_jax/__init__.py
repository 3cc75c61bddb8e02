"""l2t-jax: "Learning What and Where to Transfer" (L2T-ww, ICML 2019) in JAX/Flax.

The package is layered; each subpackage owns one thing and imports only the layers below
it (``tests/test_layout.py`` reads every import, lazy ones included, and checks these
rules and that no import cycle exists):

==============  ==========================================================  ================
layer           owns                                                        may import
==============  ==========================================================  ================
``models``      networks, feature taps, convolutions, the model registry      (itself)
                (one record per family), PyTorch key layouts; no training,
                no files
``transfer``    the method and its baselines as pure JAX: pairs, losses,    models
                terms, the method table, meta-networks, matching heads,
                the bilevel step, theta's optimiser and schedules; no
                files, no config
``data``        sources, own image folders, official splits, augmentation,  (itself)
                grain pipelines
``configs``     the experiment configs (ml_collections)                     the JAX-free
                                                                            ``transfer.
                                                                            pair_lists``
``training``    one run from config to ``result.json``: build, the loop,   models, transfer,
                checkpoints, the workdir, devices and hosts, logs,          data, configs
                provenance, the compilation cache, released assets
``tools``       the demo, the offline study, the paper's tables and         all of the above
                numbers, summaries, pictures, benchmarks, the grid runner
entry points    ``main``, ``convert``, ``export``, ``evaluate``,            anything (``main``
                ``prepare`` (``python -m l2t_jax.NAME``)                    reaches the tools
                                                                            by name)
==============  ==========================================================  ================

Importing the package does nothing but define ``__version__``: the modules that need no JAX
(``transfer.methods``, ``configs``, ``training.workdir``, ``training.logs``, the summaries)
load without it. The XLA flags the package needs (``models.xla_workarounds``) are set when
the networks are first imported, before any computation.
"""
__version__ = "0.1.0"

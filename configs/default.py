"""Defaults of every experiment: the reference's CIFAR-100 setting (docs/semantics.md).

The config itself ships with the package: l2t_jax/configs/default.py. This file is what
`--config=configs/default.py` loads from a checkout; `--config=default` works from anywhere.
"""
from l2t_jax.configs.default import *  # noqa: F401,F403  (get_config, tiny, apply_variant, ...)

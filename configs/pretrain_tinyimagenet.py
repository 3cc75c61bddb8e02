"""Pre-train a source on TinyImageNet (the sources the paper used but did not release).

The config itself ships with the package: l2t_jax/configs/pretrain_tinyimagenet.py. This file is what
`--config=configs/pretrain_tinyimagenet.py` loads from a checkout; `--config=pretrain_tinyimagenet` works from anywhere.
"""
from l2t_jax.configs.pretrain_tinyimagenet import get_config  # noqa: F401

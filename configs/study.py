"""The offline study of the paper's claims (l2t_jax/tools/study.py): real digits, no download.

The config itself ships with the package: l2t_jax/configs/study.py. This file is what
`--config=configs/study.py` loads from a checkout; `--config=study` works from anywhere.
"""
from l2t_jax.configs.study import get_config  # noqa: F401

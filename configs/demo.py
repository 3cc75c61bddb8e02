"""The offline demo (l2t_jax/tools/demo.py): transfer between real digit tasks, no download.

The config itself ships with the package: l2t_jax/configs/demo.py. This file is what
`--config=configs/demo.py` loads from a checkout; `--config=demo` works from anywhere.
"""
from l2t_jax.configs.demo import get_config  # noqa: F401

"""Your own image folder: a converted source -> a new target (README, "Transfer to your own data").

The config itself ships with the package: l2t_jax/configs/image_folder.py. This file is what
`--config=configs/image_folder.py` loads from a checkout; `--config=image_folder` works from anywhere.
"""
from l2t_jax.configs.image_folder import get_config  # noqa: F401

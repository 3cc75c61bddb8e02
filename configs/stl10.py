"""STL-10: TinyImageNet ResNet-32 (released) -> VGG-9-BN, 15 pairs, official split.

The config itself ships with the package: l2t_jax/configs/stl10.py. This file is what
`--config=configs/stl10.py` loads from a checkout; `--config=stl10` works from anywhere.
"""
from l2t_jax.configs.stl10 import get_config  # noqa: F401

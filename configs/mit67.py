"""MIT Indoor-67: ImageNet ResNet-34 (torchvision weights) -> ResNet-18, 16 pairs, batch 64.

The config itself ships with the package: l2t_jax/configs/mit67.py. This file is what
`--config=configs/mit67.py` loads from a checkout; `--config=mit67` works from anywhere.
"""
from l2t_jax.configs.mit67 import get_config  # noqa: F401

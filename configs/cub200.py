"""CUB-200-2011: ImageNet ResNet-34 (torchvision weights) -> ResNet-18, 16 pairs, batch 64.

The config itself ships with the package: l2t_jax/configs/cub200.py. This file is what
`--config=configs/cub200.py` loads from a checkout; `--config=cub200` works from anywhere.
"""
from l2t_jax.configs.cub200 import get_config  # noqa: F401

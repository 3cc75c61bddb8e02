"""Stanford 40 Actions: ImageNet ResNet-34 (torchvision weights) -> ResNet-18, 16 pairs, batch 64.

The config itself ships with the package: l2t_jax/configs/stanford40.py. This file is what
`--config=configs/stanford40.py` loads from a checkout; `--config=stanford40` works from anywhere.
"""
from l2t_jax.configs.stanford40 import get_config  # noqa: F401

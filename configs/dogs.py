"""Stanford Dogs: ImageNet ResNet-34 (torchvision weights) -> ResNet-18, 16 pairs, batch 64.

The config itself ships with the package: l2t_jax/configs/dogs.py. This file is what
`--config=configs/dogs.py` loads from a checkout; `--config=dogs` works from anywhere.
"""
from l2t_jax.configs.dogs import get_config  # noqa: F401

"""CIFAR-100: TinyImageNet ResNet-32 (released) -> VGG-9-BN, 15 pairs, the official split.

The config itself ships with the package: l2t_jax/configs/cifar100.py. This file is what
`--config=configs/cifar100.py` loads from a checkout; `--config=cifar100` works from anywhere.
"""
from l2t_jax.configs.cifar100 import get_config  # noqa: F401

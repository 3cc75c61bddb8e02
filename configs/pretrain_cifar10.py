"""Pre-train a CIFAR-10 ResNet-32 source (the paper's third STL-10 multi-source row).

The config itself ships with the package: l2t_jax/configs/pretrain_cifar10.py. This file is what
`--config=configs/pretrain_cifar10.py` loads from a checkout; `--config=pretrain_cifar10` works from anywhere.
"""
from l2t_jax.configs.pretrain_cifar10 import get_config  # noqa: F401

"""CIFAR-100: TinyImageNet ResNet-32 (released) -> VGG-9-BN, 15 pairs, the official split.

    python -m l2t_jax.main --config=cifar100 --workdir=DIR
    python -m l2t_jax.main --config=cifar100:tiny --workdir=DIR   # smoke run

Data: ``tfds build cifar100 --file_format=array_record`` once (needs the [prepare] extra).
"""
from l2t_jax.configs import default

VARIANTS = default.VARIANTS


def get_config(variant=None):
    config = default.get_config()
    config.data.kind = "tfds"
    config.data.name = "cifar100"
    config.data.official_split = "cifar100"
    config.data.num_classes = 100
    config.batch_size = 128
    return default.apply_variant(config, variant, "cifar100")

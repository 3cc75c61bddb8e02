"""CUB-200-2011: ImageNet ResNet-34 (torchvision weights) -> ResNet-18, 16 pairs, batch 64.

Data: ``tfds build caltech_birds2011 --file_format=array_record`` once (needs the [prepare]
extra). The release's split lists index the sorted image-folder listing; records are put in
that order by their ``image/filename`` (class folder, then file). An image folder
``D/{train,test}/<class>/<image>`` works too: ``--config.data.kind=image_folder
--config.data.data_dir=D``. Train/val/test follow the release's official split
`cub200-*`.
"""
from l2t_jax.configs import default

VARIANTS = default.VARIANTS


def get_config(variant=None):
    config = default.imagenet_transfer(default.get_config(), "cub200", 200, "cub200")
    config.data.kind = "tfds"
    config.data.name = "caltech_birds2011"
    return default.apply_variant(config, variant, "cub200")

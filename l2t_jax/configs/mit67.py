"""MIT Indoor-67: ImageNet ResNet-34 (torchvision weights) -> ResNet-18, 16 pairs, batch 64.

Data: an image folder `data_dir/{train,test}/<class>/<image>` (class folders and files
sorted; set --config.data.data_dir). The release has no official split for this data set: the
configured eval split is the test folder (documented limitation, see README).
"""
from l2t_jax.configs import default


def get_config(variant=None):
    config = default.imagenet_transfer(default.get_config(), "mit67", 67, "")
    config.data.eval_splits = ("test",)
    return default.apply_variant(config, variant, "mit67")

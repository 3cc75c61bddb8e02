"""STL-10: TinyImageNet ResNet-32 (released) -> VGG-9-BN, 15 pairs, official split.

Images are resized from 96 to 32 px first, as in the reference. Data: the official binary
files converted once, in their order (the order the split lists refer to; TFDS's records
do not keep it): ``python -m l2t_jax.prepare stl10 --binary_dir stl10_binary
--output_dir DIR``, then ``--config.data.data_dir=DIR``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default  # noqa: E402


def get_config(variant=None):
    config = default.get_config()
    config.data.kind = "npz"
    config.data.name = "stl10"
    config.data.official_split = "stl10"
    config.data.num_classes = 10
    return default.apply_variant(config, variant, "stl10")

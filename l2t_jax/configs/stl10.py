"""STL-10: TinyImageNet ResNet-32 (released) -> VGG-9-BN, 15 pairs, official split.

Images are resized from 96 to 32 px first, as in the reference. Data: the official binary
files converted once, in their order (the order the split lists refer to; TFDS's records
do not keep it): ``python -m l2t_jax.prepare stl10 --binary_dir stl10_binary
--output_dir DIR``, then ``--config.data.data_dir=DIR``.

Multi-source variants (the paper's STL-10 rows) add a second source with its own pairs
(the same scheme as config.pairs), heads and meta-networks. Those sources were not
released; train them first with the pretrain configs, which write WORKDIR/source:

    python -m l2t_jax.main --config=pretrain_tinyimagenet:resnet20 \\
        --workdir=runs/pretrain/tinyimagenet-resnet20
    python -m l2t_jax.main --config=stl10:plus_resnet20 --workdir=DIR

``plus_resnet20`` (TinyImageNet ResNet-20), ``plus_resnet32`` (a second TinyImageNet
ResNet-32, another seed) and ``plus_cifar10_resnet32`` (CIFAR-10 ResNet-32) read
``runs/pretrain/<name>/source``; override with
``--config.extra_sources`` only from a config file (it is a list of dicts).
"""
import os

from l2t_jax.configs import default

# variant -> (model, classes, pretrain workdir under runs/pretrain)
SECOND_SOURCES = {
    "plus_resnet20": ("resnet20", 200, "tinyimagenet-resnet20"),
    "plus_resnet32": ("resnet32", 200, "tinyimagenet-resnet32-seed1"),
    "plus_cifar10_resnet32": ("resnet32", 10, "cifar10-resnet32"),
}
VARIANTS = (*default.VARIANTS, *SECOND_SOURCES)


def _with_second_source(model, num_classes, run):
    def add(config):
        config.extra_sources = ({"model": model, "num_classes": num_classes,
                                 "checkpoint": os.path.join("runs", "pretrain", run, "source"),
                                 "pairs": "as_primary"},)
        return config
    return add


def get_config(variant=None):
    config = default.get_config()
    config.data.kind = "npz"
    config.data.name = "stl10"
    config.data.official_split = "stl10"
    config.data.num_classes = 10
    config.pairs = "all_to_all"      # = default.CIFAR_PAIRS for ResNet-32 -> VGG-9
    return default.apply_variant(config, variant, "stl10", {
        name: _with_second_source(*spec) for name, spec in SECOND_SOURCES.items()})

"""Pre-train a CIFAR-10 ResNet-32 source (the paper's third STL-10 multi-source row).

The same recipe as configs/pretrain_tinyimagenet.py (SGD lr 0.1, x0.1 at 50% and 75% of the
epochs, batch 128, 200 epochs, cross-entropy). CIFAR-10 has no validation split (the
release has no split lists for it): ``data.val_fraction`` (10%) of every class of its
train set is held out as the val split (stratified, seeded by ``data.split_seed``), the
network trains on the rest, and the best network by val accuracy is written to
``WORKDIR/source``; CIFAR-10's test set is evaluated beside it, never used to choose.

Data, once: ``tfds build cifar10 --file_format=array_record`` (the [prepare] extra)::

    python -m l2t_jax.main --config=pretrain_cifar10 \\
        --workdir=runs/pretrain/cifar10-resnet32
"""
from l2t_jax.configs import default
from l2t_jax.configs import pretrain_tinyimagenet

VARIANTS = default.VARIANTS


def get_config(variant=None):
    config = default.get_config()
    config.data.kind = "tfds"
    config.data.name = "cifar10"
    config.data.official_split = ""
    config.data.eval_splits = ("val", "test")    # val carved from train: see above
    config = pretrain_tinyimagenet.pretrain(config, "resnet32", 10)
    return default.apply_variant(config, variant, "pretrain_cifar10")

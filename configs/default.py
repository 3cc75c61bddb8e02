"""Defaults of every experiment: the reference's CIFAR-100 setting (SPEC.md).

Experiment files import ``get_config`` and override what differs. Every key is listed here;
:func:`l2t_jax.train.validate_config` rejects unknown keys and invalid values.
"""
import ml_collections

CIFAR_PAIRS = "4-0,4-1,4-2,4-3,4-4,9-0,9-1,9-2,9-3,9-4,14-0,14-1,14-2,14-3,14-4"
IMAGENET_PAIRS = "4-4,4-3,4-2,4-1,3-4,3-3,3-2,3-1,2-4,2-3,2-2,2-1,1-4,1-3,1-2,1-1"


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Data. `kind`: "tfds" (a prepared TFDS data set), "image_folder" (root/split/class/img)
    # or "npz" (arrays `images` uint8 NHWC and `labels` per split file `<split>.npz`).
    config.data = ml_collections.ConfigDict()
    config.data.kind = "tfds"
    config.data.name = "cifar100"          # TFDS name, or a label for the other kinds
    config.data.data_dir = ""              # TFDS data_dir / image-folder root / npz directory
    config.data.official_split = "cifar100"  # name in the release's split/ files, or "" for none
    config.data.num_classes = 100
    config.data.image_size = 32            # network input; 32-px sets pad-crop-flip, else RRC
    config.data.eval_splits = ("val", "test")
    config.data.skip_corrupt = False       # image folders: skip undecodable files (logged)

    # Networks. The source checkpoint: "released:resnet32" (the authors' TinyImageNet
    # ResNet-32, found through l2t_jax.assets) or a directory written by l2t_jax.convert.
    config.source_model = "resnet32"
    config.source_num_classes = 200
    config.source_checkpoint = "released:resnet32"
    config.target_model = "vgg9_bn"
    config.model_overrides = ml_collections.ConfigDict()   # e.g. widths for tiny models
    config.conv_impl = "auto"

    # Transfer (SPEC.md defaults).
    config.pairs = CIFAR_PAIRS
    config.channel_weighting = True
    config.pair_weight_type = "relu6"
    config.pair_weight_init = 1.0
    config.beta = 0.5
    config.T = 2
    config.remat = False
    config.replay_bn_update = True

    # Optimisation: theta by SGD-momentum with a per-epoch cosine schedule, phi by Adam.
    config.batch_size = 128
    config.eval_batch_size = 256
    config.epochs = 200
    config.learning_rate = 0.1
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.meta_learning_rate = 1e-4
    config.meta_weight_decay = 1e-4
    config.steps_per_epoch = -1            # -1: len(train split) // batch_size

    # Bookkeeping.
    config.log_every_steps = 20
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 3
    return config


def imagenet_transfer(config, name, num_classes, official_split=""):
    """The 224-px experiments: torchvision ImageNet ResNet-34 -> ResNet-18, 16 pairs, batch
    64, data from an image folder ``root/{train,test}/<class>/<image>``."""
    config.data.kind = "image_folder"
    config.data.name = name
    config.data.official_split = official_split
    config.data.num_classes = num_classes
    config.data.image_size = 224
    config.source_model = "resnet34"
    config.source_num_classes = 1000
    config.source_checkpoint = "released:resnet34-imagenet"
    config.target_model = "resnet18"
    config.pairs = IMAGENET_PAIRS
    config.batch_size = 64
    return config


def apply_variant(config, variant, name):
    """``file.py:variant`` on the command line: None for the full experiment, ``tiny``."""
    if variant == "tiny":
        return tiny(config)
    if variant:
        raise ValueError(f"unknown variant {variant!r} of {name}; valid: tiny")
    return config


def tiny(config):
    """Shrinks a config to run in seconds (smoke runs and tests): tiny widths, small batch."""
    config.batch_size = 8
    config.eval_batch_size = 16
    config.epochs = 2
    config.steps_per_epoch = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.model_overrides = ml_collections.ConfigDict({
        "target": {"widths": (8, 8, 16, 16, 16) if config.target_model == "vgg9_bn"
                   else (8, 8, 16, 16)}})
    if config.data.image_size > 64:
        config.data.image_size = 64
    return config

"""Pre-train a source on TinyImageNet (the sources the paper used but did not release).

The authors' recipe: SGD lr 0.1 (momentum 0.9, weight decay 1e-4), x0.1 at 50% and 75% of
the epochs, batch 128, plain cross-entropy (``method = scratch``), at 32 px as the CIFAR /
STL-10 transfers read it. The recipe gives no epoch count; 200 as the transfer runs.
The best network (by TinyImageNet val accuracy) is written to ``WORKDIR/source`` in the
format ``config.source_checkpoint`` reads.

Data, once: ``python -m l2t_jax.prepare tinyimagenet --source_dir tiny-imagenet-200
--output_dir DIR``, then ``--config.data.data_dir=DIR``.

Variants: ``resnet20``, ``resnet32`` (seed 0), ``resnet32_seed1`` (the paper's second
ResNet-32); with ``,tiny`` for a smoke run::

    python -m l2t_jax.main --config=pretrain_tinyimagenet:resnet20 \\
        --config.data.data_dir=DIR --workdir=runs/pretrain/tinyimagenet-resnet20
"""
from l2t_jax.configs import default


def pretrain(config, model, num_classes):
    """The authors' source recipe on ``config``'s data: ``model`` trained from scratch."""
    config.method = "scratch"
    config.target_model = model
    config.data.num_classes = num_classes
    config.batch_size = 128
    config.epochs = 200
    config.learning_rate = 0.1
    config.lr_schedule = "step"
    config.lr_decay_at = (0.5, 0.75)
    config.lr_decay_factor = 0.1
    config.export_source = True
    return config


def _architecture(model, seed=0):
    def choose(config):
        config.target_model = model
        config.seed = seed
        return config
    return choose


# The architectures (with their seed), one per variant; ``tiny`` as default.apply_variant.
ARCHITECTURES = {"resnet20": _architecture("resnet20"), "resnet32": _architecture("resnet32"),
                 "resnet32_seed1": _architecture("resnet32", seed=1)}
VARIANTS = (*default.VARIANTS, *ARCHITECTURES)


def get_config(variant=None):
    config = default.get_config()
    config.data.kind = "npz"
    config.data.name = "tinyimagenet"
    config.data.official_split = ""
    config.data.eval_splits = ("val",)
    config.data.image_size = 32
    config = pretrain(config, "resnet20", 200)
    parts = (variant or "resnet20").split(",")
    if not any(p in ARCHITECTURES for p in parts):
        parts = ["resnet20"] + parts
    # The architecture first, so that ``tiny`` shrinks the chosen one.
    parts.sort(key=lambda p: p not in ARCHITECTURES)
    return default.apply_variant(config, ",".join(parts), "pretrain_tinyimagenet",
                                 ARCHITECTURES)

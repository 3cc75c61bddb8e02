"""Your own images: L2T-ww from a converted source into a new target on an image folder.

    python -m l2t_jax.main --config=image_folder --workdir=RUN --config.data.data_dir=ROOT

The folder is ``ROOT/train/<class>/<image>``, ``ROOT/test/<class>/<image>`` and optionally
``ROOT/val/<class>/<image>`` (README, "Transfer to your own data"):
- Classes are the sub-folders of ``train/``, sorted (a class's label is its rank); ``val/``
  and ``test/`` must have the same ones, and no class folder may be empty. The classes are
  recorded in the run's config.json (``data.classes``). ``data.num_classes`` is 0 here,
  inferred from the folder; when given it is checked.
- Without ``val/``, ``data.val_fraction`` (default 0.1) of every train class is held out as
  the validation split that picks the reported model, sampled with ``data.split_seed``
  (default 0), the same for every run seed.
- Images of any size and mode PIL reads; grayscale, palette and RGBA images are converted
  to RGB (one log line per split), as torchvision's ImageFolder does.

Sources. The default is the 224-px ImageNet setting of the paper's fine-grained tasks:
torchvision's ResNet-34 (``released:resnet34-imagenet``; README, "Sources") -> ResNet-18,
all-to-all pairs. The variant ``small`` is the 32-px setting of CIFAR-100: the authors'
TinyImageNet ResNet-32 (``released:resnet32``) -> VGG-9-BN. Any converted source works:
``--config.source_model=M --config.source_num_classes=K --config.source_checkpoint=DIR``
(``python -m l2t_jax.convert`` writes DIR; the model and class count are checked against
it), with ``--config.image_size`` the size it was trained at; the ``all_to_all`` scheme
pairs the candidate taps of any source and target.

The recipe is the offline study's small-data recipe (docs/study/study.md; README, "When
does L2T-ww pay off"), for about 1-25 labelled images per class: batch 16, theta's rate
0.02 per 16 images (another batch scales it linearly: ``lr_reference_batch_size``), cosine
to zero over 300 steps (30 epochs of 10 steps, whatever the folder's size), meta learning
rate 1e-2, T = 2, beta = 0.5. It was chosen on val accuracy at 32 px (the ``small``
networks' setting) over Scratch and FM, never tuned for one method. The study reports the
last epoch's test accuracy (result.json's ``test_last``), which selects nothing on val.
For a large folder use ``paper_recipe`` (the paper's: 0.1 per 64 images, 200 epochs over
the whole train split, meta learning rate 1e-4, batch 32), or set
``--config.steps_per_epoch=-1`` and epochs.
"""
from l2t_jax.configs import default


def small(config):
    """32 px: the authors' TinyImageNet ResNet-32 -> VGG-9-BN (the CIFAR-100 networks)."""
    config.data.image_size = 32
    config.source_model = "resnet32"
    config.source_num_classes = 200
    config.source_checkpoint = "released:resnet32"
    config.target_model = "vgg9_bn"
    return config


def paper_recipe(config):
    """The paper's recipe instead of the small-data one: for folders of hundreds of images
    per class and more."""
    config.batch_size = 32
    config.learning_rate = 0.1
    config.lr_reference_batch_size = 64    # the reference's 0.1 is for its batch of 64
    config.epochs = 200
    config.steps_per_epoch = -1
    config.meta_learning_rate = 1e-4
    return config


# The variants besides ``tiny`` (default.apply_variant).
_PRESETS = {"small": small, "paper_recipe": paper_recipe}
VARIANTS = (*default.VARIANTS, *_PRESETS)


def get_config(variant=None):
    config = default.imagenet_transfer(default.get_config(), "image_folder", 0)
    config.data.data_dir = ""            # --config.data.data_dir=ROOT
    config.data.eval_splits = ("val", "test")
    config.pairs = "all_to_all"
    config.eval_batch_size = 64
    # The small-data recipe (module docstring; configs/study.py found it).
    config.batch_size = 16
    config.learning_rate = 0.02
    config.lr_reference_batch_size = 16
    config.epochs = 30
    config.steps_per_epoch = 10
    config.meta_learning_rate = 1e-2
    config.T = 2
    config.beta = 0.5
    # `small` first: `tiny` shrinks the networks the variant chose.
    parts = (variant or "").split(",")
    ordered = [p for p in parts if p == "small"] + [p for p in parts if p != "small"]
    return default.apply_variant(config, ",".join(p for p in ordered if p), "image_folder",
                                 _PRESETS)

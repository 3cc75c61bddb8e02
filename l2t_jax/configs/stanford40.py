"""Stanford 40 Actions: ImageNet ResNet-34 (torchvision weights) -> ResNet-18, 16 pairs, batch 64.

    python -m l2t_jax.main --config=stanford40 --workdir=runs/stanford40 \\
        --config.data.data_dir=DIR

Data: an image folder ``DIR/{train,test}/<class>/<image>`` built from the data set's own
lists (``ImageSplits/train.txt``: 4,000 images, 100 per class; ``test.txt``: 5,532), with
no ``val/`` folder (docs/reproducing-the-paper.md has the commands).

The values the authors set for this data set, from their answer in alinlab/L2T-ww#4 (the
user who asked then reproduced the paper's 63.08%):

- **Validation.** "We used 10% of training images for validation, i.e., we used 3600
  images for training." ``data.val_fraction = 0.1`` carves a stratified 10% of every train
  class (10 of each class's 100 images; sampled with ``data.split_seed``, the same for every
  run seed and method), and the reported model is the one at the best accuracy on it:
  ``data.eval_splits = ("val", "test")``. The test folder is only ever reported, never
  used to select.
- **meta_learning_rate = 1e-3**, ten times the other experiments' 1e-4 (the user who asked
  had about 53% against the paper's 63.08%, holding out 20-25% with the code's defaults).
- **meta_weight_decay = 1e-4, beta = 0.5, T = 2**: "the same as other experiments".

Everything else is the paper's 224-px setting (``default.imagenet_transfer``): SGD 0.1 per
64 images, cosine over 200 epochs, batch 64; 3,600 // 64 = 56 steps per epoch.
"""
from l2t_jax.configs import default

# alinlab/L2T-ww#4: the authors' values for Stanford 40 Actions.
VAL_FRACTION = 0.1
META_LEARNING_RATE = 1e-3
META_WEIGHT_DECAY = 1e-4
BETA = 0.5
T = 2
VARIANTS = default.VARIANTS


def get_config(variant=None):
    config = default.imagenet_transfer(default.get_config(), "stanford40", 40, "")
    config.data.val_fraction = VAL_FRACTION
    config.data.eval_splits = ("val", "test")   # select on the carved val, report test
    config.meta_learning_rate = META_LEARNING_RATE
    config.meta_weight_decay = META_WEIGHT_DECAY
    config.beta = BETA
    config.T = T
    return default.apply_variant(config, variant, "stanford40")

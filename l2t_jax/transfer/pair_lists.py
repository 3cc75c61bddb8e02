"""The authors' default pair lists and the names of the matching schemes, as plain data.

Nothing here imports JAX: the configs read these lists (``config.pairs``), and
:mod:`l2t_jax.transfer.pairs` resolves them against the networks' taps.
"""

# The authors' all-to-all lists: ResNet-32 block outputs 4, 9, 14 x VGG-9 stages 0-4 (the
# CIFAR-100 and STL-10 experiments), and ResNet-34 x ResNet-18 stages 1-4 (the 224-px ones).
CIFAR_PAIRS = "4-0,4-1,4-2,4-3,4-4,9-0,9-1,9-2,9-3,9-4,14-0,14-1,14-2,14-3,14-4"
IMAGENET_PAIRS = "4-4,4-3,4-2,4-1,3-4,3-3,3-2,3-1,2-4,2-3,2-2,2-1,1-4,1-3,1-2,1-1"

# The matching schemes a config may name instead of a list (l2t_jax.transfer.pairs).
SCHEMES = ("single", "one_to_one", "all_to_all")

"""The offline demo (l2t_jax/tools/demo.py): transfer between real digit tasks, no download.

    python -m l2t_jax.main --config=demo --workdir=/tmp/l2t-demo
    python -m l2t_jax.main --config=demo:smallest --workdir=DIR   # CI
    python -m l2t_jax.main --config=demo:quick --workdir=DIR      # the notebook
    python -m l2t_jax.main --config=demo:all_methods --workdir=DIR  # every method

A ResNet-20 learns digits 0-4 (the study's ``demo_resnet20`` source, pre-trained in
``DIR/sources``); a VGG-9-BN then learns digits 5-9 from 5 labelled images per class. The
grid: ``methods`` (Scratch, FM one-to-one and all-to-all, L2T-w one-to-one, L2T-ww
all-to-all) x ``examples_per_class`` x ``seeds``, each run in
``DIR/runs/<method-scheme>/epc<k>/seed<s>``, skipped when finished. This is one column of
the offline study (configs/study.py, docs/study/study.md), its setting with the clearest
effects, with the study's small-data recipe. ``shard``, ``only`` and ``dry_run`` choose
the runs a process makes, as in the study; a process that made every run writes
results.md/csv and the pictures into DIR.
"""
import ml_collections

from l2t_jax.configs import study

VARIANTS = ("smallest", "quick", "all_methods")


def get_config(variant=None):
    recipe = study.get_config()
    config = ml_collections.ConfigDict()
    config.program = "demo"
    config.variant = variant or ""        # the preset; the runs' commands name it
    # Which runs this process makes (configs/study.py, l2t_jax/tools/runner.py).
    config.shard = ""
    config.only = ""
    config.dry_run = False
    config.methods = ("scratch", "fm:one_to_one", "fm:all_to_all", "l2t_w:one_to_one",
                      "l2t_ww:all_to_all")
    config.examples_per_class = (recipe.probe_examples_per_class,)
    config.seeds = tuple(recipe.seeds)
    config.split_seed = recipe.split_seed  # the fixed val/test split and the source's seed
    config.image_size = recipe.image_size  # 8x8 digits up-sampled (VGG-9 needs >= 32 px)
    config.crop_padding = recipe.crop_padding
    # Networks: the paper's families at small widths (the study's demo source and target).
    # The source: a name of source_specs (released_resnet32 needs L2T_RELEASE_DIR).
    config.source = "demo_resnet20"
    config.source_specs = recipe.source_specs
    config.target_model = recipe.target_model
    config.target_widths = tuple(recipe.target_widths)
    config.conv_impl = recipe.conv_impl
    config.source_batch_size = recipe.source_batch_size
    config.source_epochs = recipe.source_epochs
    # Target runs: the study's recipe (fixed steps, so every budget sees the same number of
    # updates; meta learning rate 1e-2: the study's one-seed sensitivity check found no
    # setting of it or T better, docs/study/study.md).
    for key in ("batch_size", "epochs", "steps_per_epoch", "learning_rate",
                "meta_learning_rate", "T", "beta", "meta_val_per_class"):
        config[key] = recipe[key]
    if variant == "smallest":
        # Every part of the pipeline, at the least cost (CI runs it in the notebook): one
        # budget, two seeds (a mean and a std), a source of one epoch, and T = 1 (each
        # simulated step adds about a quarter to L2T-ww's compilation, most of this run).
        config.methods = ("scratch", "fm:one_to_one", "l2t_ww:all_to_all")
        config.seeds = (0, 1)
        config.source_epochs = 1
        config.epochs = 2
        config.steps_per_epoch = 3
        config.T = 1
        config.conv_impl = "native"    # as study:smoke's (configs/study.py: why)
    elif variant == "quick":
        # A result that means something in a few minutes (the Colab notebook's default):
        # the full recipe and source, three methods, two seeds.
        config.methods = ("scratch", "fm:one_to_one", "l2t_ww:all_to_all")
        config.seeds = (0, 1)
    elif variant == "all_methods":
        # Every row of the paper's table on the demo's target, then the two later methods
        # that learn where to transfer with an attention trained with the target (AFD,
        # SemCKD), over L2T-ww's all-to-all pairs.
        config.methods = ("scratch", "lwf", "at:one_to_one", "lwf_at:one_to_one",
                          "fm:single", "fm:one_to_one", "l2t_w:single", "l2t_w:one_to_one",
                          "l2t_ww:all_to_all", "afd:all_to_all", "semckd:all_to_all")
        config.examples_per_class = (10,)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of demo; valid: {', '.join(VARIANTS)}")
    return config

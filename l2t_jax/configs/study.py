"""The offline study of the paper's claims (l2t_jax/tools/study.py): real digits, no download.

    python -m l2t_jax.main --config=study --workdir=runs/study          # every grid
    python -m l2t_jax.main --config=study:smoke --workdir=DIR           # CI: the runner
    L2T_RELEASE_DIR=DIR  (the authors' released files: the released ResNet-32 source)

The digits tasks (l2t_jax/tools/digits.py): digits 0-4 pre-train the demo's ResNet-20
source, a VGG-9-BN learns digits 5-9 from k labelled images per class. Every run shares one
recipe (batch, steps, theta's and phi's rates, T, beta) and changes what its grid varies:

- ``recipe``: Scratch and FM at ``recipe_examples_per_class`` over theta's learning rates
  ``recipe_learning_rates``, seeds ``recipe_seeds`` (how ``learning_rate`` was chosen, on
  val accuracy, before any L2T-ww run);
- ``main``: ``sources`` (the demo's own, and the authors' released TinyImageNet ResNet-32)
  x ``methods`` x label budgets (``examples_per_class``, or a source's own) x ``seeds``
  (a seed draws the labelled subset, the same for every method, so methods are paired);
- ``meta_batch``: L2T-ww with the meta loss on held-out labelled images against the
  paper's same batch, at ``meta_batch_examples_per_class``;
- ``every_k``: L2T-ww with phi updated every k-th iteration, k in ``every_k``;
- ``sensitivity``: L2T-ww over ``sensitivity_meta_learning_rates`` x ``sensitivity_T``;
- ``meta_screen``: L2T-ww (all-to-all) with each meta objective of ``screen_objectives``
  (:data:`META_OBJECTIVES`: which meta loss, how phi is scheduled) x
  ``screen_meta_learning_rates`` x ``screen_examples_per_class`` x ``screen_seeds`` (seeds
  outside the main grid's), on ``probe_source``: each objective's meta learning rate is
  chosen on the last epoch's val accuracy, never on test;
- ``meta_objective``: L2T-ww (all-to-all) with each objective of
  ``meta_objective_learning_rates`` (name -> the meta learning rate its screen chose) on
  the main grid's sources x budgets x seeds, paired with the main grid's runs.

``meta_batch``, ``every_k`` and ``sensitivity`` use the probe: L2T-ww (all-to-all) with
``probe_source`` at ``probe_examples_per_class``. ``grids`` picks what runs; every grid's
runs live under ``DIR/runs`` (a run two grids share is made once) and are skipped when
finished, so the study resumes. Which runs a process makes: ``shard='i/n'`` every n-th
from the i-th (one process per core), ``only=<run directory>`` one run, ``dry_run=True``
none (it prints their commands). A process that made every run writes the report
(``DIR/report``: study.md, CSVs, pictures).
"""
import ml_collections

SOURCES = {
    # name -> (model, classes, widths or () for the model's own, checkpoint or "" to train,
    #          label budgets or () for config.examples_per_class)
    "demo_resnet20": ("resnet20", 5, (8, 16, 32), "", ()),
    "released_resnet32": ("resnet32", 200, (), "released:resnet32", ()),
}
VARIANTS = ("smoke",)

# L2T-ww's meta objectives beyond the paper's (configs/default.py: the keys): name -> the
# run-config settings that make it (config.meta_objectives). "same" is the paper's.
META_OBJECTIVES = {
    "same": {},
    # The meta loss on val labels moved out of val (meta_val_per_class per class).
    "val": {"meta_loss_batch": "val"},
    # The same, phi stepping on the mean of 8 meta-gradients (their per-batch direction
    # is noisy: pairwise cosine 0.05-0.35 on one batch of 16 val images).
    "val_mean8": {"meta_loss_batch": "val", "meta_gradient_batches": 8},
    # The same-batch loss over temperature 4 (3-5x its gradient once the batch is fitted).
    "temperature4": {"meta_temperature": 4.0},
    # Another view of the batch's own images: no labels beyond the budget.
    "augment": {"meta_loss_batch": "augment"},
    # The same-batch loss, phi fixed after the first 30% of the steps (its gradient has
    # fallen 40-250x by then): the real step alone at a third of the cost.
    "freeze": {"meta_freeze_after": 0.3},
}


def get_config(variant=None):
    config = ml_collections.ConfigDict()
    config.program = "study"
    config.variant = variant or ""        # the preset; the runs' commands name it
    config.grids = ("recipe", "main", "meta_batch", "every_k", "sensitivity", "meta_screen",
                    "meta_objective")
    # Which runs this process makes (l2t_jax/tools/runner.py): "i/n" runs i, i+n, ...;
    # a run's directory under DIR/runs; True: print the unfinished runs' commands only.
    config.shard = ""
    config.only = ""
    config.dry_run = False
    config.split_seed = 0                 # the fixed val/test split and the demo source's seed
    config.image_size = 32
    config.crop_padding = 4
    config.sources = tuple(SOURCES)
    config.source_specs = ml_collections.ConfigDict(
        {name: {"model": m, "num_classes": c, "widths": w, "checkpoint": ck,
                "examples_per_class": k}
         for name, (m, c, w, ck, k) in SOURCES.items()})
    config.source_epochs = 8              # the demo source's pre-training
    config.source_batch_size = 64
    config.target_model = "vgg9_bn"
    config.target_widths = (16, 16, 32, 32, 32)
    config.conv_impl = "auto"             # every run's (configs/default.py)
    # The main grid.
    # Scratch; FM over one-to-one and over all-to-all pairs; the three methods that learn
    # where to transfer over the all-to-all pairs: L2T-ww (a meta-gradient through unrolled
    # steps), AFD and SemCKD (an attention trained jointly with the target).
    config.methods = ("scratch", "fm:one_to_one", "fm:all_to_all", "l2t_ww:all_to_all",
                      "afd:all_to_all", "semckd:all_to_all")
    config.examples_per_class = (1, 2, 5, 10, 25)
    config.seeds = (0, 1, 2, 3, 4)
    # The shared recipe (every method; the `recipe` grid chose learning_rate).
    config.batch_size = 16
    config.steps_per_epoch = 10
    # 300 steps; cosine to zero, no warm-up. Chosen on val accuracy at the last epoch
    # (Scratch and FM at 2 and 10 per class, subsets 0-4, experiments/recipe_noise.py):
    # 87.7% against 86.0% at 150 steps (and 87.1-87.4% at theta's rate 0.01), with a
    # training-seed std of val of 2.1 points against 3.5 at 150 steps.
    config.epochs = 30
    # 0.02: the best mean val accuracy of the recipe grid (Scratch and FM at 1 and 25 per
    # class, seeds 0-1: 83.6% against 81.5% at 0.05 and 80.4% at 0.1; docs/study/study.md).
    config.learning_rate = 0.02
    config.meta_learning_rate = 1e-2
    config.T = 2
    config.beta = 0.5
    # Of the target's 25 val images per class, this many move to the meta split in every
    # run (the same images: data.split_seed), so every method selects its model on, and
    # reports val accuracy of, the other 10; only meta_loss_batch='val' trains on them
    # (configs/default.py, data.meta_val_per_class).
    config.meta_val_per_class = 15
    # The recipe search: Scratch and FM only, two budgets, two seeds (main grid's seeds).
    config.recipe_methods = ("scratch", "fm:one_to_one")
    config.recipe_examples_per_class = (1, 25)
    config.recipe_learning_rates = (0.02, 0.05, 0.1)   # the recipe cells' own rates
    config.recipe_seeds = (0, 1)
    # The other grids vary L2T-ww (all-to-all) with the demo's source at one budget.
    config.probe_source = "demo_resnet20"
    config.probe_examples_per_class = 5
    config.sensitivity_meta_learning_rates = (1e-4, 1e-3, 1e-2)
    config.sensitivity_T = (1, 2, 5)
    config.sensitivity_seeds = (0,)        # one seed: a screen, not a comparison
    config.every_k = (1, 2, 5, 10)
    # Held-out meta loss: m of the k labelled images per class score the adapted
    # parameters instead of the training batch (at budgets where k - m >= 1 remain).
    config.meta_batch_examples_per_class = (2, 5, 10)
    config.meta_held_out_fraction = 0.2   # m = max(1, round(fraction * k))
    # The meta objectives' screen (META_OBJECTIVES): the meta learning rate of each, on
    # the probe's source, at seeds outside the main grid's (their subsets are others).
    config.meta_objectives = ml_collections.ConfigDict(META_OBJECTIVES)
    config.screen_objectives = tuple(META_OBJECTIVES)
    config.screen_meta_learning_rates = (1e-3, 3e-3, 1e-2)
    config.screen_examples_per_class = (2, 10)
    config.screen_seeds = (100, 101)
    # The objectives the main grid's budgets and seeds run, each at the meta learning rate
    # its screen chose (the best mean last-epoch val accuracy over its budgets and seeds).
    # The screen (seed 100; docs/study/study.md) put "val_mean8" (86.0 at its best rate) and
    # "augment" (87.0) below the paper's "same" (92.0 at 3e-3), so they are not run here.
    config.meta_objective_learning_rates = ml_collections.ConfigDict(
        {"same": 3e-3, "val": 1e-2, "temperature4": 3e-3, "freeze": 3e-3})
    if variant == "smoke":
        # Every grid and the report at the least cost (CI): tiny runs, one source.
        config.sources = ("demo_resnet20",)
        config.source_epochs = 1
        config.methods = ("scratch", "l2t_ww:all_to_all")
        config.examples_per_class = (2,)
        config.seeds = (0, 1)
        # demo:smallest's run length and T: its runs and these share compiled programs (the
        # schedule is part of the step program), which the tests' compilation cache uses.
        config.epochs = 2
        config.steps_per_epoch = 3
        config.T = 1
        # XLA's native convolutions compile in about 60% of the CPU default's time, and
        # compiling is most of this variant's time (the full study keeps "auto").
        config.conv_impl = "native"
        config.recipe_methods = ("scratch",)
        config.recipe_examples_per_class = (2,)
        config.recipe_learning_rates = (0.02, 0.05)
        config.recipe_seeds = (0,)
        config.probe_examples_per_class = 2
        config.sensitivity_meta_learning_rates = (1e-2,)
        config.sensitivity_T = (1,)
        config.sensitivity_seeds = (0, 1)
        config.every_k = (1, 2)
        config.meta_batch_examples_per_class = (2,)
        config.screen_objectives = ("same", "val")
        config.screen_meta_learning_rates = (1e-2,)
        config.screen_examples_per_class = (2,)
        config.screen_seeds = (100,)
        config.meta_objective_learning_rates = ml_collections.ConfigDict({"val": 1e-2})
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of study; valid: smoke")
    return config

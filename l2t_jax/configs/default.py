"""Defaults of every experiment: the reference's CIFAR-100 setting (docs/semantics.md).

Experiment files import ``get_config`` and override what differs. Every key is listed here;
:func:`l2t_jax.training.config.validate_config` rejects unknown keys and invalid values.
"""
import ml_collections

from l2t_jax.transfer.pair_lists import CIFAR_PAIRS, IMAGENET_PAIRS  # the reference's defaults

# The variants every experiment file takes (:func:`apply_variant`): ``tiny``, a smoke-run size.
VARIANTS = ("tiny",)


def get_config(variant=None):
    """Every key with the reference's CIFAR-100 defaults; ``variant`` as in the experiment
    files (``tiny``)."""
    if variant:
        return apply_variant(get_config(), variant, "default")
    config = ml_collections.ConfigDict()
    config.seed = 0
    # scratch | lwf | at | lwf_at | fm | l2t_w | l2t_ww | afd | semckd
    # (l2t_jax/transfer/methods.py: what each adds to CE, and where its hyperparameters
    # come from).
    config.method = "l2t_ww"

    # Data. `kind`: "tfds" (a prepared TFDS data set), "image_folder" (root/split/class/img)
    # or "npz" (arrays `images` uint8 NHWC and `labels` per split file `<split>.npz`).
    config.data = ml_collections.ConfigDict()
    config.data.kind = "tfds"
    config.data.name = "cifar100"          # TFDS name, or a label for the other kinds
    config.data.data_dir = ""              # TFDS data_dir / image-folder root / npz directory
    config.data.official_split = "cifar100"  # name in the release's split/ files, or "" for none
    config.data.num_classes = 100          # own image folders: 0 infers it from train/
    # Class names in label order. Own image folders (kind image_folder, no official split)
    # fill it from train/'s sub-folders (sorted), and check it when it is given.
    config.data.classes = ()
    # Data without an official split and without a val split of their own (an image folder
    # without val/, npz without val.npz, a TFDS set without "val" or "validation"), when
    # eval_splits names "val": this fraction of every train class is held out as the val
    # split (stratified), sampled with split_seed, not the run's seed, so runs of every
    # seed and method select their models on the same images.
    config.data.val_fraction = 0.1
    config.data.split_seed = 0
    config.data.image_size = 32            # network input; 32-px sets pad-crop-flip, else RRC
    config.data.eval_splits = ("val", "test")
    config.data.skip_corrupt = False       # image folders: skip undecodable files (logged)
    config.data.hflip = True               # random horizontal flips in training
    config.data.crop_padding = 4           # <= 64 px: zero-pad then random crop
    # The input pipeline (l2t_jax/data/, step_batches): threads reading and augmenting
    # examples (-1: one per CPU core, at most 16; 0: one background thread does it all),
    # and batches read ahead of the step. Neither changes a number.
    config.data.read_threads = -1
    config.data.prefetch_batches = 2
    # Limited data: keep this many examples of each class of the train split (sampled
    # with the seed); 0 keeps all.
    config.data.train_examples_per_class = 0
    # With meta_loss_batch="held_out": images per class moved from the train split (after
    # train_examples_per_class) to the meta loss's own split, sampled with the seed.
    config.data.meta_held_out_per_class = 0
    # Images per class moved out of the val split (sampled with split_seed, not the run's
    # seed), for every method when > 0: every run of the data selects its model on (and
    # reports val on) the same remaining val images. Only meta_loss_batch="val" reads the
    # moved images: they are the meta loss's batches (labels that train phi, never theta).
    config.data.meta_val_per_class = 0

    # Networks. The source checkpoint: "released:resnet32" (the authors' TinyImageNet
    # ResNet-32, found through l2t_jax.training.assets) or a directory written by l2t_jax.convert.
    config.source_model = "resnet32"
    config.source_num_classes = 200
    config.source_checkpoint = "released:resnet32"
    config.target_model = "vgg9_bn"
    config.model_overrides = ml_collections.ConfigDict()   # e.g. widths for tiny models
    # A model is a registry name (l2t_jax/models/registry.py) or an import path package.module:Class
    # of any Linen classifier (README, "Your own model"). Taps (l2t_jax/models/taps.py): the
    # submodules or sown values whose outputs are matched, comma-separated in index order;
    # "" takes the model's own (default_taps()). Candidates: the taps the matching schemes
    # pick from; "" takes the model's own, or every tap when the taps are named here.
    config.source_taps = ""
    config.source_candidates = ""
    config.target_taps = ""
    config.target_candidates = ""
    config.conv_impl = "auto"
    # Multi-source: more frozen sources, each a dict with keys model, num_classes,
    # checkpoint, pairs (indices into that source's own taps, a scheme, or "as_primary" for
    # config.pairs) and optionally model_overrides, taps, candidates. Each gets its own heads and meta-networks; the losses add up.
    config.extra_sources = ()

    # Transfer (docs/semantics.md defaults). `pairs`: an explicit "source-target" list or a scheme,
    # single | one_to_one | all_to_all (l2t_jax/transfer/pairing.py). CIFAR_PAIRS is all_to_all.
    config.pairs = CIFAR_PAIRS
    config.channel_weighting = True
    config.pair_weight_type = "relu6"
    config.pair_weight_init = 1.0
    config.beta = 0.5
    config.T = 2
    # Memory/speed of the T simulated steps (BENCHMARKS.md): remat none | dots | full
    # (jax.checkpoint policy of each simulated step: full keeps memory flat in T);
    # unroll_inner unrolls their scan (14% faster at T = 2 on CPU; compile time grows with
    # T), unless remat is on: remat only saves memory inside the loop.
    config.remat = "none"
    config.unroll_inner = True
    config.replay_bn_update = True
    # Initialise the networks in one compiled program, freed afterwards (bilevel.init_state):
    # about 0.4 GiB less resident memory while training the CIFAR networks, for one more
    # compilation at start-up (BENCHMARKS.md, "Time and memory against T"). Off by default:
    # a process that initialises many networks (the tests) shares op-by-op executables.
    config.jit_init = False
    # Baselines (l2t_jax/transfer/methods.py): AT weight (Zagoruyko & Komodakis' beta / 2), LwF's
    # weight and temperature (Li & Hoiem).
    config.at_weight = 500.0
    config.lwf_weight = 1.0
    config.lwf_temperature = 2.0
    # AFD (l2t_jax/transfer/afd.py; clovaai/attention-feature-distillation @ dd990d0b): the
    # weight of its loss (main.py:40, --beta 200) and the width of its queries, keys and
    # positional terms (main.py:41, --qk_dim 128).
    config.afd_weight = 200.0
    config.afd_qk_dim = 128
    # SemCKD (l2t_jax/transfer/semckd.py; DefangChen/SemCKD @ ebe5db19): the weight of its
    # loss (-b 400 for CIFAR-100, scripts/run_cifar_distill.sh:25 and README; 50 for
    # ImageNet) and the embedding width as a divisor of the batch (models/util.py:57,
    # factor 4: batch_size // 4; the batch is config.batch_size, the global batch).
    config.semckd_weight = 400.0
    config.semckd_factor = 4

    # Optimisation: theta by SGD-momentum with a per-epoch schedule, phi by Adam.
    # lr_schedule: "cosine" (the reference's) or "step" (x lr_decay_factor at each fraction
    # of the epochs in lr_decay_at, the authors' source pre-training recipe).
    config.batch_size = 128
    config.eval_batch_size = 256
    config.epochs = 200
    # theta's learning rate for a batch of lr_reference_batch_size examples: another batch
    # size scales it linearly (Goyal et al. 2017, as the Flax examples do), the rate used
    # being learning_rate * batch_size / lr_reference_batch_size (logged at the start and
    # in result.json). The paper's configs give the rate of their own batch, so their rates
    # are exactly the paper's; 0 uses learning_rate as given, whatever the batch.
    config.learning_rate = 0.1
    config.lr_reference_batch_size = 128
    config.lr_schedule = "cosine"
    config.lr_decay_at = (0.5, 0.75)
    config.lr_decay_factor = 0.1
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.meta_learning_rate = 1e-4
    # Cheaper meta-steps (not in the paper): update phi only at every k-th iteration
    # (0, k, 2k, ...); the others take the real step alone, with phi's weights but phi fixed,
    # at a fraction of the cost (a second compiled program). 1 is the paper's rule.
    config.meta_update_every = 1
    # What the meta loss scores (not in the paper beyond "same"): "same", the paper's CE of
    # the adapted parameters on the iteration's own batch; "held_out", CE on a batch of
    # data.meta_held_out_per_class images per class kept out of the train split (the
    # validation-style bilevel scheme), which keeps a signal once the target fits its
    # training images. The held-out images are taken from the labelled budget. "val", CE
    # on a batch of the data.meta_val_per_class images per class moved out of the val
    # split: the validation labels the run already has train phi (as learning to reweight
    # scores its weights on a clean validation set), theta never sees them, and model
    # selection uses the rest of val.
    # "augment" (no labels beyond the budget), CE on another view of the iteration's own
    # images: the same images and labels, augmented with another random stream.
    config.meta_loss_batch = "same"
    # Beyond the paper, each 1 or 1.0 there (l2t_jax/transfer/bilevel.py, Transfer): phi
    # takes one Adam step on the mean of every meta_gradient_batches meta-gradients (fixed
    # in between); the meta loss is CE of the adapted logits over meta_temperature.
    config.meta_gradient_batches = 1
    config.meta_temperature = 1.0
    # phi's schedule, beyond the paper (1.0 and 0 are its rule): phi is fixed (the real
    # step alone, as between meta_update_every's updates) from iteration
    # meta_freeze_after * the run's steps on, and for its first meta_warmup_steps
    # iterations.
    config.meta_freeze_after = 1.0
    config.meta_warmup_steps = 0
    config.meta_weight_decay = 1e-4
    config.steps_per_epoch = -1            # -1: len(train split) // batch_size

    # Bookkeeping.
    config.log_every_steps = 20
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 3
    # Also write the best target as a source checkpoint (workdir/source), in the format
    # config.source_checkpoint reads: how configs/pretrain_*.py make sources.
    config.export_source = False
    # A non-finite loss, meta-gradient or parameter: "stop" (raise, naming the step and the
    # quantity; checkpoints only ever hold finite parameters) or "skip" (that batch's update
    # is dropped inside the step; metrics train/skipped and result.json skipped_steps count
    # them). May change when a run is resumed.
    config.on_nonfinite = "stop"
    # SIGTERM or Ctrl-C stops the run at the next step boundary with a checkpoint (exit
    # status 143 or 130). An epoch-end evaluation in progress may go on for this many
    # seconds after the signal; past it, it is abandoned and runs again on resume. 0 (the
    # default) keeps the whole grace period of a preemption notice for the save. One
    # process only: several always finish their evaluation.
    config.preemption_grace_s = 0.0
    # Several processes (jax.distributed, l2t_jax/training/parallel.py), in whole seconds (jax's
    # defaults): how long to wait for the coordinator and every process at the start (and
    # for every process to have compiled the step); after how long without a heartbeat a
    # process counts as dead (the others then stop, naming it); how long a finishing process
    # waits for the others.
    config.distributed_init_timeout_s = 300
    config.distributed_heartbeat_timeout_s = 100
    config.distributed_shutdown_timeout_s = 300
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
    config.lr_reference_batch_size = 64    # the reference's 0.1 is for its batch of 64
    return config


def apply_variant(config, variant, name, extra_variants=None):
    """``file.py:variant`` on the command line: None for the full experiment, ``tiny``, or a
    variant of ``extra_variants`` (name -> function(config)); several join with commas, e.g.
    ``stl10.py:plus_resnet20,tiny``."""
    extra_variants = extra_variants or {}
    for part in (variant or "").split(","):
        if part == "tiny":
            config = tiny(config)
        elif part in extra_variants:
            config = extra_variants[part](config)
        elif part:
            raise ValueError(f"unknown variant {part!r} of {name}; valid: "
                             f"{', '.join([*VARIANTS, *extra_variants])}")
    return config


def tiny(config):
    """Shrinks a config to run in seconds (smoke runs and tests): the target network's
    registry ``NAME:tiny`` variant (a few channels per layer, l2t_jax/models/registry.py),
    small batches, two epochs of two steps. The source keeps its checkpoint's network; a
    target named by import path (``package.module:Class``) keeps its own size."""
    config.batch_size = 8
    config.eval_batch_size = 16
    config.epochs = 2
    config.steps_per_epoch = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    if ":" not in config.target_model:       # a registry name, not an import path
        config.target_model += ":tiny"
    config.model_overrides = ml_collections.ConfigDict({"target": {}})
    if config.data.image_size > 64:
        config.data.image_size = 64
    return config

"""What several test files share, other than fixtures (those are in conftest.py): where the
checkout and the authors' release are, small input batches and the PyTorch BN set-up of the
conversion tests, the tiny training setup (small npz data, a tiny converted source, a
config, reading a run's checkpoints back, the command line), and fake finished workdirs.

No module-level import of jax or the training code: the JAX-free tests (summaries, grid,
plots, paper) import this module too. The helpers that need jax import it themselves.
"""
import importlib.util
import json
import math
import os
import random
import socket
import subprocess
import sys

import numpy as np

# -------------------------------------------------------------------- the checkout, assets
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CI and developers keep the release beside the checkout (../shared/assets/...); elsewhere
# point L2T_RELEASE_DIR at a copy (see README, "Assets").
RELEASE_DIR = os.environ.get(
    "L2T_RELEASE_DIR", os.path.join(REPO_ROOT, "..", "shared", "assets", "l2t-ww-release"))
RESNET32_SHA256 = "049f81f8bea8504e90818d6c614f15c485ac2d891348330b433110e161f66d68"

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


# --------------------------------------------------------- input batches, PyTorch networks
def normalized_images(batch, size, seed=0, dtype=np.float32):
    """NHWC images uniform in [0, 1], normalised with the reference's mean/std."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(batch, size, size, 3))
    return ((images - IMAGENET_MEAN) / IMAGENET_STD).astype(dtype)


def nchw(array):
    return np.ascontiguousarray(np.transpose(np.asarray(array), (0, 3, 1, 2)))


def randomize_bn_statistics(torch_model, seed=0):
    """Gives every BN layer non-trivial affine parameters and running statistics, so that
    a conversion that dropped or swapped them would show."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in torch_model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                shape = module.running_mean.shape
                module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
                module.weight.copy_(1.0 + 0.1 * torch.randn(shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(shape, generator=generator))


def calibrate_bn_statistics(torch_model, images_nchw, extra_variance=0.0):
    """Sets every BN's running statistics to those of one batch (as a trained network's
    would roughly be), so that deep random networks keep activations of order one.

    ``extra_variance`` is then added to every running variance: a random network has
    nearly constant channels whose calibrated variance is tiny, and dividing by it
    amplifies rounding enough that PyTorch's own float32 forward of a tiny-width ResNet-50
    is 2e-4 away from its float64 one; 0.1 brings that to 1e-5."""
    import torch
    bns = [m for m in torch_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None          # cumulative average: after one batch, the batch's stats
    with torch.no_grad():
        torch_model.train()(torch.as_tensor(images_nchw))
    for bn in bns:
        bn.momentum = 0.1
        with torch.no_grad():
            bn.running_var.add_(extra_variance)
    torch_model.eval()


# ------------------------------------------------------------------ the tiny training setup
# The registry's tiny variants (models.registry: NAME:tiny), the networks of every tiny run.
SOURCE_MODEL = "resnet20:tiny"     # taps 0..8, candidates 2, 5, 8
TARGET_MODEL = "vgg9_bn:tiny"      # taps 0..4
# XLA's native convolutions for the tiny networks: their step compiles in about 60% of the
# time of the CPU default's im2col matmuls (11 s against 18 s at T = 1), and compiling is
# most of these tests' time. The default path is checked against PyTorch to second order by
# the parity test (float64, full size; its second run checks the native one), and trains
# through the program in test_train's cifar100:tiny runs.
TINY_CONV_IMPL = "native"


def write_npz_splits(directory, sizes=(("train", 40), ("val", 12), ("test", 12)), seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    for split, n in sizes:
        np.savez(os.path.join(directory, f"{split}.npz"),
                 images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 labels=rng.integers(0, 3, n))


def tiny_networks():
    """tiny_config's networks, built directly (the tests of the step itself): (source
    ResNet-20:tiny, 5 classes; target VGG-9-BN:tiny, 3 classes). The transfer needs no
    conv_impl of its own: its 1x1 matching heads are always dots."""
    from l2t_jax import models
    return (models.get_model(SOURCE_MODEL, 5, conv_impl=TINY_CONV_IMPL),
            models.get_model(TARGET_MODEL, 3, conv_impl=TINY_CONV_IMPL))


def write_tiny_source(directory):
    import jax
    import jax.numpy as jnp

    from l2t_jax import models
    from l2t_jax.training import converted
    model = models.get_model(SOURCE_MODEL, 5)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    converted.save_converted(directory, variables, {"model": SOURCE_MODEL, "num_classes": 5})


def tiny_config(data_dir, source_dir, **overrides):
    import ml_collections

    from l2t_jax.training.config import default_config
    config = default_config()
    config.data.kind = "npz"
    config.data.name = "test-arrays"
    config.data.data_dir = str(data_dir)
    config.data.official_split = ""
    config.data.num_classes = 3
    config.source_model = SOURCE_MODEL
    config.source_num_classes = 5
    config.source_checkpoint = str(source_dir)
    config.target_model = TARGET_MODEL
    config.model_overrides = ml_collections.ConfigDict({"source": {}, "target": {}})
    config.pairs = "2-0,5-1,8-4,8-3"
    config.conv_impl = TINY_CONV_IMPL
    # One simulated step: each adds about a quarter to the step's compilation, most of these
    # tests' time. The T-step loop itself is checked in test_bilevel and test_parity (T = 2).
    config.T = 1
    config.batch_size = 8
    config.lr_reference_batch_size = 0   # the tests' rates as given (0.1 at batch 8)
    config.eval_batch_size = 8
    config.epochs = 2
    config.steps_per_epoch = 3
    config.log_every_steps = 1
    config.checkpoint_every_steps = 1
    for key, value in overrides.items():
        config[key] = value
    return config


def final_params(workdir, step=None):
    """(step, state as a dict of host arrays) of the latest (or the given) checkpoint,
    whatever device count wrote it."""
    import jax
    import orbax.checkpoint as ocp
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    manager = ocp.CheckpointManager(directory, item_names=("state", "progress"))
    step = manager.latest_step() if step is None else step
    metadata = ocp.StandardCheckpointer().metadata(os.path.join(directory, str(step), "state"))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            metadata.item_metadata)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    return step, jax.device_get(restored["state"])


def assert_same_leaves(expected, actual):
    import jax
    expected, actual = jax.tree.leaves(expected), jax.tree.leaves(actual)
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def load_config(name, variant=None):
    """configs/<name>.py's get_config(variant), loaded from the checkout's file."""
    spec = importlib.util.spec_from_file_location(
        f"config_{name}", os.path.join(REPO_ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


# --------------------------------------------------------------------- the command line
def write_config_file(config, path):
    """A config file for ``python -m l2t_jax.main --config=path``."""
    path.write_text("import ml_collections\n"
                    f"def get_config():\n    return ml_collections.ConfigDict("
                    f"{config.to_dict()!r})\n")
    return path


def main_command(config_file, workdir):
    return [sys.executable, "-m", "l2t_jax.main", f"--config={config_file}",
            f"--workdir={workdir}"]


def run_main(*args, cwd=REPO_ROOT):
    """``python -m l2t_jax.main *args``, its output captured."""
    return subprocess.run([sys.executable, "-m", "l2t_jax.main", *args], cwd=cwd,
                          capture_output=True, text=True)


def one_line_error(completed) -> str:
    """The single ``error: ...`` line of a failed run_main (no traceback, no usage text)."""
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr and "flags:" not in completed.stderr
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, completed.stderr[-3000:]
    return errors[0]


# --------------------------------------------------------------- fake finished workdirs
def write_run(root, relative, method, scheme, dataset, seed, test, examples_per_class=0,
              extra_sources=(), config_only=False):
    """A finished workdir: config.json and result.json as train.py writes them (the last
    epoch's test accuracy 3 points under ``test``, the one at the best val). With
    config_only, result.json leaves out what config.json knows and the last epoch's
    accuracies (an older trainer's)."""
    workdir = os.path.join(str(root), relative)
    os.makedirs(workdir, exist_ok=True)
    extra = [dict(e) for e in extra_sources]
    config = {"method": method, "pairs": scheme or "4-0,9-1", "seed": seed,
              "data": {"name": dataset, "train_examples_per_class": examples_per_class},
              "source_model": "resnet32", "target_model": "vgg9_bn", "extra_sources": extra}
    result = {"test_at_best_val": test, "best_val": test + 1.0, "best_epoch": 7, "steps": 800,
              "dataset": dataset, "source": "resnet32", "target": "vgg9_bn", "seed": seed}
    if not config_only:
        result.update(method=method, scheme=scheme or "4-0,9-1", pairs=[[4, 0], [9, 1]],
                      test_last=test - 3.0, val_last=test + 0.5,
                      train_examples_per_class=examples_per_class,
                      extra_sources=[e["model"] for e in extra], wall_seconds=12.5)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump(result, f)
    return workdir


def write_limited_runs(root):
    """The limited-data table's runs (Scratch, FM one-to-one, L2T-ww all-to-all at 25-250
    examples per class, two seeds each) and one whole-training-set run, which the table
    leaves out."""
    accuracy = {"scratch": 40.0, "fm": 45.0, "l2t_ww": 55.0}
    schemes = {"scratch": None, "fm": "one_to_one", "l2t_ww": "all_to_all"}
    for size in (25, 50, 100, 250):
        for method, base in accuracy.items():
            for seed, noise in enumerate((-1.0, 1.0)):
                write_run(root, f"limited/stl10/{method}/epc{size}/seed{seed}", method,
                          schemes[method], "stl10", seed,
                          base + 10 * math.log10(size) + noise, examples_per_class=size)
    write_run(root, "main/stl10/scratch/epc_all/seed0", "scratch", None, "stl10", 0, 65.0)


def load_script(name):
    """experiments/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO_ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ coordinator ports
_ports_given: set = set()


def free_port() -> int:
    """A port for a jax.distributed coordinator that no other test of this session gets.

    Below Linux's ephemeral range (32768-60999), so the OS hands it to no other socket
    between this call and the coordinator's bind; each xdist worker draws from its own
    block of 2000 (two tests on two workers once drew the same ephemeral port, and four
    processes joined one coordinator); a port is never given twice in one process."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    low = 20000 + 2000 * (int(worker[2:] or 0) % 6)
    rng = random.Random()
    while True:
        port = rng.randrange(low, low + 2000)
        if port in _ports_given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_given.add(port)
        return port

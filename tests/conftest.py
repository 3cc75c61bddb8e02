"""Shared fixtures: the authors' released assets and small input batches."""
import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

# One persistent XLA compilation cache for the whole test session (set before jax is
# imported, and inherited by the subprocesses the tests start): tests that build the same
# program, in this process or another, compile it once. Compile time dominates the suite:
# the tiny L2T-ww step compiles in about 20 s on 2 cores and loads from the cache in 2.5 s.
# The cache key is the program (its name included), so tests that should share a step
# build it the way the training program does. The directory is removed at exit.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="l2t-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# Before any test module computes with jax: the package's XLA flags (xla_workarounds) only
# take effect when set before the backend starts, and the subprocesses inherit them.
import l2t_jax  # noqa: E402,F401

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CI and developers keep the release beside the checkout (../shared/assets/...); elsewhere
# point L2T_RELEASE_DIR at a copy (see README, "Assets").
RELEASE_DIR = os.environ.get(
    "L2T_RELEASE_DIR", os.path.join(REPO_ROOT, "..", "shared", "assets", "l2t-ww-release"))
RESNET32_SHA256 = "049f81f8bea8504e90818d6c614f15c485ac2d891348330b433110e161f66d68"

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="session")
def released_resnet32_path():
    path = os.path.join(RELEASE_DIR, "tinyimagenet-200-resnet32.pth.tar")
    if not os.path.isfile(path):
        pytest.fail(f"the released checkpoint is not at {path}; set L2T_RELEASE_DIR to the "
                    "directory holding tinyimagenet-200-resnet32.pth.tar (see README)")
    return path


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


def calibrate_bn_statistics(torch_model, images_nchw):
    """Sets every BN's running statistics to those of one batch (as a trained network's
    would roughly be), so that deep random networks keep activations of order one."""
    import torch
    bns = [m for m in torch_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None          # cumulative average: after one batch, the batch's stats
    with torch.no_grad():
        torch_model.train()(torch.as_tensor(images_nchw))
    for bn in bns:
        bn.momentum = 0.1
    torch_model.eval()

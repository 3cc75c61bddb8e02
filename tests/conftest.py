"""The test session's environment (compilation cache, XLA flags) and the fixtures several
files share: the authors' released checkpoint and the tiny training assets. Helpers that
are not fixtures are in helpers.py."""
import atexit
import os
import shutil
import tempfile

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
# take effect when set before the backend starts, and the subprocesses inherit them
# (importing l2t_jax.models would set them too; this does not depend on the import order).
from l2t_jax.models import xla_workarounds  # noqa: E402

xla_workarounds.apply()

from helpers import RELEASE_DIR, write_npz_splits, write_tiny_source  # noqa: E402


@pytest.fixture(scope="session")
def released_resnet32_path():
    path = os.path.join(RELEASE_DIR, "tinyimagenet-200-resnet32.pth.tar")
    if not os.path.isfile(path):
        pytest.fail(f"the released checkpoint is not at {path}; set L2T_RELEASE_DIR to the "
                    "directory holding tinyimagenet-200-resnet32.pth.tar (see README)")
    return path


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """helpers.tiny_config's data (npz arrays, 3 classes) and source (a tiny converted
    ResNet-20, untrained): the directory holding data/ and source/."""
    root = tmp_path_factory.mktemp("assets")
    write_npz_splits(root / "data")
    write_tiny_source(str(root / "source"))
    return root


@pytest.fixture
def mock_tfds(tmp_path, monkeypatch):
    """TFDS mock records (``tfds.testing.mock_data``) for the data sets named: a call
    ``mock_tfds("cifar100", num_examples=24)`` returns the context manager. The data sets'
    directories are made under a fresh ``$TFDS_DATA_DIR``, as ``tfds build`` leaves them,
    because the package checks for them before it asks TFDS."""
    import tensorflow_datasets as tfds
    root = tmp_path / "tensorflow_datasets"
    monkeypatch.setenv("TFDS_DATA_DIR", str(root))

    def mock(*names, num_examples):
        for name in names:
            (root / name).mkdir(parents=True, exist_ok=True)
        return tfds.testing.mock_data(num_examples=num_examples,
                                      policy=tfds.testing.MockPolicy.USE_CODE)
    return mock

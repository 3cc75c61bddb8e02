"""Checkpoints on a small pytree: save and restore, fallback past an unreadable newest
checkpoint (moved aside, not deleted), a config that differs is refused by name."""
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from l2t_jax.training import checkpoints, parallel


def _state(value):
    return {"w": jnp.full((3,), value, jnp.float32), "step": jnp.asarray(int(value))}


def test_save_restore_and_fallback_past_an_unreadable_checkpoint(tmp_path):
    saved = checkpoints.Checkpoints(str(tmp_path), keep=3)
    for step in (1, 2):
        saved.save(step, _state(step), {"epoch": step})
    assert saved.latest_step() == 2 and "step 2" in saved.describe_newest()
    abstract = parallel.abstract_replicated(parallel.make_mesh(), jax.eval_shape(
        lambda: _state(0)))
    state, progress = saved.restore_latest_readable(abstract)
    np.testing.assert_array_equal(state["w"], [2, 2, 2])
    assert progress == {"epoch": 2}
    # Corrupt the newest: its array files gone.
    newest = os.path.join(saved.directory, "2", "state")
    for name in os.listdir(newest):
        path = os.path.join(newest, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    state, progress = saved.restore_latest_readable(abstract)
    np.testing.assert_array_equal(state["w"], [1, 1, 1])
    assert progress == {"epoch": 1} and saved.latest_step() == 1
    assert os.listdir(tmp_path / "unreadable_checkpoints")[0].startswith("2-")


def test_another_config_is_refused_by_the_keys_that_differ(tmp_path):
    from l2t_jax.training import workdir
    config = ml_collections.ConfigDict({"seed": 0, "epochs": 5, "beta": 0.5})
    with pytest.raises(ValueError, match="no config.json"):
        checkpoints.check_resumable(config, str(tmp_path))
    workdir.write_config(str(tmp_path), checkpoints.config_for_comparison(config))
    checkpoints.check_resumable(config, str(tmp_path))
    config.epochs = 10                         # resumable: may change
    checkpoints.check_resumable(config, str(tmp_path))
    config.beta = 1.0
    with pytest.raises(ValueError, match=r"another config \(keys differ: beta\)"):
        checkpoints.check_resumable(config, str(tmp_path))


def test_a_run_from_before_a_key_was_added_resumes_as_it_ran(tmp_path):
    """config.json without lr_reference_batch_size (added later): the run used its rate as
    given, i.e. 0; other added keys take any value (data.classes records what it used)."""
    from l2t_jax.training import workdir
    old = {"seed": 0, "batch_size": 32, "data": {"name": "folder"}}
    workdir.write_config(str(tmp_path), old)
    config = ml_collections.ConfigDict({**old, "lr_reference_batch_size": 128, "data": {
        "name": "folder", "classes": ("cat", "dog"), "val_fraction": 0.1}})
    with pytest.raises(ValueError, match=r"keys differ: lr_reference_batch_size\).*predates "
                                         r"lr_reference_batch_size: it resumes with "
                                         r"--config.lr_reference_batch_size=0"):
        checkpoints.check_resumable(config, str(tmp_path))
    config.lr_reference_batch_size = 0
    checkpoints.check_resumable(config, str(tmp_path))
    config.data.name = "other"
    with pytest.raises(ValueError, match=r"keys differ: data\)"):
        checkpoints.check_resumable(config, str(tmp_path))

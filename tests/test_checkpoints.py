"""Checkpoints on a small pytree: save and restore, fallback past an unreadable newest
checkpoint (moved aside, not deleted). (A workdir of another config is refused by
l2t_jax.training.config.check_resumable: test_run_config.py.)"""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

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

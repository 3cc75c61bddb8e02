"""l2t_jax.training.config: the range-check table (every row rejects a bad value naming its
key), the one reader of a run's config.json (defaults for the keys added since the run,
the same for resume, evaluate and export) and the resume check built on it."""
import json
import re

import pytest

from l2t_jax.configs import default as default_configs
from l2t_jax.training import build, workdir
from l2t_jax.training.config import (ADDED_KEYS, ANY, RANGE_CHECKS, RESUMABLE_KEYS,
                                     check_resumable, config_for_comparison, default_config,
                                     read_run_config, validate_config)

# A value each row of RANGE_CHECKS refuses (a row without one here fails the test).
BAD_VALUES = {
    "method": "l2t_xx", "source_model": "vgg11", "target_model": "resnet7",
    "lr_schedule": "linear", "lr_decay_at": (0.5, 1.5), "data.train_examples_per_class": -1,
    "data.kind": "hdf5", "batch_size": 0, "eval_batch_size": 0, "epochs": 0,
    "log_every_steps": 0, "checkpoint_every_steps": 0, "keep_checkpoints": 0,
    "distributed_init_timeout_s": 0, "distributed_heartbeat_timeout_s": 0,
    "distributed_shutdown_timeout_s": 0, "learning_rate": float("inf"),
    "meta_learning_rate": 0.0, "meta_update_every": 0, "meta_loss_batch": "validation",
    "lr_reference_batch_size": -1, "preemption_grace_s": -1.0, "on_nonfinite": "ignore",
    "data.image_size": 0, "data.val_fraction": 1.0, "source_num_classes": 0,
    "data.read_threads": -2, "data.prefetch_batches": -1, "data.crop_padding": -1,
    "data.eval_splits": (), "data.meta_val_per_class": -1, "meta_gradient_batches": 0,
    "meta_temperature": 0.0, "meta_freeze_after": 0.0, "meta_warmup_steps": -1,
}


def _set(config, key, value):
    *parents, leaf = key.split(".")
    for part in parents:
        config = config[part]
    config[leaf] = value


def test_every_range_check_rejects_its_bad_value_naming_the_key():
    validate_config(default_config())                  # the defaults pass every check
    assert {key for key, _, _ in RANGE_CHECKS} == set(BAD_VALUES)
    for key, value in BAD_VALUES.items():
        config = default_config()
        _set(config, key, value)
        with pytest.raises(ValueError, match=rf"^config\.{re.escape(key)}\b") as info:
            validate_config(config)
        print(info.value)
    # The messages name the valid values where there is a list of them.
    config = default_config()
    config.method = "l2t_xx"
    with pytest.raises(ValueError, match=r"is not a method; valid: .*l2t_ww"):
        validate_config(config)
    config = default_config()
    config.meta_loss_batch = "validation"
    with pytest.raises(ValueError, match=r"='validation'; valid: same \(the paper's\), "
                                         r"held_out, val, augment$"):
        validate_config(config)


def test_the_val_meta_loss_checks_name_the_key():
    """meta_loss_batch='val' needs meta-networks and val images moved out for it; moving
    them needs a val split among the evaluated ones."""
    config = default_config()
    config.meta_loss_batch, config.data.meta_val_per_class = "val", 2
    validate_config(config)
    for key, value, message in (
            ("data.meta_val_per_class", 0, r"^config\.meta_loss_batch='val' needs "
                                           r"config\.data\.meta_val_per_class >= 1"),
            ("method", "fm", r"^config\.meta_loss_batch='val' needs a method with "
                             r"meta-networks"),
            ("data.eval_splits", ("test",), r"^config\.data\.meta_val_per_class=2 moves "
                                            r"images out of the val split")):
        bad = default_config()
        bad.meta_loss_batch, bad.data.meta_val_per_class = "val", 2
        _set(bad, key, value)
        with pytest.raises(ValueError, match=message):
            validate_config(bad)
    # Every method may move them (they leave val alike); only 'val' trains on them.
    config = default_config()
    config.method, config.data.meta_val_per_class = "scratch", 2
    validate_config(config)


def _old_run(tmp_path, config, *missing):
    """A workdir whose config.json was written by ``config`` before the keys ``missing``
    (dotted) existed."""
    written = config_for_comparison(config)
    for key in missing:
        *parents, leaf = key.split(".")
        part = written
        for name in parents:
            part = part[name]
        del part[leaf]
    workdir.write_config(str(tmp_path), written)
    return str(tmp_path)


def test_the_reader_fills_the_keys_added_since_the_run_with_what_reproduces_it(tmp_path):
    config = default_config()
    config.seed, config.data.eval_splits = 3, ("test",)
    run = _old_run(tmp_path, config, "lr_reference_batch_size", "meta_update_every",
                   "data.classes", "data.val_fraction")
    read = read_run_config(run)
    assert read.seed == 3 and read.data.eval_splits == ("test",)      # the file's, as tuples
    assert read.lr_reference_batch_size == 0 != default_config().lr_reference_batch_size
    assert read.meta_update_every == ADDED_KEYS["meta_update_every"] == 1
    # Every value reproduces the run (ANY): today's default, or the resuming config's.
    assert ADDED_KEYS["data.classes"] is ANY
    assert read.data.classes == () and read.data.val_fraction == 0.1
    resuming = default_config()
    resuming.data.classes, resuming.data.val_fraction = ("cat", "dog"), 0.2
    read = read_run_config(run, resuming)
    assert read.data.classes == ("cat", "dog") and read.data.val_fraction == 0.2
    # Keys never written (they may change on resume) are today's defaults.
    assert "epochs" in RESUMABLE_KEYS and read.epochs == default_config().epochs
    # A config.json of a few keys (written by hand) is read over the defaults.
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text(json.dumps(
        {"target_model": "vgg9_bn", "model_overrides": {"target": {"widths": [4, 6, 8, 8, 8]}},
         "data": {"num_classes": 3}}))
    read = read_run_config(str(tmp_path / "partial"))
    assert read.model_overrides.target.widths == (4, 6, 8, 8, 8)
    assert read.data.num_classes == 3 and read.data.image_size == 32 and read.method == "l2t_ww"
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        read_run_config(str(tmp_path / "nowhere"))


def test_the_target_builder_gives_training_and_a_read_run_the_same_network(tmp_path):
    """One builder: the network training builds and the one evaluate and export build from
    the run's config.json are equal (model, widths, taps, convolution)."""
    config = default_configs.get_config("tiny")
    config.conv_impl, config.target_taps = "matmul", ""
    trained = build.build_networks(config)[1]
    workdir.write_config(str(tmp_path), config_for_comparison(config))
    assert build.target_model(read_run_config(str(tmp_path))) == trained == \
        build.target_model(config)
    assert trained.module.conv_impl == "matmul"
    config.model_overrides.target.widths = (4, -6, 8, 8, 8)
    with pytest.raises(ValueError, match=r"config.model_overrides.target.widths=\(4, -6, 8, 8, "
                                         r"8\): widths must be integers >= 1"):
        build.target_model(config)


def test_another_config_is_refused_by_the_keys_that_differ(tmp_path):
    config = default_config()
    with pytest.raises(ValueError, match="no config.json"):
        check_resumable(config, str(tmp_path))
    workdir.write_config(str(tmp_path), config_for_comparison(config))
    check_resumable(config, str(tmp_path))
    config.epochs = 10                         # resumable: may change
    check_resumable(config, str(tmp_path))
    config.beta = 1.0
    with pytest.raises(ValueError, match=r"another config \(keys differ: beta\)"):
        check_resumable(config, str(tmp_path))
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON .*; use a new workdir"):
        check_resumable(config, str(tmp_path))


def test_a_run_from_before_a_key_was_added_resumes_as_it_ran(tmp_path):
    """config.json without lr_reference_batch_size (added later): the run used its rate as
    given, i.e. 0; other added keys take any value (data.classes records what it used)."""
    run = _old_run(tmp_path, default_config(), "lr_reference_batch_size", "data.classes",
                   "data.val_fraction")
    config = default_config()
    config.lr_reference_batch_size = 128
    config.data.classes, config.data.val_fraction = ("cat", "dog"), 0.2
    with pytest.raises(ValueError, match=r"keys differ: lr_reference_batch_size\).*predates "
                                         r"lr_reference_batch_size: it resumes with "
                                         r"--config.lr_reference_batch_size=0$"):
        check_resumable(config, run)
    config.lr_reference_batch_size = 0
    check_resumable(config, run)
    config.data.name = "other"
    with pytest.raises(ValueError, match=r"keys differ: data\); use a new workdir \(or "
                                         r"compare with .*config.json\)$"):
        check_resumable(config, run)


def test_runs_from_before_the_meta_options_resume_with_the_papers_values(tmp_path):
    """The meta-loss and phi-schedule keys added since: a run without them ran the paper's
    rule, which their defaults are; another value is refused, naming the one that
    resumes."""
    added = ("meta_gradient_batches", "meta_temperature", "meta_freeze_after",
             "meta_warmup_steps", "data.meta_val_per_class")
    run = _old_run(tmp_path, default_config(), *added)
    check_resumable(default_config(), run)
    assert {key: ADDED_KEYS[key] for key in added} == {
        key: _value(default_config(), key) for key in added}
    config = default_config()
    config.meta_temperature = 4.0
    with pytest.raises(ValueError, match=r"predates meta_temperature: it resumes with "
                                         r"--config.meta_temperature=1.0$"):
        check_resumable(config, run)


def _value(config, key):
    for part in key.split("."):
        config = config[part]
    return config


def test_a_key_added_without_a_reproducing_value_is_refused_on_resume(tmp_path):
    """A key the run's config.json lacks and ADDED_KEYS does not list: evaluate and export
    read today's default, but resuming refuses (the default need not be what the run did),
    even when the config resuming it has the default."""
    assert "beta" not in ADDED_KEYS and "hflip" not in ADDED_KEYS
    run = _old_run(tmp_path, default_config(), "beta", "data.hflip")
    assert read_run_config(run).beta == default_config().beta
    with pytest.raises(ValueError, match=r"keys differ: beta, data\)"):
        check_resumable(default_config(), run)

"""The training program end to end on small data the tests write: npz arrays and an image
folder, checkpoints, metrics, result.json and the run metadata, exact resume after SIGKILL,
2 devices, a broken image in a run, and the experiment configs' tiny variants run for real
(the released source, TFDS mock data)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import (RELEASE_DIR, REPO_ROOT, TINY_CONV_IMPL, assert_same_leaves, final_params,
                     load_config, main_command, tiny_config, write_config_file)
from l2t_jax import data
from l2t_jax.training import build, train
from l2t_jax.training.config import validate_config


@pytest.fixture(scope="module")
def straight_run(tiny_assets, tmp_path_factory):
    """tiny_config's 6 steps uninterrupted, on one device: (config, workdir, final state,
    result). Every checkpoint is kept."""
    config = tiny_config(tiny_assets / "data", tiny_assets / "source", keep_checkpoints=6)
    workdir = tmp_path_factory.mktemp("straight")
    result = train.train_and_evaluate(config, str(workdir))
    return config, workdir, final_params(workdir)[1], result


def test_trains_evaluates_and_writes_everything(straight_run):
    _, tmp_path, _, result = straight_run
    with open(tmp_path / "result.json") as f:
        assert json.load(f) == result
    assert result["steps"] == 6 and 0 <= result["test_at_best_val"] <= 100
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_lines = [line for line in lines if "train/ce" in line]
    assert [line["step"] for line in train_lines] == [1, 2, 3, 4, 5, 6]
    assert {"train/meta_loss", "train/pair_weights/3", "train/channel_weight_entropy/0",
            "train/learning_rate"} <= set(train_lines[0])
    # Per-epoch cosine, stepped at the start of each epoch (epoch 0 runs at the 2nd value).
    np.testing.assert_allclose([line["train/learning_rate"] for line in train_lines],
                               [0.05] * 3 + [0.0] * 3, atol=1e-7)
    evals = [line for line in lines if "eval/val" in line]
    assert [line["step"] for line in evals] == [3, 6]
    # The last epoch's accuracies, besides the test accuracy at the best val.
    assert (result["test_last"], result["val_last"]) == (evals[-1]["eval/test"],
                                                         evals[-1]["eval/val"])
    best = max(evals, key=lambda line: line["eval/val"])      # the first of equals
    assert (result["test_at_best_val"], result["best_val"]) == (best["eval/test"],
                                                                best["eval/val"])
    assert os.listdir(tmp_path / "tensorboard")
    assert os.path.isdir(tmp_path / "best")
    step, _ = final_params(tmp_path)
    assert step == 6


def test_result_and_metrics_carry_the_run_metadata(straight_run):
    """result.json and the first metrics.jsonl record name the code, libraries and devices
    (this test runs from the checkout, so the commit is this checkout's HEAD)."""
    import flax
    import l2t_jax
    _, workdir, _, result = straight_run
    with open(workdir / "metrics.jsonl") as f:
        first = json.loads(f.readline())
    run = result["run"]
    assert first == {"step": 0, "run": run}
    assert run["l2t_jax"] == l2t_jax.__version__
    assert run["versions"]["jax"] == jax.__version__
    assert run["versions"]["flax"] == flax.__version__
    assert set(run["versions"]) >= {"jaxlib", "optax", "orbax-checkpoint"}
    assert all(run["versions"].values())
    assert run["backend"] == jax.default_backend()
    assert run["device_kind"] == jax.devices()[0].device_kind
    assert (run["device_count"], run["process_count"]) == (jax.device_count(), 1)
    head = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert run["git"]["commit"] == head and isinstance(run["git"]["dirty"], bool)


# Run as `python KILL_DURING_SAVE <main args>`: l2t_jax.main, except that the process
# SIGKILLs itself while saving checkpoint L2T_TEST_KILL_AT_SAVE, when every file of it is
# written into orbax's temporary directory but the directory is not yet renamed to its step
# (the commit). orbax's rename is patched: a test-only hook, outside the program.
KILL_DURING_SAVE = """
import os, signal, sys
from orbax.checkpoint._src.path import async_path
_rename = async_path.rename
async def rename(src, dst):
    if dst.name == os.environ["L2T_TEST_KILL_AT_SAVE"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return await _rename(src, dst)
async_path.rename = rename
from absl import app
from l2t_jax import main
app.run(main.main, flags_parser=main.parse_flags)
"""


def _wait_for(path, process, timeout=300):
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    return path.exists()


def test_resume_after_sigkill_is_exact(straight_run, tmp_path):
    """6 uninterrupted steps == the same run SIGKILLed three times and restarted (bitwise
    on CPU): in the middle of saving step 2 (files written, not committed), right after
    step 3's checkpoint, and at a random moment after step 4's checkpoint."""
    config, _, expected, _ = straight_run
    interrupted = tmp_path / "interrupted"
    checkpoints = interrupted / "checkpoints"
    command = main_command(write_config_file(config, tmp_path / "tiny_config.py"), interrupted)
    hook = tmp_path / "kill_during_save.py"
    hook.write_text(KILL_DURING_SAVE)

    # 1. Killed inside the save of step 2.
    killed = subprocess.run([sys.executable, str(hook)] + command[3:], cwd=REPO_ROOT,
                            env=dict(os.environ, L2T_TEST_KILL_AT_SAVE="2"),
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(os.listdir(checkpoints)) == ["1", "2.orbax-checkpoint-tmp"]

    # 2. Killed once step 3's checkpoint is committed; 3. at a random moment after step 4's,
    # cut short when step 5's appears (with warm compilation caches a tiny step can take
    # less than the delay, and the run would finish before the kill).
    rng = np.random.default_rng()
    for step, delay in ((3, 0.0), (4, rng.uniform(0, 0.5))):
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        reached = _wait_for(checkpoints / str(step), process)
        deadline = time.time() + delay
        while time.time() < deadline and not (checkpoints / str(step + 1)).exists():
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert reached, f"the run never reached step {step}"
        saved = [int(n) for n in os.listdir(checkpoints) if n.isdigit()]
        assert max(saved) < 6, "the run finished before it was killed: nothing was resumed"
        print(f"killed {delay:.2f} s after checkpoint {step}: {sorted(os.listdir(checkpoints))}")
    finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "resumed from step" in finished.stderr
    step, resumed = final_params(interrupted)
    assert step == 6 and not [n for n in os.listdir(checkpoints) if "tmp" in n]
    assert_same_leaves(expected, resumed)


# Float32 tolerance for "the same parameters" on 2 devices, per leaf: max |difference| <=
# RTOL * max |leaf| + ATOL. Sharding changes only the order of the reductions over the batch
# (per-device partial sums, then an all-reduce), as tests/test_parallel.py measures for the
# step alone. Measured here over the 6 steps (jax 0.10.2, CPU): at most 3.9e-5 of a leaf's
# scale (5x margin); pre-BN conv biases, whose gradient is zero up to rounding (values
# ~1e-5), within 1.4e-5 absolute. phi's Adam moments (META_RTOL): the meta-gradient of this
# untrained tiny setup grows 100x per step (norm 7, 650, 46000 in steps 1-3; 0 in the
# second epoch, where the learning rate is 0), and its moments differ by 7.6e-5 of their
# scale after step 1 and 4.4e-3 from step 3 on. phi itself stays within 1e-5. A real fault
# (a device normalising or averaging over its own rows only, a process loading the wrong
# rows) moves the parameters by O(1) of their scale.
RTOL, ATOL, META_RTOL = 2e-4, 1e-4, 2e-2


def _assert_close_per_leaf(expected, actual, what):
    flat = dict((jax.tree_util.keystr(p), x)
                for p, x in jax.tree_util.tree_flatten_with_path(actual)[0])
    worst = 0.0
    for path, a in jax.tree_util.tree_flatten_with_path(expected)[0]:
        key = jax.tree_util.keystr(path)
        a, b = np.asarray(a, np.float64), np.asarray(flat[key], np.float64)
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        rtol = META_RTOL if "meta_opt_state" in key else RTOL
        difference = float(np.max(np.abs(a - b))) if a.size else 0.0
        assert difference <= rtol * scale + ATOL, (what, key, difference, scale)
        if scale > 1e-3 and "meta_opt_state" not in key:
            worst = max(worst, difference / scale)
    print(f"{what}: largest difference {worst:.3g} of a leaf's scale")


def test_two_devices_give_the_one_device_run(straight_run, tmp_path):
    """The training program (python -m l2t_jax.main) on 2 CPU devices: batch split over
    the mesh, evaluation over global arrays; the parameters of the one-device run."""
    config, straight, _, _ = straight_run
    config_file = write_config_file(config, tmp_path / "tiny_config.py")
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu", L2T_DISTRIBUTED="0")
    finished = subprocess.run(main_command(config_file, tmp_path / "run"), cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "data parallel over 2 devices (1 processes)" in finished.stderr
    for step in (2, 6):
        _assert_close_per_leaf(final_params(straight, step)[1],
                               final_params(tmp_path / "run", step)[1],
                               f"1 vs 2 devices, step {step}")
    evals = [[json.loads(line) for line in open(workdir / "metrics.jsonl")
              if "eval/val" in line] for workdir in (straight, tmp_path / "run")]
    assert evals[0] == evals[1] and len(evals[0]) == 2
    # A batch that does not split over the devices: one line, before anything compiles.
    odd = subprocess.run(main_command(config_file, tmp_path / "odd") + ["--config.batch_size=5"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert odd.returncode != 0 and "Traceback" not in odd.stderr
    assert "config.batch_size=5 is not divisible by the 2 devices" in odd.stderr


def test_broken_image_stops_training_with_its_name(tiny_assets, tmp_path, monkeypatch):
    """In a real run, the undecodable file surfaces as a DataError naming it, raised while
    the batch is read: before any compiled code runs. (One step of the 4 images per epoch:
    the first batch holds the broken file.)"""
    from PIL import Image
    from l2t_jax.training import parallel
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for name in ("a", "b", "c"):
            os.makedirs(tmp_path / "images" / split / name)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "images" / split / name / "0.png")
    (tmp_path / "images" / "train" / "b" / "1.png").write_bytes(b"\x89PNG truncated")
    config = tiny_config(tmp_path / "images", tiny_assets / "source", batch_size=4,
                         eval_batch_size=4, steps_per_epoch=1)
    config.data.kind = "image_folder"
    config.data.eval_splits = ("test",)

    def never_run(*args, **kwargs):
        raise AssertionError("the step ran before the broken image was read")
    monkeypatch.setattr(parallel, "jit_sharded_step", lambda *args, **kwargs: never_run)
    with pytest.raises(data.DataError, match=r"cannot decode image .*b/1\.png"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


# Two real steps run for one config per network family: each costs a compilation of the
# family's bilevel step (a run takes about 50 s for the CIFAR family, 100 s for the
# ImageNet one, on 2 cores). Every config builds its networks and pairs in test_configs.py;
# in a run, the npz override below replaces what sets the configs of a family apart (data
# set kind and name, split files, class count), so they would run the same program:
# - CIFAR family (cifar100, stl10: ResNet-32 -> VGG-9-BN, 15 pairs, 32 px): cifar100's tiny
#   variant runs the program twice below, with the released source and on mock TFDS data.
# - ImageNet family (cub200, dogs, mit67, stanford40: ResNet-34 -> ResNet-18, 16 pairs,
#   224 px, 64 px when tiny, random-resized crops): cub200, here.
TWO_STEP_CONFIGS = ("cub200",)


@pytest.mark.parametrize("name", TWO_STEP_CONFIGS)
def test_every_experiment_config_runs_two_steps(name, tiny_assets, tmp_path):
    """The tiny variant of one config per family (TWO_STEP_CONFIGS), 2 steps on small npz
    data (3 classes, written by the fixture) with an untrained source: the family's
    networks, pairs, image size and augmentation run end to end."""
    config = load_config(name, "tiny")
    config.data.kind = "npz"
    config.data.data_dir = str(tiny_assets / "data")
    config.data.official_split = ""
    config.data.num_classes = 3
    config.source_checkpoint = "random-init"
    config.epochs, config.steps_per_epoch = 1, 2
    # One simulated step: each one adds a quarter to the compilation, and T's loop is the
    # family-independent part (test_bilevel, test_parity check it at T = 2).
    config.T = 1
    config.conv_impl = TINY_CONV_IMPL   # as the tiny tests' (helpers.py: why)
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["steps"] == 2 and result["target"] == config.target_model
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")
            if "train/ce" in line] == [1, 2]


def test_cifar100_tiny_with_the_released_source(tiny_assets, tmp_path, monkeypatch):
    """The released ResNet-32 found through the asset module, converted once, cached."""
    monkeypatch.setenv("L2T_RELEASE_DIR", RELEASE_DIR)
    monkeypatch.setenv("L2T_CACHE_DIR", str(tmp_path / "cache"))
    config = load_config("cifar100", "tiny")
    config.data.kind = "npz"            # CIFAR-100 itself cannot be downloaded here
    config.data.data_dir = str(tiny_assets / "data")
    config.data.official_split = ""
    # (The config's 100 classes, for labels 0-2: the program of the mock TFDS test below.)
    config.epochs, config.steps_per_epoch = 1, 2
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["steps"] == 2 and result["source"] == "resnet32"
    assert os.listdir(tmp_path / "cache" / "converted") == ["resnet32-049f81f8"]


def test_cifar100_tiny_on_mock_tfds(tmp_path, monkeypatch, mock_tfds):
    """The real cifar100 config (tiny) through tfds.data_source + grain, on TFDS mock data."""
    monkeypatch.setenv("L2T_CACHE_DIR", str(tmp_path / "cache"))
    config = load_config("cifar100", "tiny")
    # Mock records carry random ids and only a few examples: not the official split.
    config.data.official_split = ""
    config.data.eval_splits = ("test",)
    config.source_checkpoint = "random-init"
    config.epochs, config.steps_per_epoch = 1, 2
    with mock_tfds("cifar100", num_examples=24):
        result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["steps"] == 2 and result["dataset"] == "cifar100"
    assert 0 <= result["test_at_best_val"] <= 100
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2")
    assert "tensorflow" not in sys.modules


def _phi_moves_of_a_two_program_run(config, workdir, caplog) -> list[bool]:
    """Trains ``config`` (6 steps, a checkpoint at each) into ``workdir``, checks that it
    compiled the bilevel and the phi-fixed programs once each, and returns whether phi
    moved at each of steps 2..6 against the step before."""
    with caplog.at_level("INFO", logger="l2t_jax.training.train"):
        train.train_and_evaluate(config, str(workdir))
    compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith(
        "compiling the training step")]
    assert compiles == ["compiling the training step (l2t_ww, T=1)...",
                        "compiling the training step (l2t_ww, phi fixed)..."]
    phis = [final_params(workdir, step)[1]["meta_params"] for step in range(1, 7)]
    return [any(np.any(a != b) for a, b in zip(jax.tree.leaves(before),
                                               jax.tree.leaves(after)))
            for before, after in zip(phis, phis[1:])]


def test_phi_every_kth_step_takes_two_programs_compiled_once(straight_run, tiny_assets,
                                                            tmp_path, caplog):
    """config.meta_update_every=2: phi moves at iterations 0, 2, 4 only; iteration 0 is the
    straight run's step bit for bit; the run compiles each of its two programs once."""
    config, straight_workdir, _, _ = straight_run
    config = tiny_config(tiny_assets / "data", tiny_assets / "source", keep_checkpoints=6,
                         meta_update_every=2)
    moved = _phi_moves_of_a_two_program_run(config, tmp_path, caplog)
    assert moved == [False, True, False, True, False]      # steps 2..6 against the step before
    assert_same_leaves(final_params(tmp_path, 1)[1], final_params(straight_workdir, 1)[1])
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    meta_steps = [line["step"] for line in lines if "train/meta_loss" in line]
    assert meta_steps == [1, 3, 5]


def test_held_out_meta_loss_trains_on_the_rest_and_scores_its_own_split(tiny_assets, tmp_path,
                                                                        caplog):
    """config.meta_loss_batch='held_out': data.meta_held_out_per_class images per class leave
    the train split (disjoint, drawn from the seed) for the meta loss's split; the run
    trains with both programs of meta_update_every=2 (the meta batch only in phi's); bad
    settings fail before anything compiles, naming the key."""
    config = tiny_config(tiny_assets / "data", tiny_assets / "source", meta_update_every=2,
                         meta_loss_batch="held_out")
    config.data.meta_held_out_per_class = 2
    splits = build.load_splits(config)
    plain = build.load_splits(tiny_config(tiny_assets / "data", tiny_assets / "source"))
    meta, rest = set(splits["meta"].indices), set(splits["train"].indices)
    assert not meta & rest and meta | rest == set(range(len(plain["train"])))
    assert np.bincount(data.source_labels(splits["meta"])).tolist() == [2, 2, 2]
    with caplog.at_level("INFO", logger="l2t_jax.training.train"):
        result = train.train_and_evaluate(config, str(tmp_path))
    assert result["train_examples"] == len(plain["train"]) - 6
    assert any("meta 6" in r.getMessage() for r in caplog.records)
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [line["step"] for line in lines if "train/meta_loss" in line] == [1, 3, 5]
    for key, value, message in (
            ("meta_loss_batch", "validation", "meta_loss_batch='validation'; valid: same"),
            ("method", "fm", "needs a method with meta-networks"),
            ("data.meta_held_out_per_class", 0, "needs config.data.meta_held_out_per_class >= 1")):
        bad = config.copy_and_resolve_references()
        if key.startswith("data."):
            bad.data[key[5:]] = value
        else:
            bad[key] = value
        with pytest.raises(ValueError, match=message):
            validate_config(bad)
    bad = tiny_config(tiny_assets / "data", tiny_assets / "source")
    bad.data.meta_held_out_per_class = 1
    with pytest.raises(ValueError, match="only used with config.meta_loss_batch='held_out'"):
        validate_config(bad)


def test_val_meta_loss_trains_phi_on_val_images_moved_out_of_val(tiny_assets, tmp_path):
    """config.meta_loss_batch='val': data.meta_val_per_class val images per class leave the
    val split (the same for every method and seed) and are the meta loss's batches; the
    train split is untouched; phi learns at every step from them."""
    config = tiny_config(tiny_assets / "data", tiny_assets / "source", meta_loss_batch="val")
    config.data.meta_val_per_class = 1
    splits = build.load_splits(config)
    whole = build.load_splits(tiny_config(tiny_assets / "data", tiny_assets / "source"))
    assert len(splits["train"]) == len(whole["train"])
    assert np.bincount(data.source_labels(splits["meta"])).tolist() == [1, 1, 1]
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["train_examples"] == len(whole["train"])
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [line["step"] for line in lines if "train/meta_loss" in line] == list(range(1, 7))


def test_phi_warmup_and_freeze_fix_phi_outside_their_window(straight_run, tiny_assets,
                                                             tmp_path, caplog):
    """config.meta_warmup_steps=1, meta_freeze_after=0.5 of 6 steps: phi learns at
    iterations 1 and 2 only, the others take the phi-fixed program (iteration 0's theta is
    the straight run's step bit for bit); each program compiles once. The meta loss here
    scores another view of the batch's images (meta_loss_batch='augment')."""
    config, straight_workdir, _, _ = straight_run
    config = tiny_config(tiny_assets / "data", tiny_assets / "source", keep_checkpoints=6,
                         meta_warmup_steps=1, meta_freeze_after=0.5, meta_loss_batch="augment")
    moved = _phi_moves_of_a_two_program_run(config, tmp_path, caplog)
    assert moved == [True, True, False, False, False]     # iterations 1..5
    assert_same_leaves(final_params(tmp_path, 1)[1]["target_params"],
                       final_params(straight_workdir, 1)[1]["target_params"])
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [line["step"] for line in lines if "train/meta_loss" in line] == [2, 3]


def test_averaged_meta_gradients_resume_mid_average_exactly(tiny_assets, tmp_path):
    """config.meta_gradient_batches=2: phi moves at iterations 1, 3, 5 (one Adam step per
    two meta-gradients); a run resumed from step 3, half-way through an average, ends
    bitwise where the uninterrupted run ended."""
    config = tiny_config(tiny_assets / "data", tiny_assets / "source", keep_checkpoints=6,
                         meta_gradient_batches=2)
    train.train_and_evaluate(config, str(tmp_path))
    phis = [final_params(tmp_path, step)[1]["meta_params"] for step in range(1, 7)]
    moved = [any(np.any(a != b) for a, b in zip(jax.tree.leaves(before),
                                                jax.tree.leaves(after)))
             for before, after in zip(phis, phis[1:])]
    assert moved == [True, False, True, False, True]      # iterations 1..5
    _, uninterrupted = final_params(tmp_path)
    for step in ("4", "5", "6"):
        shutil.rmtree(tmp_path / "checkpoints" / step)
    os.remove(tmp_path / "result.json")
    train.train_and_evaluate(config, str(tmp_path))
    step, resumed = final_params(tmp_path)
    assert step == 6
    assert_same_leaves(uninterrupted, resumed)

"""Data parallelism and multi-host (l2t_jax/training/parallel.py) on fake CPU devices.

The device count is fixed when jax starts, so each configuration runs in its own Python
process: this file run as a script (``_worker``), with JAX_NUM_CPU_DEVICES (the jax option
behind ``--xla_force_host_platform_device_count``). A worker builds a tiny transfer, makes a
global batch of 8 per step row by row from a seed, takes 3 sharded steps and saves the final
state as .npz. The processes start together (compiling dominates; 2 cores here) and the
tests compare their results:

- 1 device vs 4 devices in one process: the same parameters, so BN statistics and loss
  means are over the global batch (normalising each device's 2 rows on their own would
  change every activation at order 1);
- 2 processes x 2 devices over loopback (gloo), each making only its 4 rows, vs 1 x 4;
- the sharded step is traced (so compiled) once over the 3 steps.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO_ROOT, free_port

GLOBAL_BATCH, STEPS, IMAGE_SIZE, NUM_CLASSES = 8, 3, 32, 3
TIMEOUT_S = 240           # for all the workers; a hang fails with the processes' output

# Float32 tolerance for "the same parameters". Sharding changes only the order of the
# reductions over the batch (BN means and variances, loss means, the gradients' sums): per
# device partial sums plus an all-reduce, each rounding a few ulps differently. Three bilevel
# steps (second order through the simulated step) carry these. Measured (jax 0.10.2, CPU),
# largest absolute difference over every state leaf: 9.4e-7 for 1 vs 4 devices, 8.5e-7 for
# 2 x 2 vs 1 x 4, i.e. at most 0.08 of the bound below (a margin of 12x). Reversing the
# rows of the batch on one device (which also changes only the summation order) moves the
# parameters by the same 8.5e-7; a real error is far larger: a process loading the wrong
# half (rows 0-3 twice) moves them by 0.8.
RTOL, ATOL = 1e-4, 1e-5


# ---------------------------------------------------------------------- the worker process
def _rows(step, rows):
    """Global batch `step`'s rows `rows` (a slice): each row depends only on (step, row), so
    a process makes only its own rows, as a per-host data loader would load them."""
    indices = range(rows.start, rows.stop)
    images = np.stack([np.random.default_rng([7, step, r]).standard_normal(
        (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32) for r in indices])
    labels = np.array([r % NUM_CLASSES for r in indices], np.int32)
    return images, labels


def _worker(output_path, mode):
    """Sharded training runs, saved as ``{output_path}-{run}.npz`` (+ ``.json``).

    mode ``single``: one process with 4 devices; run ``1dev`` on a mesh of the first device,
    then ``4dev`` on a mesh of all 4. mode ``multi``: one of several processes (started by
    L2T_COORDINATOR / L2T_NUM_PROCESSES / L2T_PROCESS_ID, read by
    parallel.maybe_initialize_distributed); run ``2x2-p{process}`` on all global devices.
    The device count comes from JAX_NUM_CPU_DEVICES.
    """

    import jax
    import jax.numpy as jnp

    from l2t_jax import models
    from l2t_jax.training import parallel
    from l2t_jax.transfer import bilevel, pairing

    parallel.maybe_initialize_distributed()
    # Random init through XLA's RngBitGenerator: compiles in ~1/5 of threefry's time on CPU
    # (the step itself draws no random numbers). Deterministic for a given device count.
    jax.config.update("jax_default_prng_impl", "unsafe_rbg")
    # XLA's native convolutions: what 'auto' picks on GPU and TPU, where data parallelism
    # runs, and they compile in 2/3 of the time of the CPU default (im2col matmuls).
    source = models.get_model("resnet20", 5, widths=(4, 6, 8), conv_impl="native")
    target = models.get_model("vgg9_bn", NUM_CLASSES, widths=(8, 8, 16, 16, 16),
                              conv_impl="native")
    transfer = bilevel.make_transfer(source, target, pairing.parse_pairs("2-0,5-2,8-4"),
                                     inner_steps=1, conv_impl="native")
    rng = jax.random.key(0)
    # Host copies: every run starts from them (the step donates its state).
    initial_state = jax.device_get(jax.jit(
        lambda r: bilevel.init_state(transfer, r, (IMAGE_SIZE, IMAGE_SIZE, 3)))(rng))
    initial_source = jax.device_get(jax.jit(lambda r: source.init(
        r, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)), train=False))(jax.random.fold_in(rng, 1)))

    def train(name, mesh):
        started = time.time()
        rows = parallel.process_batch_slice(GLOBAL_BATCH, mesh)
        state = parallel.replicate(mesh, initial_state)
        source_variables = parallel.replicate(mesh, initial_source)
        traces = []

        def step(*args):
            traces.append(1)          # runs once per trace, not per call
            return bilevel.train_step(transfer, lambda s: 0.1 * 0.5 ** s, *args)

        step_fn = parallel.jit_sharded_step(step, mesh)
        # As the training loop does: every process compiles, then all meet at a barrier
        # before the first collective (gloo gives a late process 30 s to join it, which a
        # process compiling more slowly on a loaded machine can miss). The calls below reuse
        # this trace: ``traces`` still counts every trace.
        step_fn.lower(state, source_variables,
                      *parallel.global_batch(mesh, *_rows(0, rows))).compile()
        parallel.wait_for_all("l2t_jax/test/compiled", 300)   # the same name in every process
        for i in range(STEPS):
            images, labels = parallel.global_batch(mesh, *_rows(i, rows))
            assert images.shape == (GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), images.shape
            assert images.sharding.spec == jax.sharding.PartitionSpec("data")
            state, metrics = step_fn(state, source_variables, images, labels)
        metrics = jax.device_get(metrics)
        leaves = {jax.tree_util.keystr(path): np.asarray(x)
                  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]}
        max_change = max(float(np.max(np.abs(a - b))) for a, b in zip(
            leaves.values(), jax.tree.leaves(initial_state)) if a.dtype == np.float32)
        np.savez(f"{output_path}-{name}.npz", **leaves)
        with open(f"{output_path}-{name}.json", "w") as f:
            json.dump({"traces": len(traces), "rows": [rows.start, rows.stop],
                       "main": parallel.is_main_process(),
                       "devices": mesh.size, "processes": jax.process_count(),
                       "local_devices": jax.local_device_count(),
                       "replicated": all(x.sharding.is_fully_replicated
                                         for x in jax.tree.leaves(state)),
                       "max_change": max_change, "seconds": time.time() - started,
                       "meta_loss": float(metrics["meta_loss"])}, f)

    if mode == "single":
        train("1dev", parallel.make_mesh(jax.devices()[:1]))
        train("4dev", parallel.make_mesh())
    else:
        train(f"2x2-p{jax.process_index()}", parallel.make_mesh())


# ---------------------------------------------------------------------- the tests
def _run(directory, jobs):
    """Runs the worker processes ``name -> (mode, devices, extra env)`` together; returns
    {name: why it failed, with its output} for those that failed (a hang is killed after
    TIMEOUT_S)."""
    started, processes = time.time(), {}
    for name, (mode, devices, extra_env) in jobs.items():
        env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu",
                   PYTHONPATH=REPO_ROOT, **dict(extra_env))
        log = open(directory / f"{name}.log", "w")
        processes[name] = log, subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(directory / "run"), mode],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    # Poll: a worker that fails stops the others at once (its peer would wait for it).
    stopped = None
    while stopped is None and None in [p.poll() for _, p in processes.values()]:
        if time.time() - started > TIMEOUT_S:
            stopped = f"timed out after {TIMEOUT_S} s"
        elif any(p.returncode not in (None, 0) for _, p in processes.values()):
            stopped = "stopped: another worker failed"
        else:
            time.sleep(0.5)
    failures = {}
    for name, (log, process) in processes.items():
        if process.poll() is None:
            process.kill()
        process.wait()
        log.close()
        if process.returncode != 0:
            output = (directory / f"{name}.log").read_text()[-6000:]
            reason = stopped if process.returncode < 0 else f"exit status {process.returncode}"
            failures[name] = (f"{name}: {reason} ({time.time() - started:.0f} s); its output:"
                              f"\n{output}")
    return failures


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """run name -> (final state leaves, info), or the failure's output.

    One process with 4 devices (runs 1dev, then 4dev) and the two processes of 2 devices,
    all at once. (The 2 x 2 step is the same HLO as the 4-device one, but on CPU the
    persistent cache key includes the device ids, which differ across processes: it
    compiles again, so running it after the single process would gain nothing.)
    """
    directory = tmp_path_factory.mktemp("parallel")
    single = (("L2T_DISTRIBUTED", "0"),)     # even under a launcher (SLURM) in CI
    port = free_port()
    multi = lambda pid: (("L2T_COORDINATOR", f"127.0.0.1:{port}"), ("L2T_NUM_PROCESSES", "2"),
                         ("L2T_PROCESS_ID", str(pid)))
    started = time.time()
    failures = _run(directory, {"single": ("single", 4, single),
                                "process0": ("multi", 2, multi(0)),
                                "process1": ("multi", 2, multi(1))})
    print(f"\nworkers: {time.time() - started:.0f} s")
    results = {}
    for name, job in (("1dev", "single"), ("4dev", "single"), ("2x2-p0", "process0"),
                      ("2x2-p1", "process1")):
        path = directory / f"run-{name}"
        if job in failures:
            results[name] = failures[job]
        else:
            results[name] = (dict(np.load(f"{path}.npz")),
                             json.loads(open(f"{path}.json").read()))
    return results


def _result(runs, name):
    if isinstance(runs[name], str):
        pytest.fail(runs[name])
    return runs[name]


def _max_difference(a, b):
    assert a.keys() == b.keys()
    worst = max(a, key=lambda k: float(np.max(np.abs(a[k] - b[k]))))
    return worst, float(np.max(np.abs(a[worst] - b[worst])))


def _assert_same_state(a, b, what):
    worst, difference = _max_difference(a, b)
    print(f"{what}: max |difference| {difference:.3g} (in {worst})")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=RTOL, atol=ATOL, err_msg=key)


def test_four_devices_give_the_one_device_step(runs):
    one, one_info = _result(runs, "1dev")
    four, four_info = _result(runs, "4dev")
    assert (one_info["devices"], four_info["devices"]) == (1, 4)
    assert four_info["replicated"] and four_info["rows"] == [0, GLOBAL_BATCH]
    assert one_info["max_change"] > 1e-2            # training moved the state
    _assert_same_state(one, four, "1 vs 4 devices")


def test_two_processes_give_the_one_process_step(runs):
    four, _ = _result(runs, "4dev")
    for pid in range(2):
        state, info = _result(runs, f"2x2-p{pid}")
        assert (info["processes"], info["devices"], info["local_devices"]) == (2, 4, 2)
        assert info["rows"] == [4 * pid, 4 * pid + 4]       # each loads only its half
        assert info["main"] == (pid == 0)
        assert info["replicated"]
        _assert_same_state(four, state, f"2 processes x 2 vs 1 x 4 devices (process {pid})")
    # The replicated state is the same array on both processes.
    for key, value in _result(runs, "2x2-p0")[0].items():
        np.testing.assert_array_equal(value, _result(runs, "2x2-p1")[0][key], err_msg=key)


def test_sharded_step_traces_once(runs):
    for name in runs:
        assert _result(runs, name)[1]["traces"] == 1, name


def test_single_process_helpers(monkeypatch):
    """In the pytest process: no distributed start without a launcher, process 0 loads the
    whole batch, and a coordinator without a process count is a clear error."""
    from l2t_jax.training import parallel
    for name in ("L2T_COORDINATOR", "L2T_NUM_PROCESSES", "L2T_PROCESS_ID", "L2T_DISTRIBUTED",
                 "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.maybe_initialize_distributed() is False
    assert parallel.is_main_process()
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",)
    assert parallel.process_batch_slice(8 * mesh.size, mesh) == slice(0, 8 * mesh.size)
    monkeypatch.setenv("L2T_COORDINATOR", "127.0.0.1:1")
    with pytest.raises(ValueError, match="without the process count"):
        parallel.maybe_initialize_distributed()
    monkeypatch.setenv("L2T_DISTRIBUTED", "maybe")
    with pytest.raises(ValueError, match="L2T_DISTRIBUTED='maybe'"):
        parallel.maybe_initialize_distributed()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])

"""Faults of multi-process runs and resuming on another number of devices (issue 21,
items 4 and 5), with the training program (python -m l2t_jax.main) in real processes over
loopback (gloo), on fake CPU devices (JAX_NUM_CPU_DEVICES).

All the launches of the file start together (compiling and starting jax dominate; they
share the 2 cores), once per module:

- ``raise``: 2 processes x 2 devices; process 1 raises DataError loading its rows of
  batch 2 (bad data on its rows). Process 0 must stop soon after, naming process 1.
- ``killed``: 2 x 2; process 1 is SIGKILLed as its save of checkpoint 2 starts. Process 0
  must stop within the heartbeat timeout (5 s here, config.distributed_heartbeat_timeout_s)
  naming process 1, and no checkpoint 2 may be committed. A restart in one process on one
  device (2 x 2 -> 1) resumes from checkpoint 1.
- ``four``: one process with 4 devices, checkpoints kept; resumed from its checkpoint 3 in
  the pytest process on 1 device (4 -> 1).
- ``from-one``: 2 x 2 resuming from checkpoint 3 of the 1-device reference run (1 -> 2 x 2).
- ``unreachable``: process 1 of 2 given a coordinator address where nothing listens, with
  config.distributed_init_timeout_s = 3: one line naming the address and the timeout.

Every resumed run must end where the uninterrupted 1-device run does, within the float32
tolerance of tests/test_parallel.py (another device count changes the summation order).
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO_ROOT, final_params, free_port, tiny_config, write_config_file
from l2t_jax.training import train

RTOL, ATOL = 1e-4, 1e-5            # tests/test_parallel.py's tolerance (reasons there)
HEARTBEAT_S = 5
TIMEOUT_S = 420                    # for all the launches together
# The surviving process's exit after its peer's end: the heartbeat timeout (killed) plus
# margin for a loaded, shared CPU (measured: 5.0 s after a SIGKILL, 0.2 s after a raise).
EXIT_BOUND_S = HEARTBEAT_S + 15

# `python FAULT_HOOK <main args>`: l2t_jax.main, except that in process
# L2T_TEST_FAULT_PROCESS the fault L2T_TEST_FAULT happens at step L2T_TEST_FAULT_STEP:
# `raise` (loading its rows of that batch fails as for an undecodable image) or `kill`
# (SIGKILL at the start of its save of that step's checkpoint).
FAULT_HOOK = """
import os, signal
from absl import app
from l2t_jax import data, main
from l2t_jax.training import checkpoints
fault, step = os.environ.get("L2T_TEST_FAULT"), int(os.environ.get("L2T_TEST_FAULT_STEP", 0))
if fault and os.environ.get("L2T_PROCESS_ID") == os.environ["L2T_TEST_FAULT_PROCESS"]:
    _batches, _save = data.step_batches, checkpoints.Checkpoints.save
    def batches(source, steps, **kwargs):
        for at, batch in zip(steps, _batches(source, steps, **kwargs)):
            if fault == "raise" and at == step:
                rows = kwargs["rows"]
                raise data.DataError(f"cannot decode image bad.png (rows {rows.start}-"
                                     f"{rows.stop - 1} of batch {at})")
            yield batch
    def save(self, done, state, progress):
        if fault == "kill" and done == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return _save(self, done, state, progress)
    data.step_batches, checkpoints.Checkpoints.save = batches, save
app.run(main.main, flags_parser=main.parse_flags)
"""


def _steps(workdir):
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))
                  if n.isdigit())


def _delete_after(workdir, step):
    for later in _steps(workdir):
        if later > step:
            shutil.rmtree(os.path.join(workdir, "checkpoints", str(later)))


@pytest.fixture(scope="module")
def launched(tiny_assets, tmp_path_factory):
    """(config, the 1-device reference's final state, reference workdir, {launch: {process:
    (exit status, seconds from the start to its end, output)}}, root)."""
    root = tmp_path_factory.mktemp("distributed")
    # jit_init: one compiled initialisation; op by op, 7 processes starting at once on 2
    # cores spent ~110 s there (each op its own small program).
    config = tiny_config(tiny_assets / "data", tiny_assets / "source", method="scratch",
                         pairs="", keep_checkpoints=6, jit_init=True,
                         distributed_heartbeat_timeout_s=HEARTBEAT_S,
                         distributed_shutdown_timeout_s=10)
    reference = root / "reference"
    train.train_and_evaluate(config, str(reference))
    config_file = write_config_file(config, root / "config.py")
    hook = root / "fault_hook.py"
    hook.write_text(FAULT_HOOK)
    shutil.copytree(reference, root / "from-one")
    _delete_after(root / "from-one", 3)

    def processes(name, count, devices, **env):
        port = free_port()
        return [(name, p, devices, dict(
            env, L2T_COORDINATOR=f"127.0.0.1:{port}", L2T_NUM_PROCESSES=str(count),
            L2T_PROCESS_ID=str(p)) if count > 1 else dict(env, L2T_DISTRIBUTED="0"))
            for p in range(count)]
    jobs = (processes("raise", 2, 2, L2T_TEST_FAULT="raise", L2T_TEST_FAULT_PROCESS="1",
                      L2T_TEST_FAULT_STEP="2")
            + processes("killed", 2, 2, L2T_TEST_FAULT="kill", L2T_TEST_FAULT_PROCESS="1",
                        L2T_TEST_FAULT_STEP="2")
            + processes("four", 1, 4) + processes("from-one", 2, 2)
            + [("unreachable", 1, 1, {"L2T_COORDINATOR": f"127.0.0.1:{free_port()}",
                                      "L2T_NUM_PROCESSES": "2", "L2T_PROCESS_ID": "1"})])
    started, running = time.time(), {}
    for name, p, devices, env in jobs:
        log = open(root / f"{name}-{p}.log", "w")
        running[name, p] = log, subprocess.Popen(
            [sys.executable, str(hook), f"--config={config_file}",
             f"--workdir={root / name}", "--config.distributed_init_timeout_s=3"
             if name == "unreachable" else "--config.distributed_init_timeout_s=120"],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu",
                     PYTHONPATH=REPO_ROOT, **env))
    ended = {}
    while len(ended) < len(running) and time.time() - started < TIMEOUT_S:
        for key, (_, process) in running.items():
            if key not in ended and process.poll() is not None:
                ended[key] = time.time() - started
        time.sleep(0.1)
    results = {}
    for (name, p), (log, process) in running.items():
        if process.poll() is None:
            process.kill()
        process.wait()
        log.close()
        results.setdefault(name, {})[p] = (process.returncode, ended.get((name, p)),
                                           (root / f"{name}-{p}.log").read_text())
    print(f"\nlaunches: {time.time() - started:.0f} s")
    return config, final_params(reference)[1], reference, results, root


def _assert_close(expected, actual, what):
    import jax
    worst = 0.0
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
        a, b = np.asarray(a), np.asarray(b)
        if np.issubdtype(a.dtype, np.floating):
            worst = max(worst, float(np.max(np.abs(a - b))) if a.size else 0.0)
            np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL, err_msg=what)
        else:
            np.testing.assert_array_equal(b, a, err_msg=what)
    print(f"{what}: max |difference| {worst:.3g}")


def _errors(output):
    return [line for line in output.splitlines() if line.startswith("error: ")]


def test_a_process_that_raises_stops_the_other_naming_it(launched):
    *_, results, _ = launched
    (code0, end0, out0), (code1, end1, out1) = results["raise"][0], results["raise"][1]
    assert code1 == 1, out1[-3000:]
    assert _errors(out1) == ["error: cannot decode image bad.png (rows 4-7 of batch 2)"], \
        out1[-3000:]
    assert code0 == 1, out0[-3000:]
    print(f"process 0 ended {end0 - end1:.1f} s after process 1:", _errors(out0))
    assert end0 - end1 < EXIT_BOUND_S
    assert _errors(out0) == [
        "error: process 1 of 2 failed: DataError: cannot decode image bad.png (rows 4-7 of "
        "batch 2); stopping process 0 too. The checkpoints written so far are intact: fix "
        "the failure and run the same command on every process to resume"], out0[-3000:]
    assert "Traceback" not in out0 + out1


def test_a_killed_process_stops_the_other_and_leaves_no_half_written_step(launched):
    """Process 1 killed as its save of checkpoint 2 starts: process 0 stops within the
    heartbeat timeout (plus margin) naming process 1 (our watch thread's line, or jax's
    own fatal error, whichever comes first: both name the task); checkpoint 2 is not
    committed; a restart in one process on one device (2 x 2 -> 1) resumes from 1 and ends
    where the uninterrupted run does."""
    config, expected, _, results, root = launched
    (code0, end0, out0), (code1, end1, _) = results["killed"][0], results["killed"][1]
    assert code1 == -signal.SIGKILL
    assert code0 != 0, out0[-3000:]
    print(f"process 0 ended {end0 - end1:.1f} s after process 1 was killed (status {code0}):",
          _errors(out0))
    assert end0 - end1 < EXIT_BOUND_S
    assert ("error: process 1 of 2 stopped (no heartbeat" in out0
            or "unhealthy (stopped sending heartbeats):\n1\n" in out0), out0[-3000:]
    workdir = root / "killed"
    assert _steps(workdir) == [1]                    # 2 was never committed
    train.train_and_evaluate(config, str(workdir))   # 1 process, 1 device
    assert _steps(workdir) == [1, 2, 3, 4, 5, 6]
    _assert_close(expected, final_params(workdir)[1], "2 x 2 (to step 1) -> 1 device")


def test_four_devices_resume_on_one(launched):
    config, expected, _, results, root = launched
    code, _, out = results["four"][0]
    assert code == 0, out[-3000:]
    assert "data parallel over 4 devices" in out
    _delete_after(root / "four", 3)
    train.train_and_evaluate(config, str(root / "four"))
    assert _steps(root / "four") == [1, 2, 3, 4, 5, 6]
    _assert_close(expected, final_params(root / "four")[1], "4 devices (to step 3) -> 1")


def test_one_device_resumes_on_two_processes(launched):
    _, expected, _, results, root = launched
    for p in range(2):
        code, _, out = results["from-one"][p]
        assert code == 0, out[-3000:]
        assert "resumed from step 3" in out
    assert "process 1 loads rows 4-7 of each batch of 8" in results["from-one"][1][2]
    _assert_close(expected, final_params(root / "from-one")[1], "1 device (to step 3) -> 2 x 2")


def test_unreachable_coordinator_is_one_line(launched):
    *_, results, _ = launched
    code, seconds, out = results["unreachable"][1]      # it is process 1 (of 2)
    assert code == 1 and "Traceback" not in out and "Check failure" not in out, out[-3000:]
    (line,) = _errors(out)
    print(line, f"({seconds:.0f} s from the start)")
    assert line.startswith("error: process 1 could not reach the coordinator at 127.0.0.1:")
    assert "within 3 s (config.distributed_init_timeout_s): Connection refused" in line

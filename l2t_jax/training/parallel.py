"""Data-parallel and multi-host training: the device mesh, shardings, per-process batches,
the sharded jit of the train step, and the start of the distributed runtime.

This module owns:

- :func:`make_mesh`: a 1-D mesh named ``data`` over all (global) devices.
- The shardings: a batch is split over ``data`` on its axis 0 (:func:`batch_sharding`); the
  train state and the source variables are replicated (:func:`replicated_sharding`,
  :func:`replicate`, :func:`abstract_replicated`).
- :func:`process_batch_slice`: which rows of each global batch this process loads, and
  :func:`global_batch`: the global ``jax.Array`` s built from every process's rows.
- :func:`jit_sharded_step`: ``jax.jit`` of a pure ``step(state, source_variables, images,
  labels) -> (state, metrics)`` with those shardings, state donated.
- :func:`maybe_initialize_distributed` (with :class:`DistributedTimeouts`) and
  :func:`is_main_process`.
- Failures of one process (:func:`report_failure`, :func:`describe_peer_failure` and a watch
  thread): the other processes stop with one line naming it instead of waiting in a
  collective the failed process will never join.

Data parallelism is plain GSPMD: the step is written for one logical batch and
``jax.jit`` partitions it. Every batch mean in the model (BatchNorm's statistics, the losses)
is a mean over the *global* batch: XLA computes per-device partial sums and all-reduces them.
So the result does not depend on the device count, up to float32 summation order
(tests/test_parallel.py measures it: 1 vs 4 devices, and 2 processes x 2 devices vs 1 x 4).
The global batch size is the config's ``batch_size``; it must be divisible by the number of
devices (and so by the number of processes).

Integration in a training loop::

    from l2t_jax.training import parallel
    parallel.maybe_initialize_distributed()        # first, before any other jax call
    mesh = parallel.make_mesh()
    rows = parallel.process_batch_slice(config.batch_size, mesh)   # e.g. slice(64, 128)
    state = parallel.replicate(mesh, bilevel.init_state(...))      # same seed everywhere
    source_variables = parallel.replicate(mesh, source_variables)
    step_fn = parallel.jit_sharded_step(
        functools.partial(bilevel.train_step, transfer, learning_rate_fn), mesh)
    for step in range(start, total):
        epoch, index = divmod(step, steps_per_epoch)
        # This process loads only rows [rows] of global batch `index`: the examples at
        # positions index * B + rows.start ... index * B + rows.stop - 1 of the epoch's
        # shuffled (and augmented) order, B = config.batch_size.
        local_images, local_labels = load_rows(epoch, index, rows)
        images, labels = parallel.global_batch(mesh, local_images, local_labels)
        state, metrics = step_fn(state, source_variables, images, labels)
        if parallel.is_main_process():
            ...  # metrics.jsonl, TensorBoard, progress lines, result.json, config.json
        # every process: manager.save(...) / manager.restore(...) (orbax coordinates them)

Because batch i of an epoch is a pure function of (seed, epoch, i) and the augmentation
of an example depends only on its position in the epoch, the rows a process loads are
exactly the rows that a single-process run puts at those positions: a run on any number of
processes sees the same global batches.

Checkpoints (orbax): every process must call ``CheckpointManager.save`` and ``restore``
(orbax synchronises the processes and writes each array once, from its primary copy), with
the workdir on a file system all hosts share (NFS, or a bucket mounted with GCS FUSE: the
metrics and JSON files are written with Python's ``open``, so a ``gs://`` URL does not work).
Restore into global arrays by
passing :func:`abstract_replicated` of the state as the abstract target. Files outside
orbax (metrics, TensorBoard events, ``result.json``, ``config.json``) are written by
process 0 only (:func:`is_main_process`).

Launching
---------

Every host runs the same command; each process sees its local devices, ``jax.devices()``
lists all of them, and the global batch is split over all of them.

One host, several GPUs (or TPU chips): one process sees all local devices; nothing to
configure::

    python -m l2t_jax.main --config=cifar100 --workdir=runs/c100

TPU pod slice (e.g. v4-32: 4 hosts x 4 chips). jax finds the coordinator, the process count
and the process id from the TPU VM's metadata; :func:`maybe_initialize_distributed` starts
the distributed runtime when it sees a Cloud TPU VM. The workdir must be a shared file system
(NFS or a GCS FUSE mount)::

    gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="
      cd l2t-jax && .venv/bin/python -m l2t_jax.main --config=cifar100 \\
        --workdir=/mnt/shared/runs/c100"

Several GPU nodes under SLURM: one process per GPU. jax reads the SLURM environment
(coordinator = the first node of the job, process id = SLURM_PROCID, device =
SLURM_LOCALID). Ask for all of a node's GPUs per task rather than ``--gpus-per-task=1``, since
jax picks the GPU with index SLURM_LOCALID among the visible ones::

    srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 \\
      python -m l2t_jax.main --config=cifar100 --workdir=/shared/runs/c100

Anything else (plain ssh, a container scheduler, processes on one machine): give each
process the coordinator (host:port of process 0, reachable from all), the process count
and its id, in the environment or as arguments of :func:`maybe_initialize_distributed`::

    L2T_COORDINATOR=10.0.0.1:1234 L2T_NUM_PROCESSES=2 L2T_PROCESS_ID=0 python -m l2t_jax.main ...
    L2T_COORDINATOR=10.0.0.1:1234 L2T_NUM_PROCESSES=2 L2T_PROCESS_ID=1 python -m l2t_jax.main ...

``L2T_LOCAL_DEVICE_IDS=0,1`` restricts a process to those local devices. On CPU the
processes' collectives go over gloo (TCP), jax's default CPU collectives.
``L2T_DISTRIBUTED=0`` turns the automatic start off, ``L2T_DISTRIBUTED=1`` forces
``jax.distributed.initialize()`` with jax's own detection (e.g. Open MPI, Kubernetes).
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
logger = logging.getLogger(__name__)
DATA_AXIS = "data"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


# ---------------------------------------------------------------------- the distributed runtime
def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _detected_cluster() -> Optional[str]:
    """The multi-process launcher jax would detect, or None (single process)."""
    slurm = ("SLURM_JOB_ID", "SLURM_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in os.environ for v in slurm) and (_env_int("SLURM_STEP_NUM_TASKS")
                                                or _env_int("SLURM_NTASKS") or 1) > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in os.environ and (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "Open MPI"
    try:  # set by `import jax` when it finds TPU chips and libtpu on a Cloud TPU VM
        from jax._src import cloud_tpu_init
        if cloud_tpu_init.running_in_cloud_tpu_vm:
            return "Cloud TPU"
    except (ImportError, AttributeError):
        pass
    return None


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None,
                                 local_device_ids: Optional[Sequence[int]] = None,
                                 timeouts: Optional["DistributedTimeouts"] = None) -> bool:
    """Starts jax's distributed runtime when this is one of several processes.

    Call it first, before anything touches a jax backend. Calls
    ``jax.distributed.initialize`` when:

    1. ``coordinator_address`` is given, or ``L2T_COORDINATOR`` (or jax's own
       ``JAX_COORDINATOR_ADDRESS``) is set: the coordinator, with ``num_processes`` /
       ``L2T_NUM_PROCESSES``, ``process_id`` / ``L2T_PROCESS_ID`` and optionally
       ``local_device_ids`` / ``L2T_LOCAL_DEVICE_IDS`` ("0,1");
    2. or a launcher jax detects runs several processes: SLURM with more than one task, Open
       MPI with more than one rank, a Cloud TPU VM (jax reads the slice's metadata; on a
       single-host VM this starts a runtime of one process, which is harmless);
    3. or ``L2T_DISTRIBUTED=1`` (jax's detection, whatever the environment).

    ``L2T_DISTRIBUTED=0`` disables 2 (and 3). Otherwise (one process) it does nothing.
    Idempotent. On CPU, collectives between processes use gloo, jax's default
    (``jax_cpu_collectives_implementation``); it is set explicitly here in case it was unset.

    ``timeouts`` (seconds; default jax's: 300, 100, 300; the program passes the config's
    ``distributed_*_timeout_s``): how long to wait for the coordinator and every process to
    connect, after how long without a heartbeat a process counts as dead, and how long a
    finishing process waits for the others. Once started, a thread in every process
    watches for a failure that another process reported (:func:`report_failure`): this
    process then prints one line naming the failed process and exits (status 1) instead
    of waiting forever in a collective that the failed process will never join.

    Returns:
      whether the distributed runtime is running (after this call).

    Raises:
      DistributedStartError: the coordinator could not be reached (or not every process
        connected) within the timeout; the message names the address.
    """
    if jax.distributed.is_initialized():
        return True
    mode = os.environ.get("L2T_DISTRIBUTED", "auto").strip().lower()
    if mode not in _TRUE + _FALSE + ("auto",):
        raise ValueError(f"L2T_DISTRIBUTED={mode!r}: expected auto, 1 or 0")
    coordinator_address = coordinator_address or os.environ.get("L2T_COORDINATOR") or None
    if num_processes is None:
        num_processes = _env_int("L2T_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("L2T_PROCESS_ID")
    if local_device_ids is None and os.environ.get("L2T_LOCAL_DEVICE_IDS"):
        local_device_ids = [int(i) for i in os.environ["L2T_LOCAL_DEVICE_IDS"].split(",")]
    explicit = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    cluster = None if (explicit or mode in _FALSE) else _detected_cluster()
    if not (explicit or cluster or mode in _TRUE):
        return False
    if explicit and coordinator_address and (num_processes is None or process_id is None):
        raise ValueError(f"coordinator {coordinator_address} given without the process count "
                         "and this process's id (L2T_NUM_PROCESSES, L2T_PROCESS_ID)")
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logger.info("starting jax.distributed (%s)", cluster or coordinator_address or "jax's "
                 "cluster detection")
    timeouts = timeouts or DistributedTimeouts()
    init_s = timeouts.init_s
    if coordinator_address and process_id not in (None, 0):
        # jax ends the process (a C++ fatal error and a stack trace) when it cannot reach
        # the coordinator; a plain TCP connect first turns that into one line.
        init_s = _wait_for_coordinator(coordinator_address, process_id, timeouts.init_s)
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   local_device_ids=local_device_ids,
                                   initialization_timeout=init_s,
                                   heartbeat_timeout_seconds=timeouts.heartbeat_s,
                                   shutdown_timeout_seconds=timeouts.shutdown_s)
    except Exception as e:    # jax raises its runtime's error type; keep the first line
        address = (coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
                   or cluster or "jax's cluster detection")
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DistributedStartError(
            f"process {process_id if process_id is not None else '?'} could not start the "
            f"distributed runtime with the coordinator at {address} within "
            f"{timeouts.init_s} s (config.distributed_init_timeout_s): {reason}. Check that "
            "the address is process 0's host and a free port reachable from every process, "
            "and that every process was started") from None
    logger.info("process %d of %d, %d local of %d devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    _start_failure_watch()
    return True


class DistributedStartError(ValueError):
    """jax.distributed.initialize failed (coordinator unreachable, a process missing)."""


def _wait_for_coordinator(address: str, process_id: int, timeout_s: int) -> int:
    """Connects to ``host:port`` until it answers or ``timeout_s`` pass; returns the seconds
    left for jax's own initialization (at least 1).

    Raises:
      DistributedStartError: naming the address and the timeout.
    """
    host, _, port = address.rpartition(":")
    try:
        port = int(port)
    except ValueError:
        raise DistributedStartError(f"the coordinator address {address!r} is not "
                                    "host:port") from None
    started = time.monotonic()
    error = None
    while time.monotonic() - started < timeout_s:
        try:
            socket.create_connection((host.strip("[]"), port), timeout=1.0).close()
            return max(1, int(timeout_s - (time.monotonic() - started)))
        except OSError as e:
            error = e
            time.sleep(0.25)
    raise DistributedStartError(
        f"process {process_id} could not reach the coordinator at {address} within "
        f"{timeout_s} s (config.distributed_init_timeout_s): {error.strerror or error}. "
        "Check that process 0 runs there and that the address is reachable from here")


@dataclasses.dataclass(frozen=True)
class DistributedTimeouts:
    """jax.distributed's timeouts, in whole seconds (jax's defaults)."""
    init_s: int = 300
    heartbeat_s: int = 100
    shutdown_s: int = 300

    @classmethod
    def from_config(cls, config) -> "DistributedTimeouts":
        """From ``config.distributed_{init,heartbeat,shutdown}_timeout_s`` where present
        (the demo's config has none)."""
        return cls(**{f"{name}_s": int(config.get(f"distributed_{name}_timeout_s",
                                                  getattr(cls, f"{name}_s")))
                      for name in ("init", "heartbeat", "shutdown")})


# ---------------------------------------------------------------------- failures of a process
_FAILED_KEY = "l2t_jax/failed"
_FAILURE_POLL_S = 0.5
_finishing = threading.Event()      # set at exit: the runtime shuts down, not a failure


def _client():
    from jax._src import distributed
    return distributed.global_state.client


def report_failure(error: BaseException) -> None:
    """Tells the other processes that this one failed with ``error`` (a no-op with one
    process): their watch threads print it and exit. The first report wins."""
    if jax.process_count() == 1 or _client() is None:
        return
    message = (f"process {jax.process_index()} of {jax.process_count()} failed: "
               f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    try:
        _client().key_value_set(_FAILED_KEY, message[:1000])
    except Exception:  # noqa: BLE001 - another process reported first, or the runtime is gone
        pass


def reported_failure() -> Optional[str]:
    """The failure another process reported (:func:`report_failure`), or None."""
    try:
        message = _client().key_value_try_get(_FAILED_KEY)
    except Exception:  # noqa: BLE001 - NOT_FOUND, or the service is gone
        return None
    return None if message.startswith(f"process {jax.process_index()} of") else message


def dead_processes(wait_s: float = 0.0) -> Optional[list[int]]:
    """The processes the coordination service no longer counts as alive, waiting up to
    ``wait_s`` for one to show (the service notices a dead process after the heartbeat
    timeout); None when the service cannot be asked (the coordinator's process is gone)."""
    client, count = _client(), jax.process_count()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            live = client.get_live_nodes(list(range(count)))
        except Exception:  # noqa: BLE001 - the service (process 0) is unreachable
            return None
        dead = sorted(set(range(count)) - set(live))
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(_FAILURE_POLL_S)


def describe_peer_failure(error: BaseException, heartbeat_s: int) -> Optional[str]:
    """Why a collective (or orbax's barrier) of this process failed, if another process is
    the cause: its reported failure, or which process died (waiting up to the heartbeat
    timeout for the service to notice), or the coordinator gone. None when every process
    is alive: the error is this process's own."""
    count = jax.process_count()
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}" \
        if str(error).strip() else type(error).__name__
    reported = reported_failure()
    if reported:
        return reported
    dead = dead_processes(wait_s=heartbeat_s + 2 * _FAILURE_POLL_S)
    if dead is None:
        return f"the coordinator (process 0 of {count}) is gone (this process saw {reason})"
    if dead:
        return (f"process {', '.join(map(str, dead))} of {count} stopped (no heartbeat for "
                f"{heartbeat_s} s, config.distributed_heartbeat_timeout_s; this process saw "
                f"{reason})")
    return None


def wait_for_all(name: str, timeout_s: int) -> None:
    """Every process waits here, at a barrier of jax's coordination service (no device
    collective; a no-op with one process).

    Before the first step: gloo gives the processes 30 s to meet at their first collective,
    and on a loaded machine (or a host without the compilation cache) one process can
    finish compiling the step later than that.
    """
    if jax.process_count() > 1 and _client() is not None:
        _client().wait_at_barrier(name, int(timeout_s * 1000))


def peer_failure_line(message: str) -> str:
    """The one line a process prints when it stops because of another one."""
    return (f"error: {message}; stopping process {jax.process_index()} too. The checkpoints "
            "written so far are intact: fix the failure and run the same command on every "
            "process to resume")


def _start_failure_watch() -> None:
    """A daemon thread that polls the coordination service for a failure that another
    process reported, a process it no longer counts as alive, or the service itself gone
    (the coordinator's process died); then it prints one line and ends this process, which
    would otherwise wait in its next collective, possibly forever."""
    client, count = _client(), jax.process_count()
    if client is None or count == 1:
        return
    atexit.register(_finishing.set)     # runs before jax's own shutdown (registered earlier)

    def stop(message: str) -> None:
        if _finishing.is_set():
            return
        sys.stderr.write(peer_failure_line(message) + "\n")
        sys.stderr.flush()
        os._exit(1)

    def watch():
        while not _finishing.wait(_FAILURE_POLL_S):
            message = reported_failure()
            if message:
                return stop(message)
            dead = dead_processes()
            if dead is None:
                return stop(f"the coordinator (process 0 of {count}) is gone")
            if dead:
                return stop(f"process {', '.join(map(str, dead))} of {count} stopped "
                            "(no heartbeat within config.distributed_heartbeat_timeout_s)")
    threading.Thread(target=watch, name="l2t-failure-watch", daemon=True).start()


def is_main_process() -> bool:
    """True in process 0, the one that writes logs, metrics and result files.

    Checkpoints are not its alone: every process must call orbax's save and restore.
    """
    return jax.process_index() == 0


# ---------------------------------------------------------------------- mesh and shardings
def barrier(name: str) -> None:
    """All processes wait here (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh with axis ``data`` over ``devices`` (default: all global devices).

    Devices are ordered by (process, id), so each process holds a contiguous block of every
    batch (see :func:`process_batch_slice`).
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices, dtype=object), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays split over ``data`` along axis 0 (images, labels)."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (train state, source variables, metrics)."""
    return NamedSharding(mesh, P())


def _replicate_leaf(x, sharding: NamedSharding):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        # Already global (e.g. restored by orbax): reshard on device if it must be.
        if x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    if jax.process_count() == 1 or jax.dtypes.issubdtype(getattr(x, "dtype", None),
                                                          jax.dtypes.prng_key):
        return jax.device_put(x, sharding)
    # Several processes: each one provides only its own devices' copies, from its host value
    # (which must be the same in every process: same seed, same checkpoint).
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(mesh: Mesh, tree: PyTree) -> PyTree:
    """Places a pytree replicated on ``mesh``; every process must pass the same values."""
    sharding = replicated_sharding(mesh)
    return jax.tree.map(lambda x: _replicate_leaf(x, sharding), tree)


def abstract_replicated(mesh: Mesh, tree: PyTree) -> PyTree:
    """``jax.ShapeDtypeStruct`` s of ``tree`` with the replicated sharding: the target to
    pass to orbax's ``StandardRestore`` so that a restore yields global arrays."""
    sharding = replicated_sharding(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        tree)


# ---------------------------------------------------------------------- batches
def process_batch_slice(global_batch_size: int, mesh: Optional[Mesh] = None) -> slice:
    """Rows ``[start, stop)`` of each global batch that this process loads.

    With :func:`make_mesh`'s order it is ``slice(p * L, (p + 1) * L)`` for process p and
    L = global_batch_size / process count.

    Raises:
      ValueError: the batch does not divide over the devices, or (for a hand-made mesh) this
        process's devices do not hold one contiguous block of rows.
    """
    mesh = make_mesh() if mesh is None else mesh
    if global_batch_size % mesh.size:
        raise ValueError(f"the global batch size {global_batch_size} is not divisible by the "
                         f"number of devices {mesh.size}")
    indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    rows = sorted({index[0].indices(global_batch_size)[:2] for index in indices.values()})
    for (_, stop), (start, _) in zip(rows, rows[1:]):
        if stop != start:
            raise ValueError(f"process {jax.process_index()}'s devices hold rows {rows} of "
                             "the batch, not one block; build the mesh with make_mesh()")
    return slice(rows[0][0], rows[-1][1])


def global_batch(mesh: Mesh, local_images, local_labels) -> tuple[jax.Array, jax.Array]:
    """Global ``(images, labels)`` sharded over ``data`` from this process's rows.

    Args:
      local_images, local_labels: rows :func:`process_batch_slice` of the global batch
        (host arrays). With one process they are the whole batch.
    """
    sharding = batch_sharding(mesh)
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    if len(local_images) != len(local_labels) or len(local_images) % local_devices:
        raise ValueError(f"this process's rows ({len(local_images)} images, "
                         f"{len(local_labels)} labels) do not divide over its "
                         f"{local_devices} devices")
    return (jax.make_array_from_process_local_data(sharding, np.asarray(local_images)),
            jax.make_array_from_process_local_data(sharding, np.asarray(local_labels)))


# ---------------------------------------------------------------------- the step
def jit_sharded_step(step_fn: Callable, mesh: Mesh, donate_state: bool = True,
                     batches: int = 1) -> Callable:
    """``jax.jit`` of ``step_fn(state, source_variables, images, labels) -> (state, metrics)``
    on ``mesh``: state and source variables replicated, images and labels split over
    ``data``; the new state and the metrics come back replicated (so ``jax.device_get`` of
    the metrics works in every process). ``state`` is donated unless ``donate_state=False``.
    ``batches=2``: the step takes a second (images, labels) pair after the first, split
    the same way (the meta loss's held-out batch).

    Pass the state and source variables through :func:`replicate` and the batch through
    :func:`global_batch` first. With one process jit would also accept other arrays and copy
    them to the mesh at every call; with several it must be given global arrays (a host
    array would be taken as the whole global batch).
    """
    replicated, batch = replicated_sharding(mesh), batch_sharding(mesh)
    return jax.jit(step_fn, in_shardings=(replicated, replicated) + (batch, batch) * batches,
                   out_shardings=(replicated, replicated),
                   donate_argnums=(0,) if donate_state else ())

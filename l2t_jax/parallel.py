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
- :func:`maybe_initialize_distributed` and :func:`is_main_process`.

Data parallelism is plain GSPMD: the step is written for one logical batch and
``jax.jit`` partitions it. Every batch mean in the model (BatchNorm's statistics, the losses)
is a mean over the *global* batch: XLA computes per-device partial sums and all-reduces them.
So the result does not depend on the device count, up to float32 summation order
(tests/test_parallel.py measures it: 1 vs 4 devices, and 2 processes x 2 devices vs 1 x 4).
The global batch size is the config's ``batch_size``; it must be divisible by the number of
devices (and so by the number of processes).

Integration in a training loop::

    from l2t_jax import parallel
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

import logging
import os
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
                                 local_device_ids: Optional[Sequence[int]] = None) -> bool:
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

    Returns:
      whether the distributed runtime is running (after this call).
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
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
    logger.info("process %d of %d, %d local of %d devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


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
def jit_sharded_step(step_fn: Callable, mesh: Mesh, donate_state: bool = True) -> Callable:
    """``jax.jit`` of ``step_fn(state, source_variables, images, labels) -> (state, metrics)``
    on ``mesh``: state and source variables replicated, images and labels split over
    ``data``; the new state and the metrics come back replicated (so ``jax.device_get`` of
    the metrics works in every process). ``state`` is donated unless ``donate_state=False``.

    Pass the state and source variables through :func:`replicate` and the batch through
    :func:`global_batch` first. With one process jit would also accept other arrays and copy
    them to the mesh at every call; with several it must be given global arrays (a host
    array would be taken as the whole global batch).
    """
    replicated, batch = replicated_sharding(mesh), batch_sharding(mesh)
    return jax.jit(step_fn, in_shardings=(replicated, replicated, batch, batch),
                   out_shardings=(replicated, replicated),
                   donate_argnums=(0,) if donate_state else ())

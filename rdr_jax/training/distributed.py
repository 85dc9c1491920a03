"""Multi-process training: starting ``jax.distributed``, and splitting the data between the processes.

Start-up (``initialize``), for ``rdr-jax train``:

- explicit: ``--coordinator HOST:PORT --num-processes N --process-id I`` (any machines, CPU included);
- ``--distributed auto``: ``jax.distributed.initialize()`` with no arguments, which reads the cluster from
  the environment: TPU pod slices (GCE/GKE metadata), SLURM (``SLURM_*``, inside ``srun``), Open MPI
  (``OMPI_*``, under ``mpirun``). No such environment: one process, said in the log.

CPU processes exchange collectives through gloo, which must be chosen before the backend starts; setting it
is harmless on GPU/TPU, so it is always set.

Data: the batch's leading (example) axis is split over the mesh's data-parallel axes, so each process's
devices hold one contiguous block of the global batch. ``data_shard`` finds that block from the sharding;
each process's iterator tokenises only its block (``EpochIterator.set_shard``) with index fields local to
the block, ``agree_on_lengths`` pads the blocks' token fields to one length, and ``globalize_index_fields``
re-bases the index fields before ``shard_batch`` assembles the global arrays
(``jax.make_array_from_process_local_data``). Put together, the blocks are the 1-process batch in order.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

log = logging.getLogger(__name__)

# (environment name, variables any of which marks it), checked in order, for the log and the error message;
# jax.distributed.initialize() does the actual reading.
ENVIRONMENTS = (
    ("SLURM", ("SLURM_JOB_ID",)),
    ("Open MPI", ("OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri")),
    ("TPU pod", ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "CLOUD_TPU_TASK_ID", "TPU_WORKER_ID")),
)


def detect_environment(environ: dict[str, str] | None = None) -> str | None:
    """The cluster environment ``jax.distributed.initialize()`` will read, or None."""
    environ = os.environ if environ is None else environ
    for name, variables in ENVIRONMENTS:
        if any(v in environ for v in variables):
            if name == "SLURM" and "SLURM_STEP_ID" not in environ and "SLURM_STEPID" not in environ:
                log.warning("SLURM_JOB_ID is set but this is not a job step: launch with `srun` so that every "
                            "task runs one process")
            return name
    return None


def use_gloo_on_cpu() -> None:
    """CPU collectives across processes go through gloo (before the backend starts)."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception as e:  # an older/newer jax without the option: the default may still work
        log.warning("could not select gloo CPU collectives (%s)", e)


def initialize(mode: str | None = None, coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Start ``jax.distributed`` when asked to; True when running as several processes.

    ``mode``: None/"off" (only the explicit arguments), or "auto" (the environment; see the module docstring).
    """
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if explicit:
        if mode == "auto":
            raise ValueError("--distributed auto reads the cluster from the environment: do not also pass "
                             "--coordinator/--num-processes/--process-id")
        if not (coordinator and num_processes and process_id is not None):
            raise ValueError("multi-process training needs all of --coordinator, --num-processes and --process-id")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id} is not in [0, --num-processes={num_processes})")
        if ":" not in coordinator:
            raise ValueError(f"--coordinator {coordinator!r}: expected HOST:PORT")
        use_gloo_on_cpu()
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    elif mode == "auto":
        env = detect_environment()
        use_gloo_on_cpu()
        if env is None:
            log.info("--distributed auto: no TPU pod, SLURM or Open MPI environment found; running as one process")
            return False
        try:
            jax.distributed.initialize()
        except Exception as e:
            raise ValueError(f"--distributed auto: found a {env} environment but jax.distributed.initialize() "
                             f"failed ({type(e).__name__}: {e}); pass --coordinator/--num-processes/--process-id "
                             "explicitly") from None
        log.info("--distributed auto: %s environment", env)
    elif mode not in (None, "off"):
        raise ValueError(f"--distributed must be 'auto' or 'off', got {mode!r}")
    else:
        return False
    log.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def is_main_process() -> bool:
    return jax.process_index() == 0


# How long a process waits at a barrier for the others: process 0 may be building a random model or reading a
# large file meanwhile. A device-collective barrier would give up after the collectives' connect timeout
# (gloo's, on CPU: seconds), hence the coordination service's barrier below.
BARRIER_TIMEOUT_S = 3600
_barriers = itertools.count()


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Every process waits here until all have arrived (a no-op with one process).

    Through jax.distributed's coordination service (no device collective, so no connect timeout while process
    0 works): every process calls the same barriers in the same order, so a counter makes each id unique."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the coordination client has no public accessor

    client = getattr(jax_distributed.global_state, "client", None)
    if client is None or not hasattr(client, "wait_at_barrier"):
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(f"{name}:{next(_barriers)}", timeout_in_ms=int(timeout_s * 1000))


@contextlib.contextmanager
def main_process_first(name: str):
    """Process 0 runs the block first (e.g. writes a random init model to the shared workdir); the others
    run it after, when its files are complete."""
    if jax.process_count() == 1:
        yield
        return
    if not is_main_process():
        barrier(f"rdr_jax:{name}")
    yield
    if is_main_process():
        barrier(f"rdr_jax:{name}")


def data_shard(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """(shard index, shard count): this process's block of a ``global_batch``-row batch sharded over the
    mesh's data-parallel axes. (0, 1) with one process. Processes holding the same rows (a tensor-parallel
    axis that spans processes) get the same shard."""
    if jax.process_count() == 1:
        return 0, 1
    from rdr_jax.training.partitioning import batch_sharding

    sharding = batch_sharding(mesh)
    me = jax.process_index()
    rows: set[int] = set()
    for device, index in sharding.devices_indices_map((global_batch,)).items():
        if device.process_index == me:
            rows.update(range(global_batch)[index[0]])
    if not rows:
        raise ValueError(f"process {me} holds no rows of the batch on mesh {dict(mesh.shape)}")
    lo, hi = min(rows), max(rows) + 1
    size = hi - lo
    if len(rows) != size or global_batch % size or lo % size:
        raise ValueError(f"process {me}'s devices hold batch rows {sorted(rows)} of {global_batch}: not one aligned "
                         f"block; use a mesh whose data/fsdp axes keep each process's devices together")
    return lo // size, global_batch // size


def shard_iterator(iterator, index: int, count: int, task_name: str) -> None:
    """Make a task iterator yield only block ``index`` of ``count`` of each global batch."""
    if count == 1:
        return
    if not hasattr(iterator, "set_shard"):
        raise ValueError(f"task {task_name!r}: its train iterator ({type(iterator).__name__}) has no "
                         f"set_shard(index, count), so it cannot read one process's share of the data")
    iterator.set_shard(index, count)


def _as_tuple(targets) -> tuple[str, ...]:
    return (targets,) if isinstance(targets, str) else tuple(targets)


def globalize_index_fields(batch: dict[str, np.ndarray], task, shard_index: int) -> dict[str, np.ndarray]:
    """Block-local row indices (e.g. ``positive_index``) -> rows of the global batch; -1 (none) stays."""
    if shard_index == 0 or not task.index_fields:
        return batch
    num_q = np.asarray(batch[task.question_field]).shape[0]
    out = dict(batch)
    for key, targets in task.index_fields.items():
        if key not in batch:
            continue
        target = next((t for t in _as_tuple(targets) if t in batch), None)
        if target is None:
            continue
        group = np.asarray(batch[target]).shape[0] // num_q
        value = np.asarray(batch[key])
        out[key] = np.where(value >= 0, value + shard_index * num_q * group, value).astype(value.dtype)
    return out


TOKEN_FIELDS = ("input_ids", "attention_mask", "token_type_ids")


def agree_on_lengths(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """Pad each token field of this process's block to the longest that any process's block has this step.

    Blocks padded to length buckets of their own rows may differ in length; the global array needs one, and
    the longest block's bucket is the one a single process picks for the whole batch (buckets are monotone),
    so the shapes, and the numbers, are those of one process. One small all-gather of the lengths per step."""
    from jax.experimental import multihost_utils

    keys = sorted(k for k, v in batch.items() if k.endswith(TOKEN_FIELDS) and np.ndim(v) == 2)
    if not keys:
        return batch
    local = np.array([np.shape(batch[k])[1] for k in keys], np.int32)
    longest = np.max(np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(keys)), axis=0)
    out = dict(batch)
    for key, length in zip(keys, longest):
        value = np.asarray(batch[key])
        if value.shape[1] < length:
            fill = pad_id if key.endswith("input_ids") else 0
            out[key] = np.pad(value, ((0, 0), (0, int(length) - value.shape[1])), constant_values=fill)
    return out


def local_block(batch: dict[str, np.ndarray], task, shard_index: int, shard_count: int) -> dict[str, np.ndarray]:
    """This process's block of a global host batch (dev batches, which every process reads whole). Index
    fields keep their global values: they index the global batch."""
    if shard_count == 1:
        return batch
    num_q = np.asarray(batch[task.question_field]).shape[0]
    if num_q % shard_count:
        raise ValueError(f"a batch of {num_q} examples cannot be split into {shard_count} process shards")
    out = {}
    index_fields = set(task.index_fields)
    for key, value in batch.items():
        value = np.asarray(value)
        if key in index_fields and value.shape[0] == num_q:
            per = num_q // shard_count
            out[key] = value[shard_index * per:(shard_index + 1) * per]
            continue
        if value.shape[0] % shard_count:
            raise ValueError(f"batch field {key!r}: {value.shape[0]} rows cannot be split into {shard_count} shards")
        per = value.shape[0] // shard_count
        out[key] = value[shard_index * per:(shard_index + 1) * per]
    return out


def gather_to_host(tree: Any) -> Any:
    """A pytree of global (possibly cross-process sharded) arrays as full arrays on every process."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


__all__ = ["initialize", "detect_environment", "data_shard", "shard_iterator", "globalize_index_fields",
           "agree_on_lengths", "local_block", "main_process_first", "barrier", "is_main_process", "gather_to_host"]

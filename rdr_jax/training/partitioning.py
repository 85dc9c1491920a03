"""The device mesh, and batches and parameters placed on it.

Parameters are sharded by the logical-axis table of :mod:`rdr_jax.models.sharding` (re-exported here:
``LOGICAL_AXIS_RULES``, ``logical_to_spec``), which maps each parameter's named axes onto the ``(data, fsdp,
tensor)`` mesh built below, as in MaxText/t5x; batches are split over both data-parallel axes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# The rule table and logical_to_spec live with the models (from_pretrained shards with them too); re-exported.
from rdr_jax.models.sharding import (BATCH_AXES, LOGICAL_AXIS_RULES, MESH_AXES, logical_to_spec,  # noqa: F401
                                     variable_sharding)


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Resolve one ``-1`` to "the remaining devices" and check the product equals the device count."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"only one of mesh.data/fsdp/tensor may be -1, got {sizes}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"mesh sizes must be positive or -1, got {sizes}")
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh {sizes} does not fit {num_devices} devices: {num_devices} is not divisible "
                             f"by the fixed axes' product {fixed}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} "
                         f"= {math.prod(sizes.values())} devices does not fit the {num_devices} devices available")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    try:  # topology-aware placement on real accelerators
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def tree_shardings(tree: Any, mesh: Mesh, rules: dict[str, Any] = LOGICAL_AXIS_RULES) -> Any:
    """Shardings for a pytree holding ``nnx.Variable``s (parameters, optimizer moments that copy their
    metadata) and plain arrays/scalars (replicated). The result has the tree's structure."""
    replicated = NamedSharding(mesh, P())

    def one(x):
        if isinstance(x, nnx.Variable):
            return x.replace(variable_sharding(x, mesh, rules))
        return replicated

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis over the data-parallel axes; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a host batch of numpy arrays onto the mesh, split along the leading axis.

    Single-process: the arrays are the global batch. Multi-process: each process passes its own share of
    the global batch (the leading axis split in process order), assembled without copying across hosts.
    """
    sharding = batch_sharding(mesh)
    n = math.prod(mesh.shape[a] for a in BATCH_AXES)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if jax.process_count() == 1:
            if value.shape and value.shape[0] % n:
                raise ValueError(f"batch field {key!r}: leading size {value.shape[0]} is not divisible by the "
                                 f"{n} data-parallel devices (mesh data x fsdp)")
            out[key] = jax.device_put(value, sharding)
        else:
            out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def describe(tree: Any) -> dict[str, str]:
    """{path: partition spec} of the arrays of a tree: for logs and tests."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sharding = getattr(leaf, "sharding", None)
        out[jax.tree_util.keystr(path, simple=True, separator=".")] = str(getattr(sharding, "spec", sharding))
    return out

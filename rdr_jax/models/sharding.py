"""Logical parameter axes -> ``NamedSharding``: the rule table and the one function that applies it.

Models name the axes of every parameter (``embed``, ``heads``, ``mlp``, ...; see ``rdr_jax.models.layers``).
The table maps those names onto the axes of a ``(data, fsdp, tensor)`` mesh, as in MaxText/t5x. It lives with
the models (not in ``training``) because loading needs it too: ``from_pretrained(..., mesh=...)`` reads each
device's shard of each parameter straight from the checkpoint, with the shardings the trainer then uses.

- ``batch`` -> (data, fsdp): examples are split over both data-parallel axes;
- ``embed`` -> fsdp: FSDP-style parameter (and optimizer state) sharding, gathered per layer by XLA;
- ``heads``, ``mlp``, ``vocab`` -> tensor: Megatron-style tensor parallelism;
- everything else is replicated.

A dimension whose size is not divisible by its mesh axes is replicated instead (tiny models on many
devices), and a mesh axis is used at most once per array.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis, tuple of mesh axes, or None (replicated).
LOGICAL_AXIS_RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "length": None,
    "kv_length": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "norm": None,
    "classes": None,
    "positions": None,
}


def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: dict[str, Any] = LOGICAL_AXIS_RULES) -> P:
    """A PartitionSpec for an array of ``shape`` whose axes have the given logical names."""
    if not logical:
        return P()
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape):
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        # Drop size-1 mesh axes (no-ops) and axes already used by an earlier dimension.
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        if not axes or size % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def logical_axes(variable: nnx.Variable) -> tuple | None:
    meta = variable.get_metadata()
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def variable_sharding(variable: nnx.Variable, mesh: Mesh, rules: dict[str, Any] = LOGICAL_AXIS_RULES) -> NamedSharding:
    """The sharding of one parameter (concrete or abstract) on ``mesh`` from its logical axes."""
    shape = getattr(variable.get_value(), "shape", ())
    return NamedSharding(mesh, logical_to_spec(logical_axes(variable), shape, mesh, rules))

"""The train state, created directly sharded on the mesh.

``state = {"step", "params", "opt_state", "nonfinite_steps", "halted_at"}`` holds only what changes (the last
two are the NaN/Inf bookkeeping of ``train.nan_policy``, see step.py): the trained parameters (an
``nnx.State`` of the task's trainable submodules) and their optimizer state. Frozen parameters (a fixed
context encoder, a teacher) are a separate tree with no optimizer state; they are rebuilt from the config
on resume, never checkpointed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rdr_jax.training.partitioning import tree_shardings


@dataclasses.dataclass
class TrainSetup:
    graphdef: Any
    state: dict[str, Any]          # {"step", "params", "opt_state"}
    frozen: Any                    # nnx.State of the parameters that do not train (may be empty)
    state_shardings: dict[str, Any]
    frozen_shardings: Any


def split_model(model: nnx.Module, trainable_filter) -> tuple[Any, nnx.State, nnx.State]:
    """(graphdef, trained params, everything else)."""
    graphdef, params, frozen = nnx.split(model, trainable_filter, ...)
    return graphdef, params, frozen


def _put(tree, shardings):
    # device_put of host/single-device arrays straight into their shards; each device receives only its part.
    return jax.device_put(tree, shardings)


def create_train_state(model: nnx.Module, trainable_filter, tx: optax.GradientTransformation,
                       mesh: Mesh) -> TrainSetup:
    graphdef, params, frozen = split_model(model, trainable_filter)
    if not jax.tree.leaves(params):
        raise ValueError("the task selected no trainable parameters")
    param_shardings = tree_shardings(params, mesh)
    frozen_shardings = tree_shardings(frozen, mesh)
    params = _put(params, param_shardings)
    frozen = _put(frozen, frozen_shardings)
    # Optimizer moments copy the parameters' metadata (logical axes), so they shard like the parameters;
    # the init runs under jit with those out_shardings: no unsharded copy is ever materialised.
    opt_shardings = tree_shardings(jax.eval_shape(tx.init, params), mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    replicated = NamedSharding(mesh, P())
    zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), replicated)
    state = {"step": zero(), "params": params, "opt_state": opt_state, "nonfinite_steps": zero(),
             "halted_at": zero()}
    shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings,
                 "nonfinite_steps": replicated, "halted_at": replicated}
    return TrainSetup(graphdef, state, frozen, shardings, frozen_shardings)


def merge_model(setup: TrainSetup, params=None) -> nnx.Module:
    return nnx.merge(setup.graphdef, setup.state["params"] if params is None else params, setup.frozen)

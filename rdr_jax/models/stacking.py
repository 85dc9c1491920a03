"""Stacks of identical layers, unrolled or scanned (MaxText's ``scan_layers``), and remat policies.

A family builds its N identical layers with :func:`make_layers` and runs them with :func:`run_layers`:

- unrolled (``ComputeSettings.scan_layers=False``, the default): an ``nnx.List``; parameters at
  ``<stack>.<i>.<name>``; the traced program holds N copies of the layer, so compile time grows with depth;
- scanned (``scan_layers=True``): one layer module whose parameters carry a leading axis of N, logical name
  :data:`~rdr_jax.models.layers.LAYERS` (mapped to no mesh axis: sharding rules see the other axes as before);
  parameters at ``<stack>.<name>``; run by one ``jax.lax.scan`` over one traced layer body. Conversion maps
  Hugging Face's per-layer tensors onto slices of the stacked ones (:func:`rdr_jax.convert.mapping.stack_rules`).

Both run the same function of (one layer's parameters, hidden state, dropout key), rematerialised under
``ComputeSettings.remat_policy`` (:func:`checkpoint_policy`), so the two layouts give the same numbers. Dropout:
layer ``i`` draws from its own key, ``jax.random.split(<one key from the caller's dropout stream>, N)[i]``, in
both layouts, so its masks are bitwise the same scanned or unrolled. A scanned model built from random init
holds the unrolled model's initial values stacked (:func:`stack_modules`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from rdr_jax.models.config import ComputeSettings
from rdr_jax.models.layers import LAYERS

# ``step(layer, hidden, rngs) -> hidden``: one layer's forward; rngs is an nnx.Rngs with the layer's own
# ``dropout`` stream, or None (deterministic).
Step = Callable[[nnx.Module, Any, "nnx.Rngs | None"], Any]


def checkpoint_policy(rt: ComputeSettings):
    """The ``jax.checkpoint_policies`` function for ``rt.remat_policy`` (None for "everything": no remat)."""
    if rt.remat_policy == "everything":
        return None
    return getattr(jax.checkpoint_policies, rt.remat_policy)


def remat(fn: Callable, rt: ComputeSettings, *, prevent_cse: bool = True) -> Callable:
    """``fn`` (which may take NNX modules) rematerialised under ``rt.remat_policy``; ``fn`` itself without remat."""
    if not rt.remat:
        return fn
    return nnx.remat(fn, policy=checkpoint_policy(rt), prevent_cse=prevent_cse)


def stack_modules(modules) -> nnx.Module:
    """N modules of one structure as one module whose variables have a leading ``layers`` axis (logical name
    :data:`LAYERS` inserted first in each variable's ``out_sharding``)."""
    splits = [nnx.split(m) for m in modules]
    graphdef = splits[0][0]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(state for _, state in splits))
    stacked = nnx.spmd.add_axis(stacked, 0, {nnx.PARTITION_NAME: LAYERS})
    return nnx.merge(graphdef, stacked)


def make_layers(make: Callable[[nnx.Rngs | None], nnx.Module], n: int, rt: ComputeSettings,
                rngs: nnx.Rngs | None):
    """N layers from ``make(rngs)``: an ``nnx.List``, or with ``rt.scan_layers`` the same layers stacked."""
    layers = [make(rngs) for _ in range(n)]
    return stack_modules(layers) if rt.scan_layers else nnx.List(layers)


def is_stacked(layers) -> bool:
    return not isinstance(layers, nnx.List)


def num_layers(layers) -> int:
    if not is_stacked(layers):
        return len(layers)
    return jax.tree.leaves(nnx.state(layers))[0].shape[0]


def layer_keys(rngs, n: int, *, deterministic: bool):
    """One dropout key per layer (``[n]``), from one draw of ``rngs``'s ``dropout`` stream (an nnx.Rngs, an
    RngStream or a key); None when deterministic."""
    if deterministic or rngs is None:
        return None
    if isinstance(rngs, nnx.Rngs):
        key = rngs["dropout"]()
    elif isinstance(rngs, nnx.RngStream):
        key = rngs()
    else:
        key = rngs
    return jax.random.split(key, n)


def run_layers(layers, step: Step, x, *, rt: ComputeSettings, keys=None, last_step: Step | None = None,
               collect: Callable | None = None):
    """``x`` through every layer of ``layers`` (from :func:`make_layers`), each as ``step(layer, x, rngs)``
    with its own dropout key from ``keys`` (:func:`layer_keys`), rematerialised under ``rt.remat_policy``.

    ``last_step``: the last layer's forward when it differs (BERT's ``cls_only``: a scan needs one output shape,
    so a scanned stack runs its last layer after the scan). ``collect``: keep ``collect(hidden)`` after each
    layer. Returns ``(x, [collected per layer] or None)``."""
    last_step = last_step or step
    n = num_layers(layers)

    def pure(fn, graphdef):
        def call(params, h, key):
            rngs = nnx.Rngs(dropout=key) if key is not None else None
            return fn(nnx.merge(graphdef, params), h, rngs)
        # Inside a scan common subexpressions cannot be hoisted across iterations: no need to prevent CSE.
        return jax.checkpoint(call, policy=checkpoint_policy(rt), prevent_cse=not is_stacked(layers)) \
            if rt.remat else call

    key = (lambda i: None) if keys is None else (lambda i: keys[i])
    collected = [] if collect is not None else None
    if not is_stacked(layers):
        for i, layer in enumerate(layers):
            graphdef, params = nnx.split(layer)
            x = pure(step if i < n - 1 else last_step, graphdef)(params, x, key(i))
            if collect is not None:
                collected.append(collect(x))
        return x, collected

    graphdef, params = nnx.split(layers)
    n_scan = n if last_step is step else n - 1
    body = pure(step, graphdef)

    def scan_body(h, xs):
        p, k = xs
        h = body(p, h, k)
        return h, (collect(h) if collect is not None else None)

    if n_scan:
        head = params if n_scan == n else jax.tree.map(lambda a: a[:n_scan], params)
        x, ys = jax.lax.scan(scan_body, x, (head, None if keys is None else keys[:n_scan]))
        if collect is not None:
            collected += [jax.tree.map(lambda a: a[i], ys) for i in range(n_scan)]
    if n_scan < n:
        x = pure(last_step, graphdef)(jax.tree.map(lambda a: a[n - 1], params), x, key(n - 1))
        if collect is not None:
            collected.append(collect(x))
    return x, collected

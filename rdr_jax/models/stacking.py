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

from rdr_jax.models.attention import scanned_layers
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


def layer_at(layers, i: int) -> nnx.Module:
    """Layer ``i`` as a module of its own (a view of slice ``i`` when stacked: for code that visits layers one at
    a time, such as a decoder step with its per-layer cache)."""
    if not is_stacked(layers):
        return layers[i]
    graphdef, params = nnx.split(layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], params))


def run_layers(layers, step: Step, x, *, rt: ComputeSettings, keys=None, start: int = 0, stop: int | None = None,
               collect: Callable | None = None):
    """``x`` through layers ``start .. stop - 1`` of ``layers`` (from :func:`make_layers`; default all), each as
    ``step(layer, x, rngs)`` with its own dropout key ``keys[i]`` (:func:`layer_keys`), rematerialised under
    ``rt.remat_policy``. A layer that computes differently (BERT's last layer with ``cls_only``, DeBERTa's
    first before its conv) runs in a call of its own: a scan needs one body and one output shape.
    ``collect``: keep ``collect(hidden)`` after each layer. Returns ``(x, [collected per layer] or None)``."""
    stop = num_layers(layers) if stop is None else stop
    stacked = is_stacked(layers)

    def pure(graphdef):
        def call(params, h, key):
            rngs = nnx.Rngs(dropout=key) if key is not None else None
            return step(nnx.merge(graphdef, params), h, rngs)
        # Inside a scan common subexpressions cannot be hoisted across iterations: no need to prevent CSE.
        return jax.checkpoint(call, policy=checkpoint_policy(rt), prevent_cse=not stacked) if rt.remat else call

    key = (lambda i: None) if keys is None else (lambda i: keys[i])
    collected = [] if collect is not None else None
    if not stacked or stop - start == 1:
        for i in range(start, stop):
            graphdef, params = nnx.split(layer_at(layers, i))
            x = pure(graphdef)(params, x, key(i))
            if collect is not None:
                collected.append(collect(x))
        return x, collected
    if stop <= start:
        return x, collected

    graphdef, params = nnx.split(layers)
    body = pure(graphdef)

    def scan_body(h, xs):
        p, k = xs
        h = body(p, h, k)
        return h, (collect(h) if collect is not None else None)

    if (start, stop) != (0, num_layers(layers)):
        params = jax.tree.map(lambda a: a[start:stop], params)
    with scanned_layers():  # traced once for every layer: cuDNN's dropout must not fuse there (models.attention)
        x, ys = jax.lax.scan(scan_body, x, (params, None if keys is None else keys[start:stop]))
    if collect is not None:
        collected += [jax.tree.map(lambda a: a[i], ys) for i in range(stop - start)]
    return x, collected

"""The generic train step: one ``jax.jit`` with explicit in/out shardings and the state donated.

Functional NNX: the parameters are a pytree; the loss merges them with the graph definition and the frozen
parameters into a module for one call. Dropout keys are ``fold_in(fold_in(seed_key, step), micro_batch)``,
so a run is a pure function of (config, seed): resuming from a checkpoint replays the same keys.

Gradient accumulation: a batch of ``A * B`` questions is split into ``A`` interleaved micro-batches
(``Task.split_microbatches``), scanned, and the gradients averaged. For losses that are means over
independent questions (RDR's KL, a cross-encoder's per-query loss) this equals one step on the full batch.
DPR's in-batch negatives are the exception: a micro-batch's questions only see that micro-batch's
passages as negatives, so accumulation there trades negatives for memory.

GradCache (``grad_cache_chunk``, ``training/grad_cache.py``) bounds memory the other way: the batch stays ONE
contrastive batch (every question sees every passage of the global batch), its embeddings computed and
back-propagated chunk by chunk, the gradient exact; the two are not combined.

Non-finite loss or gradients (``nan_policy``, see ``training/faults.py``): the update is never applied, by a
``where`` on one finiteness flag inside the step (no host round-trip). "skip" still advances ``step`` (the
batch is consumed) and counts it in ``nonfinite_steps``; "stop" freezes the whole state from then on and
records the bad step in ``halted_at`` (1-based; 0 = never), which the loop reads at its next host sync.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rdr_jax.training.grad_cache import grad_cache_value_and_grad
from rdr_jax.training.partitioning import BATCH_AXES, batch_sharding
from rdr_jax.training.state import TrainSetup


def _loss_fn(task, graphdef):
    def loss_fn(params, frozen, batch, key, deterministic):
        model = nnx.merge(graphdef, params, frozen)
        rngs = nnx.Rngs(dropout=key) if not deterministic else None
        loss, metrics = task.loss(model, batch, rngs=rngs, deterministic=deterministic)
        return loss.astype(jnp.float32), {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return loss_fn


def _constrain_micro(mesh: Mesh, micro: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Keep each micro-batch split over the data-parallel devices (axis 1 after splitting)."""
    n = 1
    for a in BATCH_AXES:
        n *= mesh.shape[a]

    def one(x):
        if x.ndim >= 2 and x.shape[1] % n == 0:
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, BATCH_AXES)))
        return x
    return jax.tree.map(one, micro)


def _all_finite(loss, grads) -> jax.Array:
    finite = jnp.isfinite(loss)
    for g in jax.tree.leaves(grads):
        finite = finite & jnp.all(jnp.isfinite(g))
    return finite


def _guard(nan_policy: str, state, new_state, finite):
    """The state after a step whose loss/gradients may be non-finite (see the module docstring)."""
    pick = lambda ok: (lambda new, old: jnp.where(ok, new, old))
    if nan_policy == "skip":
        kept = {k: jax.tree.map(pick(finite), new_state[k], state[k]) for k in ("params", "opt_state")}
        return dict(new_state, **kept, nonfinite_steps=state["nonfinite_steps"] + (~finite).astype(jnp.int32))
    if nan_policy != "stop":
        raise ValueError(f"train.nan_policy must be 'stop' or 'skip', got {nan_policy!r}")
    ok = finite & (state["halted_at"] == 0)
    out = jax.tree.map(pick(ok), {k: v for k, v in new_state.items() if k != "halted_at"},
                       {k: v for k, v in state.items() if k != "halted_at"})
    halted_at = jnp.where((state["halted_at"] == 0) & ~finite, state["step"] + 1, state["halted_at"])
    return dict(out, halted_at=halted_at.astype(jnp.int32),
                nonfinite_steps=state["nonfinite_steps"] + ((state["halted_at"] == 0) & ~finite).astype(jnp.int32))


def value_and_grad_fn(task, setup: TrainSetup, mesh: Mesh, grad_accum_steps: int = 1,
                      grad_cache_chunk: int | None = None) -> Callable:
    """``fn(params, frozen, batch, key) -> ((loss, metrics), grads)`` of one step's batch (dropout on): plain,
    accumulated over micro-batches, or cached chunk by chunk (GradCache)."""
    loss_fn = _loss_fn(task, setup.graphdef)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_cache_chunk:
        return grad_cache_value_and_grad(task, setup.graphdef, mesh, grad_cache_chunk)

    def accumulate(params, frozen, batch, key):
        if grad_accum_steps == 1:
            return grad_fn(params, frozen, batch, key, False)
        micro = _constrain_micro(mesh, task.split_microbatches(batch, grad_accum_steps))
        first = jax.tree.map(lambda x: x[0], micro)
        _, metric_shapes = jax.eval_shape(lambda p, f, b, k: loss_fn(p, f, b, k, False), params, frozen, first, key)

        def body(carry, xs):
            i, mb = xs
            (loss, metrics), grads = grad_fn(params, frozen, mb, jax.random.fold_in(key, i), False)
            acc_loss, acc_metrics, acc_grads = carry
            return (acc_loss + loss, jax.tree.map(jnp.add, acc_metrics, metrics),
                    jax.tree.map(jnp.add, acc_grads, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes),
                 jax.tree.map(jnp.zeros_like, params))
        (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), micro))
        scale = 1.0 / grad_accum_steps
        return (loss * scale, jax.tree.map(lambda m: m * scale, metrics)), jax.tree.map(lambda g: g * scale, grads)
    return accumulate


def make_train_step(task, setup: TrainSetup, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh, grad_accum_steps: int = 1, nan_policy: str = "stop",
                    grad_cache_chunk: int | None = None) -> Callable:
    """``step(state, frozen, batch, seed_key) -> (state, metrics)``; the state argument is donated."""
    accumulate = value_and_grad_fn(task, setup, mesh, grad_accum_steps, grad_cache_chunk)

    def step(state, frozen, batch, seed_key):
        key = jax.random.fold_in(seed_key, state["step"])
        (loss, metrics), grads = accumulate(state["params"], frozen, batch, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                       learning_rate=jnp.asarray(schedule(state["step"]), jnp.float32))
        new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
        new_state = _guard(nan_policy, state, new_state, _all_finite(loss, grads))
        metrics.update(skipped_steps=new_state["nonfinite_steps"], halted_at=new_state["halted_at"])
        return new_state, metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(setup.state_shardings, setup.frozen_shardings, batch_sharding(mesh),
                                       replicated),
                   out_shardings=(setup.state_shardings, replicated), donate_argnums=(0,))


def make_eval_step(task, setup: TrainSetup, mesh: Mesh) -> Callable:
    """``eval(params, frozen, batch) -> metrics`` (deterministic: no dropout), loss included."""
    loss_fn = _loss_fn(task, setup.graphdef)

    def evaluate(params, frozen, batch):
        loss, metrics = loss_fn(params, frozen, batch, None, True)
        return dict(metrics, loss=loss)

    replicated = NamedSharding(mesh, P())
    return jax.jit(evaluate, in_shardings=(setup.state_shardings["params"], setup.frozen_shardings,
                                           batch_sharding(mesh)), out_shardings=replicated)


__all__ = ["make_train_step", "make_eval_step", "value_and_grad_fn"]

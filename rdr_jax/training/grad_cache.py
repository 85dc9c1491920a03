"""Cached in-batch negatives (GradCache, Gao et al. 2021): a contrastive loss over a global batch far larger than
one forward/backward pass can hold, with the exact gradient of the one big batch.

A contrastive loss (DPR's NLL with in-batch negatives, RDR's KL over each question's passages) depends on the
batch only through the encoders' embeddings. So, inside the one jitted step (``train.grad_cache_chunk`` rows per
chunk, ``n = batch_size / chunk`` chunks):

1. embeddings chunk by chunk: a ``lax.scan`` of the encoders' forward over the chunks, nothing differentiated,
   so no activation outlives its chunk; only the ``[rows, E]`` embeddings are kept;
2. the loss, and its gradient with respect to the embeddings (and to any parameter it reads directly), once,
   over the whole global batch: every question sees every passage of the global batch as a negative;
3. each chunk's backward pass: a second scan re-runs the chunk's forward under ``jax.vjp`` and pulls that
   chunk's embedding gradients back to the parameters, accumulated over the chunks.

Peak memory is then one chunk's activations plus ``[rows, E]`` embeddings, whatever the batch; the price is a
second forward of the trained encoders (4 x forward FLOPs instead of 3). The gradient is exact, dropout included:
chunk ``c`` draws its dropout masks from ``fold_in(key, c)`` in both passes, so the re-run sees the masks of the
first pass (a frozen encoder's embeddings get no cotangent, and XLA drops its unused re-run).

Chunks are the interleaved split of :meth:`Task.split_microbatches` (question ``i`` in chunk ``i % n``): on a
batch sharded over the data-parallel devices each chunk takes a slice of every device's rows, so every chunk
stays sharded over the data axes and the embeddings go back to the batch's layout without crossing devices.

A task opts in by implementing :meth:`Task.embed` (its chunk's embeddings: ``{name: [rows, ...]}``, rows grouped
per question like batch fields), :meth:`Task.loss_from_embeddings` and, for inputs of the loss that frozen models
compute in the step (RDR's in-step teacher reader), :meth:`Task.loss_targets`, run once per chunk in the first
pass and never re-run. Its plain ``loss`` should be ``loss_from_embeddings`` of its ``embed`` (``embed_loss``),
so both paths compute one function.

Versus ``train.grad_accum_steps``: accumulation splits the batch into independent micro-batches, each with its own
in-batch negatives (fewer negatives per question); GradCache keeps ONE contrastive batch. The two are not
combined (``training/config.py`` refuses it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rdr_jax.errors import ConfigError
from rdr_jax.training.partitioning import BATCH_AXES


def data_parallel_size(mesh: Mesh) -> int:
    n = 1
    for a in BATCH_AXES:
        n *= mesh.shape[a]
    return n


def check_chunk(batch_size: int, chunk: int, mesh: Mesh) -> int:
    """The number of chunks; ConfigError when ``chunk`` does not split the batch or the data-parallel devices."""
    if chunk <= 0 or batch_size % chunk:
        raise ConfigError(f"'train.grad_cache_chunk' ({chunk}) must divide 'train.batch_size' ({batch_size})")
    devices = data_parallel_size(mesh)
    if chunk % devices:
        raise ConfigError(f"'train.grad_cache_chunk' ({chunk}) must be a multiple of the {devices} data-parallel "
                          "devices (mesh.data x mesh.fsdp): each chunk is split over them")
    return batch_size // chunk


def merge_chunks(stacked, num_q: int):
    """Inverse of the interleaved split: ``[n, per * g, ...]`` chunk rows back to the batch's ``[B * g, ...]``
    (question ``i`` from chunk ``i % n``)."""
    def one(x):
        n, rows = x.shape[:2]
        per = num_q // n
        g = rows // per
        x = x.reshape((n, per, g) + x.shape[2:])
        return jnp.swapaxes(x, 0, 1).reshape((num_q * g,) + x.shape[3:])
    return jax.tree.map(one, stacked)


def split_chunks(tree, num_q: int, n: int):
    """The interleaved split of per-question rows ``[B * g, ...]`` into ``[n, B/n * g, ...]`` (as
    :meth:`Task.split_microbatches`, for arrays without index fields)."""
    def one(x):
        g = x.shape[0] // num_q
        x = x.reshape((num_q // n, n, g) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape((n, num_q // n * g) + x.shape[3:])
    return jax.tree.map(one, tree)


def _constrain(mesh: Mesh, tree, axis: int):
    """Keep axis ``axis`` of each array split over the data-parallel devices (when it divides)."""
    n = data_parallel_size(mesh)

    def one(x):
        if x.ndim > axis and x.shape[axis] % n == 0:
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*([None] * axis), BATCH_AXES)))
        return x
    return jax.tree.map(one, tree)


def grad_cache_value_and_grad(task, graphdef, mesh: Mesh, chunk: int):
    """``fn(params, frozen, batch, key) -> ((loss, metrics), grads)``: the gradient of
    ``task.loss_from_embeddings`` over the whole batch, computed chunk by chunk (module docstring)."""

    def model_of(params, frozen):
        return nnx.merge(graphdef, params, frozen)

    def embed(params, frozen, chunk_batch, key):
        return task.embed(model_of(params, frozen), chunk_batch, rngs=nnx.Rngs(dropout=key), deterministic=False)

    def fn(params, frozen, batch, key):
        num_q = batch[task.question_field].shape[0]
        n = check_chunk(num_q, chunk, mesh)
        chunks = _constrain(mesh, task.split_microbatches(batch, n), 1)
        index = jnp.arange(n)

        def forward(_, xs):   # pass 1: embeddings (and frozen models' targets) only, no activations kept
            i, mb = xs
            emb = embed(params, frozen, mb, jax.random.fold_in(key, i))
            return None, (emb, task.loss_targets(model_of(params, frozen), mb))
        _, (emb, targets) = jax.lax.scan(forward, None, (index, chunks))
        emb = _constrain(mesh, merge_chunks(emb, num_q), 0)
        targets = _constrain(mesh, merge_chunks(targets, num_q), 0)

        def full_loss(p, e):   # pass 2: the loss over the global batch, and its gradient w.r.t. the embeddings
            loss, metrics = task.loss_from_embeddings(model_of(p, frozen), batch, e, targets)
            return loss.astype(jnp.float32), {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        (loss, metrics), (grads, emb_grads) = jax.value_and_grad(full_loss, argnums=(0, 1), has_aux=True)(
            params, emb)
        emb_grads = _constrain(mesh, split_chunks(emb_grads, num_q, n), 1)

        def backward(acc, xs):   # pass 3: each chunk's forward again, pulled back with its embedding gradients
            i, mb, g = xs
            _, pull = jax.vjp(lambda p: embed(p, frozen, mb, jax.random.fold_in(key, i)), params)
            return jax.tree.map(jnp.add, acc, pull(g)[0]), None
        grads, _ = jax.lax.scan(backward, grads, (index, chunks, emb_grads))
        return (loss, metrics), grads
    return fn


__all__ = ["grad_cache_value_and_grad", "check_chunk", "merge_chunks", "split_chunks"]

"""Layers shared by every model family: parameters with logical axes, dense, embeddings, norms, attention.

Every parameter carries logical axis names (``vocab``, ``embed``, ``heads``, ``kv``, ``mlp``, ...). The
training engine maps them onto mesh axes with one rules table (``rdr_jax.training.partitioning``), so no
model knows anything about devices.

Projections into attention heads keep the head axis explicit (kernel ``[embed, heads, kv]``), as in
MaxText, so tensor parallelism shards heads without reshapes; conversion reshapes Hugging Face's
``[heads * kv, embed]`` matrices exactly.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]

# Logical axis names used by the models. The sharding rules table refers to these.
BATCH, LENGTH, KV_LENGTH = "batch", "length", "kv_length"
EMBED, HEADS, KV, MLP, VOCAB = "embed", "heads", "kv", "mlp", "vocab"
NORM, CLASSES, POSITIONS = "norm", "classes", "positions"
# The leading axis of a scanned stack's parameters (rdr_jax.models.stacking); no sharding rule maps it to a
# mesh axis, so every device holds all layers of its shard of the other axes.
LAYERS = "layers"


def param(rngs: nnx.Rngs | None, init: Callable, shape: Sequence[int], axes: Axes, param_dtype) -> nnx.Param:
    """A parameter with logical axis names. Without rngs the value is zeros (used for shape-only builds)."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
    value = init(rngs.params(), tuple(shape), param_dtype) if rngs is not None else jnp.zeros(shape, param_dtype)
    # Sharding is applied by the training engine from these names, not eagerly at creation.
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Buffer(nnx.Variable):
    """Non-trainable state that belongs to the checkpoint (a PyTorch buffer, e.g. BART's ``final_logits_bias``).

    Optimizers update ``nnx.Param`` only, so a Buffer never changes in training; weight conversion and native
    checkpoints carry it like a parameter (``CHECKPOINTED``).
    """


# Variables written to and read from checkpoints.
CHECKPOINTED = (nnx.Param, Buffer)


def normal_init(stddev: float) -> Callable:
    return jax.nn.initializers.normal(stddev=stddev)


zeros_init = jax.nn.initializers.zeros
ones_init = jax.nn.initializers.ones


class Dense(nnx.Module):
    """y = x @ kernel + bias, contracting the trailing ``len(in_shape)`` axes of x.

    ``in_shape``/``out_shape`` may be multi-dimensional (e.g. out ``(heads, kv)``), the kernel being
    ``[*in_shape, *out_shape]`` with logical axes ``in_axes + out_axes``.
    """

    def __init__(self, in_shape, out_shape, in_axes: Axes, out_axes: Axes, *, use_bias: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs):
        self.in_shape = tuple(in_shape) if isinstance(in_shape, Sequence) else (in_shape,)
        self.out_shape = tuple(out_shape) if isinstance(out_shape, Sequence) else (out_shape,)
        in_axes, out_axes = tuple(in_axes), tuple(out_axes)
        self.dtype = dtype
        self.kernel = param(rngs, normal_init(init_std), self.in_shape + self.out_shape, in_axes + out_axes, param_dtype)
        self.bias = param(rngs, zeros_init, self.out_shape, out_axes, param_dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        kernel = self.kernel[...].astype(self.dtype)
        y = jax.lax.dot_general(x.astype(self.dtype), kernel,
                                (((tuple(range(x.ndim - n_in, x.ndim))), tuple(range(n_in))), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token/position embedding table ``[num, features]``."""

    def __init__(self, num_embeddings: int, features: int, axes: Axes = (VOCAB, EMBED), *, dtype=jnp.float32,
                 param_dtype=jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, normal_init(init_std), (num_embeddings, features), axes, param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the table (tied output projection)."""
        return jnp.einsum("...d,vd->...v", x, self.embedding[...].astype(self.dtype))


class LayerNorm(nnx.Module):
    """LayerNorm with the config's epsilon; statistics in float32 whatever the compute dtype."""

    def __init__(self, features: int, eps: float, *, use_bias: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=(NORM,), eager_sharding=False)
        self.bias = (nnx.Param(jnp.zeros((features,), param_dtype), out_sharding=(NORM,), eager_sharding=False)
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def _gelu_exact(x):
    # transformers' formula, written with erf rather than jax.nn.gelu's erfc: XLA:CPU's YNNPACK can
    # fuse erf (not erfc), so the activation joins the surrounding matmuls instead of costing three
    # extra passes over the [tokens, 4*hidden] tensor.
    return x * 0.5 * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


# Names as in transformers' ACT2FN. "gelu" there is the exact erf form.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None


def padding_mask(attention_mask: jax.Array) -> jax.Array:
    """[batch, kv_len] 0/1 mask -> boolean [batch, 1, 1, kv_len] for broadcasting over heads and queries."""
    return attention_mask.astype(bool)[:, None, None, :]


def heads_first(x: jax.Array) -> jax.Array:
    """``[batch, length, heads, kv]`` <-> ``[batch, heads, length, kv]``: the layout attention's matmuls run in
    (and the decoder cache is kept in)."""
    return jnp.swapaxes(x, 1, 2)


def active_dropout(dropout: nnx.Dropout, *, deterministic: bool, rngs) -> Callable | None:
    """``dropout`` as the ``dropout`` argument of :func:`dot_product_attention`: None when it would keep every
    weight (inference, or rate 0), so the attention is free to run fused."""
    if deterministic or not dropout.rate:
        return None
    return lambda x: dropout(x, deterministic=False, rngs=rngs)


# "cudnn": cuDNN's fused attention on NVIDIA GPUs where it applies (opt-in: not yet measured here on a GPU);
# "xla" (default): the function below everywhere.
ATTENTION_ENV = "RDR_JAX_ATTENTION"


def cudnn_attention(query, key, value, mask, bias, scale):
    """cuDNN's fused (flash) attention through ``jax.nn.dot_product_attention``, or None where it does not apply:
    ``RDR_JAX_ATTENTION`` is not ``cudnn``, not a GPU, not bf16/fp16, or a shape cuDNN refuses. Same layout and
    arguments as :func:`dot_product_attention` without dropout; the scores never reach device memory.

    cuDNN takes a bias with the query length, so a ``[b, 1, 1, k]`` padding mask is broadcast to
    ``[b, 1, q, k]`` (exact for any mask, not only right padding)."""
    if (os.environ.get(ATTENTION_ENV, "xla") != "cudnn" or jax.default_backend() != "gpu"
            or query.dtype not in (jnp.bfloat16, jnp.float16) or not key.dtype == value.dtype == query.dtype):
        return None
    q_len, k_len = query.shape[1], key.shape[1]
    if mask is not None:
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (q_len, k_len))
    if bias is not None:
        bias = jnp.broadcast_to(bias, bias.shape[:2] + (q_len, k_len)).astype(query.dtype)
    try:
        return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask, scale=scale,
                                            implementation="cudnn")
    except (NotImplementedError, ValueError, RuntimeError):  # shapes/versions cuDNN does not take: ours below
        return None


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, mask: jax.Array | None = None,
                          bias: jax.Array | None = None, scale: float | None = None,
                          dropout: Callable[[jax.Array], jax.Array] | None = None, dtype=jnp.float32,
                          kv_heads_first: bool = False) -> jax.Array:
    """Attention of ``[batch, q_len, heads, kv]`` queries; returns the same layout.

    ``key``/``value`` are ``[batch, k_len, heads, kv]``, or ``[batch, heads, k_len, kv]`` with
    ``kv_heads_first`` (a decoder cache kept in that layout is then read without a transpose). ``bias`` is
    added to the scaled scores; ``mask`` (broadcast to ``[batch, heads, q_len, k_len]``) keeps the True keys.

    Keys/values may have fewer rows than the queries, ``batch = rows * group``: query rows
    ``r * group ... r * group + group - 1`` then all attend to key row ``r`` (the beams of one question reading
    its encoder output), computed as ``group * q_len`` queries of that row; ``mask`` and ``bias`` are then per
    key row and the same for every query (``[rows or 1, heads or 1, 1, k_len]``).

    With ``RDR_JAX_ATTENTION=cudnn``, without dropout, on a GPU in bf16/fp16, cuDNN's fused attention runs
    instead where it applies (:func:`cudnn_attention`). Otherwise both matmuls run heads-first
    (``[b, h, len, kv]``): with the heads axis in the middle XLA:CPU emits much slower batched matmuls.
    The softmax is normalised after the value matmul, on ``[b, h, q, kv]`` instead of ``[b, h, q, k]``: the
    same numbers up to rounding (dropout scales the kept entries, so it commutes with the division).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    batch, q_len = query.shape[:2]
    rows = key.shape[0]
    if dropout is None and rows == batch and not kv_heads_first:
        fused = cudnn_attention(query, key, value, mask, bias, scale)
        if fused is not None:
            return fused
    if rows != batch:
        if batch % rows or any(m is not None and (m.ndim != 4 or m.shape[2] != 1) for m in (mask, bias)):
            raise ValueError(f"{batch} query rows cannot share {rows} key rows (needs batch = rows * group and a "
                             f"mask/bias without a query axis)")
        query = query.reshape((rows, batch // rows * q_len) + query.shape[2:])
    query = heads_first(query)
    if not kv_heads_first:
        key, value = heads_first(key), heads_first(value)
    scores = jnp.einsum("bhqd,bhkd->bhqk", query, key) * jnp.asarray(scale, query.dtype)
    if bias is not None:
        scores = scores + bias
    scores = scores.astype(jnp.float32)
    if mask is not None:  # jnp.where, not a large negative bias: bf16 scores cannot overflow to -inf
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    normaliser = jnp.sum(weights, axis=-1, keepdims=True)
    if dropout is not None:
        weights = dropout(weights)
    context = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(dtype), value) / normaliser.astype(dtype)
    return heads_first(context).reshape((batch, q_len) + context.shape[1:2] + context.shape[3:])

"""Layers shared by every model family: parameters with logical axes, dense, embeddings, norms (attention:
:mod:`rdr_jax.models.attention`, its names re-exported here).

Every parameter carries logical axis names (``vocab``, ``embed``, ``heads``, ``kv``, ``mlp``, ...). The
training engine maps them onto mesh axes with one rules table (``rdr_jax.training.partitioning``), so no
model knows anything about devices.

Projections into attention heads keep the head axis explicit (kernel ``[embed, heads, kv]``), as in
MaxText, so tensor parallelism shards heads without reshapes; conversion reshapes Hugging Face's
``[heads * kv, embed]`` matrices exactly.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Attention lives in its own module (kernel dispatch); these names stay importable from here.
from rdr_jax.models.attention import (  # noqa: F401
    ATTENTION_ENV, AttentionDropout, cudnn_attention, dot_product_attention, heads_first, reference_attention)

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


def active_dropout(dropout: nnx.Dropout, *, deterministic: bool, rngs) -> AttentionDropout | None:
    """``dropout`` as the ``dropout`` argument of :func:`dot_product_attention`: None when it would keep every
    weight (inference, or rate 0); otherwise an :class:`~rdr_jax.models.attention.AttentionDropout` that carries
    the rate, so a fused kernel may apply it in place of the reference path's ``dropout(weights)``."""
    if deterministic or not dropout.rate:
        return None

    def skip():  # the key dropout(weights) would draw, drawn and dropped
        stream = rngs if rngs is not None else dropout.rngs
        if isinstance(stream, nnx.Rngs):
            stream[dropout.rng_collection]()
        elif isinstance(stream, nnx.RngStream):
            stream()

    return AttentionDropout(dropout.rate, lambda x: dropout(x, deterministic=False, rngs=rngs), skip)

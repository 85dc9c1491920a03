"""DeBERTa's relative positions: the bucketed query - key distance of every token pair, and the three
equivalent ways of reading a per-pair relative term (``ComputeSettings.relative_attention_impl``).

The bucket matrix depends only on the (static) sequence length, so it is computed in numpy once per trace and
enters the graph as a constant shared by every layer.

- ``"skew"`` (default): the bucket of a pair depends only on ``query - key``, so the ``2 * length - 1``
  relative-position rows the pairs can read are picked first (a small gather of ``[2L - 1, heads, kv]``),
  scored against every token by one matmul, and each query row is then shifted into place by a reshape and
  a slice (Transformer-XL's relative shift). No gather over the ``[batch, heads, L, L]`` scores, whose
  ``take_along_axis`` index (``[batch, heads, L, L, 4]``) XLA:CPU materialises.
- ``"gather"``: the ``[.., query, 2 * span]`` score table, read with ``take_along_axis``.
- ``"onehot"``: the same table read by a one-hot ``[query, key, 2 * span]`` contraction (matmuls instead of
  gathers, at the cost of ``length**2 * 2 * span`` memory for the one-hot table).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from rdr_jax.models.deberta_v2 import DebertaV2Config


def make_log_bucket_position(relative_pos, bucket_size: int, max_position: int) -> np.ndarray:
    """transformers' ``make_log_bucket_position``: distances below ``bucket_size // 2`` are kept, longer ones
    are mapped logarithmically so that ``max_position - 1`` lands on the last bucket. Float32 arithmetic, as
    in PyTorch, so bucket boundaries agree."""
    relative_pos = np.asarray(relative_pos, np.int64)
    sign = np.sign(relative_pos)
    mid = bucket_size // 2
    abs_pos = np.where((relative_pos < mid) & (relative_pos > -mid), mid - 1, np.abs(relative_pos))
    log_ratio = np.log(abs_pos.astype(np.float32) / np.float32(mid))
    log_pos = np.ceil(log_ratio / np.log(np.float32((max_position - 1) / mid)) * np.float32(mid - 1)) + np.float32(mid)
    return np.where(abs_pos <= mid, relative_pos.astype(np.float32), log_pos * sign).astype(np.int64)


@functools.lru_cache(maxsize=64)
def _relative_position_cached(query_size: int, key_size: int, bucket_size: int, max_position: int) -> np.ndarray:
    q_ids = np.arange(query_size, dtype=np.int64)
    k_ids = np.arange(key_size, dtype=np.int64)
    rel = q_ids[:, None] - k_ids[None, :]
    if bucket_size > 0 and max_position > 0:
        rel = make_log_bucket_position(rel, bucket_size, max_position)
    rel.setflags(write=False)
    return rel


def build_relative_position(query_size: int, key_size: int, bucket_size: int = -1,
                            max_position: int = -1) -> np.ndarray:
    """``[query_size, key_size]`` int64 matrix of (bucketed) ``query_pos - key_pos``; transformers' function
    without its leading batch axis of 1."""
    return _relative_position_cached(int(query_size), int(key_size), int(bucket_size), int(max_position))


def relative_score_indices(length: int, config: "DebertaV2Config") -> tuple[np.ndarray, np.ndarray]:
    """Column of the ``2 * span`` relative table each (query, key) pair reads, for c2p and for p2c."""
    span = config.attention_span
    rel = build_relative_position(length, length, config.position_buckets, config.max_relative)
    c2p = np.clip(rel + span, 0, 2 * span - 1).astype(np.int32)
    p2c = np.clip(-rel + span, 0, 2 * span - 1).astype(np.int32)
    return c2p, p2c


def gather_relative(table: jax.Array, index: jax.Array, impl: str) -> jax.Array:
    """``out[..., x, y] = table[..., x, index[x, y]]`` for table ``[..., L, R]`` and index ``[L, L]``."""
    if impl == "gather":
        index = jnp.broadcast_to(index, table.shape[:-1] + index.shape[-1:])
        return jnp.take_along_axis(table, index, axis=-1)
    # One-hot contraction: every output is one table entry times 1 plus zeros, so it is exact as long as the
    # matmul does not round float32 operands to bfloat16 (the TPU default), hence HIGHEST for float32 tables.
    onehot = jax.nn.one_hot(index, table.shape[-1], dtype=table.dtype)
    precision = jax.lax.Precision.HIGHEST if table.dtype == jnp.float32 else None
    return jnp.einsum("...xr,xyr->...xy", table, onehot, precision=precision)


def toeplitz_rows(index: np.ndarray) -> np.ndarray:
    """For ``index[x, y] = G(x - y)`` (``[L, L]``), the ``[2L - 1]`` vector ``rows[j] = G(L - 1 - j)``, so that
    ``index[x, y] == rows[y + L - 1 - x]``; ValueError when the index does not depend on ``x - y`` alone."""
    index = np.asarray(index)
    length = index.shape[0]
    if index.shape != (length, length):
        raise ValueError(f"the skew implementation needs a square index, got {index.shape}")
    rows = np.concatenate([index[::-1, 0], index[0, 1:]])
    x, y = np.indices(index.shape)
    if not np.array_equal(rows[y + length - 1 - x], index):
        raise ValueError("the relative index is not a function of query - key")
    return rows


def skew(table: jax.Array) -> jax.Array:
    """``out[..., x, y] = table[..., x, y + L - 1 - x]`` for ``table [..., L, 2L - 1]``: a reshape and a slice.

    Flattened, that entry sits at ``x * (2L - 1) + L - 1 - x + y = L - 1 + x * (2L - 2) + y``, so rows of
    ``2L - 2`` starting at offset ``L - 1`` hold the output in their first ``L`` columns."""
    length = table.shape[-2]
    if table.shape[-1] != 2 * length - 1:
        raise ValueError(f"skew needs [..., L, 2L - 1], got {table.shape}")
    if length == 1:
        return table
    lead = table.shape[:-2]
    flat = table.reshape(lead + (length * (2 * length - 1),))[..., length - 1:length - 1 + length * (2 * length - 2)]
    return flat.reshape(lead + (length, 2 * length - 2))[..., :length]


def relative_term(states: jax.Array, positions: jax.Array, index: np.ndarray, impl: str) -> jax.Array:
    """``out[b, h, x, y] = states[b, x, h] . positions[index[x, y], h]`` for ``states [b, L, h, d]``,
    ``positions [R, h, d]`` and a static ``[L, L]`` index (the c2p or p2c bucket columns)."""
    if impl == "skew":
        rows = jnp.take(positions, jnp.asarray(toeplitz_rows(index)), axis=0)  # [2L - 1, h, d]
        return skew(jnp.einsum("bxhd,jhd->bhxj", states, rows))
    table = jnp.einsum("bxhd,rhd->bhxr", states, positions)
    return gather_relative(table, jnp.asarray(index), impl)

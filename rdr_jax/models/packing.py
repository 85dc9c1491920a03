"""Unpadded ("packed") tokens: run a padded batch's position-wise work on its real tokens only.

A ``[batch, length]`` batch of passages is typically a quarter padding (lengths spread over
``[length/2, length]``), and transformers' BERT spends the same matmuls on padding as on text. Every
layer of a BERT-style encoder except attention works on each position alone, so those layers can run on
the ``[tokens, ...]`` rows of the real tokens, as MosaicBERT and NVIDIA's BERT do; attention gathers
its queries, keys and values back into the padded ``[batch, length, ...]`` layout, where the padding
mask applies as usual.

The number of packed rows is a static shape. :meth:`TokenPacking.for_batch` builds the maps on the host
from a numpy mask, rounding the real token count up to one of ``steps`` sizes so that batches of one
shape share a few compilations; pass the result into a jitted function as an ordinary argument (a
pytree of arrays). Inside a traced function, :meth:`TokenPacking.from_mask` takes the row count
explicitly. Rows past the real count repeat position 0 and are never read back; if a batch holds more
real tokens than rows, :meth:`TokenPacking.check` turns the output into NaN rather than drop text.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenPacking:
    """Index maps between the padded ``[batch, length]`` layout and ``[tokens]`` packed rows."""
    token_position: jax.Array   # [tokens] flat padded position of each packed row
    position_row: jax.Array     # [batch * length] packed row of each position; ``tokens`` for padding
    overflow: jax.Array         # [] True when the mask has more real tokens than ``tokens``
    batch: int = dataclasses.field(metadata=dict(static=True))
    length: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def from_mask(cls, attention_mask: jax.Array, tokens: int) -> "TokenPacking":
        batch, length = attention_mask.shape
        real = jnp.asarray(attention_mask).reshape(-1).astype(bool)
        (token_position,) = jnp.nonzero(real, size=tokens, fill_value=0)
        rank = jnp.cumsum(real) - 1
        position_row = jnp.where(real, rank, tokens)
        return cls(token_position.astype(jnp.int32), position_row.astype(jnp.int32),
                   jnp.sum(real) > tokens, batch, length)

    @classmethod
    def for_batch(cls, attention_mask, steps: int = 16) -> "TokenPacking":
        """Host-side maps for a numpy ``[batch, length]`` mask, with :func:`packed_length` rows."""
        mask = np.asarray(attention_mask)
        tokens = packed_length(mask, steps)
        real = mask.reshape(-1).astype(bool)
        token_position = np.zeros(tokens, np.int32)
        positions = np.flatnonzero(real)
        token_position[:len(positions)] = positions
        position_row = np.where(real, np.cumsum(real) - 1, tokens).astype(np.int32)
        return cls(token_position, position_row, np.asarray(False), *mask.shape)

    @property
    def tokens(self) -> int:
        return self.token_position.shape[0]

    def pack(self, x: jax.Array) -> jax.Array:
        """``[batch, length, ...]`` -> ``[tokens, ...]``."""
        flat = x.reshape(self.batch * self.length, *x.shape[2:])
        return jnp.take(flat, self.token_position, axis=0, mode="clip")

    def unpack(self, x: jax.Array) -> jax.Array:
        """``[tokens, ...]`` -> ``[batch, length, ...]``, zeros at the padding."""
        rows = jnp.take(x, self.position_row, axis=0, mode="fill", fill_value=0)
        return rows.reshape(self.batch, self.length, *x.shape[1:])

    def first(self, x: jax.Array) -> jax.Array:
        """``[tokens, ...]`` -> ``[batch, 1, ...]``: each sequence's position 0 (its [CLS])."""
        rows = jnp.take(x, self.position_row[::self.length], axis=0, mode="fill", fill_value=0)
        return rows[:, None]

    def check(self, x: jax.Array) -> jax.Array:
        """``x`` unchanged, or all NaN when real tokens did not fit in the packed rows."""
        return jnp.where(self.overflow, jnp.asarray(jnp.nan, x.dtype), x)


def packed_length(attention_mask, steps: int = 16) -> int:
    """Packed rows for a host-side ``[batch, length]`` mask: its real token count rounded up to a multiple of
    ``ceil(batch * length / steps)``, so one batch shape compiles at most ``steps`` variants."""
    mask = np.asarray(attention_mask)
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be [batch, length], got shape {mask.shape}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    step = -(-mask.size // steps)
    count = max(1, int(np.count_nonzero(mask)))
    return int(min(mask.size, -(-count // step) * step))

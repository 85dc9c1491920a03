"""Unpadded ("packed") tokens: run a padded batch's position-wise work on its real tokens only.

A ``[batch, length]`` batch of passages is typically a quarter padding (lengths spread over
``[length/2, length]``), and transformers' BERT spends the same matmuls on padding as on text. Every
layer of a BERT-style encoder except attention works on each position alone, so those layers can run on
the ``[tokens, ...]`` rows of the real tokens, as MosaicBERT and NVIDIA's BERT do; attention gathers
its queries, keys and values back into the padded ``[batch, length, ...]`` layout, where the padding
mask applies as usual.

Per shard, on a mesh. The batch's rows are split into ``shards`` equal contiguous blocks, the blocks its
data-parallel devices hold (``training.partitioning.batch_sharding``), and each block is packed on its own:
the maps are ``[shards, tokens_per_shard]`` (``token_position``) and ``[shards, rows_per_shard * length]``
(``position_row``) with block-local indices, so pack and unpack are gathers batched over the leading
(sharded) axis and every device gathers from its own rows: no collective moves activations. The packed
``[tokens, ...]`` rows are the blocks one after another (``shards * tokens_per_shard``), still split over the
same devices. This layout was chosen over sequences packed into rows with segment ids (a block-diagonal
attention mask) because it keeps attention in the padded layout (the same mask, the same attention kernels and
the same numbers as the padded model) and needs no segment-aware attention path; every block has the same
static number of packed rows, the largest block's real count rounded up. One shard (the default) is the
whole batch.

The number of packed rows is a static shape. :meth:`TokenPacking.for_batch` builds the maps on the host
from a numpy mask, rounding the real token count up to one of ``steps`` sizes so that batches of one
shape share a few compilations; pass the result into a jitted function as an ordinary argument (a
pytree of arrays). :func:`block_maps` builds the per-shard maps as row-aligned ``[rows, ...]`` arrays, so that
they can travel as batch fields sharded like the batch (:meth:`TokenPacking.from_rows`). Inside a traced
function, :meth:`TokenPacking.from_mask` takes the row count explicitly. Rows past the real count repeat
position 0 and are never read back; if a batch holds more real tokens than rows, :meth:`TokenPacking.check`
turns the output into NaN rather than drop text.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenPacking:
    """Index maps between the padded ``[batch, length]`` layout and ``[tokens]`` packed rows, per shard."""
    token_position: jax.Array   # [shards, tokens_per_shard] flat padded position in the shard's rows
    position_row: jax.Array     # [shards, rows_per_shard * length] packed row in the shard; tokens_per_shard
    #                             for padding
    overflow: jax.Array         # [] True when the mask has more real tokens than ``tokens``
    batch: int = dataclasses.field(metadata=dict(static=True))
    length: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def from_mask(cls, attention_mask: jax.Array, tokens: int) -> "TokenPacking":
        """Traced maps of one shard (the whole batch) with ``tokens`` packed rows."""
        batch, length = attention_mask.shape
        real = jnp.asarray(attention_mask).reshape(-1).astype(bool)
        (token_position,) = jnp.nonzero(real, size=tokens, fill_value=0)
        rank = jnp.cumsum(real) - 1
        position_row = jnp.where(real, rank, tokens)
        return cls(token_position.astype(jnp.int32)[None], position_row.astype(jnp.int32)[None],
                   jnp.sum(real) > tokens, batch, length)

    @classmethod
    def for_batch(cls, attention_mask, steps: int = 16) -> "TokenPacking":
        """Host-side maps of one shard for a numpy ``[batch, length]`` mask, with :func:`packed_length` rows."""
        mask = np.asarray(attention_mask)
        tokens = packed_length(mask, steps)
        token_position, position_row = _maps(mask, tokens)
        return cls(token_position[None], position_row[None], np.asarray(False), *mask.shape)

    @classmethod
    def from_rows(cls, token_position, position_row, shards: int) -> "TokenPacking":
        """The packing of :func:`block_maps`' row-aligned maps (``[rows, per_row]`` and ``[rows, length]``, e.g.
        batch fields, traced) over ``shards`` contiguous blocks of rows."""
        rows, length = position_row.shape
        if rows % shards or token_position.shape[0] != rows:
            raise ValueError(f"packing maps of {token_position.shape[0]} and {rows} rows do not split into "
                             f"{shards} shards")
        return cls(token_position.reshape(shards, -1), position_row.reshape(shards, -1), jnp.asarray(False),
                   rows, length)

    @property
    def shards(self) -> int:
        return self.token_position.shape[0]

    @property
    def tokens(self) -> int:
        """Packed rows in all (every shard's block, one after another)."""
        return self.token_position.shape[0] * self.token_position.shape[1]

    def pack(self, x: jax.Array) -> jax.Array:
        """``[batch, length, ...]`` -> ``[tokens, ...]``."""
        blocks = x.reshape(self.shards, -1, *x.shape[2:])
        rows = jax.vmap(lambda b, i: jnp.take(b, i, axis=0, mode="clip"))(blocks, self.token_position)
        return rows.reshape(self.tokens, *x.shape[2:])

    def _gather_rows(self, x: jax.Array, position_row: jax.Array) -> jax.Array:
        blocks = x.reshape(self.shards, -1, *x.shape[1:])
        return jax.vmap(lambda b, i: jnp.take(b, i, axis=0, mode="fill", fill_value=0))(blocks, position_row)

    def unpack(self, x: jax.Array) -> jax.Array:
        """``[tokens, ...]`` -> ``[batch, length, ...]``, zeros at the padding."""
        return self._gather_rows(x, self.position_row).reshape(self.batch, self.length, *x.shape[1:])

    def first(self, x: jax.Array) -> jax.Array:
        """``[tokens, ...]`` -> ``[batch, 1, ...]``: each sequence's position 0 (its [CLS])."""
        return self._gather_rows(x, self.position_row[:, ::self.length]).reshape(self.batch, 1, *x.shape[1:])

    def check(self, x: jax.Array) -> jax.Array:
        """``x`` unchanged, or all NaN when real tokens did not fit in the packed rows."""
        return jnp.where(self.overflow, jnp.asarray(jnp.nan, x.dtype), x)


def _maps(mask: np.ndarray, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(token_position [tokens], position_row [mask.size]) of one block's host mask."""
    real = mask.reshape(-1).astype(bool)
    token_position = np.zeros(tokens, np.int32)
    positions = np.flatnonzero(real)
    token_position[:len(positions)] = positions
    position_row = np.where(real, np.cumsum(real) - 1, tokens).astype(np.int32)
    return token_position, position_row


def packed_length(attention_mask, steps: int = 16) -> int:
    """Packed rows for a host-side ``[batch, length]`` mask: its real token count rounded up to a multiple of
    ``ceil(batch * length / steps)``, so one batch shape compiles at most ``steps`` variants."""
    mask = _check_mask(attention_mask, steps)
    step = -(-mask.size // steps)
    count = max(1, int(np.count_nonzero(mask)))
    return int(min(mask.size, -(-count // step) * step))


def _check_mask(attention_mask, steps: int) -> np.ndarray:
    mask = np.asarray(attention_mask)
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be [batch, length], got shape {mask.shape}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return mask


def packed_per_row(attention_mask, blocks: int, steps: int = 16) -> int:
    """Packed rows per batch row when a host ``[rows, length]`` mask is packed in ``blocks`` contiguous blocks of
    rows: the fullest block's real token count over its rows, rounded up to a multiple of ``ceil(length /
    steps)`` (so one batch shape compiles at most ``steps`` variants), at most ``length``. A block then has
    ``rows_per_block * per_row`` packed rows."""
    mask = _check_mask(attention_mask, steps)
    rows, length = mask.shape
    if blocks < 1 or rows % blocks:
        raise ValueError(f"{rows} rows cannot be split into {blocks} equal blocks")
    per_block = rows // blocks
    fullest = max(1, int(np.count_nonzero(mask.reshape(blocks, -1), axis=1).max()))
    need, step = -(-fullest // per_block), -(-length // steps)
    return int(min(length, -(-need // step) * step))


def block_maps(attention_mask, blocks: int, per_row: int) -> tuple[np.ndarray, np.ndarray]:
    """Host maps of a ``[rows, length]`` mask packed per block of ``rows / blocks`` contiguous rows, as row-aligned
    arrays (so they shard like the batch): ``token_position`` ``[rows, per_row]`` (block ``b``'s
    ``rows_per_block * per_row`` packed rows are its rows' entries, row-major) and ``position_row``
    ``[rows, length]``, indices local to the block. :meth:`TokenPacking.from_rows` reads them back."""
    mask = np.asarray(attention_mask)
    rows, length = mask.shape
    per_block = rows // blocks
    if rows % blocks or per_row * per_block < int(np.count_nonzero(mask.reshape(blocks, -1), axis=1).max()):
        raise ValueError(f"a [{rows}, {length}] mask in {blocks} blocks does not fit {per_row} packed rows per row")
    token_position = np.empty((rows, per_row), np.int32)
    position_row = np.empty((rows, length), np.int32)
    for b in range(blocks):
        sl = slice(b * per_block, (b + 1) * per_block)
        tp, pr = _maps(mask[sl], per_block * per_row)
        token_position[sl] = tp.reshape(per_block, per_row)
        position_row[sl] = pr.reshape(per_block, length)
    return token_position, position_row

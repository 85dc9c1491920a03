"""Batches of a map-style dataset (``len()`` + ``make_batch(indices, rng)``): a resumable epoch iterator, split
by process, and fixed dev batches."""

from __future__ import annotations

import numpy as np


class EpochIterator:
    """Batches of example indices: a fresh permutation per epoch from (seed, epoch), dropping the last
    partial batch. State (epoch, position) makes a resumed run see exactly the batches it would have.

    Multi-process (``set_shard(index, count)``): every process walks the same global order and tokenises only
    its contiguous block ``index`` of ``count`` of each global batch (the rows its devices hold), so the
    processes' blocks put together are the 1-process batch, in the same order. Index fields stay local to the
    block (the training loop re-bases them)."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, make_batch, shuffle: bool = True):
        if num_examples < batch_size:
            raise ValueError(f"{num_examples} training examples are fewer than train.batch_size={batch_size}")
        self.n, self.batch_size, self.seed, self.shuffle = num_examples, batch_size, seed, shuffle
        self.make_batch = make_batch
        self.epoch, self.position = 0, 0
        self.shard_index, self.shard_count = 0, 1

    def set_shard(self, index: int, count: int) -> None:
        if self.batch_size % count or not 0 <= index < count:
            raise ValueError(f"train.batch_size={self.batch_size} cannot be split into {count} equal process "
                             f"shards (shard {index})")
        self.shard_index, self.shard_count = index, count

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position + self.batch_size > self.n:
            self.epoch, self.position = self.epoch + 1, 0
        idx = self._order()[self.position:self.position + self.batch_size]
        rng = np.random.default_rng([self.seed, self.epoch, self.position, 1])
        if self.shard_count > 1:
            per = self.batch_size // self.shard_count
            idx = idx[self.shard_index * per:(self.shard_index + 1) * per]
            rng = np.random.default_rng([self.seed, self.epoch, self.position, 1, self.shard_index])
        self.position += self.batch_size
        return self.make_batch(idx, rng)

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class DevBatches:
    """The dev set in fixed batches, in order, tokenised afresh on each pass (not held in memory)."""

    def __init__(self, data, batch_size: int):
        self.data, self.batch_size = data, batch_size

    def __iter__(self):
        for start in range(0, len(self.data) - self.batch_size + 1, self.batch_size):
            idx = np.arange(start, start + self.batch_size)
            yield self.data.make_batch(idx, np.random.default_rng([0, start]))

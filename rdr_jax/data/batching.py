"""Batches of a map-style dataset (``len()`` + ``make_batch(indices, rng)``): a resumable epoch iterator, split
by process, whose batches are built ahead of the training step by grain (worker processes or a thread), and
fixed dev batches."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

# A grain index range this long never ends in practice (the loop stops at train.steps).
_ENDLESS = 2 ** 62


class BatchPlan:
    """Which examples make global batch number ``step`` (and the batch's random generator), as a pure
    function of (seed, step): a fresh permutation per epoch from (seed, epoch), dropping the last partial
    batch. Picklable, so grain worker processes compute the same batches as the main process would."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool = True):
        if num_examples < batch_size:
            raise ValueError(f"{num_examples} training examples are fewer than train.batch_size={batch_size}")
        self.n, self.batch_size, self.seed, self.shuffle = num_examples, batch_size, seed, shuffle
        self.per_epoch = num_examples // batch_size
        self.shard_index, self.shard_count = 0, 1
        self._order: tuple[int, np.ndarray] | None = None   # (epoch, permutation): one epoch's, cached

    def set_shard(self, index: int, count: int) -> None:
        if self.batch_size % count or not 0 <= index < count:
            raise ValueError(f"train.batch_size={self.batch_size} cannot be split into {count} equal process "
                             f"shards (shard {index})")
        self.shard_index, self.shard_count = index, count

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._order[1]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, position of the batch's first example in that epoch's order)."""
        return step // self.per_epoch, (step % self.per_epoch) * self.batch_size

    def batch(self, step: int) -> tuple[np.ndarray, np.random.Generator]:
        """This process's block of global batch ``step``: example indices, and a generator that is the same
        on every process (seeded by seed, epoch, position). Sampling that must not depend on the process
        split derives per-example generators from it (:func:`example_rngs`)."""
        epoch, position = self.locate(step)
        idx = self.order(epoch)[position:position + self.batch_size]
        if self.shard_count > 1:
            per = self.batch_size // self.shard_count
            idx = idx[self.shard_index * per:(self.shard_index + 1) * per]
        return idx, np.random.default_rng([self.seed, epoch, position, 1])

    def state(self, step: int) -> dict:
        """The resumable state after ``step`` batches: (epoch, position)."""
        epoch, position = self.locate(step)
        if step and position == 0:   # as before: the last batch's epoch, rolled over at the next batch
            epoch, position = epoch - 1, self.per_epoch * self.batch_size
        return {"epoch": epoch, "position": position}

    def step_of(self, state: dict) -> int:
        """The batches handed out at ``state`` (inverse of :meth:`state`)."""
        epoch, position = int(state["epoch"]), int(state["position"])
        return epoch * self.per_epoch + -(-position // self.batch_size)


def example_rngs(rng: np.random.Generator, idx) -> list[np.random.Generator]:
    """One generator per example from a batch generator that every process shares: a function of (the batch's
    seed, epoch, position) and the example's global index, so the processes' blocks draw what one process
    drawing the whole batch does."""
    base = int(rng.integers(2 ** 63))
    return [np.random.default_rng([base, int(i)]) for i in idx]


class EpochIterator:
    """Batches of example indices (:class:`BatchPlan`), made by ``make_batch(indices, rng)``. State
    (epoch, position) makes a resumed run see exactly the batches it would have.

    Multi-process (``set_shard(index, count)``): every process walks the same global order and tokenises only
    its contiguous block ``index`` of ``count`` of each global batch (the rows its devices hold), so the
    processes' blocks put together are the 1-process batch, in the same order. Index fields stay local to the
    block (the training loop re-bases them).

    ``workers``: 0 builds each batch when asked for (on the calling thread); N > 0 builds them ahead in N
    grain worker processes (spawned: ``make_batch`` must pickle), ``prefetch`` batches per worker. The
    batches are the same either way; the state counts the batches handed out, not those built ahead, so a
    checkpoint resumes exactly.

    ``plan``: another plan of global batches (``batch(step)`` -> ``make_batch``'s arguments, ``set_shard``,
    ``state(step)``, ``step_of(state)``), e.g. one mixing two example streams; default a :class:`BatchPlan`."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, make_batch, shuffle: bool = True,
                 workers: int = 0, prefetch: int = 2, plan=None):
        self.plan = plan if plan is not None else BatchPlan(num_examples, batch_size, seed, shuffle)
        self.n, self.batch_size, self.seed, self.shuffle = num_examples, batch_size, seed, shuffle
        self.make_batch = make_batch
        self.workers, self.prefetch = workers, prefetch
        self.step = 0          # global batches handed out
        self._stream = None    # the grain iterator from self.step on (built at the first next())

    @property
    def shard_index(self) -> int:
        return self.plan.shard_index

    @property
    def shard_count(self) -> int:
        return self.plan.shard_count

    def set_shard(self, index: int, count: int) -> None:
        self.plan.set_shard(index, count)
        self._stream = None

    def __iter__(self):
        return self

    def _open(self):
        import grain

        ds = grain.MapDataset.range(self.step, _ENDLESS).map(_MakeBatch(self.plan, self.make_batch))
        if not self.workers:
            return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
        from absl import flags

        if not flags.FLAGS.is_parsed():   # grain's worker options are absl flags; not run under absl.app
            flags.FLAGS.mark_as_parsed()
        log.info("training batches built by %d grain worker processes (%d ahead each)", self.workers, self.prefetch)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=self.prefetch))
        return iter(ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                                per_worker_buffer_size=self.prefetch)))

    def __next__(self) -> dict[str, np.ndarray]:
        if self._stream is None:
            self._stream = self._open()
        batch = next(self._stream)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return self.plan.state(self.step)

    def set_state(self, state: dict) -> None:
        self.step = self.plan.step_of(state)
        self._stream = None

    def close(self) -> None:
        """Stop the worker processes (they also stop with this process)."""
        self._stream = None


class _MakeBatch:
    """grain's map function: global batch number -> this process's block of it (picklable)."""

    def __init__(self, plan, make_batch):
        self.plan, self.make_batch = plan, make_batch

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        return self.make_batch(*self.plan.batch(int(step)))


class DevBatches:
    """The dev set in fixed batches, in order, tokenised afresh on each pass (not held in memory)."""

    def __init__(self, data, batch_size: int):
        self.data, self.batch_size = data, batch_size

    def __iter__(self):
        for start in range(0, len(self.data) - self.batch_size + 1, self.batch_size):
            idx = np.arange(start, start + self.batch_size)
            yield self.data.make_batch(idx, np.random.default_rng([0, start]))

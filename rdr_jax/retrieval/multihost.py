"""Small host-side collectives for inference commands run on every process of a slice.

Inference splits its inputs over processes and merges on process 0 without a separate step or a shared file
system: each step's small per-process results (scores, answers) travel through ``jax.distributed``'s
collectives (gloo on CPU hosts), not through files.
"""

from __future__ import annotations

import itertools
import pickle
import threading
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in process order, on every process; ``[obj]`` with one process.

    A collective: every process must call it the same number of times. Objects are pickled: only for the
    processes of one program, never for data from elsewhere."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [pickle.loads(gathered[p, :int(n)].tobytes()) for p, n in enumerate(sizes)]


class _RoundBuffer:
    """Process 0's copy of the blocks read so far, by round (``processes`` blocks a round), filled by the thread
    that reads the input and taken round by round by the one that merges."""

    def __init__(self, processes: int):
        self.processes, self.blocks, self.ended = processes, {}, False
        self.cond = threading.Condition()

    def add(self, number: int, block) -> None:
        with self.cond:
            self.blocks[number] = block
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def take_round(self, number: int) -> list:
        first, last = number * self.processes, (number + 1) * self.processes - 1
        with self.cond:
            self.cond.wait_for(lambda: self.ended or last in self.blocks)
            return [self.blocks.pop(b) for b in range(first, last + 1) if b in self.blocks]


def deal_and_merge(blocks: Iterable[list], compute: Callable[[Iterator[list]], Iterator[list]]
                   ) -> Iterator[tuple[Any, Any]]:
    """Inference split over processes, streamed: block ``b`` of ``blocks`` (lists of items, read once, in order,
    by every process) goes to process ``b % processes``; ``compute(my_blocks)`` yields one list of values per
    block it is given (one value per item, in order; it may read ahead, e.g. on a runner's producer thread).
    After each round the values are gathered, and process 0 yields ``(item, value)`` for every item, in input
    order; the other processes yield nothing. Memory: the blocks read ahead, never the whole input."""
    processes, index = jax.process_count(), jax.process_index()
    buffer = _RoundBuffer(processes) if index == 0 else None

    def mine() -> Iterator[list]:
        try:
            for number, block in enumerate(blocks):
                if buffer is not None:
                    buffer.add(number, block)
                if number % processes == index:
                    yield block
        finally:
            if buffer is not None:
                buffer.close()

    values = compute(mine())
    for number in itertools.count():
        local = next(values, None)
        gathered = allgather_objects(local)   # a collective: every process, every round, also past its own end
        if all(g is None for g in gathered):
            return
        if index == 0:
            for block, block_values in zip(buffer.take_round(number), gathered):
                if block_values is not None:
                    yield from zip(block, block_values)

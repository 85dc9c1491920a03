"""One inference runner for every command that applies a model to many rows: it keeps the devices busy.

A *row* is one model input: a passage for ``encode``, a question for question encoding, a (question, passage)
pair for the reader (``read``, ``teacher-scores``) or a (query, passage) pair for a cross-encoder (``rerank``).
Callers hand the runner *chunks* of rows, ``(key, payload)``; ``prepare(payload)`` turns a payload into
:class:`TokenRows` (tokenising through a :class:`TokenizePool`, or slicing a tokenised corpus store) and the
runner yields ``(key, outputs)`` per chunk, outputs in the chunk's row order. How the devices stay busy:

- **Reading/tokenising ahead.** A producer thread runs ``prepare`` and pads batches while the devices work;
  :class:`TokenizePool` splits a chunk over threads around the fast tokenizer's batch call (the Rust tokenizer
  releases the GIL; its own rayon pool is off, ``TOKENIZERS_PARALLELISM=false`` in the CLI, so the threads do
  not oversubscribe the cores). A bounded queue keeps at most ``prefetch`` padded batches ahead.
- **Two batches in flight.** Batch ``i`` is dispatched (JAX dispatch is asynchronous and its outputs start
  copying to the host at once) before batch ``i-1``'s results are read back, so the host's fetch, scatter and
  next ``device_put`` overlap the device's compute.
- **Little padding, few shapes.** Within a chunk rows are sorted by length and cut into batches of
  ``batch_size`` rows, each padded to the next multiple of ``length_step`` tokens (capped at ``max_length``).
  Every batch has the same row count (a chunk's last batch is filled with dummy rows), so there are at most
  ``ceil(max_length / length_step)`` compiled shapes per ``max_length``: 8 for 256 tokens in steps of 32, on one
  device or many (rows are sharded over the devices, so no packing is needed to cut padding). For 100-word
  passages the padding share is about 10% (``stats.padding_share`` measures it).
- **Multi-host.** The mesh is built over ``jax.local_devices()``: each process runs its own rows on its own
  chips, with no cross-process collective, so a command started on every host of a slice simply splits rows.

``stats`` counts rows, real and padded tokens, compilations (the jitted function's cache size) and, with
``measure_busy=True``, the time the devices were busy: a watcher thread waits for each dispatched batch in
turn, and a batch's busy time runs from when the device could start it (its dispatch, or the previous batch's
end) to its end.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rdr_jax.data.token_rows import TokenRows

DEFAULT_LENGTH_STEP = 32


class TokenizePool:
    """Tokenises a chunk in pieces on a thread pool, in order: ``pool.rows(fn, items)`` with
    ``fn(list_of_items) -> TokenRows``."""

    def __init__(self, workers: int | None = None, piece: int = 512):
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.piece = piece
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tokenize") if self.workers > 1 else None

    def rows(self, fn: Callable[[list], TokenRows], items: Sequence) -> TokenRows:
        items = list(items)
        pieces = [items[i:i + self.piece] for i in range(0, len(items), self.piece)]
        if self._pool is None or len(pieces) < 2:
            return TokenRows.concatenate([fn(p) for p in pieces])
        return TokenRows.concatenate(list(self._pool.map(fn, pieces)))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def padded_lengths(max_length: int, step: int) -> list[int]:
    """The padded lengths a batch may have: multiples of ``step`` below ``max_length``, then ``max_length``."""
    return sorted({*range(step, max_length, step), max_length})


@dataclasses.dataclass
class RunnerStats:
    rows: int = 0
    batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    busy_s: float = 0.0          # device busy time (measure_busy=True only)
    shapes: set = dataclasses.field(default_factory=set)

    @property
    def padding_share(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


class _Chunk:
    __slots__ = ("key", "rows", "fetched", "ended", "out", "max_length")

    def __init__(self, key, rows: int, max_length: int):
        self.key, self.rows, self.max_length = key, rows, max_length
        self.fetched, self.ended, self.out = 0, False, None

    @property
    def complete(self) -> bool:
        return self.ended and self.fetched == self.rows


class InferenceRunner:
    """Applies ``model`` to chunks of rows, data-parallel over this process's devices (see the module docstring).

    ``output_fn(model_output)`` picks the arrays to return (a pytree of ``[rows, ...]`` arrays; a dict for
    ``per_token``); with ``extras`` (names of :class:`TokenRows` per-row integers) it is
    ``output_fn(model_output, inputs)``, ``inputs`` holding ``input_ids``, ``attention_mask`` and the extras, so
    work that needs the inputs (the reader's best span) runs on the device too. ``per_token`` names dict outputs shaped ``[rows, length, ...]``: they come back padded with
    zeros to ``max_length`` so rows of different batches line up. ``model_kwargs`` go to every call
    (e.g. ``cls_only=True``).
    """

    INPUTS = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, model: nnx.Module, output_fn: Callable, batch_size: int, *, devices: Sequence | None = None,
                 model_kwargs: dict | None = None, length_step: int = DEFAULT_LENGTH_STEP, per_token: Sequence[str] = (),
                 pad_id: int = 0, prefetch: int = 4, in_flight: int = 2, measure_busy: bool = False,
                 extras: Sequence[str] = ()):
        if length_step < 1 or batch_size < 1 or in_flight < 1:
            raise ValueError(f"batch_size ({batch_size}), length_step ({length_step}) and in_flight ({in_flight}) "
                             "must be >= 1")
        devices = list(devices or jax.local_devices())
        n = len(devices)
        self.devices = devices
        self.mesh = Mesh(np.array(devices), ("data",))
        self.batch_size = max(n, (batch_size + n - 1) // n * n)
        self.length_step, self.per_token, self.pad_id = length_step, tuple(per_token), pad_id
        self.prefetch, self.in_flight, self.measure_busy = max(1, prefetch), in_flight, measure_busy
        self.row_sharding = NamedSharding(self.mesh, P("data"))
        self.stats = RunnerStats()
        graphdef, params = nnx.split(model)
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
        kw = dict(model_kwargs or {})
        self.extras = tuple(extras)

        @jax.jit
        def apply(params, input_ids, attention_mask, token_type_ids, extra):
            out = nnx.merge(graphdef, params)(input_ids, attention_mask, token_type_ids, **kw)
            if not self.extras:
                return output_fn(out)
            return output_fn(out, {"input_ids": input_ids, "attention_mask": attention_mask, **extra})

        self._apply = apply

    # ---- introspection -----------------------------------------------------------------------------------

    def compiled_shapes(self, max_length: int) -> list[tuple[int, int]]:
        """Every ``(rows, length)`` batch shape a run up to ``max_length`` may compile."""
        return [(self.batch_size, n) for n in padded_lengths(max_length, self.length_step)]

    @property
    def compilations(self) -> int:
        """Executables compiled so far (the jitted function's cache size)."""
        size = getattr(self._apply, "_cache_size", None)
        return int(size()) if callable(size) else len(self.stats.shapes)

    def padded_length(self, longest: int, max_length: int, step: int | None = None) -> int:
        step = step or self.length_step
        return min(max_length, max(step, -(-longest // step) * step))

    # ---- running -----------------------------------------------------------------------------------------

    def __call__(self, rows: TokenRows, max_length: int):
        """The outputs for one chunk of rows, in row order."""
        return next(iter(self.map([(None, rows)], max_length=max_length)))[1]

    def map(self, chunks: Iterable[tuple[Any, Any]], *, max_length: int,
            prepare: Callable[[Any], TokenRows] | None = None,
            length_step: int | None = None) -> Iterator[tuple[Any, Any]]:
        """``(key, outputs)`` for each ``(key, payload)`` of ``chunks``, in order; ``prepare(payload)`` (default:
        the payload is a :class:`TokenRows`) runs on the producer thread, as does iterating ``chunks``, so
        reading a file and tokenising overlap the devices. Rows longer than ``max_length`` are cut to it. A
        chunk of no rows yields ``None`` outputs. ``length_step`` overrides the runner's for this call
        (``max_length``: one shape, every batch padded to it)."""
        work: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    work.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for key, payload in chunks:
                    rows = prepare(payload) if prepare is not None else payload
                    lengths = np.minimum(rows.lengths(), max_length)
                    order = np.argsort(lengths, kind="stable")
                    if not put(("chunk", key, len(rows))):
                        return
                    for start in range(0, len(rows), self.batch_size):
                        index = order[start:start + self.batch_size]
                        length = self.padded_length(int(lengths[index].max()), max_length, length_step)
                        if not put(("batch", index, self._pad(rows, index, length), int(lengths[index].sum()))):
                            return
                    if not put(("end",)):
                        return
                put(("done",))
            except BaseException as e:  # noqa: BLE001 - re-raised on the consuming thread
                put(("error", e))

        producer = threading.Thread(target=produce, name="runner-producer", daemon=True)
        producer.start()
        watcher = _BusyWatcher(self.stats) if self.measure_busy else None
        open_chunks: deque[_Chunk] = deque()
        pending: deque = deque()
        try:
            while True:
                item = work.get()
                kind = item[0]
                if kind == "error":  # finish what was read before the failure (a resumable caller keeps it)
                    while pending:
                        self._fetch(*pending.popleft())
                    while open_chunks and open_chunks[0].complete:
                        chunk = open_chunks.popleft()
                        yield chunk.key, chunk.out
                    raise item[1]
                if kind == "chunk":
                    open_chunks.append(_Chunk(item[1], item[2], max_length))
                elif kind == "batch":
                    pending.append((open_chunks[-1], item[1], self._dispatch(item[2], item[3], watcher)))
                    while len(pending) >= self.in_flight:  # the newest keeps the device busy meanwhile
                        self._fetch(*pending.popleft())
                elif kind == "end":
                    open_chunks[-1].ended = True
                else:  # done
                    while pending:
                        self._fetch(*pending.popleft())
                while open_chunks and open_chunks[0].complete:
                    chunk = open_chunks.popleft()
                    yield chunk.key, chunk.out
                if kind == "done":
                    return
        finally:
            stop.set()
            if watcher is not None:
                watcher.close()

    def _pad(self, rows: TokenRows, index: np.ndarray, length: int) -> dict[str, np.ndarray]:
        batch = {"input_ids": np.full((self.batch_size, length), self.pad_id, np.int32),
                 "attention_mask": np.zeros((self.batch_size, length), np.int32),
                 "token_type_ids": np.zeros((self.batch_size, length), np.int32)}
        types = rows.token_type_ids
        for j, i in enumerate(index):
            seq = rows.input_ids[i][:length]
            batch["input_ids"][j, :len(seq)] = seq
            batch["attention_mask"][j, :len(seq)] = 1
            if types is not None:
                t = types[i][:length]
                batch["token_type_ids"][j, :len(t)] = t
        batch["attention_mask"][len(index):, 0] = 1  # dummy rows stay well-defined (no all-masked softmax)
        if self.extras:
            if not rows.extras or set(self.extras) - set(rows.extras):
                raise ValueError(f"the runner reads per-row {self.extras}; the rows have {sorted(rows.extras or {})}")
            batch["extra"] = {k: np.zeros(self.batch_size, np.int32) for k in self.extras}
            for k in self.extras:
                batch["extra"][k][:len(index)] = np.asarray(rows.extras[k])[index]
        return batch

    def _dispatch(self, batch: dict[str, np.ndarray], real_tokens: int, watcher):
        arrays = [jax.device_put(batch[k], self.row_sharding) for k in self.INPUTS]
        extra = jax.device_put(batch.get("extra", {}), self.row_sharding)
        t = time.perf_counter()
        out = self._apply(self.params, *arrays, extra)
        for leaf in jax.tree.leaves(out):
            leaf.copy_to_host_async()
        if watcher is not None:
            watcher.submit(t, out)
        shape = batch["input_ids"].shape
        self.stats.batches += 1
        self.stats.real_tokens += real_tokens
        self.stats.padded_tokens += shape[0] * shape[1]
        self.stats.shapes.add(shape)
        return out

    def _fetch(self, chunk: _Chunk, index: np.ndarray, out) -> None:
        rows = len(index)
        host = jax.tree.map(lambda x: np.asarray(x)[:rows], out)
        if chunk.out is None:
            chunk.out = jax.tree_util.tree_map_with_path(
                lambda path, x: np.zeros((chunk.rows, *self._row_shape(path, x, chunk.max_length)), x.dtype), host)

        def scatter(path, target, value):
            if value.ndim > 1 and target.shape[1] != value.shape[1]:  # a per-token output of a shorter batch
                target[index, :value.shape[1]] = value
            else:
                target[index] = value

        jax.tree_util.tree_map_with_path(scatter, chunk.out, host)
        chunk.fetched += rows
        self.stats.rows += rows

    def _row_shape(self, path, x: np.ndarray, max_length: int) -> tuple:
        name = getattr(path[-1], "key", None) if path else None
        if name in self.per_token:
            return (max_length, *x.shape[2:])
        return x.shape[1:]


class _BusyWatcher:
    """Waits for each dispatched batch in order and adds its device time to ``stats.busy_s``."""

    def __init__(self, stats: RunnerStats):
        self.stats, self._queue, self._last_end = stats, queue.Queue(), 0.0
        self._thread = threading.Thread(target=self._run, name="runner-busy-watcher", daemon=True)
        self._thread.start()

    def submit(self, dispatched: float, out) -> None:
        self._queue.put((dispatched, out))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            dispatched, out = item
            jax.block_until_ready(out)
            end = time.perf_counter()
            self.stats.busy_s += max(0.0, end - max(dispatched, self._last_end))
            self._last_end = end

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

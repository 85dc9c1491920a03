"""Exact inner-product search over an encoding directory (``rdr-jax encode``), on the devices.

The passage embeddings stay in their storage dtype (float16/bfloat16/float32 as written) and are split in
contiguous row blocks: first over processes (process ``p`` of ``P`` holds rows ``[p*N/P, (p+1)*N/P)``), then
over the process's local devices. Each process reads only its rows (plain reads, no memory map) in fixed blocks of
``chunk_rows`` that go to the device one at a time and are written into a preallocated, donated buffer: the
host never holds more than one block, and the devices hold the vectors once.

A batch of questions is scored with one matmul per chunk of ``chunk_rows`` rows (float32 accumulation:
``preferred_element_type``), a running top-k is kept per device (``jax.lax.top_k``), the devices' top-k are
all-gathered and merged inside the same jitted ``shard_map``, and with several processes the per-process top-k
are gathered with ``multihost_utils.process_allgather`` and merged on the host: every process gets the same
result. Compiled shapes are fixed: the question batch is padded to ``query_batch`` and every device holds the
same number of rows (padded rows score ``-inf``), so one search compiles once.

Exactness: with ``query_dtype="float32"`` (the default) every stored vector is upcast exactly and the dot
products run at ``Precision.HIGHEST``, i.e. the numbers FAISS ``IndexFlatIP`` computes over the upcast vectors up
to float32 summation order. ``query_dtype="storage"`` casts the questions to the storage dtype instead (tensor
cores on GPUs, float32 accumulation), which changes the scores by the rounding of the questions.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from rdr_jax.retrieval.encode import complete_encoding_meta

AXIS = "rows"
QUERY_DTYPES = ("float32", "storage")


def _shard_files(encoding_dir: Path, num_shards: int) -> list[tuple[Path, int, int, int, np.dtype]]:
    """(embeddings file, first global row, rows, byte offset of the data (None: Fortran order), dtype) of every
    shard, from the .npy headers only."""
    out, start = [], 0
    for i in range(num_shards):
        path = encoding_dir / f"embeddings-{i:05d}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"{encoding_dir}: missing {path.name}; rerun `rdr-jax encode` to finish it")
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if len(shape) != 2:
                raise ValueError(f"{path}: expected a [rows, dim] array, got shape {shape}")
            out.append((path, start, shape[0], None if fortran else f.tell(), np.dtype(dtype)))
        start += shape[0]
    return out


def process_rows(num_rows: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The contiguous global rows ``[start, stop)`` process ``process_index`` of ``process_count`` holds."""
    return num_rows * process_index // process_count, num_rows * (process_index + 1) // process_count


def merge_top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of candidates ``[..., n]`` by score, ties by lower row; rows < 0 (padding) sort last."""
    key_scores = np.where(rows < 0, -np.inf, scores)
    order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), -key_scores), axis=-1)[..., :k]
    return np.take_along_axis(scores, order, -1), np.take_along_axis(rows, order, -1)


def merge_across_processes(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every process's ``(scores, rows) [n, k]`` of the same ``n`` queries gathered and merged into the best ``k``
    (:func:`merge_top_k`); the same on every process. A collective: every process must call it."""
    from jax.experimental import multihost_utils

    gathered_s, gathered_r = multihost_utils.process_allgather((scores, rows))  # [processes, n, k]
    scores = np.moveaxis(np.asarray(gathered_s), 0, 1).reshape(len(scores), -1)
    rows = np.moveaxis(np.asarray(gathered_r), 0, 1).reshape(len(rows), -1)
    return merge_top_k(scores, rows, k)


def concatenate_results(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """``iter_search``'s blocks as one ``(scores, rows)``, ``[0, k]`` arrays when there were no queries."""
    if not parts:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate([s for s, _ in parts]), np.concatenate([r for _, r in parts])


class DeviceSearch:
    """Exact top-k inner-product search over an encoding directory, held on the local devices.

    ``search(queries, k)`` returns ``(scores [n, k] float32, rows [n, k] int64)``, rows being global corpus
    rows (the order of the encoding, i.e. of the passages file); ``k`` is capped at the corpus size.
    """

    def __init__(self, encoding_dir: str | os.PathLike, *, devices: Sequence | None = None,
                 process_index: int | None = None, process_count: int | None = None, chunk_rows: int = 16384,
                 query_batch: int = 256, query_dtype: str = "float32", progress: bool = True):
        if query_dtype not in QUERY_DTYPES:
            raise ValueError(f"query_dtype must be one of {QUERY_DTYPES}, got {query_dtype!r}")
        if chunk_rows < 1 or query_batch < 1:
            raise ValueError(f"chunk_rows ({chunk_rows}) and query_batch ({query_batch}) must be >= 1")
        self.encoding_dir = Path(encoding_dir)
        meta = complete_encoding_meta(self.encoding_dir)
        self.num_rows, self.dim = int(meta["num_passages"]), int(meta["dim"])
        files = _shard_files(self.encoding_dir, int(meta["num_shards"]))
        if sum(f[2] for f in files) != self.num_rows:
            raise ValueError(f"{self.encoding_dir}: the shards hold {sum(f[2] for f in files)} rows but "
                             f"meta.json says {self.num_rows}; the encoding is damaged, encode it again")
        self.storage_dtype = files[0][4]
        if any(f[4] != self.storage_dtype for f in files):
            raise ValueError(f"{self.encoding_dir}: shards of several dtypes; the encoding is damaged, encode it again")
        self.devices = list(devices or jax.local_devices())
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.query_batch, self.query_dtype = query_batch, query_dtype
        self.start, self.stop = start, stop = process_rows(self.num_rows, self.process_index, self.process_count)
        n_dev = len(self.devices)
        per_device = max(1, -(-(stop - start) // n_dev))
        self.chunk_rows = min(chunk_rows, -(-per_device // 8) * 8)
        self.device_rows = -(-per_device // self.chunk_rows) * self.chunk_rows  # padded, a multiple of the chunk
        self.device_starts = np.array([min(start + d * per_device, stop) for d in range(n_dev)], np.int64)
        self.device_valid = np.array([min(per_device, stop - s) for s in self.device_starts], np.int64)
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.embeddings = self._load(files, progress)
        self._compiled = {}
        self._max_norm = None

    @property
    def nbytes(self) -> int:
        """Bytes of the vectors this process holds on its devices (padding included)."""
        return len(self.devices) * self.device_rows * self.dim * self.storage_dtype.itemsize

    @property
    def max_norm(self) -> float:
        """The largest L2 norm of this process's rows (computed once on the devices; padding rows are zero), for
        bounding the float32 error of a score."""
        if self._max_norm is None:
            squares = jax.jit(lambda e: jnp.max(jnp.sum(jnp.square(e.astype(jnp.float32)), axis=1)))(self.embeddings)
            self._max_norm = float(np.sqrt(float(squares)))
        return self._max_norm

    def _load(self, files, progress: bool) -> jax.Array:
        """Each device's rows, read block by block from the shard files into a donated device buffer."""
        c, dtype = self.chunk_rows, self.storage_dtype

        @partial(jax.jit, donate_argnums=0)
        def put(buffer, block, offset):
            return jax.lax.dynamic_update_slice_in_dim(buffer, block, offset, axis=0)

        total = int(self.device_valid.sum())
        bar = tqdm(total=total, desc="loading vectors onto the devices", unit="row", disable=not progress,
                   unit_scale=True, mininterval=2.0)
        buffers = []
        block = np.empty((c, self.dim), dtype)  # the one host staging block, reused
        for device, first, valid in zip(self.devices, self.device_starts, self.device_valid):
            buffer = jax.jit(lambda: jnp.zeros((self.device_rows, self.dim), dtype),
                             out_shardings=jax.sharding.SingleDeviceSharding(device))()
            for offset in range(0, int(valid), c):
                n = min(c, int(valid) - offset)
                block[n:] = 0
                _read_rows(files, int(first) + offset, block[:n])
                buffer = put(buffer, jax.device_put(block, device), np.int32(offset))
                # wait before the staging block is refilled (and so that no copies pile up in flight)
                buffer.block_until_ready()
                bar.update(n)
            buffers.append(buffer)
        bar.close()
        sharding = NamedSharding(self.mesh, P(AXIS))
        return jax.make_array_from_single_device_arrays((len(self.devices) * self.device_rows, self.dim), sharding,
                                                        buffers)

    def _search_fn(self, k: int):
        if k in self._compiled:
            return self._compiled[k]
        c, n_chunks = self.chunk_rows, self.device_rows // self.chunk_rows
        kc = min(k, c)
        starts, valid = jnp.asarray(self.device_starts), jnp.asarray(self.device_valid)
        compute = jnp.float32 if self.query_dtype == "float32" else self.storage_dtype

        def per_device(emb, q):
            d = jax.lax.axis_index(AXIS)
            q = q.astype(compute)
            local = jnp.arange(c)

            def body(i, best):
                best_s, best_r = best
                chunk = jax.lax.dynamic_slice_in_dim(emb, i * c, c).astype(compute)
                s = jax.lax.dot_general(q, chunk, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                                        preferred_element_type=jnp.float32)
                rows = i * c + local
                s = jnp.where(rows[None, :] < valid[d], s, -jnp.inf)
                top_s, top_i = jax.lax.top_k(s, kc)
                cand_s = jnp.concatenate([best_s, top_s], axis=1)
                cand_r = jnp.concatenate([best_r, (top_i + i * c).astype(jnp.int32)], axis=1)
                new_s, pick = jax.lax.top_k(cand_s, k)
                return new_s, jnp.take_along_axis(cand_r, pick, axis=1)

            init = (jnp.full((q.shape[0], k), -jnp.inf, jnp.float32), jnp.full((q.shape[0], k), -1, jnp.int32))
            best_s, best_r = jax.lax.fori_loop(0, n_chunks, body, init)
            best_r = jnp.where(best_r >= 0, best_r + starts[d].astype(jnp.int32), -1)
            # Every device's top-k, device order = row order, then the best k of them (replicated).
            all_s = jax.lax.all_gather(best_s, AXIS, axis=1, tiled=True)
            all_r = jax.lax.all_gather(best_r, AXIS, axis=1, tiled=True)
            top_s, pick = jax.lax.top_k(all_s, k)
            return top_s, jnp.take_along_axis(all_r, pick, axis=1)

        fn = jax.jit(jax.shard_map(per_device, mesh=self.mesh, in_specs=(P(AXIS), P()), out_specs=(P(), P()),
                                   check_vma=False))
        self._compiled[k] = fn
        return fn

    def iter_search(self, queries: np.ndarray, k: int, *, progress: bool = False, merge_processes: bool = True
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(scores, rows)`` per batch of ``query_batch`` questions, in order (for streaming the results).
        ``merge_processes=False``: this process's own top-k of its rows (no collective; rows past them are -1
        with score -inf when it holds fewer than ``k``)."""
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries of shape {queries.shape} do not fit vectors of dim {self.dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, self.num_rows)
        fn = self._search_fn(k)
        replicated = NamedSharding(self.mesh, P())
        b = self.query_batch
        for start in tqdm(range(0, len(queries), b), desc="searching", unit="batch", disable=not progress):
            chunk = queries[start:start + b]
            padded = np.zeros((b, self.dim), np.float32)
            padded[:len(chunk)] = chunk
            scores, rows = fn(self.embeddings, jax.device_put(padded, replicated))
            scores, rows = np.asarray(scores)[:len(chunk)], np.asarray(rows)[:len(chunk)].astype(np.int64)
            if self.process_count > 1 and merge_processes:
                scores, rows = merge_across_processes(scores, rows, k)
            yield scores, rows

    def search(self, queries: np.ndarray, k: int, *, progress: bool = False, merge_processes: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self.iter_search(queries, k, progress=progress, merge_processes=merge_processes))
        return concatenate_results(parts, min(k, self.num_rows))


def _read_rows(files, first: int, out: np.ndarray) -> None:
    """Read global rows ``[first, first + len(out))`` of the shard files into ``out`` (C-contiguous) with plain
    reads: no memory map, so the file's pages never count in this process's resident memory."""
    filled, row_bytes = 0, out.strides[0]
    for path, start, rows, data_offset, _ in files:
        if filled == len(out):
            return
        lo = first + filled
        if not start <= lo < start + rows:
            continue
        take = min(len(out) - filled, start + rows - lo)
        if data_offset is None:  # a Fortran-ordered file (not written by `rdr-jax encode`): rows are strided
            out[filled:filled + take] = np.load(path, mmap_mode="r")[lo - start:lo - start + take]
            filled += take
            continue
        with open(path, "rb") as f:
            f.seek(data_offset + (lo - start) * row_bytes)
            view = memoryview(out[filled:filled + take]).cast("B")
            if f.readinto(view) != len(view):
                raise ValueError(f"{path}: shorter than its header says; the encoding is damaged, encode it again")
        filled += take


def is_encoding_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an encoding directory (``rdr-jax encode``) rather than a FAISS index (``rdr-jax index``)."""
    path = Path(path)
    return (path / "meta.json").is_file() and not (path / "index.json").is_file()


def iter_encoded_ids(encoding_dir: str | os.PathLike) -> Iterator[str]:
    """The passage ids of a finished encoding in row order, one shard's ids file at a time."""
    encoding_dir = Path(encoding_dir)
    for i in range(complete_encoding_meta(encoding_dir)["num_shards"]):
        yield from json.loads((encoding_dir / f"ids-{i:05d}.json").read_text())

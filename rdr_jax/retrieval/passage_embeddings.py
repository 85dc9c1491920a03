"""The passage vectors of an encoding (the directory ``rdr-jax encode`` writes), memory-mapped, for training with a
frozen context encoder: its vectors are looked up by row instead of recomputed.

Nothing here holds the corpus in memory: each ``embeddings-NNNNN.npy`` shard is ``np.load(mmap_mode="r")``-ed
(fp16 stays fp16 on disk and in the page cache, shared by every process of a node) and only the rows a batch
asks for are read and converted to float32. The map is advised random access, so a row read does not pull in
the read-ahead around it. Ids are mapped to rows once (``rows_of``) by streaming the ids files past the hashes
of the wanted ids: memory follows the number of wanted ids, never the corpus size.
"""

from __future__ import annotations

import json
import mmap
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from rdr_jax.data.files import resolve_data_path
from rdr_jax.data.id_hash import id_hashes
from rdr_jax.retrieval.encode import _shard_paths, complete_encoding_meta


def _advise_random(array: np.ndarray) -> None:
    mapped = getattr(array, "_mmap", None)
    if mapped is not None and hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)


class PassageEmbeddings:
    """An encoding's vectors, memory-mapped per shard: ``rows(r)`` (float32), ``blocks(n)`` (to scan it),
    ``rows_of(ids)`` and ``ids_of(rows)`` (id <-> row, without a table of every id)."""

    def __init__(self, encoding_dir):
        self.path = resolve_data_path(encoding_dir)
        meta = complete_encoding_meta(self.path)
        self.shards = []
        for i in range(meta["num_shards"]):
            emb_path, ids_path = _shard_paths(self.path, i)
            if not emb_path.is_file() or not ids_path.is_file():
                raise FileNotFoundError(f"{self.path}: shard {i} ({emb_path.name}, {ids_path.name}) is missing")
            shard = np.load(emb_path, mmap_mode="r")
            _advise_random(shard)
            self.shards.append(shard)
        dims = {s.shape[1] for s in self.shards}
        if len(dims) != 1:
            raise ValueError(f"{self.path}: shards of different widths {sorted(dims)}; not one encoding")
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.shape = (int(self.offsets[-1]), dims.pop())
        self.dtype = self.shards[0].dtype
        self._shard_ids = lru_cache(maxsize=4)(self._read_shard_ids)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the vectors on disk (what the map may page in, shared between processes)."""
        return sum(s.nbytes for s in self.shards)

    def rows(self, rows) -> np.ndarray:
        """float32 ``[len(rows), dim]``: the vectors of ``rows``; a negative row (padding) gives zeros."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if rows.size and rows.max() >= len(self):
            raise IndexError(f"{self.path}: row {int(rows.max())} is past the encoding's {len(self)} passages")
        out = np.zeros((len(rows), self.shape[1]), np.float32)
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(shard[rows >= 0]):
            at = np.flatnonzero((shard == s) & (rows >= 0))
            local = rows[at] - self.offsets[s]
            order = np.argsort(local, kind="stable")   # ascending reads: fewer page faults out of order
            out[at[order]] = self.shards[s][local[order]]
        return out

    def blocks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, block) over the whole encoding in order, each block at most ``size`` rows of one shard,
        still in the stored dtype (the caller converts a block at a time)."""
        for offset, shard in zip(self.offsets, self.shards):
            for start in range(0, len(shard), size):
                yield int(offset) + start, shard[start:start + size]

    def _read_shard_ids(self, index: int) -> list[str]:
        return [str(x) for x in json.loads(_shard_paths(self.path, index)[1].read_text())]

    @property
    def ids(self) -> "EncodedIds":
        """The passage ids, by row, read from the ids files on demand."""
        return EncodedIds(self)

    def ids_of(self, rows: Sequence[int]) -> list[str]:
        """The passage ids of ``rows`` (reading only the ids files of their shards)."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        out = [""] * len(rows)
        for s in np.unique(shard):
            ids = self._shard_ids(int(s))
            for i in np.flatnonzero(shard == s):
                out[i] = ids[rows[i] - self.offsets[s]]
        return out

    def rows_of(self, hashes: np.ndarray, progress: bool = True) -> np.ndarray:
        """The row of each wanted id, given as ``data.id_hash.id_hashes`` (any shape; the result has it), by one
        pass over the ids files. -1 where an id is not in the encoding. Two corpus passages answering one wanted
        hash (a repeated id, or a 64-bit collision) are refused: the row would be ambiguous."""
        hashes = np.asarray(hashes, np.uint64)
        wanted, inverse = np.unique(hashes.reshape(-1), return_inverse=True)
        found = np.full(len(wanted), -1, np.int64)
        for s in tqdm(range(len(self.shards)), desc="passage ids -> rows", unit="shard",
                      disable=not progress or len(self.shards) < 20):
            h = id_hashes(self._read_shard_ids(s))
            pos = np.minimum(np.searchsorted(wanted, h), max(len(wanted) - 1, 0))
            hit = np.flatnonzero(wanted[pos] == h) if len(wanted) else np.zeros(0, np.int64)
            p = pos[hit]
            order = np.argsort(p, kind="stable")
            repeated = np.flatnonzero(np.diff(p[order]) == 0)          # two rows of this shard, one hash
            earlier = np.flatnonzero(found[p] >= 0)                     # a row of an earlier shard had it
            if len(repeated) or len(earlier):
                row = int(self.offsets[s] + (hit[order[repeated[0] + 1]] if len(repeated) else hit[earlier[0]]))
                raise ValueError(f"{self.path}: passage id {self.ids_of([row])[0]!r} (row {row}) is not unique "
                                 "in the encoding (or two ids share a 64-bit hash); ids cannot name its rows")
            found[pos[hit]] = self.offsets[s] + hit
        return found[inverse].reshape(hashes.shape)


class EncodedIds:
    """The ids of an encoding as a read-only sequence (``ids[row]``, ``ids_of(rows)`` for many at once), each
    shard's ids file read when one of its rows is asked for: no list of every id."""

    def __init__(self, embeddings: PassageEmbeddings):
        self.embeddings = embeddings

    def __len__(self) -> int:
        return len(self.embeddings)

    def __getitem__(self, row: int) -> str:
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} of {len(self)} passages")
        return self.embeddings.ids_of([row % len(self)])[0]

    def ids_of(self, rows: Sequence[int]) -> list[str]:
        return self.embeddings.ids_of(rows)

"""Exact top-k over a corpus split in contiguous row blocks over processes (``device_search.process_rows``): each
process ranks only its own rows, the per-process top-k are all-gathered and merged (score descending, row
ascending), so every process gets exactly ``dev_recall.exact_top_k``'s answer over the whole corpus, whatever the
number of processes and devices.

A process ranks its rows on its devices (``DeviceSearch``, which holds them there) or, without one, on the host
(``exact_top_k`` over its rows). The devices sum float32 products in an order that depends on chunk and kernel
shapes, so two near-equal scores could rank differently on 1 and on 8 processes; the devices therefore only pick
candidates: the process's top ``k + margin`` by device score, scored again on the host as ``exact_top_k`` scores
(float64 products and sums, rounded once to float32) and ranked. The candidates provably hold the process's exact
top-k when the last candidate's device score plus an error bound stays below the k-th exact score: the bound,
``(dim + 8) * 2**-23 * |q| * max|p|``, is above twice a float32 dot product's worst error (``dim * 2**-24 *
sum|q_i p_i|``) plus the final rounding. A question where it does not hold (a tie, or near-ties, wider than the
margin: e.g. many identical passages) is ranked by ``exact_top_k`` over the process's rows on the host and
counted in ``fallbacks``.
"""

from __future__ import annotations

from typing import Iterator

import jax
import numpy as np
from tqdm import tqdm

from rdr_jax.retrieval.dev_recall import exact_top_k_scores
from rdr_jax.retrieval.device_search import (DeviceSearch, concatenate_results, merge_across_processes,
                                             process_rows)


class ProcessRows:
    """Global rows ``[start, stop)`` of a corpus's vectors, read on the host: ``source`` is an array (a memory map
    included) or ``PassageEmbeddings`` whose row ``i`` is global row ``source_first + i`` (0: the whole corpus;
    ``start``: only this process's rows were computed)."""

    def __init__(self, source, start: int, stop: int, source_first: int = 0):
        if not (source_first <= start <= stop <= source_first + len(source)):
            raise ValueError(f"rows [{start}, {stop}) are not in the {len(source)} vectors from row {source_first}")
        self.source, self.start, self.stop, self.first = source, start, stop, source_first
        self.dim = int(source.shape[1])

    @classmethod
    def of_process(cls, source, num_rows: int | None = None) -> "ProcessRows":
        """This process's share (``process_rows``) of the whole corpus ``source``."""
        start, stop = process_rows(len(source) if num_rows is None else num_rows, jax.process_index(),
                                   jax.process_count())
        return cls(source, start, stop)

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dim

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float64 vectors of global ``rows`` (any shape; all in this block) with a trailing dim axis."""
        flat = np.asarray(rows, np.int64).reshape(-1) - self.first
        out = self.source.rows(flat) if hasattr(self.source, "rows") else self.source[flat]
        return np.asarray(out, np.float64).reshape(*np.shape(rows), self.dim)

    def blocks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row counted from ``start``, block) over the rows, in the stored dtype, at most ``size`` rows."""
        lo, hi = self.start - self.first, self.stop - self.first
        if hasattr(self.source, "blocks"):   # a memory-mapped encoding: its shards' blocks, clipped
            for first, block in self.source.blocks(size):
                a, b = max(first, lo), min(first + len(block), hi)
                if a < b:
                    yield a - lo, block[a - first:b - first]
            return
        for a in range(lo, hi, size):
            yield a - lo, self.source[a:min(a + size, hi)]


def _exact_scores(queries: np.ndarray, local: ProcessRows, rows: np.ndarray, block: int = 32) -> np.ndarray:
    """``exact_top_k``'s scores (float64, rounded once) of global ``rows [n, m]`` for ``queries [n, dim]``, read
    ``block`` questions at a time (a float64 copy of only their candidates)."""
    out = np.empty(rows.shape, np.float32)
    for i in range(0, len(rows), block):
        vectors = local.take(rows[i:i + block])
        out[i:i + block] = np.einsum("nd,nmd->nm", np.asarray(queries[i:i + block], np.float64), vectors)
    return out


class SplitSearch:
    """Exact top-k over a corpus whose rows ``local`` (a ``ProcessRows``) this process holds, the other processes
    holding theirs; ``search``: the same rows on this process's devices (``DeviceSearch``), or None to rank them on
    the host. Every call is a collective when there are several processes: all must make it, in the same order."""

    def __init__(self, local: ProcessRows, num_rows: int, search: DeviceSearch | None = None, *,
                 margin: int | None = None, query_block: int = 256):
        if search is not None and (search.start, search.stop) != (local.start, local.stop):
            raise ValueError(f"the devices hold rows [{search.start}, {search.stop}) but the host rows are "
                             f"[{local.start}, {local.stop})")
        self.local, self.num_rows, self.device = local, num_rows, search
        self.margin, self.query_block = margin, query_block
        self.fallbacks = 0   # questions ranked on the host because the device candidates could not prove it

    @property
    def shape(self) -> tuple[int, int]:
        """(rows of the whole corpus, dim)."""
        return self.num_rows, self.local.dim

    def _local_top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's exact top ``k`` (global rows, padded with -1 / -inf past its rows)."""
        n, local = len(queries), self.local
        scores = np.full((n, k), -np.inf, np.float32)
        rows = np.full((n, k), -1, np.int64)
        kl = min(k, len(local))
        if kl == 0:
            return scores, rows
        wide = min(len(local), k + (self.margin if self.margin is not None else max(k, 16)))
        on_host = np.ones(n, bool)
        if self.device is not None and wide < len(local):
            dev_s, dev_r = self.device.search(queries, wide, merge_processes=False)
            cand = np.where(np.isfinite(dev_s), dev_r, -1)
            if (cand < 0).any():
                raise RuntimeError("the device search returned padding among a process's candidates")
            s = _exact_scores(queries, local, cand)
            order = np.lexsort((cand, -s), axis=1)[:, :kl]
            scores[:, :kl] = np.take_along_axis(s, order, 1)
            rows[:, :kl] = np.take_along_axis(cand, order, 1)
            bound = (local.dim + 8) * 2.0 ** -23 * np.linalg.norm(queries.astype(np.float64), axis=1) \
                * self.device.max_norm * (1 + 1e-5)
            on_host = dev_s[:, -1].astype(np.float64) + bound >= scores[:, kl - 1]
            self.fallbacks += int(on_host.sum())
        if on_host.any():   # every row of this process, exactly, on the host
            s, r = exact_top_k_scores(queries[on_host], local, kl, query_block=self.query_block)
            scores[on_host, :kl], rows[on_host, :kl] = s, r + local.start
        return scores, rows

    def iter_search(self, queries: np.ndarray, k: int, *, progress: bool = False
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(scores, rows)`` of ``exact_top_k`` over the whole corpus, per block of ``query_block`` questions, the
        same on every process. ``k`` is capped at the corpus size."""
        queries = np.asarray(queries, np.float32)
        k = min(k, self.num_rows)
        for q0 in tqdm(range(0, len(queries), self.query_block), desc="searching", unit="batch",
                       disable=not progress):
            scores, rows = self._local_top_k(queries[q0:q0 + self.query_block], k)
            if jax.process_count() > 1:
                scores, rows = merge_across_processes(scores, rows, k)
            yield scores, rows

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.num_rows)
        return concatenate_results(list(self.iter_search(queries, k)), k)

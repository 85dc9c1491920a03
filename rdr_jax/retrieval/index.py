"""FAISS indexes over encoded passages: exact inner product (flat), HNSW and IVF-PQ.

An index directory holds ``index.faiss``, ``passage_ids.json`` (row -> passage id) and ``index.json``
(kind, dim, count). The id mapping is checked against the corpus so a stale index is refused.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from rdr_jax.retrieval.encode import complete_encoding_meta, iter_shards

KINDS = ("flat", "hnsw", "ivfpq")


def _faiss():
    import faiss

    return faiss


def new_index(kind: str, dim: int, *, hnsw_m: int = 32, ef_construction: int = 200, nlist: int = 1024,
              pq_m: int = 16, pq_bits: int = 8):
    for name, value in (("dim", dim), ("hnsw_m", hnsw_m), ("ef_construction", ef_construction), ("nlist", nlist),
                        ("pq_m", pq_m), ("pq_bits", pq_bits)):
        if not isinstance(value, int) or value < 1:  # FAISS aborts the process (or crashes) on these
            raise ValueError(f"index option {name} must be a positive integer, got {value!r}")
    faiss = _faiss()
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        return index
    if kind == "ivfpq":
        if dim % pq_m:
            raise ValueError(f"ivfpq: embedding dim {dim} must be divisible by pq_m={pq_m}")
        quantizer = faiss.IndexFlatIP(dim)
        return faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, pq_bits, faiss.METRIC_INNER_PRODUCT)
    raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")


def default_nlist(num_vectors: int) -> int:
    """IVF lists for a corpus: ~4 sqrt(N) (FAISS's guideline is 4-16 sqrt(N)), a power of two in [1, 65536],
    and at most N / 39 so that each list gets the 39 training points FAISS asks for (21M -> 16384)."""
    target = min(4 * math.sqrt(num_vectors), num_vectors / 39, 65536)
    return 1 << max(0, int(math.floor(math.log2(max(target, 1)))))


def default_train_size(nlist: int) -> int:
    """Training rows for IVF-PQ: 64 per list (FAISS samples at most 256 per list), at least 65536 (PQ codebooks)."""
    return max(64 * nlist, 65536)


def random_sample(encoding_dir: Path, size: int, seed: int = 0) -> np.ndarray:
    """``size`` rows drawn uniformly without replacement from every shard (memory-mapped), float32."""
    meta = complete_encoding_meta(encoding_dir)
    rows = np.sort(np.random.default_rng(seed).choice(meta["num_passages"], size, replace=False))
    out, start, filled = np.empty((size, meta["dim"]), np.float32), 0, 0
    for i in range(meta["num_shards"]):
        shard = np.load(encoding_dir / f"embeddings-{i:05d}.npy", mmap_mode="r")
        mine = rows[(rows >= start) & (rows < start + len(shard))] - start
        out[filled:filled + len(mine)] = shard[mine]
        filled += len(mine)
        start += len(shard)
    return out


def check_ids_against_corpus(passage_ids: Sequence[str], corpus_ids: Iterable[str], source: str = "corpus",
                             what: str = "the index") -> None:
    """Refuse rows (of an index or an encoding) that are not the corpus's passages in the corpus's order."""
    n = 0
    for n, pid in enumerate(corpus_ids, start=1):
        if n > len(passage_ids):
            raise ValueError(f"{source}: has more passages than {what} ({len(passage_ids)}); {what} is stale, "
                             "rebuild it")
        if passage_ids[n - 1] != pid:
            raise ValueError(f"{source}: passage {n} has id {pid!r} but {what.split()[-1]} row {n - 1} is "
                             f"{passage_ids[n - 1]!r}; {what} was built from another corpus")
    if n != len(passage_ids):
        raise ValueError(f"{source}: has {n} passages but {what} has {len(passage_ids)}")


class PassageIndex:
    def __init__(self, index, passage_ids: Sequence[str], kind: str):
        if index.ntotal != len(passage_ids):
            raise ValueError(f"index has {index.ntotal} vectors but {len(passage_ids)} passage ids")
        self.index, self.passage_ids, self.kind = index, list(passage_ids), kind

    @classmethod
    def build(cls, encoding_dir: str | os.PathLike, kind: str = "flat", *, train_size: int | None = None,
              progress: bool = True, seed: int = 0, **options) -> "PassageIndex":
        """An index over every shard of an encoding. IVF-PQ: ``nlist`` defaults to :func:`default_nlist` of the
        corpus size and is trained on ``train_size`` rows drawn at random from the whole encoding (default
        :func:`default_train_size`; DPR's corpus is ordered by article, so its first rows are not a fair sample)."""
        encoding_dir = Path(encoding_dir)
        meta = complete_encoding_meta(encoding_dir)
        if kind == "ivfpq" and options.get("nlist") is None:
            options["nlist"] = default_nlist(meta["num_passages"])
        index = new_index(kind, meta["dim"], **{k: v for k, v in options.items() if v is not None})
        if kind == "ivfpq":
            size = min(train_size or default_train_size(index.nlist), meta["num_passages"])
            if size < index.nlist:
                raise ValueError(f"ivfpq: {size} training vectors < nlist={index.nlist}; lower --nlist")
            index.train(random_sample(encoding_dir, size, seed))
        ids: list[str] = []
        for emb, shard_ids in tqdm(iter_shards(encoding_dir), total=meta["num_shards"], desc=f"indexing ({kind})",
                                   unit="shard", disable=not progress):
            index.add(np.ascontiguousarray(emb, np.float32))
            ids.extend(shard_ids)
        return cls(index, ids, kind)

    def save(self, out_dir: str | os.PathLike) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        faiss = _faiss()
        tmp = out_dir / "index.faiss.tmp"
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, out_dir / "index.faiss")
        (out_dir / "passage_ids.json").write_text(json.dumps(self.passage_ids))
        (out_dir / "index.json").write_text(json.dumps({"kind": self.kind, "dim": self.index.d,
                                                         "count": len(self.passage_ids)}, indent=2))
        return out_dir

    @classmethod
    def load(cls, index_dir: str | os.PathLike) -> "PassageIndex":
        index_dir = Path(index_dir)
        for name in ("index.faiss", "passage_ids.json", "index.json"):
            if not (index_dir / name).is_file():
                raise FileNotFoundError(f"{index_dir}: missing {name}; build it with `rdr-jax index`")
        info = json.loads((index_dir / "index.json").read_text())
        index = _faiss().read_index(str(index_dir / "index.faiss"))
        return cls(index, json.loads((index_dir / "passage_ids.json").read_text()), info["kind"])

    def check_against_corpus(self, corpus_ids: Iterable[str], source: str = "corpus") -> None:
        """Refuse an index whose rows are not the corpus's passages in the corpus's order."""
        check_ids_against_corpus(self.passage_ids, corpus_ids, source)

    def search_rows(self, queries: np.ndarray, k: int, *, batch_size: int = 512, ef_search: int = 128,
                    nprobe: int = 32, progress: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Top-k ``(scores [n, k], rows [n, k])`` per batch of ``batch_size`` queries (rows -1 where an
        approximate index found fewer than k)."""
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(ef_search, k)
        elif self.kind == "ivfpq":
            self.index.nprobe = nprobe
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = np.ascontiguousarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise ValueError(f"queries of shape {queries.shape} do not fit an index of dim {self.index.d}")
        k = min(k, self.index.ntotal)
        for start in tqdm(range(0, len(queries), batch_size), desc="searching", unit="batch",
                          disable=not progress):
            yield self.index.search(queries[start:start + batch_size], k)

    def search(self, queries: np.ndarray, k: int, *, batch_size: int = 512, ef_search: int = 128,
               nprobe: int = 32, progress: bool = False) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k (scores [n, k], passage ids) by inner product, searched in batches."""
        parts = list(self.search_rows(queries, k, batch_size=batch_size, ef_search=ef_search, nprobe=nprobe,
                                      progress=progress))
        k = min(k, self.index.ntotal)
        scores = np.concatenate([s for s, _ in parts]) if parts else np.zeros((0, k), np.float32)
        rows = np.concatenate([r for _, r in parts]) if parts else np.zeros((0, k), np.int64)
        ids = [[self.passage_ids[r] for r in row if r >= 0] for row in rows]
        return scores, ids

"""FAISS search latency and recall through rdr_jax.retrieval.index.PassageIndex (no PyTorch side).

Database: random Gaussian float32 vectors (100k x 384; smaller with --quick) written in the encode layout
(embeddings-00000.npy, ids-00000.json, meta.json). Queries are database vectors plus noise, so each has
real near neighbours (pure random queries make every approximate index look equally bad). Reported per
index kind: build time, ms per query batch, queries/s, recall@10 against the exact flat index.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks import common as C


def write_encoding(out_dir: Path, vectors: np.ndarray) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "embeddings-00000.npy", vectors)
    (out_dir / "ids-00000.json").write_text(json.dumps([str(i) for i in range(len(vectors))]))
    (out_dir / "meta.json").write_text(json.dumps({"complete": True, "num_shards": 1, "dim": vectors.shape[1],
                                                   "num_passages": len(vectors)}))
    return out_dir


def recall_at_k(found: list[list[str]], exact: list[list[str]], k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(e[:k])) / k for f, e in zip(found, exact)]))


def run(opts: C.Options) -> list[C.Result]:
    import faiss
    from rdr_jax.retrieval.index import PassageIndex

    faiss.omp_set_num_threads(opts.threads)
    n, dim, n_queries, batch = (2000, 32, 64, 32) if opts.quick else (100_000, 384, 1024, 256)
    rng = np.random.default_rng(0)
    db = rng.standard_normal((n, dim), dtype=np.float32)
    queries = db[rng.integers(0, n, n_queries)] + 0.5 * rng.standard_normal((n_queries, dim), dtype=np.float32)
    encoding = write_encoding(Path(opts.workdir) / "search_encoding", db)
    options = {"flat": {}, "hnsw": {"hnsw_m": 32, "ef_construction": 80 if not opts.quick else 40},
               "ivfpq": {"nlist": 16, "pq_m": 8, "pq_bits": 4} if opts.quick else {"nlist": 1024, "pq_m": 16}}

    indexes, build_s = {}, {}
    for kind, kw in options.items():
        build_s[kind] = C.timed(lambda: indexes.__setitem__(kind, PassageIndex.build(
            encoding, kind, progress=False, train_size=min(n, 100_000), **kw)))
    _, exact = indexes["flat"].search(queries, 10, batch_size=batch)
    fns = {kind: (lambda ix=ix: ix.search(queries, 10, batch_size=batch)) for kind, ix in indexes.items()}
    times = C.interleaved(fns, max(opts.repeats, 3), opts.warmup, desc="search")

    results = []
    for kind, ix in indexes.items():
        _, found = ix.search(queries, 10, batch_size=batch)
        total_ms = C.median_ms(times[kind])
        per_batch = total_ms / (n_queries / batch)
        extra = {"index": kind, "vectors": n, "dim": dim, "queries": n_queries, "query_batch": batch,
                 "ms_per_batch": per_batch, "queries_per_s": n_queries / (total_ms / 1000),
                 "build_s": build_s[kind], "recall_at_10_vs_flat": recall_at_k(found, exact, 10),
                 "options": options[kind], "spread": C.spread(times[kind])}
        notes = (f"FAISS only; {n:,}x{dim}, {extra['queries_per_s']:,.0f} q/s, "
                 f"R@10 {extra['recall_at_10_vs_flat']:.3f}, build {build_s[kind]:.1f}s")
        results.append(C.Result(f"search: {kind} (ms/{batch} queries)", per_batch, None, notes, extra))
    return results

"""Top-k answer recall of a dev question set during training, as the retrieval pipeline computes it: exact
inner-product search over the dev passages' embeddings (in blocks, so a large corpus never needs a [queries,
corpus] score matrix, nor a float copy of a memory-mapped encoding), DPR's has_answer on the passage text,
percent of questions."""

from __future__ import annotations

from typing import Iterator

import jax
import numpy as np

from rdr_jax.data.files import resolve_data_path
from rdr_jax.data.readers import read_dpr_passages, read_qa
from rdr_jax.errors import ConfigError
from rdr_jax.retrieval.answers import AnswerMatcher, default_tokenizer
from rdr_jax.retrieval.metrics import top_k_answer_recall


def _best_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the ``k`` best (score descending, row ascending) of the candidates. Ties at the k-th score are
    common (identical passages, an untrained encoder), so every candidate tied with the k-th is ranked, not
    the arbitrary ones ``argpartition`` keeps."""
    if scores.shape[1] > k:
        kth = np.partition(scores, scores.shape[1] - k, axis=1)[:, scores.shape[1] - k]
        best_scores = np.empty((len(scores), k), scores.dtype)
        best_rows = np.empty((len(scores), k), rows.dtype)
        for i in range(len(scores)):
            cand = np.flatnonzero(scores[i] >= kth[i])
            order = cand[np.lexsort((rows[i, cand], -scores[i, cand]))[:k]]
            best_scores[i], best_rows[i] = scores[i, order], rows[i, order]
        return best_scores, best_rows
    order = np.lexsort((rows, -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def corpus_blocks(vectors, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, block of at most ``size`` rows) over ``vectors``: an array (a memory map included) or an object
    with ``blocks(size)`` (``PassageEmbeddings``: its memory-mapped shards, in the stored dtype)."""
    if hasattr(vectors, "blocks"):
        yield from vectors.blocks(size)
        return
    for start in range(0, len(vectors), size):
        yield start, vectors[start:start + size]


def exact_top_k(queries: np.ndarray, vectors, k: int, *, query_block: int = 256,
                corpus_block: int = 32_768) -> np.ndarray:
    """Rows of the ``k`` largest inner products per query, best first, ties to the lower row (as a stable
    sort); exact, in blocks so a large corpus never needs a [queries, corpus] score matrix nor a float copy of
    itself: ``vectors`` (an array or ``PassageEmbeddings``) is read a block at a time (fp16 converted per
    block), so memory is bounded by the blocks whatever the corpus size."""
    return exact_top_k_scores(queries, vectors, k, query_block=query_block, corpus_block=corpus_block)[1]


def exact_top_k_scores(queries: np.ndarray, vectors, k: int, *, query_block: int = 256,
                       corpus_block: int = 32_768) -> tuple[np.ndarray, np.ndarray]:
    """``exact_top_k``'s (scores float32, rows) ``[queries, min(k, rows)]``; rows count from ``vectors``' first."""
    n = len(vectors)
    k = min(k, n)
    out = np.zeros((len(queries), k), np.int64)
    out_scores = np.zeros((len(queries), k), np.float32)
    for q0 in range(0, len(queries), query_block):
        # float64 products and sums, rounded to float32 once: identical passages get identical scores whatever
        # BLAS kernel a block's shape picks (float32 GEMM and GEMV round differently, which broke ties)
        q = np.asarray(queries[q0:q0 + query_block], np.float64)
        best_scores = np.zeros((len(q), 0), np.float32)
        best_rows = np.zeros((len(q), 0), np.int64)
        for c0, block in corpus_blocks(vectors, corpus_block):
            block = np.asarray(block, np.float64)
            scores = np.concatenate([best_scores, (q @ block.T).astype(np.float32)], axis=1)
            rows = np.concatenate([best_rows, np.broadcast_to(np.arange(c0, c0 + len(block)), (len(q), len(block)))],
                                  axis=1)
            best_scores, best_rows = _best_k(scores, rows, k)
        out[q0:q0 + len(q)] = best_rows
        out_scores[q0:q0 + len(q)] = best_scores
    return out_scores, out


class DevRecall:
    """Top-k answer recall on ``data.dev_qa`` against ``data.dev_passages``, as the retrieval pipeline computes
    it (exact inner product, DPR's has_answer on the passage text, percent of questions). The answer matchers
    are built once; passage texts are read only for the passages that reach some question's top max(k)."""

    def __init__(self, qa_path, passages_path, ks, match_type: str = "string"):
        qa_path, self.passages_path = resolve_data_path(qa_path), resolve_data_path(passages_path)
        for key, path in (("data.dev_qa", qa_path), ("data.dev_passages", self.passages_path)):
            if not path.is_file():
                raise ConfigError(f"{path}: {key} file not found")
        qa = list(read_qa(qa_path))
        if not qa:
            raise ValueError(f"{qa_path}: data.dev_qa holds no questions")
        self.questions = [x["question"] for x in qa]
        tokenizer = default_tokenizer()
        self.matchers = [AnswerMatcher(x["answers"], match_type, tokenizer) for x in qa]
        self.ks = sorted(set(int(k) for k in ks))
        self._texts: dict[str, str] = {}

    def passages(self) -> list[dict]:
        """Every dev passage ({id, title, text}), for tasks that encode them; their texts are kept."""
        rows = list(read_dpr_passages(self.passages_path))
        self._texts.update((p["id"], p["text"]) for p in rows)
        return rows

    def texts(self, wanted: set[str]) -> dict[str, str]:
        missing = set(wanted) - self._texts.keys()
        if missing:
            for p in read_dpr_passages(self.passages_path):
                if p["id"] in missing:
                    self._texts[p["id"]] = p["text"]
                    missing.discard(p["id"])
                    if not missing:
                        break
        if missing:
            raise ValueError(f"{self.passages_path}: {len(missing)} passage ids of the dev index are not in "
                             f"data.dev_passages (e.g. {sorted(missing)[:3]}); the embeddings were made from "
                             "another corpus")
        return self._texts

    def __call__(self, question_vectors: np.ndarray, passage_vectors, passage_ids) -> dict[str, float]:
        """``passage_vectors``: an array or ``PassageEmbeddings`` (searched a block at a time by ``exact_top_k`` on
        this process), or a search over rows split between processes (``split_search.SplitSearch``: its
        ``search(queries, k)`` is a collective, so every process calls this; only process 0 reads texts and
        returns the numbers, the others ``{}``). ``passage_ids``: a list, or ``EncodedIds`` (only the ids of the
        top rows are read)."""
        if question_vectors.shape[1] != passage_vectors.shape[1]:
            raise ValueError(f"question embeddings have {question_vectors.shape[1]} dims but the dev passage "
                             f"embeddings {passage_vectors.shape[1]}")
        if hasattr(passage_vectors, "search"):
            rows = passage_vectors.search(question_vectors, max(self.ks))[1]
            if jax.process_index() != 0:
                return {}
        else:
            rows = exact_top_k(question_vectors, passage_vectors, max(self.ks))
        if hasattr(passage_ids, "ids_of"):   # ids read on demand (an encoding's): all of them in one pass
            flat = passage_ids.ids_of(rows.reshape(-1))
            ranked = [flat[i:i + rows.shape[1]] for i in range(0, len(flat), rows.shape[1])]
        else:
            ranked = [[passage_ids[r] for r in row] for row in rows]
        texts = self.texts({pid for row in ranked for pid in row})
        hits = [[match(texts[pid]) for pid in row] for match, row in zip(self.matchers, ranked)]
        return {f"dev_top{k}": v for k, v in top_k_answer_recall(hits, self.ks).items()}

"""Dense retrieval for a set of questions held in memory, in DPR's retriever-results JSON layout (the demo's
and the library's small-scale path; ``rdr-jax retrieve`` streams through :mod:`rdr_jax.retrieval.results_io`).

``[{"question", "answers", "ctxs": [{"id", "title", "text", "score", "has_answer"}, ...]}, ...]``, the file
DPR's reader and our teacher-score and evaluation steps read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from rdr_jax.retrieval.answers import AnswerMatcher, default_tokenizer
from rdr_jax.retrieval.index import PassageIndex
from rdr_jax.retrieval.metrics import top_k_answer_recall


def lookup_passages(passages: Iterable[dict], wanted: set[str]) -> dict[str, dict]:
    """Stream the corpus once and keep only the wanted passages (the corpus may not fit in memory)."""
    found = {}
    for p in passages:
        if p["id"] in wanted:
            found[p["id"]] = p
            if len(found) == len(wanted):
                break
    missing = wanted - set(found)
    if missing:
        raise ValueError(f"{len(missing)} retrieved passage ids are not in the corpus (e.g. "
                         f"{sorted(missing)[:3]}); the index was built from another corpus")
    return found


def retrieval_results(questions: Sequence[dict], scores: np.ndarray, ids: Sequence[Sequence[str]],
                      passages: dict[str, dict], match_type: str = "string") -> list[dict]:
    tokenizer = default_tokenizer()
    results = []
    for qa, row_scores, row_ids in zip(questions, scores, ids):
        matcher = AnswerMatcher(qa["answers"], match_type, tokenizer)
        ctxs = [{"id": pid, "title": passages[pid]["title"], "text": passages[pid]["text"],
                 "score": float(s), "has_answer": bool(matcher(passages[pid]["text"]))}
                for pid, s in zip(row_ids, row_scores)]
        results.append({"question": qa["question"], "answers": list(qa["answers"]), "ctxs": ctxs})
    return results


def retrieve(question_embeddings: np.ndarray, questions: Sequence[dict], index: PassageIndex,
             corpus: Iterable[dict], k: int, match_type: str = "string") -> list[dict]:
    scores, ids = index.search(question_embeddings, k)
    passages = lookup_passages(corpus, {pid for row in ids for pid in row})
    return retrieval_results(questions, scores, ids, passages, match_type)


def recall_of_results(results: Sequence[dict], ks=(1, 5, 20, 50, 100)) -> dict[str, float]:
    """Top-k answer recall from retriever results (their stored ``has_answer``)."""
    return top_k_answer_recall([[c["has_answer"] for c in r["ctxs"]] for r in results], ks)


def write_results(path: str | os.PathLike, results: Iterable[dict]) -> Path:
    """DPR's retriever-results JSON, written item by item (``results`` may be a generator) to ``PATH.tmp`` and
    renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("[")
            for i, item in enumerate(results):
                f.write(("," if i else "") + "\n" + json.dumps(item, indent=1, ensure_ascii=False))
            f.write("\n]\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no PATH.tmp left behind (e.g. PATH is a directory)
        raise
    return path

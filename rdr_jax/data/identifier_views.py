"""MINDER's multi-view identifiers of a passage for training a generative retriever: its title, the body n-grams
that overlap the question most (as SEAL and MINDER choose training targets), and its pseudo-queries.

Views are token sequences made as the corpus n-gram index makes its views (``SubstringIndex.from_passages``:
title, body and each pseudo-query tokenised on their own, without special tokens), so every n-gram view is a
substring of the index's body view and decodable under it. The n-grams are spans of ``length`` tokens of the
body, scored by how many of their tokens occur in the question; the best ``count`` spans that do not overlap one
another are kept, best first, ties going to the earlier span: a pure function of (question, passage). A body of
at most ``length`` tokens is one span."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """How many views of each kind a candidate passage gets (V = title + ngrams + pseudo_queries)."""
    ngrams: int
    ngram_length: int
    pseudo_queries: int = 0
    title: bool = True

    @property
    def count(self) -> int:
        return int(self.title) + self.ngrams + self.pseudo_queries


def best_ngrams(question: Sequence[int], body: Sequence[int], count: int, length: int) -> list[list[int]]:
    """Up to ``count`` non-overlapping spans of ``length`` tokens of ``body`` holding the most question tokens."""
    body = list(body)
    if not body or count <= 0:
        return []
    if len(body) <= length:
        return [body]
    asked = set(question)
    sums = np.concatenate([[0], np.cumsum([t in asked for t in body])])
    starts = np.arange(len(body) - length + 1)
    overlap = sums[starts + length] - sums[starts]
    chosen: list[int] = []
    for s in sorted(starts.tolist(), key=lambda s: (-overlap[s], s)):
        if all(abs(s - c) >= length for c in chosen):
            chosen.append(s)
            if len(chosen) == count:
                break
    return [body[s:s + length] for s in chosen]


def view_texts(spec: ViewSpec, passage: dict, pseudo_queries=()) -> tuple[str | None, str, list[str]]:
    """(title or None when blank, body, the first ``spec.pseudo_queries`` non-blank pseudo-queries): the texts
    to tokenise, as the n-gram index reads them."""
    title = passage.get("title") or ""
    queries = [q for q in (pseudo_queries or []) if isinstance(q, str) and q.strip()][:spec.pseudo_queries]
    return (title if spec.title and title.strip() else None), str(passage.get("text") or ""), queries


def passage_views(spec: ViewSpec, question: Sequence[int], title: Sequence[int] | None, body: Sequence[int],
                  queries: Sequence[Sequence[int]]) -> list[list[int] | None]:
    """The ``spec.count`` views of a passage (token ids, no EOS) for a question, None where a view is missing (no
    title, a short body, fewer pseudo-queries): the view mask's zeros."""
    views: list[list[int] | None] = [list(title) if title is not None else None] if spec.title else []
    ngrams = best_ngrams(question, body, spec.ngrams, spec.ngram_length)
    views += ngrams + [None] * (spec.ngrams - len(ngrams))
    views += [list(q) for q in queries] + [None] * (spec.pseudo_queries - len(queries))
    return views

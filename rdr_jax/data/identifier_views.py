"""MINDER's multi-view identifiers of a passage for training a generative retriever: its title, the body n-grams
that overlap the question most (as SEAL and MINDER choose training targets), and its pseudo-queries.

The n-grams are spans of ``length`` whitespace words of the passage text, scored by how many of their words
(lower-cased ``\\w+``) occur in the question; the best ``count`` spans that do not overlap one another are kept,
best first, ties going to the earlier span, so the choice is a pure function of (question, passage). A passage of
at most ``length`` words is one span."""

from __future__ import annotations

import dataclasses
import re

import numpy as np

_WORD = re.compile(r"\w+")


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


def best_ngrams(question: str, text: str, count: int, length: int) -> list[str]:
    """Up to ``count`` non-overlapping spans of ``length`` words of ``text`` with the most question words."""
    words = text.split()
    if not words or count <= 0:
        return []
    if len(words) <= length:
        return [" ".join(words)]
    asked = set(_WORD.findall(question.lower()))
    hits = np.array([bool(asked.intersection(_WORD.findall(w.lower()))) for w in words], np.int64)
    sums = np.concatenate([[0], np.cumsum(hits)])
    starts = np.arange(len(words) - length + 1)
    overlap = sums[starts + length] - sums[starts]
    chosen: list[int] = []
    for s in sorted(starts.tolist(), key=lambda s: (-overlap[s], s)):
        if all(abs(s - c) >= length for c in chosen):
            chosen.append(s)
            if len(chosen) == count:
                break
    return [" ".join(words[s:s + length]) for s in chosen]


def passage_views(spec: ViewSpec, question: str, passage: dict, pseudo_queries=()) -> list[str | None]:
    """The ``spec.count`` view strings of a passage for a question, None where a view is missing (no title,
    a short passage, fewer pseudo-queries): the view mask's zeros."""
    views: list[str | None] = []
    if spec.title:
        views.append(" ".join(str(passage.get("title") or "").split()) or None)
    ngrams = best_ngrams(question, str(passage.get("text") or ""), spec.ngrams, spec.ngram_length)
    views += ngrams + [None] * (spec.ngrams - len(ngrams))
    queries = [q for q in (pseudo_queries or []) if isinstance(q, str) and q.strip()][:spec.pseudo_queries]
    views += queries + [None] * (spec.pseudo_queries - len(queries))
    return views

"""Passages from generated n-grams (MINDER, SEAL): each n-gram weighted by how much likelier the model finds it
than the corpus does, a passage scored by the distinct, non-overlapping n-grams it contains; and
:class:`CorpusNgrams`, the corpus n-gram identifiers as the generative retriever uses them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from rdr_jax.decoding.substring_index import DeviceSubstringIndex, SubstringIndex
from rdr_jax.decoding.substring_parts import PartitionedSubstringIndex, load_substring_index
from rdr_jax.decoding.substring_union import DeviceSubstringUnion

NgramIndex = SubstringIndex | PartitionedSubstringIndex   # one index, or parts past 2**31 positions


def ngram_weight(log_prob: float, count: int, total: int) -> float:
    """SEAL's weight of a generated n-gram: ``max(0, log(P(n|q) (1 - P(n)) / (P(n) (1 - P(n|q)))))`` with the
    model's probability ``P(n|q)`` and the corpus frequency ``P(n) = count / total``: frequent n-grams count
    for little however likely."""
    p_q = min(math.exp(log_prob), 1.0 - 1e-7)
    p = min(max(count, 1) / total, 1.0 - 1e-7)
    return max(0.0, math.log(p_q * (1.0 - p)) - math.log(p * (1.0 - p_q)))


def score_passages(index: NgramIndex, ngrams: Sequence[Sequence[int]], log_probs: Sequence[float],
                   top_k: int | None = None, max_occurrences: int = 10_000) -> list[tuple[int, float]]:
    """SEAL's intersective scoring of one question: ``(passage row, score)``, best first. A passage's score is
    the sum of the weights (:func:`ngram_weight`) of the distinct generated n-grams it contains, taking n-grams
    from the heaviest down and skipping one whose every occurrence in the passage overlaps an occurrence of an
    n-gram already counted there (so "new york" does not also count "york"). N-grams occurring more than
    ``max_occurrences`` times are too common to name passages and are left out. Counts and positions are the
    whole corpus's whether ``index`` is one index or parts (summed over them)."""
    total = index.num_suffixes
    weighted = []
    for ngram, lp in zip(ngrams, log_probs):
        ngram = list(ngram)
        ngram = ngram[:ngram.index(index.eos_token_id)] if index.eos_token_id in ngram else ngram
        if not ngram or not np.isfinite(lp) or len(ngram) > index.max_ngram:
            continue
        count = index.count(ngram)
        if 0 < count <= max_occurrences:
            weighted.append((ngram_weight(float(lp), count, total), tuple(ngram)))
    weighted.sort(key=lambda w: -w[0])
    scores: dict[int, float] = {}
    covered: dict[int, list[tuple[int, int]]] = {}
    seen: set[tuple[int, ...]] = set()
    for weight, ngram in weighted:
        if ngram in seen or weight <= 0:
            continue
        seen.add(ngram)
        starts = index.occurrences(ngram)
        rows = index.passages_of_positions(starts)
        for row in np.unique(rows):
            spans = covered.setdefault(int(row), [])
            fresh = [(s, s + len(ngram)) for s in starts[rows == row]
                     if not any(s < e and c < s + len(ngram) for c, e in spans)]
            if fresh:
                spans.extend(fresh)
                scores[int(row)] = scores.get(int(row), 0.0) + weight
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    return ranked[:top_k] if top_k else ranked


class CorpusNgrams:
    """The passage identifiers of MINDER-style retrieval: every n-gram of every view, named by ``passage_ids``
    (row -> id), ranked per question by :func:`score_passages`. Plays the part of
    :class:`~rdr_jax.decoding.identifiers.PassageIdentifiers` for :class:`rdr_jax.retrieval.generative.
    GenerativeRetriever`."""

    PASSAGE_IDS = "passage_ids.json"

    def __init__(self, index: NgramIndex, passage_ids: Sequence[str], *, top_k: int = 100,
                 max_occurrences: int = 10_000):
        self.index, self.passage_ids = index, list(passage_ids)
        self.top_k, self.max_occurrences = top_k, max_occurrences
        rows = int(index.view_passage.max(initial=-1)) + 1
        if rows > len(self.passage_ids):
            raise ValueError(f"the n-gram index names {rows} passages but {len(self.passage_ids)} ids were given")

    @property
    def max_length(self) -> int:
        return self.index.max_ngram + 1

    def constraint(self, vocab_size: int) -> DeviceSubstringIndex | DeviceSubstringUnion:
        return self.index.to_device(vocab_size)

    def check_vocabulary(self, vocab_size: int) -> None:
        if self.index.vocab_size > vocab_size:
            raise ValueError(f"the n-gram index was built for {self.index.vocab_size} tokens, more than the model's "
                             f"{vocab_size}: another tokenizer")

    def rank_passages(self, sequences, scores) -> list[list[tuple[str, float]]]:
        """Ranked ``(passage_id, SEAL score)`` lists, one per row of beam-search output."""
        ranked = []
        for row_sequences, row_scores in zip(np.asarray(sequences), np.asarray(scores)):
            rows = score_passages(self.index, row_sequences.tolist(), row_scores.tolist(), self.top_k,
                                  self.max_occurrences)
            ranked.append([(self.passage_ids[r], s) for r, s in rows])
        return ranked

    def save(self, out_dir) -> Path:
        out = self.index.save(out_dir)
        self.save_passage_ids(out, self.passage_ids)
        return out

    @classmethod
    def save_passage_ids(cls, out_dir, passage_ids: Sequence[str]) -> None:
        """``passage_ids.json`` (row -> id), alone: a streamed build writes it before its parts."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{cls.PASSAGE_IDS}.tmp"
        tmp.write_text(json.dumps(list(passage_ids)))
        os.replace(tmp, out / cls.PASSAGE_IDS)

    @classmethod
    def load(cls, index_dir, **kwargs) -> "CorpusNgrams":
        index = load_substring_index(index_dir)
        ids_path = Path(index_dir) / cls.PASSAGE_IDS
        if not ids_path.is_file():
            raise FileNotFoundError(f"{index_dir}: no {cls.PASSAGE_IDS} (the passage ids of the index rows)")
        return cls(index, json.loads(ids_path.read_text()), **kwargs)

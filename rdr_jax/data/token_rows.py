"""Tokenised rows as the inference runner (rdr_jax.retrieval.runner) and the corpus store exchange them.

Unpadded: each row is its own token id sequence, so rows can be sorted by length and padded per batch.
The token ids are exactly those of :mod:`rdr_jax.data.tokenization` (DPR's layouts) before padding.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class TokenRows:
    """A chunk of tokenised rows: per-row token ids (lists or 1-D int arrays, e.g. views of a memory-mapped
    store), for models that read them per-row token types (None: all zero), and named per-row integers an
    output function reads beside the model (``extras``, e.g. the reader's passage start)."""
    input_ids: Sequence[Sequence[int]]
    token_type_ids: Sequence[Sequence[int]] | None = None
    extras: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), np.int64, len(self.input_ids))

    @staticmethod
    def concatenate(parts: Sequence["TokenRows"]) -> "TokenRows":
        ids = [x for p in parts for x in p.input_ids]
        types = None
        if any(p.token_type_ids is not None for p in parts):
            types = [t for p in parts for t in (p.token_type_ids if p.token_type_ids is not None
                                                 else [np.zeros(len(x), np.int32) for x in p.input_ids])]
        extras = None
        if parts and parts[0].extras:
            extras = {k: np.concatenate([np.asarray(p.extras[k]) for p in parts]) for k in parts[0].extras}
        return TokenRows(ids, types, extras)


def passage_rows(tokenizer, titles: Sequence[str] | None, texts: Sequence[str], max_length: int) -> TokenRows:
    """``[CLS] title [SEP] text [SEP]`` (``[CLS] text [SEP]`` without titles), truncated as
    :func:`rdr_jax.data.tokenization.encode_passages` does (the final [SEP] kept)."""
    texts = list(texts)
    if titles is None:
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    else:
        ids = tokenizer(list(titles), texts, truncation="only_second", max_length=max_length)["input_ids"]
    return TokenRows(ids)


def question_rows(tokenizer, questions: Sequence[str], max_length: int) -> TokenRows:
    """``[CLS] question [SEP]`` rows, as :func:`rdr_jax.data.tokenization.encode_questions`."""
    return TokenRows(tokenizer(list(questions), truncation=True, max_length=max_length)["input_ids"])


def reader_rows(tokenizer, questions: Sequence[str], titles: Sequence[str], texts: Sequence[str],
                max_length: int) -> TokenRows:
    """``[CLS] question [SEP] title [SEP] text`` rows as :func:`rdr_jax.data.tokenization.encode_reader_inputs`
    builds them (transformers' DPRReaderTokenizer), unpadded, with ``extras["passage_start"]``: the index of
    each row's first text token."""
    question_and_titles = tokenizer(list(questions), list(titles))["input_ids"]
    text_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    ids = [(qt + t)[:max_length] for qt, t in zip(question_and_titles, text_ids)]
    start = np.array([min(len(qt), max_length) for qt in question_and_titles], np.int32)
    return TokenRows(ids, extras={"passage_start": start})

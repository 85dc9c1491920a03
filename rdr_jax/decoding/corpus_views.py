"""A corpus's identifier views as token ids, for the n-gram index builds: MINDER's views of each passage
(title, body, pseudo-queries) tokenised in batches as a stream, and one view's ids in the narrowest array."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def token_ids(view) -> np.ndarray:
    """One view's token ids as a flat array: int32 when they fit (4 bytes a token while a build holds a part's
    views), else int64 (out-of-vocabulary ids that the build then names in its error)."""
    ids = view if isinstance(view, np.ndarray) and view.dtype == np.int32 else np.asarray(view, np.int64)
    if ids.dtype == np.int64 and (not ids.size or (ids.min() >= -2 ** 31 and ids.max() < 2 ** 31)):
        ids = ids.astype(np.int32)
    return ids.reshape(-1)


def passage_views(passages: Iterable[dict], tokenizer, *, views: Sequence[str] = ("title", "body"),
                  pseudo_queries: dict[str, list[str]] | None = None, batch_size: int = 10_000):
    """``(passage row, token ids)`` of MINDER's views of each passage, tokenised ``batch_size`` texts at a time
    (a stream: the 21M-passage build never holds every view's tokens as Python lists)."""
    texts, rows = [], []
    for row, p in enumerate(passages):
        for view in views:
            if view == "title" and (p.get("title") or "").strip():
                texts.append(p["title"]), rows.append(row)
            elif view == "body":
                texts.append(p["text"]), rows.append(row)
            elif view not in ("title", "body"):
                raise ValueError(f"unknown view {view!r}: title, body (and pseudo-queries as a mapping)")
        for q in (pseudo_queries or {}).get(str(p["id"]), ()):
            texts.append(q), rows.append(row)
        if len(texts) >= batch_size:
            yield from zip(rows, tokenizer(texts, add_special_tokens=False)["input_ids"])
            texts, rows = [], []
    if texts:
        yield from zip(rows, tokenizer(texts, add_special_tokens=False)["input_ids"])

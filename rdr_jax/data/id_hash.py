"""64-bit hashes of passage ids, computed a column at a time over a whole array of ids (no Python loop per id).

RDR's teacher data names passages by id while the encoding is addressed by row. Mapping ids to rows through a
dict of every corpus id would hold 21M Python strings per process; instead the ids the data needs are hashed
once into a sorted ``uint64`` array and the encoding's id files are streamed past it (see
``retrieval.passage_embeddings``), so memory follows the data, not the corpus.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def id_hashes(ids: Sequence[str]) -> np.ndarray:
    """FNV-1a over the ids' code points, then their length: ``uint64 [len(ids)]``, the same for an id wherever
    it appears (the width numpy pads a batch of ids to does not enter the hash; numpy drops trailing NULs,
    which no passage id has)."""
    if len(ids) == 0:
        return np.zeros(0, np.uint64)
    text = np.asarray([str(i) for i in ids], dtype=str)
    codes = text.view(np.uint32).reshape(len(text), -1)
    lengths = np.char.str_len(text)
    h = np.full(len(text), _FNV_OFFSET, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(codes.shape[1]):
            h = np.where(j < lengths, (h ^ codes[:, j].astype(np.uint64)) * _FNV_PRIME, h)
        h = (h ^ lengths.astype(np.uint64)) * _FNV_PRIME
    return h

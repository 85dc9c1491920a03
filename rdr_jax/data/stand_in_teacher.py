"""A deterministic stand-in for a teacher's scores, for data that has none (the embedded data): the share of the
query's distinct words (lower-cased ``\\w+``) found in the passage. It lets the cross-encoder and DGR
distillation pipelines run end to end; it is not a teacher worth distilling."""

from __future__ import annotations

import re

STAND_IN_TEACHERS = ("lexical_overlap",)

_WORD = re.compile(r"\w+")


def lexical_overlap(query: str, passage: str) -> float:
    """Share of the query's distinct words (lower-cased ``\\w+``) that occur in the passage."""
    q = set(_WORD.findall(query.lower()))
    return len(q & set(_WORD.findall(passage.lower()))) / max(len(q), 1)

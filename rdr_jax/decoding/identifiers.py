"""Passage identifiers for generative retrieval, their token ids, trie, and the way back to passages.

Kinds of identifier (each a function ``-> {passage_id: identifier string}``):

- :func:`atomic_identifiers`: the passage id itself ("12345"), tokenised;
- :func:`semantic_identifiers`: hierarchical k-means codes of passage embeddings (DSI / NCI): ``k`` clusters per
  level, recursively until a cluster holds at most ``c`` passages, then the passage's position in that leaf;
  the codes joined as "3-7-12" (deterministic: numpy k-means with a fixed seed);
- :func:`title_identifiers`: passage titles, with " (2)", " (3)", ... appended to repeats unless
  ``unique=False`` (then one title names every passage that has it);
- :func:`read_identifier_tsv`: user-supplied ``passage_id<TAB>identifier`` lines.

:meth:`PassageIdentifiers.build` tokenises the identifier strings with a transformers tokenizer (T5, BART; its
special tokens included, EOS appended if the tokenizer does not add it), builds the :class:`PrefixTrie`, and
keeps identifier -> passage ids, so beam-search outputs map back to a ranked passage list
(:meth:`PassageIdentifiers.rank_passages`).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from rdr_jax.decoding.trie import PrefixTrie

log = logging.getLogger(__name__)


# ---- identifier kinds -----------------------------------------------------------------------------------------
def atomic_identifiers(passage_ids: Iterable[str]) -> dict[str, str]:
    """Each passage named by its own id string."""
    return {str(pid): str(pid) for pid in passage_ids}


def title_identifiers(passage_ids: Sequence[str], titles: Sequence[str], *, unique: bool = True) -> dict[str, str]:
    """Titles as identifiers. ``unique``: the n-th passage (in input order) with an already used title gets
    "title (n)" (skipping suffixes that are themselves titles), so each identifier names one passage."""
    if len(passage_ids) != len(titles):
        raise ValueError(f"title_identifiers: {len(passage_ids)} passage ids but {len(titles)} titles")
    out: dict[str, str] = {}
    used = set(titles) if unique else set()
    seen: dict[str, int] = defaultdict(int)
    for pid, title in zip(passage_ids, titles):
        title = " ".join(str(title).split())
        if not title:
            raise ValueError(f"title_identifiers: passage {pid!r} has an empty title")
        seen[title] += 1
        name = title
        if unique and seen[title] > 1:
            n = seen[title]
            while f"{title} ({n})" in used:
                n += 1
            name = f"{title} ({n})"
            seen[title] = n
            used.add(name)
        out[str(pid)] = name
    return out


def read_identifier_tsv(path: str | os.PathLike) -> dict[str, str]:
    """``passage_id<TAB>identifier`` per line (a first line ``id<TAB>identifier`` is taken as a header)."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise ValueError(f"{path}:{number}: expected 'passage_id<TAB>identifier', got {line[:80]!r}")
            pid, identifier = parts[0].strip(), parts[1].strip()
            if number == 1 and pid.lower() in ("id", "passage_id", "pid") and identifier.lower() == "identifier":
                continue
            if pid in out:
                raise ValueError(f"{path}:{number}: passage {pid!r} given a second identifier")
            out[pid] = identifier
    if not out:
        raise ValueError(f"{path}: no identifiers")
    return out


def kmeans(points: np.ndarray, k: int, *, seed: int = 0, iterations: int = 20) -> np.ndarray:
    """Cluster labels ``[n]`` by Lloyd's k-means with k-means++ seeding (numpy, deterministic for a seed)."""
    points = np.asarray(points, np.float64)
    n = len(points)
    rng = np.random.default_rng(seed)
    centers = [points[rng.integers(n)]]
    distance = np.sum((points - centers[0]) ** 2, axis=1)
    for _ in range(1, k):
        total = distance.sum()
        choice = rng.choice(n, p=distance / total) if total > 0 else rng.integers(n)
        centers.append(points[choice])
        distance = np.minimum(distance, np.sum((points - centers[-1]) ** 2, axis=1))
    centers = np.stack(centers)
    squared_norms = np.sum(points ** 2, axis=1, keepdims=True)
    labels = np.zeros(n, np.int64)
    for step in range(iterations):
        distances = squared_norms - 2 * points @ centers.T + np.sum(centers ** 2, axis=1)[None, :]
        new_labels = np.argmin(distances, axis=1)
        if step and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        for j in range(k):
            members = labels == j
            if members.any():
                centers[j] = points[members].mean(axis=0)
    return labels


def semantic_codes(embeddings: np.ndarray, *, k: int = 10, c: int = 100, seed: int = 0,
                   progress: bool = False) -> list[tuple[int, ...]]:
    """Hierarchical k-means code of every row of ``embeddings`` (DSI's semantic docids).

    A cluster of more than ``c`` passages is split into ``k`` clusters (k-means, fixed seed) and each part coded
    recursively; a cluster of at most ``c`` passages appends each passage's position in it. When k-means cannot
    split a cluster (identical embeddings), it is cut into ``k`` consecutive chunks instead, so codes stay unique.
    """
    embeddings = np.asarray(embeddings, np.float32)
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(f"semantic_codes: expected a non-empty [passages, dim] array, got shape {embeddings.shape}")
    if k < 2 or c < 1:
        raise ValueError(f"semantic_codes: need k >= 2 and c >= 1 (got k={k}, c={c})")
    codes: list[tuple[int, ...] | None] = [None] * len(embeddings)
    stack = [(np.arange(len(embeddings)), ())]
    bar = tqdm(total=len(embeddings), desc="semantic ids", unit="passage", disable=not progress)
    while stack:
        members, prefix = stack.pop()
        if len(members) <= c:
            for position, row in enumerate(members):
                codes[row] = prefix + (position,)
            bar.update(len(members))
            continue
        labels = kmeans(embeddings[members], k, seed=seed)
        if len(np.unique(labels)) < 2:
            labels = np.arange(len(members)) * k // len(members)
        for cluster in range(k - 1, -1, -1):  # popped in increasing cluster order
            part = members[labels == cluster]
            if len(part):
                stack.append((part, prefix + (cluster,)))
    bar.close()
    return codes


def semantic_identifiers(passage_ids: Sequence[str], embeddings: np.ndarray, *, k: int = 10, c: int = 100,
                         seed: int = 0, separator: str = "-", progress: bool = False) -> dict[str, str]:
    """Semantic docids as strings, e.g. "3-7-12" (see :func:`semantic_codes`)."""
    if len(passage_ids) != len(embeddings):
        raise ValueError(f"semantic_identifiers: {len(passage_ids)} passage ids but {len(embeddings)} embeddings")
    codes = semantic_codes(embeddings, k=k, c=c, seed=seed, progress=progress)
    return {str(pid): separator.join(map(str, code)) for pid, code in zip(passage_ids, codes)}


# ---- tokenised identifiers, trie, and the way back -------------------------------------------------------------
@dataclass
class PassageIdentifiers:
    """Unique identifiers (by token sequence), the passages each one names, and the trie over them.

    ``identifiers[i]`` (a string), ``token_ids[i]`` (ending with EOS) and ``passages[i]`` (passage ids, in input
    order) describe identifier ``i``; the trie's identifier index is ``i``.
    """
    identifiers: list[str]
    token_ids: list[list[int]]
    passages: list[list[str]]
    trie: PrefixTrie

    @classmethod
    def build(cls, passage_identifiers: Mapping[str, str], tokenizer, *, batch_size: int = 10_000,
              progress: bool = False) -> "PassageIdentifiers":
        """Tokenise ``{passage_id: identifier}`` and build the trie. Identifier strings that tokenise alike
        (e.g. differing only in whitespace the tokenizer drops) become one identifier naming all their passages."""
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"{type(tokenizer).__name__} has no EOS token; generative identifiers need one")
        if not passage_identifiers:
            raise ValueError("PassageIdentifiers.build: no passages given")
        strings = list(dict.fromkeys(passage_identifiers.values()))  # unique, in first-seen order
        token_ids: list[list[int]] = []
        for start in tqdm(range(0, len(strings), batch_size), desc="tokenising identifiers", unit="batch",
                          disable=not progress):
            for ids in tokenizer(strings[start:start + batch_size])["input_ids"]:
                ids = list(ids)
                if not ids or ids[-1] != eos:
                    ids.append(eos)
                token_ids.append(ids)
        by_tokens: dict[tuple[int, ...], int] = {}
        identifiers, unique_ids, passages = [], [], []
        index_of_string: dict[str, int] = {}
        for string, ids in zip(strings, token_ids):
            key = tuple(ids)
            if key not in by_tokens:
                by_tokens[key] = len(identifiers)
                identifiers.append(string)
                unique_ids.append(ids)
                passages.append([])
            else:
                log.warning("identifiers %r and %r tokenise the same; they are merged", identifiers[by_tokens[key]],
                            string)
            index_of_string[string] = by_tokens[key]
        for pid, string in passage_identifiers.items():
            passages[index_of_string[string]].append(str(pid))
        return cls(identifiers, unique_ids, passages, PrefixTrie(unique_ids, eos_token_id=eos))

    def identifier_of(self) -> dict[str, int]:
        """passage id -> index of its identifier (training targets are ``token_ids[index]``)."""
        return {pid: i for i, pids in enumerate(self.passages) for pid in pids}

    @property
    def max_length(self) -> int:
        return self.trie.max_length

    def constraint(self, vocab_size: int):
        return self.trie.to_device()

    def check_vocabulary(self, vocab_size: int) -> None:
        if self.trie.max_token >= vocab_size:
            raise ValueError(f"identifier token id {self.trie.max_token} is outside the model's vocabulary of "
                             f"{vocab_size}: the identifiers were tokenised with another tokenizer")

    def rank_passages(self, sequences, scores) -> list[list[tuple[str, float]]]:
        """Ranked ``(passage_id, score)`` lists, one per row of beam-search output ``sequences [B, K, L]`` /
        ``scores [B, K]`` (best first): each beam's identifier contributes its passages with the beam's score;
        beams with -inf score or no identifier are skipped, repeated passages keep their first (best) place."""
        sequences, scores = np.asarray(sequences), np.asarray(scores)
        found = self.trie.lookup(sequences)  # [B, K]
        ranked = []
        for row_ids, row_scores in zip(found, scores):
            seen, row = set(), []
            for identifier, score in zip(row_ids, row_scores):
                if identifier < 0 or not np.isfinite(score):
                    continue
                for pid in self.passages[identifier]:
                    if pid not in seen:
                        seen.add(pid)
                        row.append((pid, float(score)))
            ranked.append(row)
        return ranked

    def save_tsv(self, path: str | os.PathLike):
        """``passage_id<TAB>identifier`` lines, readable back with :func:`read_identifier_tsv`."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for identifier, pids in zip(self.identifiers, self.passages):
                for pid in pids:
                    f.write(f"{pid}\t{identifier}\n")
        os.replace(tmp, path)  # atomic: a half-written file never replaces a good one

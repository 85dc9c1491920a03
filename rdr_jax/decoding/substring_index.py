"""Corpus n-gram identifiers (MINDER, SEAL): any substring of any view of any passage is a valid output.

MINDER's identifiers are a passage's title, n-grams of its body and pseudo-queries written for it; decoding may
emit any substring of any of these views, constrained by an FM-index (SEAL's C++ one). Here the index is a
**suffix array over token ids, depth-limited to ``max_ngram`` tokens**, kept on the device as two int32 arrays,
so the constraint runs inside the jit-compiled beam search with no host callback:

- ``tokens [T]``: every view of every passage, tokenised, each view followed by ``SEPARATOR`` (-1);
- ``suffixes [S]``: the start of every token position, sorted by its first ``max_ngram`` tokens (a view's end
  sorts first). All occurrences of a prefix ``w`` (``|w| <= max_ngram``) are then one range ``[lo, hi)`` of
  ``suffixes``, and inside that range the token at depth ``|w|`` is sorted.

Why a suffix array and not an FM-index: both answer "which tokens follow the occurrences of ``w``" with a range
per prefix, but the FM-index's backward search extends a pattern to the left while decoding extends it to the
right, so SEAL keeps the index of the reversed corpus and a wavelet tree for the distinct-token query, pointer
chasing that does not vectorise. The suffix array's forward step is a binary search over a sorted slice, which
does: one step of the beam search finds, for every beam and every vocabulary token ``v`` at once, the lower
bound of ``v`` in the beam's range (``log2 S`` gathers each), and token ``v`` is allowed exactly when the bounds
of ``v`` and ``v + 1`` differ; those two bounds are also the child range. That is exact (every substring of
length ``<= max_ngram`` is reachable, nothing else is), costs ``beams x vocab x log2 S`` gathers per step, which
an accelerator does in well under a millisecond, and stores 4 bytes per token for ``suffixes`` plus 4 for the
tokens. Offsets are int32, so one index holds < 2**31 positions; 21M passages (~2.35B positions) are split into
such indexes by passage range, searched as their union (:mod:`rdr_jax.decoding.substring_parts`): ~19 GB.

A beam state is its range ``(lo, hi)``; the generated n-gram may end (EOS) after ``min_ngram`` tokens, and must
after ``max_ngram``. Passages are scored from the generated n-grams as SEAL does
(:mod:`rdr_jax.decoding.ngram_passages`).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rdr_jax.decoding.corpus_views import passage_views, token_ids
from rdr_jax.decoding.trie import top_k_padded

SEPARATOR = -1
# Positions (plus the n-gram depth and a short range) a device index addresses with int32; larger corpora are
# split into parts of fewer positions (rdr_jax.decoding.substring_parts).
DEVICE_POSITION_LIMIT = 2 ** 31 - 1
# Ranges of at most this many suffixes are read directly instead of searched per vocabulary token.
DEFAULT_SHORT_RANGE = 256


def _sort_keys(tokens: np.ndarray, starts: np.ndarray, depth: int, vocab_size: int) -> list[np.ndarray]:
    """Lexicographic sort keys of the suffixes at ``starts``, first ``depth`` tokens, several tokens packed per
    int64 key (token ``t`` -> ``t + 1``, a view's end and everything after it -> 0, so a shorter n-gram sorts
    first). Built one depth at a time: memory is a few ``[S]`` arrays, never ``[S, depth]``."""
    bits = int(vocab_size + 1).bit_length()
    per_key = max(1, 63 // bits)
    keys, open_ = [], np.ones(len(starts), bool)
    padded = np.concatenate([tokens, np.full(depth, SEPARATOR, tokens.dtype)])
    for first in range(0, depth, per_key):
        key = np.zeros(len(starts), np.int64)
        for d in range(first, first + per_key):
            key <<= bits
            if d < depth:
                column = padded[starts + d].astype(np.int64)
                open_ &= column != SEPARATOR
                key |= np.where(open_, column + 1, 0)
        keys.append(key)
    return keys


def _sorted_suffixes(tokens: np.ndarray, starts: np.ndarray, depth: int, vocab_size: int,
                     group_size: int = 1 << 24) -> np.ndarray:
    """``starts`` sorted by their first ``depth`` tokens, a group of first tokens at a time: the first tokens'
    counts split the vocabulary into ranges of about ``group_size`` suffixes, each range is sorted on its own
    (its keys only) and the ranges are concatenated in token order. Peak memory is the output plus one range's
    keys, not keys for the whole corpus."""
    first = tokens[starts]
    counts = np.bincount(first, minlength=vocab_size)
    cuts = np.searchsorted(np.cumsum(counts), np.arange(group_size, len(starts), group_size), "left")
    bounds = np.unique(np.concatenate([[0], cuts + 1, [vocab_size]]).clip(0, vocab_size))
    out = np.empty_like(starts)
    at = 0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        group = starts[(first >= lo) & (first < hi)]
        if len(group):
            out[at:at + len(group)] = group[np.lexsort(_sort_keys(tokens, group, depth, vocab_size)[::-1])]
            at += len(group)
    return out


@dataclasses.dataclass
class SubstringIndex:
    """The host side: built from token-id views, answers host queries, and moves to the device.

    Build with :meth:`build` (views as token lists) or :meth:`from_passages` (text, a tokenizer and the views
    MINDER uses). ``view_passage[v]`` is the passage (row) of view ``v``; ``view_starts`` its token offset."""
    tokens: np.ndarray         # int32 [T], SEPARATOR after each view
    suffixes: np.ndarray       # int32 (int64 past 2**31 tokens) [S], sorted by their first max_ngram tokens
    view_starts: np.ndarray    # int64 [views + 1]
    view_passage: np.ndarray   # int32 [views]
    vocab_size: int
    eos_token_id: int
    max_ngram: int
    min_ngram: int = 1
    build_seconds: float = 0.0

    @classmethod
    def build(cls, views: Iterable[Sequence[int]], view_passage: Sequence[int], *, vocab_size: int,
              eos_token_id: int, max_ngram: int = 10, min_ngram: int = 1) -> "SubstringIndex":
        """``views``: token-id lists (special tokens stripped), ``view_passage[v]``: the passage of view ``v``."""
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram ({min_ngram}) <= max_ngram ({max_ngram})")
        t0 = time.perf_counter()
        views = [token_ids(v) for v in views]
        view_passage = np.asarray(view_passage, np.int32)
        if len(views) != len(view_passage):
            raise ValueError(f"{len(views)} views but {len(view_passage)} passage rows")
        if not views:
            raise ValueError("SubstringIndex: no views to index")
        lengths = np.array([len(v) for v in views], np.int64)
        flat = np.concatenate(views) if lengths.sum() else np.zeros(0, np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
            bad = int(flat.min() if flat.min() < 0 else flat.max())
            raise ValueError(f"SubstringIndex: token id {bad} is outside the vocabulary of {vocab_size}")
        if (flat == eos_token_id).any():
            raise ValueError(f"SubstringIndex: the views contain the EOS token {eos_token_id}; strip special tokens")
        view_starts = np.concatenate([[0], np.cumsum(lengths + 1)])
        tokens = np.full(int(view_starts[-1]), SEPARATOR, np.int32)
        body = np.ones(len(tokens), bool)
        body[view_starts[1:] - 1] = False
        tokens[body] = flat
        index_dtype = np.int32 if len(tokens) < 2 ** 31 else np.int64
        starts = np.flatnonzero(body).astype(index_dtype)
        suffixes = _sorted_suffixes(tokens, starts, max_ngram, vocab_size)
        return cls(tokens, suffixes, view_starts, view_passage, vocab_size, eos_token_id, max_ngram, min_ngram,
                   time.perf_counter() - t0)

    @classmethod
    def from_passages(cls, passages: Sequence[dict], tokenizer, *, eos_token_id: int | None = None,
                      views: Sequence[str] = ("title", "body"), pseudo_queries: dict[str, list[str]] | None = None,
                      max_ngram: int = 10, min_ngram: int = 1, batch_size: int = 10_000) -> "SubstringIndex":
        """MINDER's views of each passage (``{id, title, text}``): ``title``, ``body`` (the text) and, with
        ``pseudo_queries`` (passage id -> queries), ``query`` views, tokenised without special tokens."""
        rows, ids = [], []
        for row, view in passage_views(passages, tokenizer, views=views, pseudo_queries=pseudo_queries,
                                       batch_size=batch_size):
            rows.append(row), ids.append(view)
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        return cls.build(ids, rows, vocab_size=len(tokenizer), eos_token_id=eos, max_ngram=max_ngram,
                         min_ngram=min_ngram)

    # ---- host-side queries ---------------------------------------------------------------------------------
    def _column(self, depth: int, lo: int, hi: int) -> np.ndarray:
        positions = self.suffixes[lo:hi].astype(np.int64) + depth
        return np.where(positions < len(self.tokens), self.tokens[np.minimum(positions, len(self.tokens) - 1)],
                        SEPARATOR)

    def _token_at(self, depth: int):
        """Suffix ``i`` -> its token at ``depth`` (SEPARATOR past the end): a key for :func:`bisect.bisect_left`."""
        def at(i: int) -> int:
            position = int(self.suffixes[i]) + depth
            return int(self.tokens[position]) if position < len(self.tokens) else SEPARATOR
        return at

    def range_of(self, ngram: Sequence[int]) -> tuple[int, int]:
        """``[lo, hi)`` of the suffixes starting with ``ngram`` (empty when it occurs nowhere). Scalar binary
        searches (``log2 S`` reads per token) rather than a gathered column: at depth 0 the column would be the
        whole corpus (gigabytes per query at 21M passages)."""
        if len(ngram) > self.max_ngram:
            raise ValueError(f"n-gram of {len(ngram)} tokens is longer than the index's max_ngram {self.max_ngram}")
        lo, hi = 0, len(self.suffixes)
        for depth, token in enumerate(ngram):
            key, suffixes = self._token_at(depth), range(lo, hi)
            lo, hi = (lo + bisect.bisect_left(suffixes, int(token), key=key),
                      lo + bisect.bisect_right(suffixes, int(token), key=key))
            if lo >= hi:
                return lo, lo
        return lo, hi

    def count(self, ngram: Sequence[int]) -> int:
        lo, hi = self.range_of(ngram)
        return hi - lo

    def allowed_tokens(self, prefix: Sequence[int]) -> np.ndarray:
        """The tokens that may follow ``prefix``: the distinct tokens after its occurrences, and EOS once it has
        ``min_ngram`` tokens (only EOS at ``max_ngram``); what a ``prefix_allowed_tokens_fn`` returns."""
        prefix = list(prefix)
        if prefix and prefix[-1] == self.eos_token_id:
            return np.zeros(0, np.int64)
        lo, hi = self.range_of(prefix)
        allowed = []
        if len(prefix) < self.max_ngram and hi > lo:
            column = self._column(len(prefix), lo, hi)
            allowed = np.unique(column[column != SEPARATOR]).tolist()
        if len(prefix) >= self.min_ngram and hi > lo:
            allowed.append(self.eos_token_id)
        return np.asarray(sorted(set(allowed)), np.int64)

    def occurrences(self, ngram: Sequence[int]) -> np.ndarray:
        """Token positions where ``ngram`` starts."""
        lo, hi = self.range_of(ngram)
        return np.sort(self.suffixes[lo:hi].astype(np.int64))

    def passages_of_positions(self, positions: np.ndarray) -> np.ndarray:
        view = np.searchsorted(self.view_starts, positions, "right") - 1
        return self.view_passage[view]

    # ---- on disk: built once (21M passages), memory-mapped when loaded -----------------------------------
    ARRAYS = ("tokens", "suffixes", "view_starts", "view_passage")

    def save(self, out_dir, extra_meta: dict | None = None) -> Path:
        """``out_dir/{tokens,suffixes,view_starts,view_passage}.npy`` + ``meta.json`` (plus ``extra_meta``),
        written to temporary names and renamed, meta last (a directory with ``meta.json`` is complete)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in self.ARRAYS:
            tmp = out / f".{name}.tmp.npy"
            np.save(tmp, getattr(self, name))
            os.replace(tmp, out / f"{name}.npy")
        meta = {"kind": "substring_index", "vocab_size": self.vocab_size, "eos_token_id": self.eos_token_id,
                "max_ngram": self.max_ngram, "min_ngram": self.min_ngram, "num_tokens": int(len(self.tokens)),
                "num_suffixes": int(len(self.suffixes)), "num_views": int(len(self.view_passage)),
                "num_passages": int(self.view_passage.max(initial=-1)) + 1, "build_seconds": self.build_seconds,
                **(extra_meta or {})}
        tmp = out / ".meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out / "meta.json")
        return out

    @classmethod
    def load(cls, index_dir) -> "SubstringIndex":
        index_dir = Path(index_dir)
        meta_path = index_dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{index_dir}: no meta.json (not an n-gram index, or its build did not finish)")
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") != "substring_index":
            raise ValueError(f"{meta_path}: not an n-gram index (kind {meta.get('kind')!r})")
        arrays = {name: np.load(index_dir / f"{name}.npy", mmap_mode="r") for name in cls.ARRAYS}
        return cls(**arrays, vocab_size=meta["vocab_size"], eos_token_id=meta["eos_token_id"],
                   max_ngram=meta["max_ngram"], min_ngram=meta["min_ngram"], build_seconds=meta["build_seconds"])

    @property
    def num_suffixes(self) -> int:
        """Indexed positions: the corpus size SEAL's n-gram frequencies divide by."""
        return int(len(self.suffixes))

    @property
    def nbytes(self) -> int:
        return int(self.tokens.nbytes + self.suffixes.nbytes + self.view_starts.nbytes + self.view_passage.nbytes)

    def to_device(self, vocab_size: int | None = None, short_range: int = DEFAULT_SHORT_RANGE
                  ) -> "DeviceSubstringIndex":
        """The device arrays; ``vocab_size``: the model's (its logits' width), at least the index's;
        ``short_range``: see :meth:`DeviceSubstringIndex.next_candidates`."""
        vocab_size = self.vocab_size if vocab_size is None else vocab_size
        if vocab_size < self.vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the index's {self.vocab_size}")
        if len(self.tokens) + self.max_ngram + short_range + 2 > DEVICE_POSITION_LIMIT:
            raise ValueError(f"SubstringIndex of {len(self.tokens):,} tokens: past the int32 positions of the device "
                             f"index; build it in parts (substring_parts.PartitionedSubstringIndex)")
        # the first column's lower bounds are the first tokens' cumulative counts (no [S] column gathered)
        counts = np.bincount(self.tokens[self.tokens >= 0], minlength=vocab_size + 1)[:vocab_size + 1]
        root = np.concatenate([[0], np.cumsum(counts)[:vocab_size]]).astype(np.int32)
        padded = np.concatenate([self.tokens, np.full(self.max_ngram + 1, SEPARATOR, np.int32)])
        return DeviceSubstringIndex(
            tokens=jnp.asarray(padded), suffixes=jnp.asarray(self.suffixes), root_bounds=jnp.asarray(root),
            eos_token_id=int(self.eos_token_id), vocab_size=int(vocab_size), max_ngram=int(self.max_ngram),
            min_ngram=int(self.min_ngram), short_range=int(short_range),
            search_iterations=max(1, math.ceil(math.log2(len(self.suffixes) + 1))))


@struct.dataclass
class DeviceSubstringIndex:
    """The index on the device, a jit argument; a beam's state is its suffix range ``(lo, hi)``."""
    tokens: jax.Array        # int32 [T + max_ngram + 1], SEPARATOR-padded
    suffixes: jax.Array      # int32 [S]
    root_bounds: jax.Array   # int32 [vocab + 1]: lower bound of each token in the first column
    eos_token_id: int = struct.field(pytree_node=False)
    vocab_size: int = struct.field(pytree_node=False)
    max_ngram: int = struct.field(pytree_node=False)
    min_ngram: int = struct.field(pytree_node=False)
    short_range: int = struct.field(pytree_node=False)
    search_iterations: int = struct.field(pytree_node=False)

    @property
    def max_length(self) -> int:
        """Most tokens a search generates: the longest n-gram and its EOS."""
        return self.max_ngram + 1

    def initial_state(self, shape: tuple[int, ...]):
        return (jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.int32))

    def _bounds(self, lo, hi, depth):
        """``[..., vocab + 1]``: for every token ``v``, the first suffix of ``[lo, hi)`` whose token at ``depth``
        is ``>= v`` (a fixed number of halvings: the same code for every beam)."""
        targets = jnp.arange(self.vocab_size + 1, dtype=jnp.int32)
        low = jnp.broadcast_to(lo[..., None], lo.shape + targets.shape)
        high = jnp.broadcast_to(hi[..., None], hi.shape + targets.shape)
        last = self.suffixes.shape[0] - 1
        for _ in range(self.search_iterations):
            mid = low + (high - low) // 2   # not (low + high) // 2: that overflows int32 past 2**30
            token = self.tokens[self.suffixes[jnp.minimum(mid, last)] + depth]
            smaller = (mid < high) & (token < targets)
            low = jnp.where(smaller, mid + 1, low)
            high = jnp.where(smaller | (mid >= high), high, mid)
        return low

    def _candidates(self, scores, bounds, occurs, count: int, depth):
        """Top ``count`` of ``scores [B, K, V]`` where allowed, with each choice's parent beam, token and range.
        ``occurs [B, K]``: the beam's n-gram occurs (its range is not empty; it may end at a view's end, where
        nothing follows but EOS is allowed)."""
        B, K, V = scores.shape
        allowed = (bounds[..., 1:] > bounds[..., :-1]) & (depth < self.max_ngram)
        eos = (jnp.arange(V) == self.eos_token_id) & (depth >= self.min_ngram) & occurs[..., None]
        scores = jnp.where(allowed | eos, scores, -jnp.inf)
        top_scores, index = top_k_padded(scores.reshape(B, K * V), count)
        index = jnp.minimum(index, K * V - 1)   # padding columns (-inf) read any real slot
        parent, token = index // V, index % V
        pick = lambda a: jnp.take_along_axis(a.reshape(B, K * (V + 1)), parent * (V + 1) + token, axis=1)
        return top_scores, parent, token, (pick(bounds), pick(jnp.roll(bounds, -1, axis=-1)))

    def first_candidates(self, log_probs, count: int, vocab_size: int):
        """Step 0, one row per question over the whole index (bounds precomputed on the host)."""
        scores = log_probs(None)[:, None, :]          # [B, 1, V]
        bounds = jnp.broadcast_to(self.root_bounds, scores.shape[:2] + self.root_bounds.shape)
        return self._candidates(scores, bounds, jnp.ones(scores.shape[:2], bool), count, 0)

    def next_candidates(self, log_probs, alive_scores, state, count: int, step):
        """Later steps. Beams whose ranges are all short (``<= short_range`` occurrences, most beams after two or
        three tokens) read their ranges directly: the sorted column's runs are the allowed tokens, ``K x
        short_range`` candidates. Otherwise every vocabulary token's bounds are searched (``K x vocab``). Both
        are exact; ``lax.cond`` runs one of them per step."""
        lo, hi = state
        short = jnp.all((hi - lo <= self.short_range) | ~jnp.isfinite(alive_scores))

        def by_vocabulary(_):
            bounds = self._bounds(lo, hi, step)
            return self._candidates(log_probs(None) + alive_scores[..., None], bounds, hi > lo, count, step)

        return jax.lax.cond(short, lambda _: self._run_candidates(log_probs, alive_scores, lo, hi, count, step),
                            by_vocabulary, None)

    def _run_candidates(self, log_probs, alive_scores, lo, hi, count: int, depth):
        """Candidates of ranges of at most ``short_range`` suffixes: each run of equal tokens in the range's
        (sorted) column is one allowed token, its child range the run; plus EOS."""
        B, K = lo.shape
        j = jnp.arange(self.short_range)
        index = lo[..., None] + j                                        # [B, K, R]
        valid = index < hi[..., None]
        last = self.suffixes.shape[0] - 1
        column = jnp.where(valid, self.tokens[self.suffixes[jnp.clip(index, 0, last)] + depth], SEPARATOR)
        previous = jnp.concatenate([jnp.full((B, K, 1), -2, column.dtype), column[..., :-1]], axis=-1)
        following = jnp.concatenate([column[..., 1:], jnp.full((B, K, 1), -2, column.dtype)], axis=-1)
        following = jnp.where(jnp.concatenate([valid[..., 1:], jnp.zeros((B, K, 1), bool)], axis=-1), following, -2)
        starts = valid & (column != previous)
        ends = valid & (column != following)
        # the end of the run starting at j: the first run end at or after j
        end_at = jax.lax.cummin(jnp.where(ends, j, self.short_range), axis=2, reverse=True)
        allowed = starts & (column >= 0) & (depth < self.max_ngram)
        scores = jnp.where(allowed, log_probs(jnp.maximum(column, 0)) + alive_scores[..., None], -jnp.inf)
        eos = jnp.full((B, K, 1), self.eos_token_id, jnp.int32)
        eos_ok = (hi > lo)[..., None] & (depth >= self.min_ngram)
        eos_scores = jnp.where(eos_ok, log_probs(eos) + alive_scores[..., None], -jnp.inf)
        scores = jnp.concatenate([scores, eos_scores], axis=-1)           # [B, K, R + 1]
        tokens = jnp.concatenate([jnp.maximum(column, 0), eos], axis=-1)
        child_lo = jnp.concatenate([index, lo[..., None]], axis=-1)
        child_hi = jnp.concatenate([lo[..., None] + end_at + 1, hi[..., None]], axis=-1)
        width = self.short_range + 1
        top_scores, flat = top_k_padded(scores.reshape(B, K * width), count)
        flat = jnp.minimum(flat, K * width - 1)
        pick = lambda a: jnp.take_along_axis(a.reshape(B, K * width), flat, axis=1)
        return top_scores, flat // width, pick(tokens), (pick(child_lo), pick(child_hi))


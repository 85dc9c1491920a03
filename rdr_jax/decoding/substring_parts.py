"""A corpus n-gram index past 2**31 positions: sub-indexes over passage ranges, searched as their union.

At 21M passages x ~110 tokens of views the corpus has ~2.35B token positions, more than the int32 offsets of
:class:`~rdr_jax.decoding.substring_index.SubstringIndex` address. Two answers were weighed:

- **int64 suffixes** over one index: 12 bytes per position on the device (8 for the suffix, 4 for the token)
  instead of 8 (~28 GB instead of ~19 GB at 21M), every binary-search gather twice as wide, and one sort over
  all 2.35B positions (host memory ~ the whole corpus's keys and suffixes at once: far past the 4.7 GB the
  1M-passage build peaked at);
- **sub-indexes by passage range** (this module): each part is an ordinary ``SubstringIndex`` of fewer than
  ``max_part_positions`` (< 2**31) positions, so int32 everywhere (8 bytes per position), the build streams
  part by part (host memory bounded by one part, each part saved atomically, and a restarted build skips the
  parts already on disk), and the parts may even sit on different devices later. The price is the union: a
  beam keeps one range per part and each step asks every part
  (:class:`~rdr_jax.decoding.substring_union.DeviceSubstringUnion`), ~P times one index's search work.

Chosen: sub-indexes. Measured (``benchmarks ngram_index``, 2 shared CPU cores): 1M synthetic passages (74M
positions) built as one index in 99 s at 3.5 GB peak RSS, as 4 streamed parts in 69 s at 2.1 GB; the constraint
per step at 100k passages with 1 / 2 / 4 parts: vocabulary search 1.70 / 1.76 / 2.06 s, short-range reads
4.3 / 4.9 / 11.8 ms. At 21M x 110 tokens: 2 parts, 18.8 GB on the device (int64 suffixes: 28.2 GB).
A passage's views all go to one part, so an n-gram's occurrences are the disjoint union
of its occurrences in the parts: counts add up, allowed next tokens are the union, and a passage's positions
(used by SEAL's overlap rule) stay in one part. Positions seen from outside (:meth:`occurrences`) are global:
part ``p``'s local position plus the tokens of the parts before it (int64).

On disk: ``DIR/meta.json`` (``kind: substring_index_parts``, written last) and ``DIR/part-00000/`` ... each an
ordinary index directory whose ``meta.json`` also names its passage rows ``[first_row, end_row)``; a corpus
that fits one part is one ordinary index directory, as before parts existed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from rdr_jax.decoding.corpus_views import token_ids
from rdr_jax.decoding.substring_index import DEFAULT_SHORT_RANGE, DEVICE_POSITION_LIMIT, SubstringIndex
from rdr_jax.decoding.substring_union import DeviceSubstringUnion

KIND = "substring_index_parts"
# A part's positions, leaving int32 room for the n-gram depth and the short-range reads past a range's start.
DEFAULT_PART_POSITIONS = DEVICE_POSITION_LIMIT - 2 ** 20


@dataclasses.dataclass
class PartitionedSubstringIndex:
    """Sub-indexes over consecutive passage ranges, with the host queries of one :class:`SubstringIndex`."""
    parts: list[SubstringIndex]

    def __post_init__(self):
        if not self.parts:
            raise ValueError("PartitionedSubstringIndex: no parts")
        first = self.parts[0]
        for part in self.parts[1:]:
            if (part.vocab_size, part.eos_token_id, part.max_ngram, part.min_ngram) != (
                    first.vocab_size, first.eos_token_id, first.max_ngram, first.min_ngram):
                raise ValueError("the parts of an n-gram index were built with different vocabularies, EOS or "
                                 "n-gram lengths")
        self.vocab_size, self.eos_token_id = first.vocab_size, first.eos_token_id
        self.max_ngram, self.min_ngram = first.max_ngram, first.min_ngram
        # global position of each part's first token (int64: the whole corpus passes 2**31)
        self.offsets = np.concatenate([[0], np.cumsum([len(p.tokens) for p in self.parts])]).astype(np.int64)

    @classmethod
    def build(cls, views: Iterable[Sequence[int]], view_passage: Sequence[int], *, vocab_size: int,
              eos_token_id: int, max_ngram: int = 10, min_ngram: int = 1,
              max_part_positions: int = DEFAULT_PART_POSITIONS) -> "PartitionedSubstringIndex":
        """In memory (tests, small corpora); :func:`build_parts` streams to disk."""
        settings = dict(vocab_size=vocab_size, eos_token_id=eos_token_id, max_ngram=max_ngram, min_ngram=min_ngram)
        return cls([SubstringIndex.build(v, r, **settings)
                    for v, r, _ in _split(zip(view_passage, views), max_part_positions)])

    # ---- host queries (as SubstringIndex's) ----------------------------------------------------------------
    @property
    def num_suffixes(self) -> int:
        return sum(p.num_suffixes for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def view_passage(self) -> np.ndarray:
        return np.concatenate([p.view_passage for p in self.parts])

    def count(self, ngram: Sequence[int]) -> int:
        return sum(p.count(ngram) for p in self.parts)

    def allowed_tokens(self, prefix: Sequence[int]) -> np.ndarray:
        return np.unique(np.concatenate([p.allowed_tokens(prefix) for p in self.parts])).astype(np.int64)

    def occurrences(self, ngram: Sequence[int]) -> np.ndarray:
        """Global token positions (int64, sorted) where ``ngram`` starts."""
        return np.concatenate([p.occurrences(ngram) + o for p, o in zip(self.parts, self.offsets)])

    def passages_of_positions(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, np.int64)
        part = np.searchsorted(self.offsets, positions, "right") - 1
        rows = np.empty(len(positions), np.int32)
        for p in np.unique(part):
            mask = part == p
            rows[mask] = self.parts[p].passages_of_positions(positions[mask] - self.offsets[p])
        return rows

    def to_device(self, vocab_size: int | None = None, short_range: int = DEFAULT_SHORT_RANGE):
        """One part: that index's own device arrays (single-index behaviour, exactly); more: their union."""
        devices = [p.to_device(vocab_size, short_range) for p in self.parts]
        return devices[0] if len(devices) == 1 else DeviceSubstringUnion.of(devices)

    # ---- on disk ---------------------------------------------------------------------------------------------
    def save(self, out_dir) -> Path:
        out = Path(out_dir)
        rows = 0
        for i, part in enumerate(self.parts):
            end = int(part.view_passage.max(initial=rows - 1)) + 1
            part.save(out / _part_name(i), {"first_row": rows, "end_row": end})
            rows = end
        _write_meta(out, len(self.parts), rows)
        return out

    @classmethod
    def load(cls, index_dir) -> "PartitionedSubstringIndex":
        meta = _read_meta(Path(index_dir))
        return cls([SubstringIndex.load(Path(index_dir) / name) for name in meta["parts"]])


def load_substring_index(index_dir) -> SubstringIndex | PartitionedSubstringIndex:
    """Either layout: one index directory, or parts (``kind: substring_index_parts``)."""
    meta_path = Path(index_dir) / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("kind") == KIND:
        return PartitionedSubstringIndex.load(index_dir)
    return SubstringIndex.load(index_dir)


def build_parts(passage_views: Iterable[tuple[int, Sequence[int]]], out_dir, *, vocab_size: int,
                eos_token_id: int, max_ngram: int = 10, min_ngram: int = 1,
                max_part_positions: int = DEFAULT_PART_POSITIONS) -> SubstringIndex | PartitionedSubstringIndex:
    """Streams ``(passage row, view tokens)`` pairs (rows non-decreasing) into parts of at most
    ``max_part_positions`` positions, each built and saved before the next is read: host memory is one part's.
    Resumable: a part already on disk with the same passage rows, token count and settings is loaded (memory
    mapped), not rebuilt; ``DIR/meta.json`` is written after the last part. A corpus that fits one part is saved
    as one index (``DIR`` itself, no part directories)."""
    out = Path(out_dir)
    settings = dict(vocab_size=vocab_size, eos_token_id=eos_token_id, max_ngram=max_ngram, min_ngram=min_ngram)
    parts, end = [], 0
    bar = tqdm(desc="n-gram index parts", unit="part")
    for i, (views, rows, first) in enumerate(_split(passage_views, max_part_positions)):
        end = int(rows[-1]) + 1
        directory, tokens = out / _part_name(i), sum(len(v) + 1 for v in views)
        part = _existing_part(directory, first, end, tokens, settings)
        if part is None:
            part = SubstringIndex.build(views, rows, **settings)
            part.save(directory, {"first_row": first, "end_row": end})
            part = SubstringIndex.load(directory)   # memory-mapped: the next part's build does not add to it
        parts.append(part)
        bar.update(1)
    bar.close()
    if not parts:
        raise ValueError("build_parts: no views to index")
    if len(parts) == 1:   # a corpus that fits one index keeps that index's layout: DIR is the index
        part = out / _part_name(0)
        for name in SubstringIndex.ARRAYS:
            os.replace(part / f"{name}.npy", out / f"{name}.npy")
        os.replace(part / "meta.json", out / "meta.json")   # last: DIR is complete
        part.rmdir()
        return SubstringIndex.load(out)
    _write_meta(out, len(parts), end)
    return PartitionedSubstringIndex(parts)


def _split(passage_views, max_part_positions: int) -> Iterator[tuple[list, list, int]]:
    """``(views, rows, first_row)`` per part: whole passages, at most ``max_part_positions`` positions (a view's
    tokens and its separator) each."""
    if not 0 < max_part_positions <= DEFAULT_PART_POSITIONS:
        raise ValueError(f"max_part_positions {max_part_positions}: must be in 1..{DEFAULT_PART_POSITIONS} "
                         "(the int32 offsets of a part)")
    views, rows, size, first = [], [], 0, 0
    passage, passage_size, previous = [], 0, None

    def close_passage():
        nonlocal views, rows, size, first
        if size and size + passage_size > max_part_positions:
            yield views, rows, first
            views, rows, size, first = [], [], 0, previous
        if passage_size > max_part_positions:
            raise ValueError(f"passage row {previous}: {passage_size} positions, more than a part's "
                             f"{max_part_positions}")
        views += [v for _, v in passage]
        rows += [r for r, _ in passage]
        size += passage_size

    for row, view in passage_views:
        row = int(row)
        if previous is not None and row != previous:
            if row < previous:
                raise ValueError(f"passage rows must not decrease: {row} after {previous}")
            yield from close_passage()
            passage, passage_size = [], 0
        passage.append((row, token_ids(view)))
        passage_size += len(passage[-1][1]) + 1
        previous = row
    if passage:
        yield from close_passage()
    if views:
        yield views, rows, first


def _part_name(i: int) -> str:
    return f"part-{i:05d}"


def _existing_part(directory: Path, first: int, end: int, tokens: int, settings: dict) -> SubstringIndex | None:
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    expected = dict(settings, first_row=first, end_row=end, num_tokens=tokens)
    if any(meta.get(key) != value for key, value in expected.items()):
        return None   # another corpus or other settings: rebuilt (and overwritten)
    return SubstringIndex.load(directory)


def _write_meta(out: Path, parts: int, passages: int) -> None:
    meta = {"kind": KIND, "parts": [_part_name(i) for i in range(parts)], "num_passages": passages}
    tmp = out / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "meta.json")


def _read_meta(index_dir: Path) -> dict:
    meta_path = index_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{index_dir}: no meta.json (not an n-gram index, or its build did not finish)")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != KIND:
        raise ValueError(f"{meta_path}: not a partitioned n-gram index (kind {meta.get('kind')!r})")
    return meta

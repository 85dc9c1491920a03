"""A tokenised passage corpus, built once (``rdr-jax tokenize``): memory-mapped arrays keyed by passage row.

Why memory-mapped numpy arrays rather than array_record/TFDS: nothing but numpy at run time (no TensorFlow),
O(1) random access to any row through an offsets array, each process touching only the pages of its own rows
(the OS pages them in; nothing is read whole), rows handed to the inference runner as zero-copy views, and a
format any tool can read. The build writes every file append-only, so it streams: only a few chunks of rows
are ever in memory.

Layout of a store directory::

    meta.json                    format, rows, max_length, token dtype, tokenizer and source fingerprints
    tokens.bin    tokens.offsets token ids of all rows back to back (uint16 when the vocabulary fits, else
                                 int32), with int64 [rows + 1] offsets: row i is tokens[off[i]:off[i+1]]
    ids.bin       ids.offsets    passage ids, UTF-8, the same way
    titles.bin    titles.offsets titles, UTF-8
    texts.bin     texts.offsets  texts, UTF-8

Token ids are the context encoder's input, ``[CLS] title [SEP] text [SEP]`` truncated to ``max_length`` as
:func:`rdr_jax.data.token_rows.passage_rows` makes them (unpadded). The build writes into ``DIR.partial`` and
renames it to ``DIR`` when complete: a stopped build leaves no store, and a rerun starts over.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from rdr_jax.data.readers import read_dpr_passages
from rdr_jax.data.token_rows import TokenRows, passage_rows

FORMAT = "rdr_jax.corpus_store"
VERSION = 1
META = "meta.json"
TEXT_COLUMNS = ("ids", "titles", "texts")


def corpus_fingerprint(path: str | os.PathLike, sample_bytes: int = 1 << 20) -> dict:
    """What an encoding or a store records of its corpus file: path, size and a SHA-256 of its first and last
    MiB (cheap on a 13 GB TSV, and any other corpus differs in size or in those bytes)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(sample_bytes))
        if size > sample_bytes:
            f.seek(max(sample_bytes, size - sample_bytes))
            digest.update(f.read(sample_bytes))
    return {"path": str(path.resolve()), "size": size, "sha256_head_tail": digest.hexdigest()}


def tokenizer_fingerprint(tokenizer) -> dict:
    """Name, size and a SHA-256 of the whole tokenizer definition (vocabulary, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the definition less its truncation/padding state, which each call resets
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
        definition = json.dumps(definition, sort_keys=True)
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"name": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "sha256": hashlib.sha256(definition.encode("utf-8")).hexdigest()}


def is_corpus_store(path: str | os.PathLike) -> bool:
    meta = Path(path) / META
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


class _Appender:
    """One append-only column: values file + int64 offsets file (starting at 0)."""

    def __init__(self, directory: Path, name: str, suffix: str = ".bin"):
        self.values = open(directory / f"{name}{suffix}", "wb")
        self.offsets = open(directory / f"{name}.offsets", "wb")
        self.end = 0
        np.zeros(1, np.int64).tofile(self.offsets)

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        flat.tofile(self.values)
        (self.end + np.cumsum(lengths, dtype=np.int64)).tofile(self.offsets)
        self.end += int(lengths.sum())

    def add_strings(self, values: list[str]) -> None:
        encoded = [v.encode("utf-8") for v in values]
        self.add(np.frombuffer(b"".join(encoded), np.uint8), np.fromiter(map(len, encoded), np.int64, len(encoded)))

    def close(self) -> None:
        self.values.close()
        self.offsets.close()


def build_corpus_store(passages: str | os.PathLike, tokenizer, out_dir: str | os.PathLike, *, max_length: int = 256,
                       workers: int | None = None, chunk_rows: int = 2048, progress: bool = True) -> Path:
    """Tokenise a DPR passages TSV into a store at ``out_dir`` (see the module docstring); returns ``out_dir``.

    The TSV is read once, in order, on this thread (it is checked as :func:`read_dpr_passages` checks it:
    field count, UTF-8, duplicate ids); chunks of ``chunk_rows`` rows are tokenised on ``workers`` threads
    (the fast tokenizer releases the GIL) and written in order as they finish.
    """
    passages, out_dir = Path(passages), Path(out_dir)
    if max_length < 3:
        raise ValueError(f"max_length {max_length}: leaves no room for text after the special tokens")
    source = corpus_fingerprint(passages)
    token_dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tokens = _Appender(partial, "tokens")
    columns = {name: _Appender(partial, name) for name in TEXT_COLUMNS}
    workers = max(1, workers or os.cpu_count() or 1)

    def tokenize(chunk: list[dict]) -> tuple[list[dict], np.ndarray, np.ndarray]:
        rows = passage_rows(tokenizer, [p["title"] for p in chunk], [p["text"] for p in chunk], max_length)
        lengths = rows.lengths()
        return chunk, np.fromiter(itertools.chain.from_iterable(rows.input_ids), token_dtype, int(lengths.sum())), lengths

    def write(chunk: list[dict], flat: np.ndarray, lengths: np.ndarray) -> None:
        tokens.add(flat, lengths)
        for name, field in zip(TEXT_COLUMNS, ("id", "title", "text")):
            columns[name].add_strings([p[field] for p in chunk])

    count = real_tokens = 0
    bar = tqdm(desc="tokenizing passages", unit=" psg", disable=not progress, smoothing=0.1, mininterval=1.0)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="tokenize") as pool:
            pending = []
            for chunk in _chunks(read_dpr_passages(passages), chunk_rows):
                pending.append(pool.submit(tokenize, chunk))
                while len(pending) > 2 * workers or (pending and pending[0].done()):
                    chunk_done, flat, lengths = pending.pop(0).result()
                    write(chunk_done, flat, lengths)
                    count, real_tokens = count + len(chunk_done), real_tokens + len(flat)
                    bar.update(len(chunk_done))
            for future in pending:
                chunk_done, flat, lengths = future.result()
                write(chunk_done, flat, lengths)
                count, real_tokens = count + len(chunk_done), real_tokens + len(flat)
                bar.update(len(chunk_done))
    finally:
        bar.close()
        tokens.close()
        for column in columns.values():
            column.close()
    if count == 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise ValueError(f"{passages}: no passages (empty or header-only file)")
    meta = {"format": FORMAT, "version": VERSION, "rows": count, "max_length": max_length,
            "token_dtype": np.dtype(token_dtype).name, "tokens": real_tokens,
            "tokenizer": tokenizer_fingerprint(tokenizer), "source": source}
    (partial / META).write_text(json.dumps(meta, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    return out_dir


def _chunks(rows, size: int) -> Iterator[list]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _map(path: Path, dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class CorpusStore:
    """Read side of a store: rows by index, memory-mapped (nothing is read until a row is asked for)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not is_corpus_store(self.path):
            raise ValueError(f"{self.path}: not a corpus store (no {META} of format {FORMAT}; build one with "
                             "`rdr-jax tokenize`)")
        self.meta = json.loads((self.path / META).read_text())
        if self.meta.get("version") != VERSION:
            raise ValueError(f"{self.path}: corpus store version {self.meta.get('version')}, this rdr_jax reads "
                             f"version {VERSION}; rebuild it with `rdr-jax tokenize`")
        self.rows = int(self.meta["rows"])
        self.max_length = int(self.meta["max_length"])
        self._tokens = _map(self.path / "tokens.bin", np.dtype(self.meta["token_dtype"]))
        self._token_offsets = _map(self.path / "tokens.offsets", np.int64)
        self._strings = {name: (_map(self.path / f"{name}.bin", np.uint8), _map(self.path / f"{name}.offsets", np.int64))
                         for name in TEXT_COLUMNS}
        for name, offsets in [("tokens", self._token_offsets)] + [(n, o) for n, (_, o) in self._strings.items()]:
            if len(offsets) != self.rows + 1:
                raise ValueError(f"{self.path}: {name}.offsets holds {len(offsets) - 1} rows, meta.json says "
                                 f"{self.rows}; the store is damaged, rebuild it with `rdr-jax tokenize`")

    def __len__(self) -> int:
        return self.rows

    @property
    def source(self) -> dict:
        return self.meta["source"]

    def token_rows(self, start: int, stop: int) -> TokenRows:
        """Rows ``start:stop`` as views of the memory map (read when used)."""
        off = np.asarray(self._token_offsets[start:stop + 1])
        return TokenRows([self._tokens[off[i]:off[i + 1]] for i in range(len(off) - 1)])

    def _string(self, name: str, row: int) -> str:
        values, offsets = self._strings[name]
        return bytes(values[offsets[row]:offsets[row + 1]]).decode("utf-8")

    def ids(self, start: int = 0, stop: int | None = None) -> list[str]:
        stop = self.rows if stop is None else stop
        values, offsets = self._strings["ids"]
        off = np.asarray(offsets[start:stop + 1])
        data = bytes(values[off[0]:off[-1]]) if len(off) else b""
        base = off[0] if len(off) else 0
        return [data[off[i] - base:off[i + 1] - base].decode("utf-8") for i in range(len(off) - 1)]

    def passage(self, row: int) -> dict:
        """``{"id", "title", "text"}`` of one row."""
        if not 0 <= row < self.rows:
            raise IndexError(f"{self.path}: row {row} is not in [0, {self.rows})")
        return {"id": self._string("ids", row), "title": self._string("titles", row),
                "text": self._string("texts", row)}

    def check_tokenizer(self, tokenizer, max_length: int, source: str = "--passages") -> None:
        """Refuse a store made with another tokenizer or another max_length than this run's."""
        recorded, current = self.meta["tokenizer"], tokenizer_fingerprint(tokenizer)
        if recorded.get("sha256") != current["sha256"]:
            raise ValueError(f"{source} {self.path}: tokenised with another tokenizer ({recorded.get('name')}, "
                             f"{recorded.get('vocab_size')} tokens) than the model's ({current['name']}, "
                             f"{current['vocab_size']} tokens); rebuild it with `rdr-jax tokenize --tokenizer MODEL`")
        if max_length != self.max_length:
            raise ValueError(f"{source} {self.path}: tokenised to --max-length {self.max_length}, not {max_length}; "
                             f"pass --max-length {self.max_length} or rebuild the store")

"""Cross-encoder training lists: per query, K candidate passages with teacher scores and/or relevance labels,
read by index from a prepared dataset (:mod:`rdr_jax.data.records`) and tokenised per batch into fixed
``[B * K, L]`` pair inputs.

Sources (converted once, streamed: never the whole file in memory):

- ``ce-lists``: teacher-score JSONL ``{qid, pids, scores}`` (MS MARCO ids; texts from ``queries`` and
  ``collection``, labels from ``qrels``; each list sorted by the teacher, best first), DPR bi-encoder JSON
  (``[positive, hard negatives, negatives]``, labels positive first) or retriever results
  (``{question, ctxs: [{title, text, teacher_score?, has_answer?}]}``);
- ``ce-triples``: MS MARCO triples TSV (``query pos neg`` text, or ``qid pid+ pid-`` ids with ``queries`` and
  ``collection``): lists [positive, negative], labels [1, 0].

A record is ``{"query", "passages": [text], "teacher"?: [score], "labels"?: [0/1]}``: the texts are resolved
when the dataset is built, so training reads one record per example and holds neither the collection nor an
id -> text map (what a process holds does not grow with the corpus). Passages named by id are read from the
collection by byte offset (:class:`rdr_jax.data.id_texts.TextsById`), the qrels (small: 532k lines for MS
MARCO train) are read whole. ``list_size`` > 0 keeps the first N candidates of each list (the teacher's best).
Lists are fixed per example: nothing is sampled, so a batch split over processes is the 1-process batch.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Iterator

import numpy as np

from rdr_jax.data import readers
from rdr_jax.data.files import iter_json_records, require_file, resolve_data_path
from rdr_jax.data.id_texts import TextsById
from rdr_jax.data.records import file_key, is_prepared, prepared_records
from rdr_jax.data.stand_in_teacher import lexical_overlap
from rdr_jax.data.tokenization import passage_text
from rdr_jax.errors import ConfigError

CE_LISTS, CE_TRIPLES = FORMATS = ("ce-lists", "ce-triples")


@dataclasses.dataclass(frozen=True)
class ListSources:
    """What a conversion reads besides the training file, and how much of it it keeps. ``keys`` name the config
    keys (or command-line flags) of the files, for errors."""
    queries: str | None = None
    collection: str | None = None
    qrels: str | None = None
    triples_form: str = "auto"
    list_size: int = 0          # 0: every candidate
    max_examples: int = 0       # 0: every list
    keys: tuple[str, str, str] = ("data.queries", "data.collection", "data.qrels")

    @classmethod
    def of_config(cls, d) -> "ListSources":
        return cls(d.queries, d.collection, d.qrels, d.triples_form, d.list_size, d.max_examples)

    def options(self) -> str:
        """The part of a cache key beyond the training file: the other files' identities and the settings."""
        files = [file_key(resolve_data_path(f)) if f and resolve_data_path(f).is_file() else str(f)
                 for f in (self.queries, self.collection, self.qrels)]
        return "|".join(files + [self.triples_form, str(self.list_size), str(self.max_examples)])

    def texts(self, which: int, why: str) -> TextsById:
        return TextsById(require_file((self.queries, self.collection)[which], self.keys[which], why), self.keys[which])


def source_format(path: Path) -> str:
    suffix = readers._base_suffix(path)
    if suffix == ".tsv":
        return CE_TRIPLES
    if suffix in (".json", ".jsonl"):
        return CE_LISTS
    raise ConfigError(f"{path}: expected .jsonl (teacher scores / results), .json (DPR bi-encoder or results) or "
                      ".tsv (triples)")


def _record(query: str, passages: list[str], teacher=None, labels=None) -> dict:
    out = {"query": query, "passages": passages}
    if teacher is not None:
        out["teacher"] = [float(t) for t in teacher]
    if labels is not None:
        out["labels"] = [int(x) for x in labels]
    return out


def _cut(values: list, k: int) -> list:
    return values[:k] if k else values


def _from_biencoder(r: dict, k: int) -> dict:
    ctxs = _cut(list(r.get("positive_ctxs") or [])[:1] + list(r.get("hard_negative_ctxs") or [])
                + list(r.get("negative_ctxs") or []), k)
    return _record(r["question"], [passage_text(c) for c in ctxs], labels=[1] + [0] * (len(ctxs) - 1))


def _from_results(r: dict, k: int) -> dict:
    ctxs = _cut(list(r["ctxs"]), k)
    teacher = [c["teacher_score"] for c in ctxs] if all("teacher_score" in c for c in ctxs) else None
    labels = [bool(c["has_answer"]) for c in ctxs] if all("has_answer" in c for c in ctxs) else None
    return _record(r["question"], [passage_text(c) for c in ctxs], teacher, labels)


def _teacher_lists(path: Path, src: ListSources) -> Iterator[dict]:
    """Teacher-scored candidates (JSONL {qid, pids, scores}): each list sorted by the teacher, best first."""
    why = f"{path} holds MS MARCO ids (qid, pids)"
    queries, passages = src.texts(0, why), src.texts(1, why)
    relevant = None
    if src.qrels:
        relevant = {(r["qid"], r["pid"]) for r in readers.read_qrels(require_file(src.qrels, src.keys[2]))
                    if r["relevance"] > 0}
    try:
        for line, row in enumerate(readers.read_teacher_scores(path), start=1):
            where = f"{path}: list {line}"
            order = _cut(sorted(range(len(row["scores"])), key=lambda i: -row["scores"][i]), src.list_size)
            pids = [row["pids"][i] for i in order]
            labels = [(row["qid"], p) in relevant for p in pids] if relevant is not None else None
            yield _record(queries.get(row["qid"], where), [passages.get(p, where) for p in pids],
                          [row["scores"][i] for i in order], labels)
    finally:
        queries.close()
        passages.close()


def _json_lists(path: Path, src: ListSources) -> Iterator[dict]:
    records = iter_json_records(path)
    for line, r in records:
        if not isinstance(r, dict):
            raise readers.FormatError(path, line, "expected a JSON object per example")
        if "pids" in r:   # teacher-score JSONL: re-read by its own reader, with the id lookups
            records.close()
            yield from _teacher_lists(path, src)
            return
        if "positive_ctxs" in r:
            if r["positive_ctxs"]:   # as DPR, questions without a positive are skipped
                yield _from_biencoder(r, src.list_size)
        elif isinstance(r.get("ctxs"), list) and "question" in r:
            if r["ctxs"]:
                yield _from_results(r, src.list_size)
        else:
            raise readers.FormatError(path, line, "expected {qid, pids, scores}, DPR bi-encoder fields "
                                                  "(question, positive_ctxs, ...) or {question, ctxs}")


def _triples(path: Path, src: ListSources) -> Iterator[dict]:
    rows = readers.read_msmarco_triples(path, src.triples_form)
    first = next(rows, None)
    if first is None:
        return
    rows = itertools.chain([first], rows)
    if "query" in first:
        for t in rows:
            yield _record(t["query"], [t["positive"], t["negative"]], labels=[1, 0])
        return
    why = f"{path} holds MS MARCO ids (qid pid+ pid-)"
    queries, passages = src.texts(0, why), src.texts(1, why)
    try:
        for n, r in enumerate(rows, start=1):
            where = f"{path}: triple {n}"
            yield _record(queries.get(r["qid"], where),
                          [passages.get(r["positive_pid"], where), passages.get(r["negative_pid"], where)],
                          labels=[1, 0])
    finally:
        queries.close()
        passages.close()


def list_records(path: str | Path, src: ListSources, meta: dict | None = None, fmt: str | None = None
                 ) -> Iterator[dict]:
    """The records of a raw training file of format ``fmt`` (None: from its suffix), the first
    ``src.max_examples`` of them.
    ``meta`` (filled in as they stream): ``list_size`` and the first record without teacher scores / labels
    (``without_teacher`` / ``without_labels``, None when every one has them)."""
    path = resolve_data_path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: cross-encoder training data file not found")
    stream = _triples if (fmt or source_format(path)) == CE_TRIPLES else _json_lists
    meta = {} if meta is None else meta
    meta.update(list_size=src.list_size, without_teacher=None, without_labels=None)
    for i, record in enumerate(stream(path, src)):
        if src.max_examples and i >= src.max_examples:
            return
        for field in ("teacher", "labels"):
            if field not in record and meta[f"without_{field}"] is None:
                meta[f"without_{field}"] = i
        yield record


def query_lists(file: str, src: ListSources, cache_dir=None):
    """(examples by index, their summary as :func:`list_records` writes it): a prepared ``.arrayrecord`` as is,
    a raw file converted once into ``cache_dir``; ``cache_dir=None`` reads a small raw file whole instead
    (library use, the embedded data)."""
    if cache_dir is None and not is_prepared(file):
        meta: dict = {}
        return list(list_records(file, src, meta)), meta
    path = resolve_data_path(file)
    fmt = FORMATS if is_prepared(path) else source_format(path)
    records = prepared_records(path, fmt, None, cache_dir or ".", "cross-encoder training data",
                               stream=lambda p, meta: list_records(p, src, meta), options=src.options())
    return records, records.meta


class CrossEncoderData:
    """Query lists by index (``len`` + ``make_batch(idx, rng)``), tokenised per batch into fixed [B * K, L] pair
    inputs by ``pairs`` (and ``teacher_pairs`` for an in-step teacher with its own tokenizer): objects whose
    ``tokenize(queries, passages)`` gives the arrays. Each list keeps its first ``d.list_size`` candidates."""

    def __init__(self, file: str, d, pairs, *, need_teacher: bool, need_labels: bool,
                 stand_in: str | None, teacher_pairs=None, cache_dir=None):
        self.k = d.list_size
        self.examples, meta = query_lists(file, ListSources.of_config(d), cache_dir)
        self.n = min(len(self.examples), d.max_examples) if d.max_examples else len(self.examples)
        if not self.n:
            raise ValueError(f"{file}: no training example (every query list was empty)")
        kept = meta.get("list_size") or 0
        if kept and kept < self.k:
            raise ConfigError(f"'data.list_size' {self.k} is more than the {kept} candidates per list {file} was "
                              "prepared with (`rdr-jax prepare-data ... --list-size`)")
        self.stand_in = stand_in
        for field, what, needed, fix in (
                ("teacher", "teacher scores", need_teacher and not stand_in,
                 "set task.teacher_model, data.stand_in_teacher, or use a teacher-scored file"),
                ("labels", "labels", need_labels,
                 "this loss needs relevant passages: DPR positives, has_answer, triples, or data.qrels")):
            i = meta.get(f"without_{field}")   # the first record without them (None: every one has them)
            if needed and i is not None and i < self.n:
                raise ValueError(f"{file}: example {i} ({self.examples[i]['query'][:60]!r}) has no {what}: {fix}")
        self.pairs, self.teacher_pairs = pairs, teacher_pairs
        self.need_teacher, self.need_labels = need_teacher, need_labels

    def __len__(self):
        return self.n

    def make_batch(self, idx: np.ndarray, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        b, k = len(idx), self.k
        queries, passages = [], []
        mask = np.zeros((b, k), np.int32)
        teacher = np.zeros((b, k), np.float32)
        labels = np.zeros((b, k), np.int32)
        for row, i in enumerate(idx):
            q = self.examples[int(i)]
            texts = q["passages"][:k]
            n = len(texts)
            mask[row, :n] = 1
            if self.stand_in == "lexical_overlap":
                teacher[row, :n] = [lexical_overlap(q["query"], p) for p in texts]
            elif "teacher" in q:
                teacher[row, :n] = q["teacher"][:k]
            if "labels" in q:
                labels[row, :n] = q["labels"][:k]
            queries += [q["query"]] * k
            passages += texts + [""] * (k - n)   # padding pairs: masked out of every loss
        batch = {"passage_mask": mask, **self.pairs.tokenize(queries, passages)}
        if self.need_teacher:
            batch["teacher_scores"] = teacher
        if self.need_labels:
            batch["labels"] = labels
        if self.teacher_pairs is not None:
            batch.update({f"teacher_{key}": v for key, v in self.teacher_pairs.tokenize(queries, passages).items()})
        return batch


__all__ = ["CE_LISTS", "CE_TRIPLES", "FORMATS", "ListSources", "list_records", "query_lists", "CrossEncoderData"]

"""Cross-encoder training lists: per query, K candidate passages with teacher scores and/or relevance labels,
read from teacher-score JSONL (MS MARCO ids + queries/collection TSVs), DPR bi-encoder or retriever-results
JSON, or MS MARCO triples; tokenised per batch into fixed ``[B * K, L]`` pair inputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from rdr_jax.data import readers
from rdr_jax.data.files import iter_json_records, require_file, resolve_data_path, select_by_id
from rdr_jax.data.stand_in_teacher import lexical_overlap
from rdr_jax.data.tokenization import passage_text
from rdr_jax.errors import ConfigError


@dataclasses.dataclass
class QueryList:
    query: str
    passages: list[str]
    teacher: list[float] | None = None
    labels: list[int] | None = None


def _from_biencoder(r: dict, k: int) -> QueryList:
    ctxs = (list(r.get("positive_ctxs") or [])[:1] + list(r.get("hard_negative_ctxs") or [])
            + list(r.get("negative_ctxs") or []))[:k]
    return QueryList(r["question"], [passage_text(c) for c in ctxs], labels=[1] + [0] * (len(ctxs) - 1))


def _from_results(r: dict, k: int) -> QueryList:
    ctxs = list(r["ctxs"])[:k]
    teacher = [float(c["teacher_score"]) for c in ctxs] if all("teacher_score" in c for c in ctxs) else None
    labels = [int(bool(c["has_answer"])) for c in ctxs] if all("has_answer" in c for c in ctxs) else None
    return QueryList(r["question"], [passage_text(c) for c in ctxs], teacher, labels)


def _texts_by_id(rows, wanted: set[str], what: str, option: str) -> dict[str, str]:
    return {i: r["text"] for i, r in select_by_id(rows, wanted, what, option).items()}


def _limited(rows, limit: int):
    for i, row in enumerate(rows):
        if limit and i >= limit:
            return
        yield row


def load_teacher_lists(path: Path, d, k: int) -> list[QueryList]:
    """Teacher-scored candidates (JSONL {qid, pids, scores}): each list is the teacher's top ``k``."""
    why = f"{path} holds MS MARCO ids (qid, pids)"
    lists = []
    for row in _limited(readers.read_teacher_scores(path), d.max_examples):
        order = sorted(range(len(row["scores"])), key=lambda i: -row["scores"][i])[:k]
        lists.append((row["qid"], [row["pids"][i] for i in order], [row["scores"][i] for i in order]))
    queries = _texts_by_id(readers.read_msmarco_queries(require_file(d.queries, "data.queries", why)),
                           {q for q, _, _ in lists}, "queries", f"data.queries {d.queries}")
    passages = _texts_by_id(readers.read_msmarco_collection(require_file(d.collection, "data.collection", why)),
                            {p for _, pids, _ in lists for p in pids}, "passages", f"data.collection {d.collection}")
    relevant = None
    if d.qrels:
        relevant = {(r["qid"], r["pid"]) for r in readers.read_qrels(require_file(d.qrels, "data.qrels", ""))
                    if r["relevance"] > 0}
    return [QueryList(queries[q], [passages[p] for p in pids], scores,
                      [int((q, p) in relevant) for p in pids] if relevant is not None else None)
            for q, pids, scores in lists]


def load_triples(path: Path, d) -> list[QueryList]:
    rows = list(_limited(readers.read_msmarco_triples(path, d.triples_form), d.max_examples))
    if rows and "query" in rows[0]:
        return [QueryList(r["query"], [r["positive"], r["negative"]], labels=[1, 0]) for r in rows]
    why = f"{path} holds MS MARCO ids (qid pid+ pid-)"
    queries = _texts_by_id(readers.read_msmarco_queries(require_file(d.queries, "data.queries", why)),
                           {r["qid"] for r in rows}, "queries", f"data.queries {d.queries}")
    passages = _texts_by_id(readers.read_msmarco_collection(require_file(d.collection, "data.collection", why)),
                            {p for r in rows for p in (r["positive_pid"], r["negative_pid"])}, "passages",
                            f"data.collection {d.collection}")
    return [QueryList(queries[r["qid"]], [passages[r["positive_pid"]], passages[r["negative_pid"]]], labels=[1, 0])
            for r in rows]


def load_query_lists(file: str, d, k: int) -> list[QueryList]:
    path = resolve_data_path(file)
    if not path.is_file():
        raise ConfigError(f"{path}: cross-encoder training data file not found")
    suffix = readers._base_suffix(path)
    if suffix == ".tsv":
        return load_triples(path, d)
    if suffix not in (".json", ".jsonl"):
        raise ConfigError(f"{path}: expected .jsonl (teacher scores / results), .json (DPR bi-encoder or "
                          "results) or .tsv (triples)")
    lists = []
    records = iter_json_records(path)
    for line, r in records:
        if not isinstance(r, dict):
            raise readers.FormatError(path, line, "expected a JSON object per example")
        if "pids" in r:   # teacher-score JSONL: re-read by its own reader, with the id lookups
            records.close()
            return load_teacher_lists(path, d, k)
        if "positive_ctxs" in r:
            if r["positive_ctxs"]:   # as DPR, questions without a positive are skipped
                lists.append(_from_biencoder(r, k))
        elif isinstance(r.get("ctxs"), list) and "question" in r:
            if r["ctxs"]:
                lists.append(_from_results(r, k))
        else:
            raise readers.FormatError(path, line, "expected {qid, pids, scores}, DPR bi-encoder fields "
                                                  "(question, positive_ctxs, ...) or {question, ctxs}")
        if d.max_examples and len(lists) >= d.max_examples:
            break
    return lists


class CrossEncoderData:
    """Query lists tokenised per batch into fixed [B * K, L] pair inputs by ``pairs`` (and ``teacher_pairs`` for an
    in-step teacher with its own tokenizer): objects whose ``tokenize(queries, passages)`` gives the arrays."""

    def __init__(self, file: str, d, pairs, *, need_teacher: bool, need_labels: bool,
                 stand_in: str | None, teacher_pairs=None):
        self.k = d.list_size
        self.lists = load_query_lists(file, d, self.k)
        if not self.lists:
            raise ValueError(f"{file}: no training example (every query list was empty)")
        if stand_in == "lexical_overlap":
            for q in self.lists:
                q.teacher = [lexical_overlap(q.query, p) for p in q.passages]
        for i, q in enumerate(self.lists):
            if need_teacher and q.teacher is None:
                raise ValueError(f"{file}: example {i} ({q.query[:60]!r}) has no teacher scores: set "
                                 "task.teacher_model, data.stand_in_teacher, or use a teacher-scored file")
            if need_labels and q.labels is None:
                raise ValueError(f"{file}: example {i} ({q.query[:60]!r}) has no labels (this loss needs "
                                 "relevant passages: DPR positives, has_answer, triples, or data.qrels)")
        self.pairs, self.teacher_pairs = pairs, teacher_pairs
        self.need_teacher, self.need_labels = need_teacher, need_labels

    def __len__(self):
        return len(self.lists)

    def make_batch(self, idx: np.ndarray, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        b, k = len(idx), self.k
        queries, passages = [], []
        mask = np.zeros((b, k), np.int32)
        teacher = np.zeros((b, k), np.float32)
        labels = np.zeros((b, k), np.int32)
        for row, i in enumerate(idx):
            q = self.lists[int(i)]
            n = len(q.passages)
            mask[row, :n] = 1
            if q.teacher is not None:
                teacher[row, :n] = q.teacher
            if q.labels is not None:
                labels[row, :n] = q.labels
            queries += [q.query] * k
            passages += q.passages + [""] * (k - n)   # padding pairs: masked out of every loss
        batch = {"passage_mask": mask, **self.pairs.tokenize(queries, passages)}
        if self.need_teacher:
            batch["teacher_scores"] = teacher
        if self.need_labels:
            batch["labels"] = labels
        if self.teacher_pairs is not None:
            batch.update({f"teacher_{key}": v for key, v in self.teacher_pairs.tokenize(queries, passages).items()})
        return batch

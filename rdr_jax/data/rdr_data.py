"""RDR's training data: per question its top-K retrieved passages with the reader's relevance logits as teacher
scores. Read from the TFDS dataset ``rdr-jax teacher-scores`` writes, a JSONL of ``{question, answers, ctxs:
[{title, text, teacher_score, has_answer?}]}``, or DPR's bi-encoder JSON (no teacher scores: the teacher then
runs in the step). Teacher scores that do not match the questions/candidates are refused here, before any step.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from rdr_jax.data.dpr_data import passage_arrays, question_arrays
from rdr_jax.data.files import read_json_records, resolve_data_path
from rdr_jax.data.tokenization import encode_reader_inputs
from rdr_jax.errors import ConfigError


# ---- teacher-score checks ------------------------------------------------------------------------------------
def _finite_number(value: Any) -> bool:
    if isinstance(value, (bool, str)):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def check_teacher_records(records: Sequence[dict], source: str, top_k: int) -> None:
    """RDR records ``{question, ctxs: [{..., teacher_score}]}``: each of the first ``top_k`` ctxs (the ones
    trained on) has a finite teacher score."""
    for i, r in enumerate(records):
        where = f"{source}: example {i} ({str(r.get('question'))[:60]!r})"
        for k, ctx in enumerate((r.get("ctxs") or [])[:top_k]):
            score = ctx.get("teacher_score") if isinstance(ctx, dict) else None
            if score is None:
                raise ValueError(f"{where}: ctxs[{k}] has no 'teacher_score' (generate the teacher scores for "
                                 f"every retrieved passage first, or set task.teacher_model)")
            if not _finite_number(score):
                raise ValueError(f"{where}: ctxs[{k}] teacher score {score!r} is not a finite number")


def check_teacher_row(row: dict, i: int, source: str, score_fields: Iterable[str] = ("relevance_logits",),
                      candidate_field: str = "passage_ids", aligned_fields: Iterable[str] = ()) -> None:
    """A teacher-score dataset row: as many scores (each score field, all finite) and as many entries of each
    aligned field (titles, texts, ...) as candidates."""
    n = len(row[candidate_field])
    where = f"{source}: row {i} ({str(row.get('question'))[:60]!r})"
    for field in (*score_fields, *aligned_fields):
        if field not in row:
            raise ValueError(f"{where}: no field {field!r}")
        values = list(row[field])
        if len(values) != n:
            what = "scores" if field in score_fields else "entries"
            raise ValueError(f"{where}: {len(values)} {field} {what} for {n} candidates ({candidate_field})")
        if field in score_fields:
            bad = [k for k, v in enumerate(values) if not _finite_number(v)]
            if bad:
                raise ValueError(f"{where}: {field}[{bad[0]}] = {values[bad[0]]} is not finite")


def check_same_questions(train_questions: Sequence[str], teacher_questions: Sequence[str], train_source: str,
                         teacher_source: str) -> None:
    """A separate teacher dataset must list the training questions, in the same order."""
    if len(train_questions) != len(teacher_questions):
        raise ValueError(f"{teacher_source} has teacher scores for {len(teacher_questions)} questions, "
                         f"{train_source} has {len(train_questions)}: they are not for the same questions")
    for i, (a, b) in enumerate(zip(train_questions, teacher_questions)):
        if a != b:
            raise ValueError(f"{teacher_source}: question {i} is {b[:60]!r} but {train_source} has {a[:60]!r} "
                             f"there: the teacher scores are for other questions (or another order)")


# ---- records ---------------------------------------------------------------------------------------------------
def from_biencoder_record(r: dict) -> dict:
    """A DPR bi-encoder example as an RDR record (no teacher scores)."""
    positives = [dict(c, has_answer=True) for c in (r.get("positive_ctxs") or [])[:1]]
    ctxs = positives + list(r.get("hard_negative_ctxs") or []) + list(r.get("negative_ctxs") or [])
    return {"question": r.get("question"), "answers": r.get("answers", []), "ctxs": ctxs}


def records_from_teacher_dataset(path, split: str, score: str) -> list[dict]:
    """RDR records from the TFDS dataset written by ``rdr-jax teacher-scores``."""
    # tensorflow_datasets takes seconds to import: only when a run reads such a dataset
    from rdr_jax.data.tfds_format import load as load_tfds

    if score not in ("relevance", "relevance+span"):
        raise ConfigError(f"'data.teacher_score' must be 'relevance' or 'relevance+span', got {score!r}")
    records = []
    fields = ("relevance_logits", "span_scores") if score == "relevance+span" else ("relevance_logits",)
    source = load_tfds(path, split)
    for i in range(len(source)):  # a random-access source: index it (iterating runs past its end)
        row = source[i]
        # zip below would silently drop passages whose scores are missing: refuse instead
        check_teacher_row(row, i, f"{path} ({split})", fields, aligned_fields=("titles", "texts", "has_answer"))
        teacher = np.asarray(row["relevance_logits"], np.float32)
        if score == "relevance+span":
            teacher = teacher + np.asarray(row["span_scores"], np.float32)
        ctxs = [{"id": pid, "title": title, "text": text, "teacher_score": float(t), "has_answer": bool(h)}
                for pid, title, text, t, h in zip(row["passage_ids"], row["titles"], row["texts"], teacher,
                                                  row["has_answer"])]
        records.append({"question": row["question"], "answers": list(row["answers"]), "ctxs": ctxs})
    return records


def load_records(path, split: str, score: str) -> list[dict]:
    path = resolve_data_path(path)
    if path.is_dir():
        return records_from_teacher_dataset(path, split, score)
    records = read_json_records(path, "RDR training data")
    if records and isinstance(records[0], dict) and "ctxs" not in records[0] and "positive_ctxs" in records[0]:
        records = [from_biencoder_record(r) for r in records]
    return records


class RDRData:
    """RDR records tokenised per batch; with ``embeddings`` (an object whose ``lookup(ids)`` returns the frozen
    index vectors) the passages are looked up instead of tokenised."""

    def __init__(self, path: str, tokenizer, *, top_k: int, max_question_length: int, max_passage_length: int,
                 need_teacher_scores: bool, need_positive: bool, reader_length: int | None, split: str = "train",
                 teacher_score: str = "relevance", embeddings=None):
        records = load_records(path, split, teacher_score)
        for i, r in enumerate(records):
            if not isinstance(r, dict) or "question" not in r or not isinstance(r.get("ctxs"), list):
                raise ValueError(f"{path}: example {i} needs 'question' and a 'ctxs' list")
            if not r["ctxs"]:
                raise ValueError(f"{path}: example {i} ({r['question']!r}) has no passages in 'ctxs'")
        if need_teacher_scores:  # missing, non-finite or miscounted teacher scores: refused before any step
            check_teacher_records(records, str(path), top_k)
        for i, r in enumerate(records):
            if embeddings is not None:
                for k, ctx in enumerate(r["ctxs"][:top_k]):
                    if ctx.get("id") is None:
                        raise ValueError(f"{path}: example {i}, ctxs[{k}] has no passage 'id' to look up in "
                                         "data.passage_embeddings")
        self.records, self.tokenizer, self.k = records, tokenizer, top_k
        self.lq, self.lp = max_question_length, max_passage_length
        self.need_teacher_scores, self.need_positive, self.reader_length = (
            need_teacher_scores, need_positive, reader_length)
        self.embeddings = embeddings

    def __len__(self):
        return len(self.records)

    def make_batch(self, idx: np.ndarray, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        b, k = len(idx), self.k
        questions, titles, texts, q_of_passage, passage_ids = [], [], [], [], []
        teacher = np.zeros((b, k), np.float32)
        pmask = np.zeros((b, k), np.int32)
        positive = np.full((b,), -1, np.int32)
        for row, i in enumerate(idx):
            r = self.records[int(i)]
            questions.append(r["question"])
            ctxs = r["ctxs"][:k]
            for j in range(k):
                ctx = ctxs[j] if j < len(ctxs) else {}
                titles.append(ctx.get("title") or "")
                texts.append(ctx.get("text") or "")
                passage_ids.append(str(ctx["id"]) if j < len(ctxs) and ctx.get("id") is not None else None)
                q_of_passage.append(r["question"])
                if j < len(ctxs):
                    pmask[row, j] = 1
                    teacher[row, j] = float(ctx.get("teacher_score", 0.0))
                    if positive[row] < 0 and ctx.get("has_answer"):
                        positive[row] = row * k + j
        q_ids, q_mask = question_arrays(self.tokenizer, questions, self.lq)
        batch = {"q_input_ids": q_ids, "q_attention_mask": q_mask, "passage_mask": pmask}
        if self.embeddings is not None:
            batch["p_emb"] = self.embeddings.lookup(passage_ids)
        else:
            batch["p_input_ids"], batch["p_attention_mask"] = passage_arrays(self.tokenizer, titles, texts, self.lp)
        if self.need_teacher_scores:
            batch["teacher_scores"] = teacher
        if self.need_positive:
            batch["positive_index"] = positive
        if self.reader_length:
            reader = encode_reader_inputs(self.tokenizer, q_of_passage, titles, texts, self.reader_length)
            batch["r_input_ids"], batch["r_attention_mask"] = reader["input_ids"], reader["attention_mask"]
        return batch

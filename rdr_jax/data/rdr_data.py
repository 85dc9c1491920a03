"""RDR's training data: per question its top-K retrieved passages with the reader's relevance logits as teacher
scores. Read from the TFDS dataset ``rdr-jax teacher-scores`` writes, a JSONL of ``{question, answers, ctxs:
[{id or row, title, text, teacher_score, has_answer?}]}``, or DPR's bi-encoder JSON (no teacher scores: the
teacher then runs in the step). Teacher scores that do not match the questions/candidates are refused here,
before any step. With the frozen index's vectors the passages are rows of the encoding: no text is kept.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from rdr_jax.data.dpr_data import passage_arrays, question_arrays
from rdr_jax.data.files import iter_json_records, resolve_data_path
from rdr_jax.data.id_hash import id_hashes
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


def check_teacher_record(r: dict, i: int, source: str, top_k: int) -> None:
    """RDR record ``i`` ``{question, ctxs: [{..., teacher_score}]}``: each of the first ``top_k`` ctxs (the ones
    trained on) has a finite teacher score."""
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


def iter_teacher_dataset(path, split: str, score: str, keep_text: bool = True) -> Iterator[dict]:
    """RDR records from the TFDS dataset written by ``rdr-jax teacher-scores``, one row at a time; without
    ``keep_text`` the titles and texts are dropped as each row is read (the passages are looked up by row)."""
    # tensorflow_datasets takes seconds to import: only when a run reads such a dataset
    from rdr_jax.data.tfds_format import load as load_tfds

    if score not in ("relevance", "relevance+span"):
        raise ConfigError(f"'data.teacher_score' must be 'relevance' or 'relevance+span', got {score!r}")
    fields = ("relevance_logits", "span_scores") if score == "relevance+span" else ("relevance_logits",)
    source = load_tfds(path, split)
    for i in range(len(source)):  # a random-access source: index it (iterating runs past its end)
        row = source[i]
        # zip below would silently drop passages whose scores are missing: refuse instead
        check_teacher_row(row, i, f"{path} ({split})", fields, aligned_fields=("titles", "texts", "has_answer"))
        teacher = np.asarray(row["relevance_logits"], np.float32)
        if score == "relevance+span":
            teacher = teacher + np.asarray(row["span_scores"], np.float32)
        ctxs = [{"id": pid, "teacher_score": float(t), "has_answer": bool(h)}
                for pid, t, h in zip(row["passage_ids"], teacher, row["has_answer"])]
        if keep_text:
            for ctx, title, text in zip(ctxs, row["titles"], row["texts"]):
                ctx.update(title=title, text=text)
        yield {"question": row["question"], "ctxs": ctxs}


def iter_records(path, split: str, score: str, keep_text: bool = True) -> Iterator[dict]:
    path = resolve_data_path(path)
    if path.is_dir():
        yield from iter_teacher_dataset(path, split, score, keep_text)
        return
    if not path.is_file():
        raise ConfigError(f"{path}: RDR training data file not found")
    biencoder = None
    for _, r in iter_json_records(path):   # streamed: one record at a time, never the whole file
        if biencoder is None:
            biencoder = isinstance(r, dict) and "ctxs" not in r and "positive_ctxs" in r
        yield from_biencoder_record(r) if biencoder else r


def _stack(rows: list[np.ndarray], width: int, dtype) -> np.ndarray:
    return np.stack(rows) if rows else np.zeros((0, width), dtype)


class _HashList:
    """The id hashes of the examples read so far: one uint64 array per example (no Python int per passage)."""

    def __init__(self):
        self.parts, self.n = [], 0

    def add(self, ids: list[str]) -> None:
        if ids:
            self.parts.append(id_hashes(ids))
            self.n += len(ids)

    def __len__(self) -> int:
        return self.n

    def array(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.uint64)


class RDRData:
    """RDR examples held as arrays, tokenised per batch.

    With ``embeddings`` (``retrieval.passage_embeddings.PassageEmbeddings``: ``rows_of(id hashes)`` and
    ``rows(rows)``, the memory-mapped frozen index vectors) the passages are looked up by corpus row instead of
    tokenised, and their titles and texts are not kept (unless the in-step teacher reads them). A ctx names
    its passage by ``row`` (a row of the encoding) or ``id`` (mapped to a row once here, by a pass over the
    encoding's id files against the hashes of the ids the data uses). Per question only the first ``top_k``
    passages are kept: teacher scores, has-answer position and rows are ``[N, top_k]`` numpy arrays, so the
    data costs ~13 bytes per passage, not a dict per passage."""

    def __init__(self, path: str, tokenizer, *, top_k: int, max_question_length: int, max_passage_length: int,
                 need_teacher_scores: bool, need_positive: bool, reader_length: int | None, split: str = "train",
                 teacher_score: str = "relevance", embeddings=None):
        self.tokenizer, self.k = tokenizer, top_k
        self.lq, self.lp = max_question_length, max_passage_length
        self.need_teacher_scores, self.need_positive, self.reader_length = (
            need_teacher_scores, need_positive, reader_length)
        self.embeddings = embeddings
        keep_text = embeddings is None or bool(reader_length)
        questions, counts, teacher, positive, rows, titles, texts = [], [], [], [], [], [], []
        hashes = _HashList()
        for i, r in enumerate(iter_records(path, split, teacher_score, keep_text)):
            if not isinstance(r, dict) or "question" not in r or not isinstance(r.get("ctxs"), list):
                raise ValueError(f"{path}: example {i} needs 'question' and a 'ctxs' list")
            if not r["ctxs"]:
                raise ValueError(f"{path}: example {i} ({r['question']!r}) has no passages in 'ctxs'")
            if need_teacher_scores:  # missing, non-finite or miscounted teacher scores: refused before any step
                check_teacher_record(r, i, str(path), top_k)
            ctxs = r["ctxs"][:top_k]
            questions.append(r["question"])
            counts.append(len(ctxs))
            pad = top_k - len(ctxs)   # per example a numpy row, not a Python number per passage
            if need_teacher_scores:
                teacher.append(np.asarray([float(c.get("teacher_score") or 0.0) for c in ctxs] + [0.0] * pad,
                                          np.float32))
            positive.append(next((j for j, c in enumerate(ctxs) if c.get("has_answer")), -1))
            if embeddings is not None:
                rows.append(np.asarray(self._passage_keys(ctxs, i, path, hashes) + [-1] * pad, np.int64))
            if keep_text:
                titles.append([c.get("title") or "" for c in ctxs])
                texts.append([c.get("text") or "" for c in ctxs])
        self.questions = questions
        self.counts = np.asarray(counts, np.int32)
        self.teacher = _stack(teacher, top_k, np.float32) if need_teacher_scores else None
        self.positive = np.asarray(positive, np.int32)
        self.titles, self.texts = (titles, texts) if keep_text else (None, None)
        self.rows = None
        if embeddings is not None:
            self.rows = self._rows(_stack(rows, top_k, np.int64),
                                   hashes.array(), path, split, teacher_score)

    @staticmethod
    def _passage_keys(ctxs: list[dict], i: int, path, hashes: "_HashList") -> list[int]:
        """Per ctx its row, or ``-2 - n`` for the ``n``-th id still to be mapped (hashed into ``hashes``)."""
        keys, ids = [], []
        for k, ctx in enumerate(ctxs):
            if ctx.get("row") is not None:
                if not isinstance(ctx["row"], int) or isinstance(ctx["row"], bool) or ctx["row"] < 0:
                    raise ValueError(f"{path}: example {i}, ctxs[{k}] 'row' {ctx['row']!r} is not a row of "
                                     "data.passage_embeddings (an integer >= 0)")
                keys.append(int(ctx["row"]))
            elif ctx.get("id") is not None:
                keys.append(-2 - len(hashes) - len(ids))
                ids.append(str(ctx["id"]))
            else:
                raise ValueError(f"{path}: example {i}, ctxs[{k}] has no passage 'id' (or 'row') to look up in "
                                 "data.passage_embeddings")
        hashes.add(ids)
        return keys

    def _rows(self, keys: np.ndarray, hashes: np.ndarray, path, split, score) -> np.ndarray:
        """Ids (negative keys <= -2) replaced by their rows in the encoding; rows checked against its size."""
        rows = keys.copy()
        pending = keys <= -2
        if pending.any():
            rows[pending] = self.embeddings.rows_of(hashes)[-2 - keys[pending]]
        bad = np.argwhere((pending & (rows < 0)) | (rows >= len(self.embeddings)))
        if len(bad):
            i, k = (int(x) for x in bad[0])
            ctx = next(r for n, r in enumerate(iter_records(path, split, score, False)) if n == i)["ctxs"][k]
            what = f"row {ctx['row']} is past its {len(self.embeddings)} passages" if ctx.get("row") is not None \
                else f"passage id {str(ctx['id'])!r} is not in it"
            raise ValueError(f"{path}: example {i}, ctxs[{k}]: {what} (data.passage_embeddings "
                             f"{getattr(self.embeddings, 'path', '')})")
        return rows

    def __len__(self):
        return len(self.questions)

    def _passage_texts(self, idx: np.ndarray) -> tuple[list[str], list[str]]:
        """Titles and texts of the batch's passages, ``k`` per question ("" for padding)."""
        titles, texts = [], []
        for i in idx:
            pad = [""] * (self.k - len(self.titles[i]))
            titles += self.titles[i] + pad
            texts += self.texts[i] + pad
        return titles, texts

    def make_batch(self, idx: np.ndarray, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        idx = np.asarray(idx, np.int64)
        b, k = len(idx), self.k
        questions = [self.questions[i] for i in idx]
        pmask = (np.arange(k)[None, :] < self.counts[idx][:, None]).astype(np.int32)
        q_ids, q_mask = question_arrays(self.tokenizer, questions, self.lq)
        batch = {"q_input_ids": q_ids, "q_attention_mask": q_mask, "passage_mask": pmask}
        titles = texts = None
        if self.titles is not None:
            titles, texts = self._passage_texts(idx)
        if self.embeddings is not None:
            batch["p_emb"] = self.embeddings.rows(self.rows[idx].reshape(-1))
        else:
            batch["p_input_ids"], batch["p_attention_mask"] = passage_arrays(self.tokenizer, titles, texts, self.lp)
        if self.need_teacher_scores:
            batch["teacher_scores"] = self.teacher[idx]
        if self.need_positive:
            pos = self.positive[idx]
            batch["positive_index"] = np.where(pos >= 0, np.arange(b) * k + pos, -1).astype(np.int32)
        if self.reader_length:
            q_of_passage = [q for q in questions for _ in range(k)]
            reader = encode_reader_inputs(self.tokenizer, q_of_passage, titles, texts, self.reader_length)
            batch["r_input_ids"], batch["r_attention_mask"] = reader["input_ids"], reader["attention_mask"]
        return batch

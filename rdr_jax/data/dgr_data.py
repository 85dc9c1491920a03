"""DGR's training data: per question a candidate list ``[positive, negatives sorted by the teacher score]`` with
the teacher's scores and each candidate's identifier tokens, from candidate JSONL, re-ranked retriever results
(gold positives from ``data.gold_file``), or DPR bi-encoder JSON scored by the lexical-overlap stand-in."""

from __future__ import annotations

import logging

import numpy as np

from rdr_jax.data.files import read_json_records
from rdr_jax.data.seq2seq_inputs import encode_inputs, pad_rows, tokenize_identifiers
from rdr_jax.data.stand_in_teacher import lexical_overlap
from rdr_jax.errors import ConfigError

log = logging.getLogger(__name__)


def _candidates_from_biencoder(r: dict) -> list[dict]:
    """A bi-encoder example's passages as candidates scored by the lexical-overlap stand-in teacher."""
    out = []
    for key, positive in (("positive_ctxs", True), ("hard_negative_ctxs", False), ("negative_ctxs", False)):
        for c in (r.get(key) or [])[:1] if positive else (r.get(key) or []):
            if c.get("passage_id") is None:
                continue
            text = f"{c.get('title') or ''} {c.get('text') or ''}"
            out.append({"passage_id": str(c["passage_id"]), "is_positive": positive,
                        "teacher_score": lexical_overlap(r["question"], text)})
    return out


def _gold_ids(path) -> dict[str, set[str]]:
    """question text -> passage ids of its ``positive_ctxs`` (DPR bi-encoder JSON)."""
    gold: dict[str, set[str]] = {}
    for r in read_json_records(path, "gold positives ('data.gold_file')"):
        ids = {str(c["passage_id"]) for c in r.get("positive_ctxs") or [] if c.get("passage_id") is not None}
        gold.setdefault(r.get("question", ""), set()).update(ids)
    return gold


def normalise_record(r: dict, i: int, path, *, stand_in_teacher: str, gold: dict | None) -> list[dict]:
    """The record's candidates as ``[{passage_id, identifier?, teacher_score, is_positive}]``."""
    where = f"{path}: example {i}"
    if not isinstance(r, dict) or not isinstance(r.get("question"), str):
        raise ValueError(f"{where} has no 'question' string")
    if "candidates" in r:
        cands = r["candidates"]
        if not isinstance(cands, list):
            raise ValueError(f"{where}: 'candidates' must be a list")
        out = []
        for k, c in enumerate(cands):
            if not isinstance(c, dict) or c.get("passage_id") is None or "teacher_score" not in c:
                raise ValueError(f"{where}, candidates[{k}] needs 'passage_id' and 'teacher_score'")
            out.append({"passage_id": str(c["passage_id"]), "identifier": c.get("identifier"),
                        "teacher_score": float(c["teacher_score"]), "is_positive": bool(c.get("is_positive"))})
        return out
    if "ctxs" in r:
        golds = (gold or {}).get(r["question"], set())
        out = []
        for k, c in enumerate(r["ctxs"]):
            if not isinstance(c, dict) or c.get("id") is None or "score" not in c:
                raise ValueError(f"{where}, ctxs[{k}] needs 'id' and 'score' (the teacher's)")
            pid = str(c["id"])
            out.append({"passage_id": pid, "identifier": c.get("identifier"), "teacher_score": float(c["score"]),
                        "is_positive": bool(c.get("is_positive")) or pid in golds})
        return out
    if "positive_ctxs" in r:
        if stand_in_teacher != "lexical_overlap":
            raise ConfigError(f"{where} is a DPR bi-encoder example: it has no teacher scores. Give candidates "
                              "scored by a cross-encoder (see rdr_jax.retrieval.generative), or set "
                              "'data.stand_in_teacher: lexical_overlap' for a smoke run")
        return _candidates_from_biencoder(r)
    raise ValueError(f"{where} has none of 'candidates', 'ctxs' or 'positive_ctxs'")


def candidate_list(cands: list[dict], k: int) -> list[dict]:
    """``[positive, negatives by teacher score]`` (at most k), or [] when there is no positive."""
    positives = [c for c in cands if c["is_positive"]]
    if not positives:
        return []
    positive = max(positives, key=lambda c: c["teacher_score"])
    positive_ids = {c["passage_id"] for c in positives}
    seen, negatives = set(), []
    for c in sorted((c for c in cands if c["passage_id"] not in positive_ids),
                    key=lambda c: -c["teacher_score"]):   # stable: ties keep the file's order
        if c["passage_id"] not in seen:
            seen.add(c["passage_id"])
            negatives.append(c)
    return [positive] + negatives[:k - 1]


class DGRData:
    """Candidate lists per question, their identifiers tokenised once at load time."""

    def __init__(self, path, tokenizer, identifiers: dict[str, str] | None, *, num_candidates: int,
                 max_question_length: int, max_identifier_length: int, stand_in_teacher: str,
                 gold_file: str | None):
        gold = _gold_ids(gold_file) if gold_file else None
        self.tokenizer, self.k, self.lq = tokenizer, num_candidates, max_question_length
        self.questions, self.lists = [], []
        skipped = 0
        for i, r in enumerate(read_json_records(path, "DGR training data")):
            cands = candidate_list(normalise_record(r, i, path, stand_in_teacher=stand_in_teacher, gold=gold),
                                   num_candidates)
            if not cands:
                skipped += 1
                continue
            for c in cands:
                if not c.get("identifier"):
                    if identifiers is None or c["passage_id"] not in identifiers:
                        raise ValueError(f"{path}: example {i}: passage {c['passage_id']!r} has no 'identifier' and "
                                         "is not in the identifiers ('data.identifiers_file' / 'data.passages_file')")
                    c["identifier"] = identifiers[c["passage_id"]]
            self.questions.append(r["question"])
            self.lists.append(cands)
        if skipped:
            log.info("%s: %d questions without a positive candidate were skipped", path, skipped)
        if not self.lists:
            raise ValueError(f"{path}: no question has a positive candidate ('is_positive', or 'data.gold_file')")
        strings = list(dict.fromkeys(c["identifier"] for cands in self.lists for c in cands))
        self.tokens = dict(zip(strings, tokenize_identifiers(tokenizer, strings)))
        self.target_length = max_identifier_length or max(len(t) for t in self.tokens.values())

    def __len__(self):
        return len(self.lists)

    def make_batch(self, idx: np.ndarray, rng=None) -> dict[str, np.ndarray]:
        b, k = len(idx), self.k
        pad = self.tokenizer.pad_token_id
        targets = []
        cmask = np.zeros((b, k), np.int32)
        teacher = np.zeros((b, k), np.float32)
        for row, i in enumerate(idx):
            cands = self.lists[int(i)]
            for j in range(k):
                if j < len(cands):
                    targets.append(self.tokens[cands[j]["identifier"]])
                    cmask[row, j] = 1
                    teacher[row, j] = cands[j]["teacher_score"]
                else:
                    targets.append([])
        q_ids, q_mask = encode_inputs(self.tokenizer, [self.questions[int(i)] for i in idx], self.lq)
        t_ids, t_mask = pad_rows(targets, self.target_length, pad, "identifier")
        return {"q_input_ids": q_ids, "q_attention_mask": q_mask, "target_ids": t_ids, "target_mask": t_mask,
                "candidate_mask": cmask, "teacher_scores": teacher}

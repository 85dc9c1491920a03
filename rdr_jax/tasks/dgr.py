"""DGR: distil a cross-encoder teacher's ranking into a generative retriever (Li et al., ACL Findings 2024).

For each training question, a list ``[positive, negatives sorted by the teacher score, best first]`` of K
candidate passages. The student's passage score is s(p|q) = the summed log-probability of p's identifier given
the question, teacher forced (:func:`rdr_jax.tasks.seq2seq_index.passage_scores`: each question encoded once,
its encoder output broadcast over its K candidates). Loss::

    task.ranking_weight x ranking(s)  +  task.generation_weight x CE(gold identifier | question)

``task.ranking_loss``: ``dgr_margin`` (default; DGR's released margin hinge: m = 300, n = 100, weight 3 on
pairs with the positive, 1/(i+1) otherwise, mean over violated pairs: :func:`rdr_jax.losses.dgr_margin_ranknet`),
``ranknet`` (logistic loss over the same order) or ``listwise_kl`` (KL of the teacher's softmax to the
student's). CE is the mean over the gold identifier's tokens in the batch; ``generation_weight`` 500 as
released. (The hinge and the batch-level means are not sums over questions, so gradient accumulation only
approximates one big step here.)

Batch (``B`` questions, ``K`` candidates each, question ``i``'s at rows ``i*K .. i*K+K-1``, positive first)::

    q_input_ids, q_attention_mask   [B, Lq]
    target_ids, target_mask         [B * K, Lt]   candidate identifier tokens + EOS
    candidate_mask                  [B, K]        1 = a real candidate (padding at the end of the list)
    teacher_scores                  [B, K]

Data (``data.train_file``), one of:

- JSONL ``{question, answers?, candidates: [{passage_id, identifier?, teacher_score, is_positive?}]}``;
- DPR retriever-results JSON as ``rdr-jax rerank --results`` writes it (``ctxs: [{id, score, ...}]``, ``score``
  being the cross-encoder's): the two-step flow of :mod:`rdr_jax.retrieval.generative` (the generative
  retriever's own candidates, then the teacher). The gold positives are the ctxs marked ``is_positive`` or,
  since re-ranking keeps only the standard fields, the ``positive_ctxs`` passage ids of the question in
  ``data.gold_file`` (DPR bi-encoder JSON, matched by question text);
- DPR bi-encoder JSON (positive, hard and other negatives with ``passage_id``) with
  ``data.stand_in_teacher: lexical_overlap``: teacher score = share of the question's words found in the
  passage. A deterministic STAND-IN so the pipeline runs on the embedded data without a cross-encoder; it is
  not a teacher worth distilling.

Candidates without an ``identifier`` are named through ``data.identifiers_file`` (passage_id<TAB>identifier)
or identifiers built from ``data.passages_file`` by ``data.identifier_kind``. Per question the positive is the
best-scored positive candidate; other positives are left out of the list (they are not negatives); questions
without a positive are skipped.
"""

from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np

from rdr_jax import losses
from rdr_jax.tasks.base import register_task
from rdr_jax.tasks.dpr import read_json_records
from rdr_jax.tasks.seq2seq_index import (GENERATOR_MODEL_DEFAULTS, IDENTIFIER_DATA_DEFAULTS, RETRIEVER, GenerativeTask,
                                         encode_inputs, identifier_mapping, pad_rows, passage_scores,
                                         sequence_cross_entropy, tokenize_identifiers)
from rdr_jax.training.config import REQUIRED, ConfigError

log = logging.getLogger(__name__)

RANKING_LOSSES = ("dgr_margin", "ranknet", "listwise_kl")
STAND_IN_TEACHERS = ("none", "lexical_overlap")

_WORD = re.compile(r"\w+")


def lexical_overlap(question: str, passage_text: str) -> float:
    """Share of the question's distinct lower-cased words that occur in the passage (the stand-in teacher)."""
    q = set(_WORD.findall(question.lower()))
    p = set(_WORD.findall(passage_text.lower()))
    return len(q & p) / max(len(q), 1)


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


def ranking_loss(name: str, scores, teacher, mask, t) -> jax.Array:
    if name == "dgr_margin":
        return losses.dgr_margin_ranknet(scores, mask, margin=t.margin, margin_step=t.margin_step,
                                         positive_weight=t.positive_weight)
    if name == "ranknet":
        return losses.dgr_ranknet(scores, mask)
    return losses.listwise_kl(scores, teacher, mask, t.temperature)


@register_task
class DGRTask(GenerativeTask):
    name = "dgr"

    @classmethod
    def config_schema(cls):
        return {
            "task": {"name": REQUIRED, "ranking_loss": "dgr_margin", "margin": 300.0, "margin_step": 100.0,
                     "positive_weight": 3.0, "temperature": 1.0, "ranking_weight": 1.0,
                     "generation_weight": 500.0},
            "model": dict(GENERATOR_MODEL_DEFAULTS),
            "data": {**IDENTIFIER_DATA_DEFAULTS, "train_file": REQUIRED, "dev_file": None, "gold_file": None,
                     "num_candidates": 10, "max_question_length": 64, "stand_in_teacher": "none",
                     "shuffle": True},
        }

    @classmethod
    def validate_config(cls, c):
        cls.validate_generator_config(c)
        t, d = c["task"], c["data"]
        if t["ranking_loss"] not in RANKING_LOSSES:
            raise ConfigError(f"'task.ranking_loss' must be one of {', '.join(RANKING_LOSSES)}, got {t['ranking_loss']!r}")
        for key in ("margin", "margin_step", "positive_weight", "ranking_weight", "generation_weight"):
            if t[key] < 0:
                raise ConfigError(f"'task.{key}' must be >= 0, got {t[key]!r}")
        if t["temperature"] <= 0:
            raise ConfigError(f"'task.temperature' must be > 0, got {t['temperature']!r}")
        if d["num_candidates"] < 2:
            raise ConfigError(f"'data.num_candidates' must be >= 2 (a positive and a negative), got {d['num_candidates']!r}")
        if d["max_question_length"] < 4:
            raise ConfigError(f"'data.max_question_length' must be >= 4, got {d['max_question_length']!r}")
        if d["stand_in_teacher"] not in STAND_IN_TEACHERS:
            raise ConfigError(f"'data.stand_in_teacher' must be one of {', '.join(STAND_IN_TEACHERS)}, "
                              f"got {d['stand_in_teacher']!r}")

    def tokenizer_texts(self):
        texts = super().tokenizer_texts()
        return texts + [r.get("question", "") for r in read_json_records(self.config.data.train_file, "training data")]

    def _data(self, path) -> DGRData:
        d = self.config.data
        identifiers = None
        if d.identifiers_file or d.passages_file:
            identifiers = identifier_mapping(d, self.passages)
            self.identifiers_tsv()
        return DGRData(path, self.tokenizer, identifiers, num_candidates=d.num_candidates,
                       max_question_length=d.max_question_length, max_identifier_length=d.max_identifier_length,
                       stand_in_teacher=d.stand_in_teacher, gold_file=d.gold_file)


    def loss(self, model, batch, *, rngs, deterministic):
        t = self.config.task
        retriever = getattr(model, RETRIEVER)
        scores, token = passage_scores(retriever, batch["q_input_ids"], batch["q_attention_mask"], batch["target_ids"],
                                       batch["target_mask"], rngs=rngs, deterministic=deterministic)
        mask = batch["candidate_mask"].astype(bool)
        b, k = mask.shape
        rank = ranking_loss(t.ranking_loss, scores, batch["teacher_scores"], mask, t)
        gold_mask = batch["target_mask"].reshape(b, k, -1)[:, 0] * mask[:, :1]
        generation = sequence_cross_entropy(token[:, 0], gold_mask)
        loss = t.ranking_weight * rank + t.generation_weight * generation
        masked = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        return loss, {"ranking_loss": rank, "generation_loss": generation,
                      "positive_top1": jnp.mean((jnp.argmax(masked, -1) == 0).astype(jnp.float32))}

    def batch_stats(self, batch):
        return {"examples": int(batch["q_input_ids"].shape[0]),
                "tokens": int(np.sum(batch["q_attention_mask"]) + np.sum(batch["target_mask"]))}


__all__ = ["DGRTask", "DGRData", "lexical_overlap", "candidate_list"]

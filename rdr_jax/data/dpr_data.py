"""DPR's bi-encoder training data: a JSON list of ``{question, answers, positive_ctxs, negative_ctxs,
hard_negative_ctxs}``, tokenised per batch with DPR's layout (question ``[CLS] q [SEP]``, passage
``[CLS] title [SEP] text [SEP]``), hard negatives sampled per epoch as DPR does.

The examples are read by index from a prepared dataset (:mod:`rdr_jax.data.records`, format ``dpr``: per
question only what training reads: the question, its first positive and its negative pool, as
``[title, text]`` pairs), so a process holds none of the file; ``cache_dir=None`` reads a small file whole
instead (library use, the embedded data). Sampling is per example, from (seed, epoch, the example's index):
a batch split over processes draws the negatives one process would."""

from __future__ import annotations

import numpy as np

from rdr_jax.data import tokenization as tk
from rdr_jax.data.batching import example_rngs
from rdr_jax.data.files import read_json_records
from rdr_jax.data.records import prepared_records
from rdr_jax.errors import ConfigError

FORMAT = "dpr"


def question_arrays(tokenizer, questions: list[str], max_length: int,
                    buckets=None) -> tuple[np.ndarray, np.ndarray]:
    enc = tk.encode_questions(tokenizer, questions, max_length, buckets)
    return enc["input_ids"], enc["attention_mask"]


def passage_arrays(tokenizer, titles: list[str], texts: list[str], max_length: int,
                   buckets=None) -> tuple[np.ndarray, np.ndarray]:
    enc = tk.encode_passages(tokenizer, titles, texts, max_length, buckets)
    return enc["input_ids"], enc["attention_mask"]


def _passage(ctx: dict) -> list[str]:
    return [ctx.get("title") or "", ctx.get("text") or ""]


def dpr_record(raw, where: str) -> dict | None:
    """A DPR training example as the prepared dataset keeps it; None for one without a positive passage
    (DPR skips those)."""
    if not isinstance(raw, dict) or "question" not in raw:
        raise ValueError(f"{where}: the example has no 'question' field")
    if not raw.get("positive_ctxs"):
        return None
    pool = raw.get("hard_negative_ctxs") or raw.get("negative_ctxs") or []
    return {"question": raw["question"], "positive": _passage(raw["positive_ctxs"][0]),
            "negatives": [_passage(c) for c in pool]}


def dpr_records(path, cache_dir=None):
    """The examples of a DPR training file (raw JSON/JSONL or prepared ``.arrayrecord``) by index."""
    if cache_dir is not None:
        return prepared_records(path, FORMAT, dpr_record, cache_dir, "DPR training data")
    out = [dpr_record(r, f"{path}: example {i}") for i, r in enumerate(read_json_records(path, "DPR training data"))]
    return [r for r in out if r is not None]


def length_buckets(buckets, max_length: int) -> tuple[int, ...] | None:
    """The buckets up to ``max_length``, which is always one (the longest rows are cut there); None: pad to it."""
    if not buckets:
        return None
    return tuple(sorted({b for b in buckets if b < max_length} | {max_length}))


class DPRData:
    """DPR's bi-encoder examples by index, tokenised per batch (the hard negatives are sampled per epoch, as in
    DPR). ``question_buckets`` / ``passage_buckets``: each side is padded to the smallest of its own buckets
    that holds the batch's longest row (questions are short: padding them to the passage length wastes most of
    the question encoder)."""

    def __init__(self, path: str, tokenizer, *, max_question_length: int, max_passage_length: int,
                 hard_negatives: int, cache_dir=None, question_buckets=None, passage_buckets=None):
        self.examples = dpr_records(path, cache_dir)
        if not len(self.examples):
            raise ConfigError(f"{path}: no example has a positive passage ('positive_ctxs')")
        self.path, self.tokenizer = path, tokenizer
        self.lq, self.lp, self.hard_negatives = max_question_length, max_passage_length, hard_negatives
        self.q_buckets = length_buckets(question_buckets, max_question_length)
        self.p_buckets = length_buckets(passage_buckets, max_passage_length)

    def __len__(self):
        return len(self.examples)

    def _negatives(self, i: int, ex: dict, rng: np.random.Generator) -> list[list[str]]:
        pool = ex["negatives"]
        if not pool:  # no negatives of its own: other questions' positives stand in
            pool = [self.examples[int(j)]["positive"] for j in
                    rng.choice(len(self.examples), size=min(self.hard_negatives + 1, len(self.examples)),
                               replace=False) if int(j) != i]
        picks = rng.permutation(len(pool))[:self.hard_negatives]
        picks = np.resize(picks, self.hard_negatives)  # fewer negatives than asked: repeat them
        return [pool[int(k)] for k in picks]

    def make_batch(self, idx: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        questions, titles, texts = [], [], []
        for i, example_rng in zip(idx, example_rngs(rng, idx)):
            ex = self.examples[int(i)]
            questions.append(ex["question"])
            passages = [ex["positive"]]
            if self.hard_negatives:
                passages += self._negatives(int(i), ex, example_rng)
            for title, text in passages:
                titles.append(title)
                texts.append(text)
        q_ids, q_mask = question_arrays(self.tokenizer, questions, self.lq, self.q_buckets)
        p_ids, p_mask = passage_arrays(self.tokenizer, titles, texts, self.lp, self.p_buckets)
        per = 1 + self.hard_negatives
        return {"q_input_ids": q_ids, "q_attention_mask": q_mask, "p_input_ids": p_ids,
                "p_attention_mask": p_mask, "positive_index": (np.arange(len(idx)) * per).astype(np.int32)}

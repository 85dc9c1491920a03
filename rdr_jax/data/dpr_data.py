"""DPR's bi-encoder training data: a JSON list of ``{question, answers, positive_ctxs, negative_ctxs,
hard_negative_ctxs}``, tokenised per batch with DPR's layout (question ``[CLS] q [SEP]``, passage
``[CLS] title [SEP] text [SEP]``), hard negatives sampled per epoch as DPR does."""

from __future__ import annotations

import numpy as np

from rdr_jax.data import tokenization as tk
from rdr_jax.data.files import read_json_records


def question_arrays(tokenizer, questions: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    enc = tk.encode_questions(tokenizer, questions, max_length)
    return enc["input_ids"], enc["attention_mask"]


def passage_arrays(tokenizer, titles: list[str], texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    enc = tk.encode_passages(tokenizer, titles, texts, max_length)
    return enc["input_ids"], enc["attention_mask"]


def _passage(ctx: dict) -> tuple[str, str]:
    return ctx.get("title") or "", ctx.get("text") or ""


class DPRData:
    """DPR's bi-encoder JSON, tokenised per batch (the hard negatives are sampled per epoch, as in DPR)."""

    def __init__(self, path: str, tokenizer, *, max_question_length: int, max_passage_length: int,
                 hard_negatives: int):
        records = read_json_records(path, "DPR training data")
        self.examples = []
        for i, r in enumerate(records):
            if not isinstance(r, dict) or "question" not in r:
                raise ValueError(f"{path}: example {i} has no 'question' field")
            if not r.get("positive_ctxs"):
                continue  # DPR skips questions without a positive passage
            self.examples.append(r)
        if not self.examples:
            raise ValueError(f"{path}: no example has a positive passage ('positive_ctxs')")
        self.path, self.tokenizer = path, tokenizer
        self.lq, self.lp, self.hard_negatives = max_question_length, max_passage_length, hard_negatives

    def __len__(self):
        return len(self.examples)

    def make_batch(self, idx: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        questions, titles, texts = [], [], []
        for i in idx:
            ex = self.examples[int(i)]
            questions.append(ex["question"])
            passages = [ex["positive_ctxs"][0]]
            pool = ex.get("hard_negative_ctxs") or ex.get("negative_ctxs") or []
            if self.hard_negatives:
                if not pool:  # no negatives of its own: other questions' positives stand in
                    pool = [self.examples[int(j)]["positive_ctxs"][0] for j in
                            rng.choice(len(self.examples), size=self.hard_negatives + 1, replace=False)
                            if int(j) != int(i)]
                picks = rng.permutation(len(pool))[:self.hard_negatives]
                picks = np.resize(picks, self.hard_negatives)  # fewer negatives than asked: repeat them
                passages += [pool[int(k)] for k in picks]
            for ctx in passages:
                title, text = _passage(ctx)
                titles.append(title)
                texts.append(text)
        q_ids, q_mask = question_arrays(self.tokenizer, questions, self.lq)
        p_ids, p_mask = passage_arrays(self.tokenizer, titles, texts, self.lp)
        per = 1 + self.hard_negatives
        return {"q_input_ids": q_ids, "q_attention_mask": q_mask, "p_input_ids": p_ids,
                "p_attention_mask": p_mask, "positive_index": (np.arange(len(idx)) * per).astype(np.int32)}

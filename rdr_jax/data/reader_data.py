"""DPR reader training data: per question the positive passage plus M-1 negatives (hard ones first), with the
answer spans found in the positive, from DPR's retriever-results JSON or its bi-encoder JSON."""

from __future__ import annotations

import logging

import numpy as np

from rdr_jax.data.batching import example_rngs
from rdr_jax.data.files import read_json_records
from rdr_jax.data.tokenization import encode_reader_inputs

log = logging.getLogger(__name__)


def find_spans(row_ids: np.ndarray, begin: int, end: int, answers_ids: list[list[int]], limit: int):
    """(start, end) token positions in ``row_ids[begin:end]`` where an answer's tokens occur, up to ``limit``."""
    spans = []
    segment = row_ids[begin:end].tolist()
    for ans in answers_ids:
        n = len(ans)
        if not n:
            continue
        for i in range(len(segment) - n + 1):
            if segment[i:i + n] == ans and (begin + i, begin + i + n - 1) not in spans:
                spans.append((begin + i, begin + i + n - 1))
                if len(spans) == limit:
                    return spans
    return spans


def from_retriever_results(record: dict) -> dict:
    """A retriever-results entry as a reader example, as DPR trains its reader: the first retrieved passage
    with the answer is the positive, the retrieved passages without it are the (hard) negatives."""
    ctxs = record.get("ctxs") or []
    return {"question": record.get("question"), "answers": record.get("answers") or [],
            "positive_ctxs": [c for c in ctxs if c.get("has_answer")][:1],
            "hard_negative_ctxs": [c for c in ctxs if not c.get("has_answer")], "negative_ctxs": []}


class ReaderData:
    """Reader training data: the positive plus M-1 negatives (hard ones first), from DPR's retriever results
    JSON (negatives = the retriever's own top passages without the answer, as DPR trains its reader) or
    from DPR's bi-encoder JSON (its hard negatives)."""

    def __init__(self, path: str, tokenizer, *, passages: int, max_length: int, max_spans: int):
        self.tokenizer, self.m, self.length, self.max_spans = tokenizer, passages, max_length, max_spans
        self.examples = []
        skipped = 0
        for r in read_json_records(path, "reader training data"):
            if "ctxs" in r and "positive_ctxs" not in r:
                r = from_retriever_results(r)
            if not r.get("positive_ctxs") or not r.get("answers"):
                skipped += 1
                continue
            self.examples.append(r)
        if not self.examples:
            raise ValueError(f"{path}: no example has a positive passage and answers")
        if skipped:
            log.info("%s: skipped %d examples without a positive passage or answers", path, skipped)

    def __len__(self):
        return len(self.examples)

    def _passages(self, i: int, rng: np.random.Generator) -> list[dict]:
        ex = self.examples[i]
        negatives = list(ex.get("hard_negative_ctxs") or []) + list(ex.get("negative_ctxs") or [])
        while len(negatives) < self.m - 1:  # too few negatives of its own: other questions' positives
            j = int(rng.integers(len(self.examples)))
            if j != i:
                negatives.append(self.examples[j]["positive_ctxs"][0])
        return [ex["positive_ctxs"][0]] + negatives[: self.m - 1]

    def make_batch(self, idx: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        b, s = len(idx), self.max_spans
        ids, masks, text_masks = [], [], []
        starts, ends, span_mask = (np.zeros((b, s), np.int32) for _ in range(3))
        # one generator per example (from the batch's seed and the example's index): a batch split over
        # processes draws the stand-in negatives one process does
        for row, (i, example_rng) in enumerate(zip(idx, example_rngs(rng, idx))):
            ex = self.examples[int(i)]
            ctxs = self._passages(int(i), example_rng)
            enc = encode_reader_inputs(self.tokenizer, ex["question"], [c.get("title") or "" for c in ctxs],
                                       [c["text"] for c in ctxs], self.length)
            positions = np.arange(self.length)[None, :]
            text = (positions >= enc["passage_start"][:, None]) & (enc["attention_mask"] == 1)
            answers_ids = self.tokenizer(list(ex["answers"]), add_special_tokens=False)["input_ids"]
            found = find_spans(enc["input_ids"][0], int(enc["passage_start"][0]),
                               int(enc["attention_mask"][0].sum()), answers_ids, s)
            for k, (st, en) in enumerate(found):
                starts[row, k], ends[row, k], span_mask[row, k] = st, en, 1
            ids.append(enc["input_ids"])
            masks.append(enc["attention_mask"])
            text_masks.append(text.astype(np.int32))
        return {"r_input_ids": np.concatenate(ids), "r_attention_mask": np.concatenate(masks),
                "text_mask": np.concatenate(text_masks), "span_starts": starts, "span_ends": ends,
                "span_mask": span_mask}

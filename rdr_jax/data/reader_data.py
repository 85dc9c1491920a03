"""DPR reader training data: per question the positive passage plus M-1 negatives (hard ones first), with the
answer spans found in the positive, from DPR's retriever-results JSON or its bi-encoder JSON.

The examples are read by index from a prepared dataset (:mod:`rdr_jax.data.records`, format ``reader``: per
question the question, its answers, the positive and the first ``max_negatives`` negatives, as ``[title, text]``
pairs), so a process holds none of the file (a retriever-results entry carries 100 passages; only the few a
batch uses are kept); ``cache_dir=None`` reads a small file whole instead (library use, the embedded data).
Stand-in negatives (other questions' positives, for a question with too few of its own) are drawn per example
from (seed, epoch, the example's index): a batch split over processes draws what one process would."""

from __future__ import annotations

import functools
import logging

import numpy as np

from rdr_jax.data.batching import example_rngs
from rdr_jax.data.files import read_json_records
from rdr_jax.data.records import RecordFile, is_prepared, prepared_records
from rdr_jax.data.tokenization import encode_reader_inputs
from rdr_jax.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = "reader"
# Negatives a prepared record keeps: DPR trains its reader with 24 passages per question (23 negatives); a run
# asking for more passages converts with more (data.passages_per_question - 1).
MAX_NEGATIVES = 32


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


def _passage(ctx: dict, where: str) -> list[str]:
    if not isinstance(ctx, dict) or ctx.get("text") is None:
        raise ValueError(f"{where}: a passage has no 'text' field")
    return [ctx.get("title") or "", ctx["text"]]


def reader_record(raw, where: str, max_negatives: int = MAX_NEGATIVES) -> dict | None:
    """A reader training example as the prepared dataset keeps it (a retriever-results entry converted as DPR
    trains its reader); None for one without a positive passage or answers (skipped)."""
    if not isinstance(raw, dict) or "question" not in raw:
        raise ValueError(f"{where}: the example has no 'question' field")
    if "ctxs" in raw and "positive_ctxs" not in raw:
        raw = from_retriever_results(raw)
    if not raw.get("positive_ctxs") or not raw.get("answers"):
        return None
    pool = list(raw.get("hard_negative_ctxs") or []) + list(raw.get("negative_ctxs") or [])
    return {"question": raw["question"], "answers": list(raw["answers"]),
            "positive": _passage(raw["positive_ctxs"][0], where),
            "negatives": [_passage(c, where) for c in pool[:max_negatives]]}


def reader_records(path, cache_dir=None, max_negatives: int = MAX_NEGATIVES):
    """The examples of a reader training file (raw JSON/JSONL or prepared ``.arrayrecord``) by index."""
    if cache_dir is not None or is_prepared(path):  # a prepared file is read as is
        convert = functools.partial(reader_record, max_negatives=max_negatives)
        return prepared_records(path, FORMAT, convert, cache_dir, "reader training data",
                                options=f"max_negatives={max_negatives}", meta={"max_negatives": max_negatives})
    out = [reader_record(r, f"{path}: example {i}", max_negatives)
           for i, r in enumerate(read_json_records(path, "reader training data"))]
    kept = [r for r in out if r is not None]
    if len(kept) < len(out):
        log.info("%s: skipped %d examples without a positive passage or answers", path, len(out) - len(kept))
    return kept


class ReaderData:
    """Reader training data: the positive plus M-1 negatives (hard ones first), from DPR's retriever results
    JSON (negatives = the retriever's own top passages without the answer, as DPR trains its reader) or
    from DPR's bi-encoder JSON (its hard negatives), or their prepared dataset (``rdr-jax prepare-data
    reader``). ``cache_dir``: where a raw file is converted once (None: read whole)."""

    def __init__(self, path: str, tokenizer, *, passages: int, max_length: int, max_spans: int, cache_dir=None):
        self.tokenizer, self.m, self.length, self.max_spans = tokenizer, passages, max_length, max_spans
        self.examples = reader_records(path, cache_dir, max(MAX_NEGATIVES, passages - 1))
        if not len(self.examples):
            raise ConfigError(f"{path}: no example has a positive passage and answers")
        kept = self.examples.meta.get("max_negatives") if isinstance(self.examples, RecordFile) else None
        if kept is not None and kept < passages - 1:
            raise ConfigError(f"{path}: keeps {kept} negatives per question but data.passages_per_question="
                              f"{passages} needs {passages - 1}; rebuild it with `rdr-jax prepare-data reader "
                              f"--max-negatives {passages - 1}`")

    def __len__(self):
        return len(self.examples)

    def _passages(self, i: int, ex: dict, rng: np.random.Generator) -> list[list[str]]:
        negatives = list(ex["negatives"])
        while len(negatives) < self.m - 1:  # too few negatives of its own: other questions' positives
            j = int(rng.integers(len(self.examples)))
            if j != i:
                negatives.append(self.examples[j]["positive"])
        return [ex["positive"]] + negatives[: self.m - 1]

    def make_batch(self, idx: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        b, s = len(idx), self.max_spans
        ids, masks, text_masks = [], [], []
        starts, ends, span_mask = (np.zeros((b, s), np.int32) for _ in range(3))
        # one generator per example (from the batch's seed and the example's index): a batch split over
        # processes draws the stand-in negatives one process does
        for row, (i, example_rng) in enumerate(zip(idx, example_rngs(rng, idx))):
            ex = self.examples[int(i)]
            ctxs = self._passages(int(i), ex, example_rng)
            enc = encode_reader_inputs(self.tokenizer, ex["question"], [c[0] for c in ctxs], [c[1] for c in ctxs],
                                       self.length)
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

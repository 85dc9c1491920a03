"""DPR reader inference over retrieved passages: answers (span selection) and teacher scores for RDR.

For each question the reader sees its top passages as ``[CLS] question [SEP] title [SEP] text`` rows of a
fixed length, so the jit-compiled forward has one shape.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from rdr_jax.data.tokenization import encode_reader_inputs
from rdr_jax.retrieval.answers import exact_match_score
from rdr_jax.retrieval.encode import ShardedRunner
from rdr_jax.retrieval.spans import ReaderSpanSelector


def _reader_outputs(out):
    return {"start_logits": out.start_logits.astype(jnp.float32), "end_logits": out.end_logits.astype(jnp.float32),
            "relevance_logits": out.relevance_logits.astype(jnp.float32)}


class ReaderRunner:
    """Runs a :class:`~rdr_jax.models.DPRReader` on one question's passages at a time."""

    def __init__(self, model, tokenizer, *, passages_per_question: int, max_length: int = 256,
                 max_answer_length: int = 10):
        self.tokenizer, self.passages, self.max_length = tokenizer, passages_per_question, max_length
        self.runner = ShardedRunner(model, _reader_outputs, passages_per_question)
        self.selector = ReaderSpanSelector(tokenizer, max_answer_length=max_answer_length)

    def run(self, question: str, ctxs: Sequence[dict]) -> tuple[dict, dict]:
        """(reader inputs, outputs) for the first ``passages_per_question`` ctxs."""
        ctxs = list(ctxs)[: self.passages]
        if not ctxs:
            raise ValueError(f"question {question!r} has no retrieved passages")
        inputs = encode_reader_inputs(self.tokenizer, question, [c["title"] for c in ctxs],
                                      [c["text"] for c in ctxs], self.max_length)
        return inputs, self.runner(inputs)

    def best_span_scores(self, inputs: dict, outputs: dict) -> np.ndarray:
        """Per passage, the score (start + end) of its best span of at most max_answer_length tokens."""
        scores = []
        for m in range(inputs["input_ids"].shape[0]):
            begin, end = self.selector.passage_segment(inputs["input_ids"][m], inputs["attention_mask"][m])
            start, stop = outputs["start_logits"][m, begin:end], outputs["end_logits"][m, begin:end]
            if end <= begin:
                scores.append(-np.inf)
                continue
            # span (i, j) with 0 <= j - i < max_answer_length: max over the band of start[i] + end[j]
            n, width = end - begin, self.selector.max_answer_length
            pair = start[:, None] + stop[None, :]
            i, j = np.indices((n, n))
            band = (j >= i) & (j - i < width)
            scores.append(float(pair[band].max()))
        return np.asarray(scores, np.float32)


def read_answers(runner: ReaderRunner, results: Iterable[dict], *, total: int | None = None,
                 progress: bool = True) -> Iterator[dict]:
    """The reader's answer for each question of DPR retriever results, with EM against its answers."""
    for r in tqdm(results, total=total, desc="reading", unit="q", disable=not progress):
        inputs, outputs = runner.run(r["question"], r["ctxs"])
        spans = runner.selector.select(inputs["input_ids"], outputs["start_logits"], outputs["end_logits"],
                                       outputs["relevance_logits"], inputs["attention_mask"])
        best = spans[0] if spans else None
        prediction = best.text if best else ""
        yield {"question": r["question"], "answers": r["answers"], "prediction": prediction,
               "span_score": best.span_score if best else None,
               "relevance_score": best.relevance_score if best else None,
               "passage_id": r["ctxs"][best.passage_index]["id"] if best else None,
               "exact_match": bool(exact_match_score(prediction, r["answers"])) if r["answers"] else None}


def teacher_score_rows(runner: ReaderRunner, results: Iterable[dict], *, total: int | None = None,
                       progress: bool = True) -> Iterator[dict]:
    """RDR's teacher: the reader's relevance logit (and best span score) for each retrieved passage."""
    for r in tqdm(results, total=total, desc="teacher scores", unit="q", disable=not progress):
        ctxs = r["ctxs"][: runner.passages]
        inputs, outputs = runner.run(r["question"], ctxs)
        yield {
            "question": r["question"],
            "answers": list(r["answers"]),
            "passage_ids": [c["id"] for c in ctxs],
            "titles": [c["title"] for c in ctxs],
            "texts": [c["text"] for c in ctxs],
            "has_answer": np.array([bool(c.get("has_answer", False)) for c in ctxs]),
            "retriever_scores": np.array([c["score"] for c in ctxs], np.float32),
            "relevance_logits": outputs["relevance_logits"].astype(np.float32),
            "span_scores": runner.best_span_scores(inputs, outputs),
        }


def teacher_scores_features():
    """TFDS schema of the RDR teacher-score dataset (one row per question)."""
    import tensorflow_datasets as tfds

    Text, ListOf = tfds.features.Text, tfds.features.Sequence
    vector = lambda dtype: tfds.features.Tensor(shape=(None,), dtype=dtype)
    return tfds.features.FeaturesDict({
        "question": Text(), "answers": ListOf(Text()), "passage_ids": ListOf(Text()), "titles": ListOf(Text()),
        "texts": ListOf(Text()), "has_answer": vector(np.bool_), "retriever_scores": vector(np.float32),
        "relevance_logits": vector(np.float32), "span_scores": vector(np.float32),
    })

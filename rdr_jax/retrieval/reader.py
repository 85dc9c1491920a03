"""DPR reader inference over retrieved passages: answers (span selection) and teacher scores for RDR.

For each question the reader sees its top passages as ``[CLS] question [SEP] title [SEP] text`` rows. A step
holds ``questions_per_step`` questions' rows; the shared :class:`~rdr_jax.retrieval.runner.InferenceRunner`
tokenises steps ahead on a thread pool, sorts each step's rows by length into batches padded to multiples of 32
tokens (at most ``max_length / 32`` compiled shapes), keeps two batches in flight over this process's devices,
and returns the outputs in row order. The teacher's best span score is computed on the device beside the
forward (:mod:`rdr_jax.retrieval.span_scores`), so only ``[rows]`` floats come back for ``teacher-scores``;
``read`` also fetches the span logits for DPR's host-side span selection.

Several processes (``jax.distributed``) split the questions: step ``s`` of process ``p`` reads question block
``s * processes + p``; each step's per-question results are gathered so that process 0 yields every question,
in the input order, and writes the one output.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from rdr_jax.data.token_rows import TokenRows, reader_rows
from rdr_jax.retrieval.answers import exact_match_score
from rdr_jax.retrieval.multihost import deal_and_merge
from rdr_jax.retrieval.runner import InferenceRunner, TokenizePool
from rdr_jax.retrieval.span_scores import best_span_scores
from rdr_jax.retrieval.spans import ReaderSpanSelector


class ReaderRunner:
    """Runs a :class:`~rdr_jax.models.DPRReader` over ``questions_per_step`` questions' passages per step.

    ``batch_size``: rows per device batch (default: a quarter of a step, at least one question's passages), so
    each step's rows sorted by length fill a few batches of similar length. ``devices``: this process's devices
    by default (``jax.local_devices()``)."""

    def __init__(self, model, tokenizer, *, passages_per_question: int, max_length: int = 256,
                 max_answer_length: int = 10, questions_per_step: int = 1, batch_size: int | None = None,
                 devices: Sequence | None = None, tokenize_workers: int | None = None, measure_busy: bool = False):
        if tokenizer.sep_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the reader's tokenizer needs a [SEP] and a [PAD] token")
        self.model, self.tokenizer = model, tokenizer
        self.passages, self.max_length = passages_per_question, max_length
        self.questions_per_step = questions_per_step
        self.batch_size = batch_size or max(passages_per_question, questions_per_step * passages_per_question // 4)
        self.devices, self.measure_busy = devices, measure_busy
        self.selector = ReaderSpanSelector(tokenizer, max_answer_length=max_answer_length)
        self.pool = TokenizePool(tokenize_workers)
        self._runners: dict[bool, InferenceRunner] = {}

    def runner(self, logits: bool) -> InferenceRunner:
        """The runner of the teacher outputs (relevance logit, best span score), with the span logits too when
        ``logits`` (``read``); built on first use."""
        if logits not in self._runners:
            sep, width = self.tokenizer.sep_token_id, self.selector.max_answer_length

            def outputs(out, inputs):
                result = {"relevance_logits": out.relevance_logits.astype(jnp.float32),
                          "span_scores": best_span_scores(out.start_logits, out.end_logits, inputs["input_ids"],
                                                          inputs["attention_mask"], inputs["passage_start"], width,
                                                          sep)}
                if logits:
                    result["start_logits"] = out.start_logits.astype(jnp.float32)
                    result["end_logits"] = out.end_logits.astype(jnp.float32)
                return result

            self._runners[logits] = InferenceRunner(
                self.model, outputs, self.batch_size, devices=self.devices, pad_id=self.tokenizer.pad_token_id,
                per_token=("start_logits", "end_logits") if logits else (), extras=("passage_start",),
                measure_busy=self.measure_busy)
        return self._runners[logits]

    @property
    def shapes(self) -> set:
        """Every ``(rows, length)`` batch shape run so far (one compilation each)."""
        return set().union(*(r.stats.shapes for r in self._runners.values()))

    # ---- host side -----------------------------------------------------------------------------------------
    def tokenize(self, block: Sequence[dict]) -> TokenRows:
        """The rows of a block of retriever results: each question's first ``passages_per_question`` ctxs."""
        pairs = [(r["question"], c) for r in block for c in r["ctxs"][: self.passages]]
        return self.pool.rows(lambda part: reader_rows(self.tokenizer, [q for q, _ in part],
                                                       [c["title"] for _, c in part], [c["text"] for _, c in part],
                                                       self.max_length), pairs)

    def padded_inputs(self, rows: TokenRows, index: slice) -> dict[str, np.ndarray]:
        """``input_ids`` / ``attention_mask`` ``[n, max_length]`` and ``passage_start`` of some rows, as the host
        span selection reads them beside the per-token logits."""
        ids = rows.input_ids[index]
        out = {"input_ids": np.full((len(ids), self.max_length), self.tokenizer.pad_token_id, np.int32),
               "attention_mask": np.zeros((len(ids), self.max_length), np.int32),
               "passage_start": np.asarray(rows.extras["passage_start"][index])}
        for i, seq in enumerate(ids):
            out["input_ids"][i, :len(seq)] = seq
            out["attention_mask"][i, :len(seq)] = 1
        return out

    def run(self, question: str, ctxs: Sequence[dict]) -> tuple[dict, dict]:
        """(padded inputs, outputs with span logits) of one question's first ``passages_per_question`` ctxs."""
        ctxs = list(ctxs)[: self.passages]
        if not ctxs:
            raise ValueError(f"question {question!r} has no retrieved passages")
        block = [{"question": question, "ctxs": ctxs}]
        _, rows, outputs = next(self.steps(block, logits=True, process_index=0, process_count=1))
        return self.padded_inputs(rows, slice(0, len(ctxs))), outputs

    def steps(self, results: Iterable[dict], *, logits: bool = False, process_index: int | None = None,
              process_count: int | None = None) -> Iterator[tuple[list[dict], TokenRows, dict]]:
        """``(questions of the step, their rows, outputs [rows, ...])`` for this process's share of ``results``
        (question blocks dealt to processes in turn), in order."""
        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        mine = (block for b, block in enumerate(_batched(results, self.questions_per_step)) if b % count == index)
        return self.run_blocks(mine, logits=logits)

    def run_blocks(self, blocks: Iterable[list[dict]], *, logits: bool = False
                   ) -> Iterator[tuple[list[dict], TokenRows, dict]]:
        """``(block, its rows, outputs)`` for each block of questions, in order; the blocks are read and
        tokenised on the runner's producer thread, ahead of the devices."""
        def prepare(holder: dict) -> TokenRows:
            holder["rows"] = self.tokenize(holder["block"])
            return holder["rows"]

        chunks = ((holder, holder) for holder in ({"block": block} for block in blocks))
        for holder, outputs in self.runner(logits).map(chunks, max_length=self.max_length, prepare=prepare):
            yield holder["block"], holder["rows"], outputs

    def best_span_scores(self, inputs: dict, outputs: dict) -> np.ndarray:
        """Per row, the best span score (start + end, at most ``max_answer_length`` tokens) of the passage: the
        host-side reference of the device computation (``outputs`` with ``start_logits``/``end_logits``)."""
        scores = []
        for m in range(inputs["input_ids"].shape[0]):
            begin, end = self.selector.passage_segment(inputs["input_ids"][m], inputs["attention_mask"][m])
            if end <= begin:
                scores.append(-np.inf)
                continue
            start, stop = outputs["start_logits"][m, begin:end], outputs["end_logits"][m, begin:end]
            n, width = end - begin, self.selector.max_answer_length
            i, j = np.indices((n, n))
            band = (j >= i) & (j - i < width)
            scores.append(float((start[:, None] + stop[None, :])[band].max()))
        return np.asarray(scores, np.float32)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while block := list(itertools.islice(it, size)):
        yield block


def _answer(runner: ReaderRunner, r: dict, rows: TokenRows, outputs: dict, index: slice) -> dict:
    inputs = runner.padded_inputs(rows, index)
    spans = runner.selector.select(inputs["input_ids"], outputs["start_logits"][index],
                                   outputs["end_logits"][index], outputs["relevance_logits"][index],
                                   inputs["attention_mask"])
    best = spans[0] if spans else None
    prediction = best.text if best else ""
    return {"question": r["question"], "answers": r["answers"], "prediction": prediction,
            "span_score": best.span_score if best else None,
            "relevance_score": best.relevance_score if best else None,
            "passage_id": r["ctxs"][best.passage_index]["id"] if best else None,
            "exact_match": bool(exact_match_score(prediction, r["answers"])) if r["answers"] else None}


def _teacher_scores(runner: ReaderRunner, r: dict, rows: TokenRows, outputs: dict, index: slice) -> dict:
    return {"relevance_logits": outputs["relevance_logits"][index], "span_scores": outputs["span_scores"][index]}


def _merged(runner: ReaderRunner, results: Iterable[dict], per_question, *, logits: bool, desc: str,
            progress: bool) -> Iterator[tuple[dict, Any]]:
    """``(result, per_question(...))`` for every question, in input order, on process 0 (other processes yield
    nothing), streamed: blocks of ``questions_per_step`` questions are dealt to the processes in turn and each
    round's values gathered (:func:`~rdr_jax.retrieval.multihost.deal_and_merge`)."""
    p = runner.passages

    def compute(my_blocks):
        for block, rows, outputs in runner.run_blocks(my_blocks, logits=logits):
            ends = np.cumsum([min(len(r["ctxs"]), p) for r in block])
            yield [per_question(runner, r, rows, outputs, slice(end - min(len(r["ctxs"]), p), end))
                   for r, end in zip(block, ends)]

    bar = tqdm(desc=desc, unit="q", disable=not progress or jax.process_index() != 0)
    for r, value in deal_and_merge(_batched(results, runner.questions_per_step), compute):
        yield r, value
        bar.update(1)
    bar.close()


def read_answers(runner: ReaderRunner, results: Iterable[dict], *, progress: bool = True) -> Iterator[dict]:
    """The reader's answer for each question of DPR retriever results, with EM against its answers (every
    question on process 0, nothing on the others)."""
    for _, answer in _merged(runner, results, _answer, logits=True, desc="reading", progress=progress):
        yield answer


def teacher_score_rows(runner: ReaderRunner, results: Iterable[dict], *, progress: bool = True) -> Iterator[dict]:
    """RDR's teacher: the reader's relevance logit and best span score (computed on the device) for each
    retrieved passage; every question on process 0, nothing on the others."""
    p = runner.passages
    for r, scores in _merged(runner, results, _teacher_scores, logits=False, desc="teacher scores",
                             progress=progress):
        ctxs = r["ctxs"][:p]
        yield {
            "question": r["question"],
            "answers": list(r["answers"]),
            "passage_ids": [c["id"] for c in ctxs],
            "titles": [c["title"] for c in ctxs],
            "texts": [c["text"] for c in ctxs],
            "has_answer": np.array([bool(c.get("has_answer", False)) for c in ctxs]),
            "retriever_scores": np.array([c["score"] for c in ctxs], np.float32),
            "relevance_logits": np.asarray(scores["relevance_logits"], np.float32),
            "span_scores": np.asarray(scores["span_scores"], np.float32),
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

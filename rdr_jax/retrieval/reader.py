"""DPR reader inference over retrieved passages: answers (span selection) and teacher scores for RDR.

For each question the reader sees its top passages as ``[CLS] question [SEP] title [SEP] text`` rows. A step
holds ``questions_per_step`` questions (``questions_per_step x passages_per_question`` rows, data-parallel over
this process's devices) padded to the next multiple of 32 tokens of its longest row, so the jitted forward
compiles at most ``max_length / 32`` shapes. Tokenisation runs in a thread pool a few steps ahead (the fast
tokenizer releases the GIL), the next step is dispatched before the previous one's results are fetched, and
the teacher's best span score is computed on the device (:mod:`rdr_jax.retrieval.span_scores`), so the host
only tokenises and writes.

Several processes (``jax.distributed``) split the questions: step ``s`` of process ``p`` reads question block
``s * processes + p``; each step's per-question results are gathered so that process 0 yields every question,
in the input order, and writes the one output.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from rdr_jax.data.tokenization import encode_reader_inputs
from rdr_jax.retrieval.answers import exact_match_score
from rdr_jax.retrieval.multihost import allgather_objects
from rdr_jax.retrieval.span_scores import best_span_scores
from rdr_jax.retrieval.spans import ReaderSpanSelector

log = logging.getLogger(__name__)

LENGTH_STEP = 32          # rows are padded to a multiple of this: few shapes, <32 padded tokens per row
PREFETCH_STEPS = 3        # steps tokenised ahead of the device


class ReaderRunner:
    """Runs a :class:`~rdr_jax.models.DPRReader` on ``questions_per_step`` questions' passages per step.

    ``devices``: this process's devices by default (``jax.local_devices()``): every process runs its own rows.
    """

    def __init__(self, model, tokenizer, *, passages_per_question: int, max_length: int = 256,
                 max_answer_length: int = 10, questions_per_step: int = 1, devices: Sequence | None = None,
                 threads: int = 4):
        if tokenizer.sep_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the reader's tokenizer needs a [SEP] and a [PAD] token")
        self.tokenizer, self.passages, self.max_length = tokenizer, passages_per_question, max_length
        self.questions_per_step = questions_per_step
        self.selector = ReaderSpanSelector(tokenizer, max_answer_length=max_answer_length)
        self.threads = threads
        devices = list(devices or jax.local_devices())
        self.mesh = Mesh(np.array(devices), ("data",))
        rows = questions_per_step * passages_per_question
        self.rows = -(-rows // len(devices)) * len(devices)
        self._rows = NamedSharding(self.mesh, P("data"))
        graphdef, params = nnx.split(model)
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
        sep, width = tokenizer.sep_token_id, max_answer_length

        def forward(params, input_ids, attention_mask, passage_start, logits: bool):
            out = nnx.merge(graphdef, params)(input_ids, attention_mask)
            result = {"relevance_logits": out.relevance_logits.astype(jnp.float32),
                      "span_scores": best_span_scores(out.start_logits, out.end_logits, input_ids, attention_mask,
                                                      passage_start, width, sep)}
            if logits:
                result["start_logits"] = out.start_logits.astype(jnp.float32)
                result["end_logits"] = out.end_logits.astype(jnp.float32)
            return result

        self._forward = jax.jit(forward, static_argnames="logits")
        self.shapes: set[tuple[int, int]] = set()   # (rows, length) compiled so far

    # ---- host side -----------------------------------------------------------------------------------------
    def tokenize(self, questions: Sequence[str], ctxs: Sequence[Sequence[dict]]) -> dict[str, np.ndarray]:
        """Reader inputs for up to ``questions_per_step`` questions, ``passages_per_question`` rows each
        (missing passages and questions are empty rows), padded to a multiple of ``LENGTH_STEP`` tokens."""
        flat_q, titles, texts = [], [], []
        for question, passages in zip(questions, ctxs):
            passages = list(passages)[: self.passages]
            flat_q += [question] * len(passages)
            titles += [c["title"] for c in passages]
            texts += [c["text"] for c in passages]
        inputs = encode_reader_inputs(self.tokenizer, flat_q, titles, texts, self.max_length)
        real = int(inputs["attention_mask"].sum(1).max())
        length = min(self.max_length, -(-real // LENGTH_STEP) * LENGTH_STEP)
        out = {"input_ids": np.full((self.rows, length), self.tokenizer.pad_token_id, np.int32),
               "attention_mask": np.zeros((self.rows, length), np.int32),
               "passage_start": np.full((self.rows,), length, np.int32)}
        # question i's passages take rows i * passages_per_question onwards: fixed slots, so outputs reshape
        offset = 0
        for i, passages in enumerate(ctxs):
            count = min(len(passages), self.passages)
            slot = slice(i * self.passages, i * self.passages + count)
            out["input_ids"][slot] = inputs["input_ids"][offset:offset + count, :length]
            out["attention_mask"][slot] = inputs["attention_mask"][offset:offset + count, :length]
            out["passage_start"][slot] = inputs["passage_start"][offset:offset + count]
            offset += count
        out["attention_mask"][:, 0] = np.maximum(out["attention_mask"][:, 0], 1)  # empty rows stay well-defined
        return out

    def dispatch(self, inputs: dict[str, np.ndarray], *, logits: bool = False) -> dict:
        """Starts the forward of one tokenised step; returns device arrays (not waited on)."""
        shape = inputs["input_ids"].shape
        if shape not in self.shapes:
            self.shapes.add(shape)
            log.info("reader: compiling for %d rows x %d tokens (%d shape(s) so far)", *shape, len(self.shapes))
        arrays = [jax.device_put(inputs[k], self._rows) for k in ("input_ids", "attention_mask", "passage_start")]
        return self._forward(self.params, *arrays, logits=logits)

    def run(self, question: str, ctxs: Sequence[dict]) -> tuple[dict, dict]:
        """(reader inputs, outputs) of one question's first ``passages_per_question`` ctxs (one step)."""
        ctxs = list(ctxs)[: self.passages]
        if not ctxs:
            raise ValueError(f"question {question!r} has no retrieved passages")
        inputs = self.tokenize([question], [ctxs])
        outputs = jax.tree.map(np.asarray, self.dispatch(inputs, logits=True))
        n = len(ctxs)
        return ({k: v[:n] for k, v in inputs.items()}, {k: v[:n] for k, v in outputs.items()})

    def steps(self, results: Iterable[dict], *, logits: bool = False,
              process_index: int | None = None, process_count: int | None = None) -> Iterator[tuple]:
        """``(questions of this step, inputs, outputs)`` for this process's share of ``results``, in order:
        tokenised ``PREFETCH_STEPS`` ahead in a thread pool, each step dispatched before the previous one's
        outputs are fetched (two steps in flight). ``outputs`` are numpy, ``[rows, ...]``."""
        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        q = self.questions_per_step
        blocks = _batched(results, q)
        mine = (block for b, block in enumerate(blocks) if b % count == index)

        def prepare(block):
            return block, self.tokenize([r["question"] for r in block], [r["ctxs"] for r in block])

        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            pending = [pool.submit(prepare, b) for b in itertools.islice(mine, PREFETCH_STEPS)]
            in_flight = None
            while pending:
                block, inputs = pending.pop(0).result()
                nxt = next(mine, None)
                if nxt is not None:
                    pending.append(pool.submit(prepare, nxt))
                outputs = self.dispatch(inputs, logits=logits)
                if in_flight is not None:
                    yield _fetched(in_flight)
                in_flight = (block, inputs, outputs)
            if in_flight is not None:
                yield _fetched(in_flight)

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


def _fetched(step):
    block, inputs, outputs = step
    return block, inputs, jax.tree.map(np.asarray, outputs)


def _answer(runner: ReaderRunner, r: dict, inputs: dict, outputs: dict, rows: slice) -> dict:
    spans = runner.selector.select(inputs["input_ids"][rows], outputs["start_logits"][rows],
                                   outputs["end_logits"][rows], outputs["relevance_logits"][rows],
                                   inputs["attention_mask"][rows])
    best = spans[0] if spans else None
    prediction = best.text if best else ""
    return {"question": r["question"], "answers": r["answers"], "prediction": prediction,
            "span_score": best.span_score if best else None,
            "relevance_score": best.relevance_score if best else None,
            "passage_id": r["ctxs"][best.passage_index]["id"] if best else None,
            "exact_match": bool(exact_match_score(prediction, r["answers"])) if r["answers"] else None}


def _teacher_scores(runner: ReaderRunner, r: dict, inputs: dict, outputs: dict, rows: slice) -> dict:
    return {"relevance_logits": outputs["relevance_logits"][rows], "span_scores": outputs["span_scores"][rows]}


def _merged(runner: ReaderRunner, results: Sequence[dict], per_question, *, logits: bool, desc: str,
            progress: bool) -> Iterator[tuple[dict, Any]]:
    """``(result, per_question(...))`` for every question, in input order, on process 0 (other processes yield
    nothing). Each process runs its share (:meth:`ReaderRunner.steps`); after every step the per-question
    results of all processes are gathered (:func:`allgather_objects`), so every process calls the collective
    the same number of times, also past its own last step."""
    count, index = jax.process_count(), jax.process_index()
    q, p = runner.questions_per_step, runner.passages
    bar = tqdm(total=len(results), desc=desc, unit="q", disable=not progress or index != 0)
    mine = runner.steps(results, logits=logits, process_index=index, process_count=count)
    for s in range(math.ceil(len(results) / (q * count))):
        step = next(mine, None)
        local = []
        if step is not None:
            block, inputs, outputs = step
            local = [per_question(runner, r, inputs, outputs, slice(i * p, i * p + min(len(r["ctxs"]), p)))
                     for i, r in enumerate(block)]
        gathered = allgather_objects(local)   # process k holds block s * count + k
        if index == 0:
            first = s * q * count
            for r, value in zip(results[first:first + q * count], itertools.chain.from_iterable(gathered)):
                yield r, value
                bar.update(1)
    bar.close()


def read_answers(runner: ReaderRunner, results: Sequence[dict], *, progress: bool = True) -> Iterator[dict]:
    """The reader's answer for each question of DPR retriever results, with EM against its answers (every
    question on process 0, nothing on the others)."""
    for _, answer in _merged(runner, results, _answer, logits=True, desc="reading", progress=progress):
        yield answer


def teacher_score_rows(runner: ReaderRunner, results: Sequence[dict], *, progress: bool = True) -> Iterator[dict]:
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

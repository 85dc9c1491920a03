"""Re-ranking with a cross-encoder (BERT or DeBERTa-v2/v3 sequence classifier).

Each (query, passage) pair is tokenised as the model's tokenizer does for pairs —
``[CLS] query [SEP] passage [SEP]``, token types 0 / 1 where the model uses them — truncating only the
passage, and scored through the shared :class:`~rdr_jax.retrieval.runner.InferenceRunner`: blocks of pairs
tokenised ahead on a thread pool, sorted by length into batches padded to multiples of ``length_step`` tokens
(``ceil(max_length / length_step)`` compiled shapes), two batches in flight over this process's devices. The relevance score is one logit of the classifier: index 0 for one-logit cross-encoders (the
MS MARCO MiniLM models, xpmir's DeBERTa-v3), the positive class (index 1) for two-label classifiers.

Two inputs are re-ranked: a TREC-style run ``{qid: {docid: score}}`` with query and passage texts looked up
by id, and DPR's retriever-results JSON (each question's ``ctxs``), so answer recall can be compared before
and after. Only the top ``depth`` documents of a query are scored; the rest keep their first-stage order
below them, as is usual for re-ranking runs.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from rdr_jax.data.token_rows import TokenRows
from rdr_jax.data.tokenization import DEFAULT_BUCKETS, bucket_length, passage_text
from rdr_jax.retrieval.metrics import rank_documents
from rdr_jax.retrieval.multihost import deal_and_merge
from rdr_jax.retrieval.runner import DEFAULT_LENGTH_STEP, InferenceRunner, TokenizePool

# Pairs gathered before scoring: sorting a block by length keeps padding to the bucket small.
PAIRS_PER_BLOCK_FACTOR = 16


def default_label_index(num_labels: int) -> int:
    """The logit that scores relevance: the only one, or the positive class of a binary classifier."""
    if num_labels == 1:
        return 0
    if num_labels == 2:
        return 1
    raise ValueError(f"the classifier has {num_labels} labels; pass label_index to say which one scores "
                     "relevance")


class CrossEncoderScorer:
    """Scores (query, passage) pairs with a sequence-classification cross-encoder.

    ``model``: a :class:`~rdr_jax.models.BertForSequenceClassification` or
    :class:`~rdr_jax.models.DebertaV2ForSequenceClassification` (anything whose output has ``logits``
    ``[rows, num_labels]`` and whose ``config.labels`` gives ``num_labels``). Scoring pads batches to multiples of
    ``length_step`` (``buckets=()``: every batch to ``max_length``, one shape); ``buckets`` are the padded
    lengths of :meth:`tokenize`.
    """

    def __init__(self, model, tokenizer, batch_size: int = 64, max_length: int = 256,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, label_index: int | None = None, devices=None,
                 length_step: int = DEFAULT_LENGTH_STEP, tokenize_workers: int | None = None):
        num_labels = int(model.config.labels)
        if label_index is None:
            label_index = default_label_index(num_labels)
        if not 0 <= label_index < num_labels:
            raise ValueError(f"label_index {label_index} is out of range for a classifier with {num_labels} labels")
        positions = getattr(model.config, "max_position_embeddings", None)
        if getattr(model.config, "position_biased_input", True) and positions and max_length > positions:
            raise ValueError(f"max_length {max_length} exceeds the model's max_position_embeddings {positions}")
        special = tokenizer.num_special_tokens_to_add(pair=True)
        if max_length <= special + 1:
            raise ValueError(f"max_length {max_length} leaves no room for text after {special} special tokens")
        self.tokenizer, self.max_length, self.label_index = tokenizer, max_length, label_index
        self.buckets = sorted({b for b in buckets if b < max_length} | {max_length})
        self._special = special
        self.length_step = length_step if buckets else max_length
        self.runner = InferenceRunner(model, lambda out: out.logits[:, label_index].astype(jnp.float32), batch_size,
                                      devices=devices, length_step=self.length_step,
                                      pad_id=tokenizer.pad_token_id or 0)
        self.pool = TokenizePool(tokenize_workers)

    @property
    def batch_size(self) -> int:
        return self.runner.batch_size

    def tokenize(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, np.ndarray]:
        """Model inputs for the pairs, padded to the smallest bucket that holds the longest pair."""
        rows = self.pair_rows(queries, passages)
        return self._pad([{"input_ids": ids, "token_type_ids": types}
                          for ids, types in zip(rows.input_ids, rows.token_type_ids)])

    def rows(self, queries: Sequence[str], passages: Sequence[str]) -> TokenRows:
        """:meth:`pair_rows` split over the tokenizer thread pool."""
        return self.pool.rows(lambda part: self.pair_rows([q for q, _ in part], [p for _, p in part]),
                              list(zip(queries, passages)))

    def pair_rows(self, queries: Sequence[str], passages: Sequence[str]) -> TokenRows:
        """The pairs' token ids (unpadded) and token types.

        Only the passage is truncated; a query too long to leave room for any passage token is cut too
        (``longest_first``), rather than failing as the tokenizer's ``only_second`` does.
        """
        queries, passages = list(queries), list(passages)
        unique = list(dict.fromkeys(queries))  # a query repeats over its passages: tokenise it once
        query_length = dict(zip(unique, map(len, self.tokenizer(unique, add_special_tokens=False)["input_ids"])))
        too_long = [query_length[q] + self._special >= self.max_length for q in queries]
        rows: list[dict] = [{} for _ in queries]
        for strategy, wanted in (("only_second", False), ("longest_first", True)):
            picked = [i for i, flag in enumerate(too_long) if flag == wanted]
            if not picked:
                continue
            enc = self.tokenizer([queries[i] for i in picked], [passages[i] for i in picked],
                                 truncation=strategy, max_length=self.max_length)
            types = enc.get("token_type_ids") or [None] * len(picked)
            for j, i in enumerate(picked):
                rows[i] = {"input_ids": enc["input_ids"][j], "token_type_ids": types[j]}
        ids = [r["input_ids"] for r in rows]
        return TokenRows(ids, [r["token_type_ids"] if r["token_type_ids"] is not None else [0] * len(r["input_ids"])
                               for r in rows])

    def _pad(self, rows: list[dict]) -> dict[str, np.ndarray]:
        length = bucket_length([len(r["input_ids"]) for r in rows], self.buckets)
        ids = np.full((len(rows), length), self.tokenizer.pad_token_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        types = np.zeros((len(rows), length), np.int32)
        for row, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[row, :n], mask[row, :n] = r["input_ids"], 1
            if r["token_type_ids"] is not None:  # tokenizers without token types (RoBERTa-like) leave zeros
                types[row, :n] = r["token_type_ids"]
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def score(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        """Relevance scores (float32 ``[n]``) of the pairs ``(queries[i], passages[i])``, in input order.

        The runner sorts the pairs by length, so each batch pads little.
        """
        if len(queries) != len(passages):
            raise ValueError(f"score: {len(queries)} queries for {len(passages)} passages")
        if not len(queries):
            return np.zeros(0, np.float32)
        return self.runner(self.rows(queries, passages), self.max_length)


def _scores_below(reranked: Sequence[float], count: int) -> list[float]:
    """Scores for the documents below the re-ranking depth: strictly decreasing, all below the re-ranked
    ones, so any consumer that sorts by score keeps them in their first-stage order."""
    floor = float(min(reranked)) if len(reranked) else 0.0
    return [floor - (i + 1) for i in range(count)]


def _scored_blocks(scorer: CrossEncoderScorer, items: Iterable, pairs_of, bar):
    """Yields ``(item, scores)`` for each item of ``items``, ``pairs_of(item)`` giving its (query, [passage
    texts]), streamed. Items are scored together in blocks of about ``PAIRS_PER_BLOCK_FACTOR`` batches, so short
    lists share batches and the length sort has room to work; a block is tokenised on the runner's producer thread
    while the devices score the previous one. Several processes (``jax.distributed``) are dealt the blocks in
    turn and process 0 yields every item, in order (:func:`~rdr_jax.retrieval.multihost.deal_and_merge`; the
    other processes yield nothing)."""
    block_pairs = scorer.batch_size * PAIRS_PER_BLOCK_FACTOR

    def blocks():
        block, pairs = [], 0
        for item in items:
            query, texts = pairs_of(item)
            block.append((item, query, list(texts)))
            pairs += len(texts)
            if pairs >= block_pairs:
                yield block
                block, pairs = [], 0
        if block:
            yield block

    def prepare(block) -> TokenRows:
        return scorer.rows([q for _, q, texts in block for _ in texts], [t for _, _, texts in block for t in texts])

    def compute(my_blocks):
        for block, scores in scorer.runner.map(((b, b) for b in my_blocks), max_length=scorer.max_length,
                                               prepare=prepare):
            scores = scores.tolist() if scores is not None else []
            ends = np.cumsum([len(texts) for _, _, texts in block])
            yield [scores[end - len(texts):end] for (_, _, texts), end in zip(block, ends)]

    for (item, _, _), scores in deal_and_merge(blocks(), compute):
        yield item, scores
        bar.update(len(scores))


def rerank_run(scorer: CrossEncoderScorer, queries: Mapping[str, str], passages: Mapping[str, str | Mapping],
               run: Mapping[str, Mapping[str, float]], depth: int = 100, *, progress: bool = True
               ) -> dict[str, dict[str, float]]:
    """Re-rank the top ``depth`` documents of each query of ``run`` by the cross-encoder.

    ``queries``: qid -> text; ``passages``: docid -> text or {"title", "text"}; ``run``: qid -> {docid:
    first-stage score}, ranked as trec_eval ranks it. Returns a new run: the re-ranked documents with their
    cross-encoder scores, then the documents below ``depth`` in their first-stage order with scores below
    all of those.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    rankings = {qid: rank_documents(scores) for qid, scores in run.items()}
    missing_queries = [qid for qid in rankings if qid not in queries]
    if missing_queries:
        raise ValueError(f"{len(missing_queries)} queries of the run have no text (e.g. {missing_queries[:3]})")
    missing = sorted({d for ranking in rankings.values() for d in ranking[:depth] if d not in passages})
    if missing:
        raise ValueError(f"{len(missing)} documents of the run are not in the passages (e.g. {missing[:3]})")
    bar = tqdm(total=sum(min(depth, len(r)) for r in rankings.values()), desc="re-ranking", unit="pair",
               disable=not progress, smoothing=0.1)
    out: dict[str, dict[str, float]] = {}
    pairs_of = lambda item: (queries[item[0]], [passage_text(passages[d]) for d in item[1][:depth]])
    for (qid, ranking), scores in _scored_blocks(scorer, rankings.items(), pairs_of, bar):
        top, rest = ranking[:depth], ranking[depth:]
        out[qid] = dict(zip(top, scores)) | dict(zip(rest, _scores_below(scores, len(rest))))
    bar.close()
    return out


def rerank_results(scorer: CrossEncoderScorer, results: Iterable[Mapping], depth: int = 100, *,
                   total_pairs: int | None = None, progress: bool = True) -> list[dict]:
    """:func:`iter_reranked_results` as a list."""
    return list(iter_reranked_results(scorer, results, depth, total_pairs=total_pairs, progress=progress))


def iter_reranked_results(scorer: CrossEncoderScorer, results: Iterable[Mapping], depth: int = 100, *,
                          total_pairs: int | None = None, progress: bool = True) -> Iterator[dict]:
    """Re-rank each question's ``ctxs`` of DPR retriever results (same layout back), streamed.

    The top ``depth`` ctxs are scored with ``question`` against ``title text`` and sorted by that score
    (stable: ties keep their retrieval order); the ctxs below keep their order after them. ``score`` becomes
    the cross-encoder score (below-depth ctxs get scores under every re-ranked one) and the first-stage score
    is kept as ``retriever_score``.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    bar = tqdm(total=total_pairs, desc="re-ranking", unit="pair", disable=not progress, smoothing=0.1)
    pairs_of = lambda r: (r["question"], [passage_text(c) for c in r["ctxs"][:depth]])
    for r, scores in _scored_blocks(scorer, results, pairs_of, bar):
        top, rest = list(r["ctxs"][:depth]), list(r["ctxs"][depth:])
        order = sorted(range(len(top)), key=lambda i: -scores[i])
        below = _scores_below(scores, len(rest))
        ctxs = ([{**top[i], "score": scores[i], "retriever_score": top[i]["score"]} for i in order]
                + [{**c, "score": s, "retriever_score": c["score"]} for c, s in zip(rest, below)])
        yield {**r, "ctxs": ctxs}
    bar.close()

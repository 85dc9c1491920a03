"""DSI training data: indexing examples (passage text -> its identifier) and retrieval examples (question -> the
identifier of its gold passage), mixed in every batch from two resumable streams.

Nothing is held twice: the indexing side keeps the rows of the passages list (the task's one copy of the corpus)
that have an identifier and builds each text per batch; the retrieval side reads its questions by index from a
prepared dataset (:mod:`rdr_jax.data.records`, format ``seq2seq_index``: the question and its positive passage
ids; ``rdr-jax prepare-data seq2seq_index``, or converted once into a cache), keeping only the record numbers
of the questions whose gold passage has an identifier; ``cache_dir=None`` reads a small file whole instead.
Identifier targets are tokenised per batch (at set-up only their longest length is measured, when
``max_identifier_length`` is 0).

Multi-process: a global batch is its indexing rows then its retrieval rows; a process's block is its
contiguous share of those rows (:class:`MixedPlan`), so the blocks put together are the 1-process batch.
"""

from __future__ import annotations

import logging

import numpy as np

from rdr_jax.data.batching import BatchPlan, EpochIterator
from rdr_jax.data.files import iter_json_records, read_json_records, resolve_data_path
from rdr_jax.data.records import RecordFile, is_prepared, prepared_records
from rdr_jax.data.seq2seq_inputs import encode_inputs, pad_rows, tokenize_identifiers

log = logging.getLogger(__name__)

FORMAT = "seq2seq_index"
# Seed offset of the retrieval stream's permutation (its own order, independent of the indexing stream's).
QUERY_SEED_OFFSET = 7919


def query_record(raw, where: str) -> dict | None:
    """A retrieval example as the prepared dataset keeps it: the question and its positive passages' ids; None
    for one without a positive ``passage_id`` (skipped)."""
    if not isinstance(raw, dict) or "question" not in raw:
        raise ValueError(f"{where}: the example has no 'question' field")
    gold = [c.get("passage_id") for c in raw.get("positive_ctxs") or [] if isinstance(c, dict)]
    gold = [str(g) for g in gold if g is not None]
    return {"question": raw["question"], "positive_ids": gold} if gold else None


def query_records(path, cache_dir=None):
    """The retrieval examples of a DPR bi-encoder file (raw JSON/JSONL or prepared ``.arrayrecord``) by index."""
    if cache_dir is not None or is_prepared(path):  # a prepared file is read as is
        return prepared_records(path, FORMAT, query_record, cache_dir, "seq2seq_index training data")
    out = [query_record(r, f"{path}: example {i}")
           for i, r in enumerate(read_json_records(path, "seq2seq_index training data"))]
    return [r for r in out if r is not None]


def iter_questions(path):
    """The questions of a training file, streamed (the word tokenizer of a random model is built from them)."""
    path = resolve_data_path(path)
    if is_prepared(path):
        records = RecordFile(path, FORMAT)
        yield from (records[i]["question"] for i in range(len(records)))
        return
    for _, raw in iter_json_records(path):
        if isinstance(raw, dict):
            yield raw.get("question", "")


class IndexingData:
    """Indexing (passage -> identifier) and retrieval (question -> gold identifier) examples."""

    def __init__(self, passages: list[dict], train_file: str | None, mapping: dict[str, str], tokenizer, *,
                 max_input_length: int, max_identifier_length: int, index_with_title: bool, cache_dir=None):
        self.tokenizer, self.length, self.index_with_title = tokenizer, max_input_length, index_with_title
        self.passages, self.mapping = passages, mapping
        self.index_rows = np.fromiter((r for r, p in enumerate(passages) if p["id"] in mapping), np.int64)
        self.questions, query_rows = [], []
        if train_file:
            self.questions = query_records(train_file, cache_dir)
            query_rows = [r for r in range(len(self.questions)) if self._gold(r) is not None]
            if len(query_rows) < len(self.questions):
                log.info("%s: %d questions without a positive passage_id among the identifiers were skipped",
                         train_file, len(self.questions) - len(query_rows))
        self.query_rows = np.asarray(query_rows, np.int64)
        self.target_length = max_identifier_length or self._longest_identifier()

    def _gold(self, record: int) -> str | None:
        """The identifier of record ``record``'s first positive passage that has one."""
        return next((self.mapping[g] for g in self.questions[record]["positive_ids"] if g in self.mapping), None)

    def _index_identifier(self, i: int) -> str:
        return self.mapping[self.passages[int(self.index_rows[i])]["id"]]

    def _query_identifier(self, i: int) -> str:
        return self._gold(int(self.query_rows[i]))

    def _longest_identifier(self) -> int:
        """Tokens of the longest identifier a target can be (EOS included); 1 when there are none."""
        used = list(dict.fromkeys([self._index_identifier(i) for i in range(self.num_index)]
                                  + [self._query_identifier(i) for i in range(self.num_queries)]))
        step = 10_000   # tokenised a slice at a time: the token lists are not all held
        return max((len(ids) for s in range(0, len(used), step)
                    for ids in tokenize_identifiers(self.tokenizer, used[s:s + step])), default=1)

    @property
    def num_index(self) -> int:
        return len(self.index_rows)

    @property
    def num_queries(self) -> int:
        return len(self.query_rows)

    def index_text(self, i: int) -> str:
        p = self.passages[int(self.index_rows[i])]
        title = p["title"].strip()
        return f"{title} {p['text']}" if self.index_with_title and title else p["text"]

    def make_batch(self, index_idx: np.ndarray, query_idx: np.ndarray) -> dict[str, np.ndarray]:
        questions = [self.questions[int(self.query_rows[int(i)])]["question"] for i in query_idx]
        texts = [self.index_text(int(i)) for i in index_idx] + questions
        strings = [self._index_identifier(int(i)) for i in index_idx] + [self._query_identifier(int(i))
                                                                          for i in query_idx]
        ids, mask = encode_inputs(self.tokenizer, texts, self.length)
        targets = tokenize_identifiers(self.tokenizer, strings)
        t_ids, t_mask = pad_rows(targets, self.target_length, self.tokenizer.pad_token_id, "identifier")
        is_query = np.concatenate([np.zeros(len(index_idx), np.int32), np.ones(len(query_idx), np.int32)])
        return {"input_ids": ids, "attention_mask": mask, "target_ids": t_ids, "target_mask": t_mask,
                "is_query": is_query}


class MixedPlan:
    """Global batch ``step``: ``n_index`` indexing examples then ``n_query`` retrieval examples, each kind from
    its own per-epoch permutation (:class:`BatchPlan`). A process's block (``set_shard``) is its contiguous
    share of those rows, whatever their kind, so the blocks put together are the 1-process batch. Picklable."""

    def __init__(self, num_index: int, num_queries: int, n_index: int, n_query: int, seed: int, shuffle: bool):
        self.index = BatchPlan(num_index, n_index, seed, shuffle) if n_index else None
        self.query = BatchPlan(num_queries, n_query, seed + QUERY_SEED_OFFSET, shuffle) if n_query else None
        self.n_index, self.size = n_index, n_index + n_query
        self.shard_index, self.shard_count = 0, 1

    def set_shard(self, index: int, count: int) -> None:
        if self.size % count or not 0 <= index < count:
            raise ValueError(f"train.batch_size={self.size} cannot be split into {count} equal process shards "
                             f"(shard {index})")
        self.shard_index, self.shard_count = index, count

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's block of global batch ``step``: (indexing example numbers, retrieval example numbers)."""
        empty = np.zeros((0,), np.int64)
        index = self.index.batch(step)[0] if self.index else empty
        query = self.query.batch(step)[0] if self.query else empty
        per = self.size // self.shard_count
        lo, hi = self.shard_index * per, (self.shard_index + 1) * per
        return index[lo:hi], query[max(lo - self.n_index, 0):max(hi - self.n_index, 0)]

    def state(self, step: int) -> dict:
        return {"index": self.index.state(step) if self.index else None,
                "query": self.query.state(step) if self.query else None}

    def step_of(self, state: dict) -> int:
        """The batches handed out at ``state`` (both streams advance one batch per step)."""
        for name in ("index", "query"):
            plan = getattr(self, name)
            if plan is not None and state.get(name) is not None:
                return plan.step_of(state[name])
        return 0


class MixedIterator(EpochIterator):
    """Batches of ``n_index`` indexing + ``n_query`` retrieval examples (:class:`MixedPlan`), resumable exactly
    (state: each stream's epoch and position), split over processes with ``set_shard``, built ahead by
    ``workers`` grain processes when asked."""

    def __init__(self, data: IndexingData, n_index: int, n_query: int, seed: int, shuffle: bool,
                 workers: int = 0, prefetch: int = 2):
        plan = MixedPlan(data.num_index, data.num_queries, n_index, n_query, seed, shuffle)
        super().__init__(data.num_index + data.num_queries, n_index + n_query, seed, data.make_batch,
                         shuffle=shuffle, workers=workers, prefetch=prefetch, plan=plan)


class QueryDevSet:
    """Dev questions -> gold identifiers, for DevBatches."""

    def __init__(self, data: IndexingData):
        self.data = data

    def __len__(self):
        return self.data.num_queries

    def make_batch(self, idx, rng=None):
        return self.data.make_batch(np.zeros((0,), np.int64), idx)

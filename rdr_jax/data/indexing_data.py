"""DSI training data: indexing examples (passage text -> its identifier) and retrieval examples (question -> the
identifier of its gold passage), mixed in every batch from two resumable streams."""

from __future__ import annotations

import logging

import numpy as np

from rdr_jax.data.batching import EpochIterator
from rdr_jax.data.files import read_json_records
from rdr_jax.data.seq2seq_inputs import encode_inputs, pad_rows, tokenize_identifiers

log = logging.getLogger(__name__)


class IndexingData:
    """Indexing (passage -> identifier) and retrieval (question -> gold identifier) examples."""

    def __init__(self, passages: list[dict], train_file: str | None, mapping: dict[str, str], tokenizer, *,
                 max_input_length: int, max_identifier_length: int, index_with_title: bool):
        self.tokenizer, self.length = tokenizer, max_input_length
        self.index_texts, index_ids = [], []
        for p in passages:
            if p["id"] in mapping:
                title = p["title"].strip()
                self.index_texts.append(f"{title} {p['text']}" if index_with_title and title else p["text"])
                index_ids.append(mapping[p["id"]])
        self.questions, query_ids = [], []
        if train_file:
            skipped = 0
            for i, r in enumerate(read_json_records(train_file, "seq2seq_index training data")):
                if not isinstance(r, dict) or "question" not in r:
                    raise ValueError(f"{train_file}: example {i} has no 'question' field")
                gold = [c.get("passage_id") for c in r.get("positive_ctxs") or []]
                gold = [str(g) for g in gold if g is not None and str(g) in mapping]
                if not gold:
                    skipped += 1
                    continue
                self.questions.append(r["question"])
                query_ids.append(mapping[gold[0]])
            if skipped:
                log.info("%s: %d questions without a positive passage_id among the identifiers were skipped",
                         train_file, skipped)
        strings = list(dict.fromkeys(index_ids + query_ids))
        tokens = dict(zip(strings, tokenize_identifiers(tokenizer, strings)))
        self.index_targets = [tokens[s] for s in index_ids]
        self.query_targets = [tokens[s] for s in query_ids]
        longest = max(len(t) for t in tokens.values()) if tokens else 1
        self.target_length = max_identifier_length or longest

    def make_batch(self, index_idx: np.ndarray, query_idx: np.ndarray) -> dict[str, np.ndarray]:
        texts = [self.index_texts[int(i)] for i in index_idx] + [self.questions[int(i)] for i in query_idx]
        targets = [self.index_targets[int(i)] for i in index_idx] + [self.query_targets[int(i)] for i in query_idx]
        ids, mask = encode_inputs(self.tokenizer, texts, self.length)
        t_ids, t_mask = pad_rows(targets, self.target_length, self.tokenizer.pad_token_id, "identifier")
        is_query = np.concatenate([np.zeros(len(index_idx), np.int32), np.ones(len(query_idx), np.int32)])
        return {"input_ids": ids, "attention_mask": mask, "target_ids": t_ids, "target_mask": t_mask,
                "is_query": is_query}


class MixedIterator:
    """Batches of ``n_index`` indexing + ``n_query`` retrieval examples, each kind drawn from its own
    per-epoch permutation; the state of both streams makes resuming exact."""

    def __init__(self, data: IndexingData, n_index: int, n_query: int, seed: int, shuffle: bool):
        take = lambda idx, rng: idx
        self.data = data
        self.index = EpochIterator(len(data.index_texts), n_index, seed, take, shuffle) if n_index else None
        self.query = EpochIterator(len(data.questions), n_query, seed + 7919, take, shuffle) if n_query else None

    def __iter__(self):
        return self

    def __next__(self):
        empty = np.zeros((0,), np.int64)
        return self.data.make_batch(next(self.index) if self.index else empty,
                                    next(self.query) if self.query else empty)

    def get_state(self) -> dict:
        return {"index": self.index.get_state() if self.index else None,
                "query": self.query.get_state() if self.query else None}

    def set_state(self, state: dict) -> None:
        for name in ("index", "query"):
            if getattr(self, name) is not None and state.get(name) is not None:
                getattr(self, name).set_state(state[name])


class QueryDevSet:
    """Dev questions -> gold identifiers, for DevBatches."""

    def __init__(self, data: IndexingData):
        self.data = data

    def __len__(self):
        return len(self.data.questions)

    def make_batch(self, idx, rng=None):
        return self.data.make_batch(np.zeros((0,), np.int64), idx)

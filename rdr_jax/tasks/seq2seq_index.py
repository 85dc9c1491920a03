"""DSI-style training of a generative retriever (T5 / BART), and the pieces the generative tasks share.

A generative retriever maps a question to the identifier of a passage (an atomic id, a title, a semantic code;
see :mod:`rdr_jax.decoding.identifiers`). DSI (Tay et al., 2022) trains it on two kinds of example, mixed in
every batch:

- indexing:  passage text (``title text``)  -> the passage's identifier
- retrieval: question                       -> the identifier of its gold passage

with the teacher-forced cross-entropy of the identifier tokens (EOS included), averaged over the tokens of the
batch (transformers' ``labels`` loss). ``data.indexing_ratio`` is the share of indexing examples in a batch.

Batch (``B`` examples)::

    input_ids, attention_mask   [B, Ls]   passage text or question
    target_ids, target_mask     [B, Lt]   identifier tokens + EOS, padded
    is_query                    [B]       1 = retrieval example, 0 = indexing example (for the split metrics)

Data: the passages TSV (DPR layout ``id<TAB>text<TAB>title``) and DPR's bi-encoder training JSON whose
positive contexts carry ``passage_id`` (the embedded data does), or its prepared ``.arrayrecord`` dataset
(``rdr-jax prepare-data seq2seq_index``; a raw file is converted once into ``WORKDIR/data_cache``), whose
questions are read per batch by index. A process's share of a batch is its contiguous block of the batch's
rows (indexing rows first), so 2 processes train on the 1-process batches. Identifiers: ``data.identifiers_file`` (a
``passage_id<TAB>identifier`` TSV, :func:`~rdr_jax.decoding.identifiers.read_identifier_tsv`), else built
from the passages by ``data.identifier_kind`` (``atomic`` or ``title``) and written to
``WORKDIR/identifiers.tsv``. The export (``WORKDIR/final/retriever/``) holds the model, its tokenizer and
``identifiers.tsv``: what ``rdr-jax generate`` needs.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax.numpy as jnp
import numpy as np

from rdr_jax import losses
from rdr_jax.data.batching import DevBatches
from rdr_jax.data.indexing_data import IndexingData, MixedIterator, QueryDevSet, iter_questions
from rdr_jax.decoding.scoring import identifier_token_log_probs
from rdr_jax.tasks.generative import RETRIEVER, GenerativeTask, GeneratorModel, IdentifierData, identifier_mapping
from rdr_jax.training.config import ConfigError, TaskSection, option
from rdr_jax.training.task import register_task


@dataclasses.dataclass(frozen=True)
class IndexingDataConfig(IdentifierData):
    passages_file: str = option(doc="DPR passages TSV (id, text, title): the passages to index")
    train_file: str | None = option(None, doc="DPR bi-encoder JSON (or its `rdr-jax prepare-data seq2seq_index` "
                                              "dataset): questions with positive passage ids")
    dev_file: str | None = option(None)
    indexing_ratio: float = option(0.5, min=0.0, max=1.0, doc="share of indexing examples in a batch")
    max_input_length: int = option(128, min=4)
    index_with_title: bool = option(True)
    shuffle: bool = option(True)


@register_task
class Seq2SeqIndexTask(GenerativeTask):
    name = "seq2seq_index"
    question_field = "input_ids"
    token_mask_fields = ("attention_mask", "target_mask")

    @classmethod
    def config_sections(cls):
        return {"task": TaskSection, "model": GeneratorModel, "data": IndexingDataConfig}

    @classmethod
    def validate_config(cls, c):
        super().validate_config(c)
        if c.data.indexing_ratio < 1.0 and not c.data.train_file:
            raise ConfigError("'data.indexing_ratio' < 1 needs 'data.train_file' (questions with positive "
                              "passage ids) for the retrieval examples")

    def tokenizer_texts(self):
        texts = super().tokenizer_texts()
        if self.config.data.train_file:
            texts += list(iter_questions(self.config.data.train_file))
        return texts

    def _data(self, questions_file) -> IndexingData:
        d = self.config.data
        mapping = identifier_mapping(d, self.passages)
        self.identifiers_tsv()
        return IndexingData(self.passages, questions_file, mapping, self.tokenizer,
                            max_input_length=d.max_input_length, max_identifier_length=d.max_identifier_length,
                            index_with_title=d.index_with_title, cache_dir=self.data_cache)

    def split(self, batch_size: int) -> tuple[int, int]:
        n_index = int(round(batch_size * self.config.data.indexing_ratio))
        return n_index, batch_size - n_index

    def train_iterator(self, batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        n_index, n_query = self.split(batch_size)
        data = self._data(self.config.data.train_file if n_query else None)
        if not data.num_index:
            raise ValueError(f"{self.config.data.passages_file}: no passage has an identifier")
        if n_query and not data.num_queries:
            raise ValueError(f"{self.config.data.train_file}: no question has a positive passage with an identifier")
        return MixedIterator(data, n_index, n_query, seed, self.config.data.shuffle)

    def dev_batches(self, batch_size):
        if not self.config.data.dev_file:
            return None
        return DevBatches(QueryDevSet(self._data(self.config.data.dev_file)), batch_size)

    def step_flops(self, batch_shapes):
        return self.retriever_step_flops(*batch_shapes["input_ids"], *batch_shapes["target_ids"])

    def loss(self, model, batch, *, rngs, deterministic):
        retriever = getattr(model, RETRIEVER)
        hidden = retriever.encode(batch["input_ids"], batch["attention_mask"], rngs=rngs, deterministic=deterministic)
        token, correct = identifier_token_log_probs(retriever, hidden, batch["attention_mask"], batch["target_ids"],
                                                    batch["target_mask"], rngs=rngs, deterministic=deterministic)
        mask = batch["target_mask"].astype(bool)
        query = batch["is_query"].astype(bool)[:, None] & mask
        index = ~batch["is_query"].astype(bool)[:, None] & mask
        loss = losses.sequence_cross_entropy(token, mask)
        exact = jnp.all(correct | ~mask, axis=-1).astype(jnp.float32)   # every identifier token is the argmax
        return loss, {"query_loss": losses.sequence_cross_entropy(token, query),
                      "index_loss": losses.sequence_cross_entropy(token, index),
                      "token_accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(mask), 1),
                      "exact_match": jnp.mean(exact)}

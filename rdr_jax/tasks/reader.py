"""DPR reader training: passage relevance among M passages plus the marginal likelihood of the gold spans.

For each question the reader sees M passages, the positive first (``[CLS] question [SEP] title [SEP] text``).
Loss (DPR, Karpukhin et al. 2020, Sec. 6.1)::

    relevance:  -log softmax(relevance_logits)[0]                  over the question's M passages
    span:       -log sum_{(s, e) gold} p_start(s) * p_end(e)       over the positive passage's text tokens

Start/end probabilities are softmaxes over the positive passage's *text* tokens only (DPR takes them over the
whole row; restricting to the text is what span selection reads, and keeps padding out of the normaliser).

Batch (``B`` questions, ``M`` passages each, ``S`` gold-span slots)::

    r_input_ids, r_attention_mask   [B * M, L]
    text_mask                       [B * M, L]   1 on passage-text tokens
    span_starts, span_ends          [B, S]       token positions of the answer in the positive row
    span_mask                       [B, S]

Data: DPR's retriever-results JSON (the positive is the first retrieved passage with the answer, the negatives
the retrieved ones without it, as DPR trains its reader) or its bi-encoder JSON, or their prepared
``.arrayrecord`` dataset (``rdr-jax prepare-data reader``; a raw file is converted once into
``WORKDIR/data_cache``), read per batch by index (``data.workers`` grain processes build the batches ahead).
"""

from __future__ import annotations

import dataclasses

from rdr_jax import losses
from rdr_jax.data.reader_data import ReaderData
from rdr_jax.data.tokenization import load_tokenizer
from rdr_jax.models.bert import BertModel
from rdr_jax.models.dpr import DPRReader
from rdr_jax.tasks.model_setup import ModelSpec, model_dir, model_runtime_kwargs, resolve_path
from rdr_jax.training import model_flops as F
from rdr_jax.training.config import ConfigError, TaskSection, option
from rdr_jax.training.task import FileDataTask, ModelBundle, TrainFiles, register_task


@dataclasses.dataclass(frozen=True)
class ReaderSettings(TaskSection):
    span_weight: float = option(1.0, doc="weight of the gold spans' marginal likelihood")
    relevance_weight: float = option(1.0, doc="weight of the positive passage's relevance NLL")


@dataclasses.dataclass(frozen=True)
class ReaderModel(ModelSpec):
    reader: str | None = option(None, doc="a DPRReader or BERT checkpoint directory (BERT: fresh reader heads); "
                                          "default: a random reader from model.init")


@dataclasses.dataclass(frozen=True)
class ReaderDataConfig(TrainFiles):
    passages_per_question: int = option(4, min=1, doc="the positive and M-1 negatives")
    max_length: int = option(256, min=8)
    max_spans: int = option(4, min=1, doc="gold-span slots per question")


@register_task
class ReaderTask(FileDataTask):
    name = "reader"
    question_field = "span_starts"

    @classmethod
    def config_sections(cls):
        return {"task": ReaderSettings, "model": ReaderModel, "data": ReaderDataConfig}

    @classmethod
    def validate_config(cls, c):
        if not (c.model.reader or c.model.init):
            raise ConfigError("set 'model.reader' (a DPRReader or BERT checkpoint directory) or 'model.init' "
                              "(a BERT config dict for a random reader)")

    def __init__(self, config, workdir):
        super().__init__(config, workdir)
        self._tokenizer = None

    @property
    def reader_path(self) -> str:
        m = self.config.model
        return model_dir(m.reader, m, BertModel, self.workdir / "init" / "bert", self.config.train.seed,
                         what="a random reader")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(resolve_path(self.config.model.tokenizer) or self.reader_path)
        return self._tokenizer

    def build_model(self) -> ModelBundle:
        return self.bundle(reader=DPRReader.from_pretrained(self.reader_path,
                                                            **model_runtime_kwargs(self.config.model, self.mesh)))

    def trainable_submodules(self):
        return ("reader",)

    def step_flops(self, batch_shapes):
        config, compute = self.model_specs["reader"]
        return F.train_flops(F.dpr_reader(config, *batch_shapes["r_input_ids"]), trained=True, remat=F.recomputes_layers(compute))

    def loss(self, model, batch, *, rngs, deterministic):
        t = self.config.task
        out = model.reader(batch["r_input_ids"], batch["r_attention_mask"], rngs=rngs, deterministic=deterministic)
        num_q = batch["span_starts"].shape[0]
        m = out.relevance_logits.shape[0] // num_q
        reshape = lambda x: x.reshape((num_q, m) + x.shape[1:])
        relevance, span, metrics = losses.reader_losses(
            reshape(out.start_logits), reshape(out.end_logits), reshape(out.relevance_logits),
            reshape(batch["text_mask"]), batch["span_starts"], batch["span_ends"], batch["span_mask"])
        return t.relevance_weight * relevance + t.span_weight * span, metrics

    def _data(self, path) -> ReaderData:
        d = self.config.data
        return ReaderData(path, self.tokenizer, passages=d.passages_per_question, max_length=d.max_length,
                          max_spans=d.max_spans, cache_dir=self.data_cache)


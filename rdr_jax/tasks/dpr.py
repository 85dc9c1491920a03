"""DPR bi-encoder training: question and context encoders, NLL of the positive with in-batch negatives.

Batch (``B`` questions, ``P = 1 + hard_negatives`` passages per question, question ``i``'s positive at row
``i * P``)::

    q_input_ids, q_attention_mask   [B, Lq]
    p_input_ids, p_attention_mask   [B * P, Lp]
    positive_index                  [B]       row of the question's positive among the B * P passages

Data: DPR's bi-encoder training JSON (a list of ``{question, answers, positive_ctxs, negative_ctxs,
hard_negative_ctxs}``), or its prepared ``.arrayrecord`` dataset (``rdr-jax prepare-data dpr``; a raw file is
converted once into ``WORKDIR/data_cache``), read per batch by index and tokenised with the fast tokenizer of the model directory: question
``[CLS] q [SEP]``, passage ``[CLS] title [SEP] text [SEP]``, token types all 0 (as DPR's BertTensorizer).

Dev recall during training: see :mod:`rdr_jax.tasks.bi_encoder`.
"""

from __future__ import annotations

import dataclasses

from rdr_jax import losses
from rdr_jax.data.dpr_data import DPRData
from rdr_jax.models.dpr import DPRContextEncoder, DPRQuestionEncoder
from rdr_jax.tasks.bi_encoder import (BiEncoderData, BiEncoderTask, EncoderModel, encode,
                                      packed_tokens)
from rdr_jax.tasks.model_setup import model_runtime_kwargs
from rdr_jax.training import model_flops as F
from rdr_jax.training.config import ConfigError, TaskSection, option
from rdr_jax.training.task import ModelBundle, register_task


def dpr_step_flops(q_config, c_config, questions: int, q_len: int, passages: int, p_len: int, *,
                   train_question: bool = True, train_context: bool = True, remat: bool = False,
                   q_tokens: int | None = None, p_tokens: int | None = None, micro_batches: int = 1,
                   grad_cache: bool = False) -> float:
    """FLOPs of one DPR step: both encoders ([CLS] only in their last layer), 3 x forward each when trained
    (1 x when frozen), and the in-batch score matrix ``q @ p^T`` (per micro-batch: ``1 / micro_batches`` of
    it), whose backward has one matmul per trained side. ``*_tokens``: packed rows under ``model.unpad``.
    ``grad_cache``: a trained encoder's forward runs twice (``train.grad_cache_chunk``).
    ``benchmarks.common.dpr_step_flops`` is this function."""
    q = F.dpr_encoder(q_config, questions, q_len, tokens=q_tokens)
    p = F.dpr_encoder(c_config, passages, p_len, tokens=p_tokens)
    scores = F.matmul(questions, F.embedding_dim(q_config), passages) / micro_batches
    return (F.train_flops(q, trained=train_question, remat=remat)
            + F.train_flops(p, trained=train_context, remat=remat)
            + scores * (1 + train_question + train_context)
            + grad_cache * (train_question * q.total + train_context * p.total))


@dataclasses.dataclass(frozen=True)
class DPRSettings(TaskSection):
    train_question_encoder: bool = option(True)
    train_context_encoder: bool = option(True)

    def check(self) -> None:
        if not (self.train_question_encoder or self.train_context_encoder):
            raise ConfigError("'task.train_question_encoder' and 'task.train_context_encoder' are both false: "
                              "nothing would train")


@dataclasses.dataclass(frozen=True)
class DPRDataConfig(BiEncoderData):
    hard_negatives: int = option(1, min=0, doc="hard negatives per question (sampled per epoch)")
    question_buckets: list[int] = option([16, 32, 64, 128], min=1,
                                         doc="padded question lengths (up to max_question_length, always one): "
                                             "a batch is padded to the smallest that holds its longest question")
    passage_buckets: list[int] = option([], min=1, doc="the same for passages; [] pads to max_passage_length")


@register_task
class DPRTask(BiEncoderTask):
    name = "dpr"
    index_fields = {"positive_index": "p_input_ids"}

    @classmethod
    def config_sections(cls):
        return {"task": DPRSettings, "model": EncoderModel, "data": DPRDataConfig}

    def build_model(self) -> ModelBundle:
        q_path, c_path, _ = self.paths()
        kw = model_runtime_kwargs(self.config.model, self.mesh)
        return self.bundle(question_encoder=DPRQuestionEncoder.from_pretrained(q_path, **kw),
                           context_encoder=DPRContextEncoder.from_pretrained(c_path, **kw))

    def trainable_submodules(self):
        t = self.config.task
        return tuple(n for n, on in (("question_encoder", t.train_question_encoder),
                                     ("context_encoder", t.train_context_encoder)) if on)

    def step_flops(self, batch_shapes):
        (q_config, compute), (c_config, _) = self.model_specs["question_encoder"], self.model_specs["context_encoder"]
        trained = self.trainable_submodules()
        return dpr_step_flops(q_config, c_config, *batch_shapes["q_input_ids"], *batch_shapes["p_input_ids"],
                              train_question="question_encoder" in trained, train_context="context_encoder" in trained,
                              remat=F.recomputes_layers(compute), q_tokens=packed_tokens(batch_shapes, "q_"),
                              p_tokens=packed_tokens(batch_shapes, "p_"),
                              micro_batches=self.config.train.grad_accum_steps,
                              grad_cache=bool(self.config.train.grad_cache_chunk))

    def embed(self, model, batch, *, rngs, deterministic):
        train_ctx = "context_encoder" in self.trainable_submodules()
        q = encode(model.question_encoder, batch["q_input_ids"], batch["q_attention_mask"], rngs=rngs,
                   deterministic=deterministic, packing=self.packing(batch, "q_"))
        p = encode(model.context_encoder, batch["p_input_ids"], batch["p_attention_mask"], rngs=rngs,
                   deterministic=deterministic or not train_ctx, packing=self.packing(batch, "p_"))
        return {"q": q, "p": p}

    def loss_from_embeddings(self, model, batch, embeddings, targets):
        scores = losses.dot_scores(embeddings["q"], embeddings["p"])
        positive = batch["positive_index"]
        loss = losses.dpr_nll_from_scores(scores, positive)
        return loss, {"accuracy": losses.in_batch_accuracy(scores, positive)}

    def loss(self, model, batch, *, rngs, deterministic):
        return self.embed_loss(model, batch, rngs=rngs, deterministic=deterministic)

    def _data(self, path) -> DPRData:
        d = self.config.data
        return DPRData(path, self.tokenizer, max_question_length=d.max_question_length,
                       max_passage_length=d.max_passage_length, hard_negatives=d.hard_negatives,
                       cache_dir=self.data_cache, question_buckets=d.question_buckets,
                       passage_buckets=d.passage_buckets)


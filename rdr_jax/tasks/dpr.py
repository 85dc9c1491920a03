"""DPR bi-encoder training: question and context encoders, NLL of the positive with in-batch negatives.

Batch (``B`` questions, ``P = 1 + hard_negatives`` passages per question, question ``i``'s positive at row
``i * P``)::

    q_input_ids, q_attention_mask   [B, Lq]
    p_input_ids, p_attention_mask   [B * P, Lp]
    positive_index                  [B]       row of the question's positive among the B * P passages

Data: DPR's bi-encoder training JSON (a list of ``{question, answers, positive_ctxs, negative_ctxs,
hard_negative_ctxs}``), tokenised with the fast tokenizer of the model directory: question
``[CLS] q [SEP]``, passage ``[CLS] title [SEP] text [SEP]``, token types all 0 (as DPR's BertTensorizer).

Dev recall during training: see :mod:`rdr_jax.tasks.bi_encoder`.
"""

from __future__ import annotations

import dataclasses

from rdr_jax import losses
from rdr_jax.data.dpr_data import DPRData
from rdr_jax.models.dpr import DPRContextEncoder, DPRQuestionEncoder
from rdr_jax.tasks.bi_encoder import BiEncoderData, BiEncoderTask, EncoderModel, batch_packing, encode
from rdr_jax.tasks.model_setup import model_runtime_kwargs
from rdr_jax.training.config import ConfigError, TaskSection, option
from rdr_jax.training.task import ModelBundle, register_task


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


@register_task
class DPRTask(BiEncoderTask):
    name = "dpr"
    index_fields = {"positive_index": "p_input_ids"}

    @classmethod
    def config_sections(cls):
        return {"task": DPRSettings, "model": EncoderModel, "data": DPRDataConfig}

    def build_model(self) -> ModelBundle:
        q_path, c_path, _ = self.paths()
        kw = model_runtime_kwargs(self.config.model)
        return ModelBundle(question_encoder=DPRQuestionEncoder.from_pretrained(q_path, **kw),
                           context_encoder=DPRContextEncoder.from_pretrained(c_path, **kw))

    def trainable_submodules(self):
        t = self.config.task
        return tuple(n for n, on in (("question_encoder", t.train_question_encoder),
                                     ("context_encoder", t.train_context_encoder)) if on)

    def loss(self, model, batch, *, rngs, deterministic):
        train_ctx = "context_encoder" in self.trainable_submodules()
        q = encode(model.question_encoder, batch["q_input_ids"], batch["q_attention_mask"], rngs=rngs,
                   deterministic=deterministic, packing=batch_packing(batch, "q_"))
        p = encode(model.context_encoder, batch["p_input_ids"], batch["p_attention_mask"], rngs=rngs,
                   deterministic=deterministic or not train_ctx, packing=batch_packing(batch, "p_"))
        scores = losses.dot_scores(q, p)
        positive = batch["positive_index"]
        loss = losses.dpr_nll_from_scores(scores, positive)
        return loss, {"accuracy": losses.in_batch_accuracy(scores, positive)}

    def _data(self, path) -> DPRData:
        d = self.config.data
        return DPRData(path, self.tokenizer, max_question_length=d.max_question_length,
                       max_passage_length=d.max_passage_length, hard_negatives=d.hard_negatives)


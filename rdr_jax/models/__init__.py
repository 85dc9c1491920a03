"""Model families. Importing this module registers every class for :func:`rdr_jax.from_pretrained`."""

from rdr_jax.models.base import MODEL_CLASSES, PretrainedModel, from_pretrained
from rdr_jax.models.bert import BertConfig, BertForSequenceClassification, BertModel
from rdr_jax.models.dpr import DPRConfig, DPRContextEncoder, DPRQuestionEncoder, DPRReader
from rdr_jax.models.deberta_v2 import DebertaV2Config, DebertaV2ForSequenceClassification, DebertaV2Model
from rdr_jax.models.t5 import T5Config, T5ForConditionalGeneration
from rdr_jax.models.bart import BartConfig, BartForConditionalGeneration

__all__ = [
    "MODEL_CLASSES", "PretrainedModel", "from_pretrained",
    "BertConfig", "BertModel", "BertForSequenceClassification",
    "DPRConfig", "DPRQuestionEncoder", "DPRContextEncoder", "DPRReader",
    "DebertaV2Config", "DebertaV2Model", "DebertaV2ForSequenceClassification",
    "T5Config", "T5ForConditionalGeneration", "BartConfig", "BartForConditionalGeneration",
]

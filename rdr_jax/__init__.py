"""rdr_jax: retrieval models for open-domain QA and passage ranking in JAX/Flax NNX.

    import rdr_jax
    model = rdr_jax.from_pretrained("path/to/hf_dir")
    out = model(input_ids=..., attention_mask=...)
    model.save_pretrained("out_dir")                   # Hugging Face format
    model.save_pretrained("out_dir", format="orbax")   # native checkpoint
"""

from rdr_jax import models
from rdr_jax.models import (BartForConditionalGeneration, BertForSequenceClassification, BertModel,
                            DebertaV2ForSequenceClassification, DebertaV2Model, DPRContextEncoder, DPRQuestionEncoder, DPRReader, T5ForConditionalGeneration,
                            from_pretrained)

__version__ = "0.1.0"

__all__ = ["from_pretrained", "models", "BertModel", "BertForSequenceClassification", "DPRQuestionEncoder",
           "DPRContextEncoder", "DPRReader", "DebertaV2Model", "DebertaV2ForSequenceClassification",
           "T5ForConditionalGeneration", "BartForConditionalGeneration",
           "__version__"]

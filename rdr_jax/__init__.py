"""rdr_jax: retrieval models for open-domain QA and passage ranking in JAX/Flax NNX.

    import rdr_jax
    model = rdr_jax.from_pretrained("path/to/hf_dir")
    out = model(input_ids=..., attention_mask=...)
    model.save_pretrained("out_dir")                   # Hugging Face format
    model.save_pretrained("out_dir", format="orbax")   # native checkpoint
"""

import importlib

# Resolved on first use (PEP 562), so that ``import rdr_jax``, ``import rdr_jax.runtime`` or the ``rdr-jax``
# launcher does not load JAX before it has set the process up. ``rdr_jax.decoding.PrefixTrie`` etc. work after a
# bare ``import rdr_jax``: each subpackage (or module: ``losses``) is imported when first named.
_SUBMODULES = ("models", "decoding", "data", "retrieval", "training", "tasks", "convert", "losses",
               "ranking_losses")
_MODEL_NAMES = ("from_pretrained", "BertModel", "BertForSequenceClassification", "DPRQuestionEncoder",
                "DPRContextEncoder", "DPRReader", "DebertaV2Model", "DebertaV2ForSequenceClassification",
                "T5ForConditionalGeneration", "BartForConditionalGeneration")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"rdr_jax.{name}")   # also binds it here: later lookups skip this
    if name in _MODEL_NAMES:
        return getattr(importlib.import_module("rdr_jax.models"), name)
    raise AttributeError(f"module 'rdr_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_MODEL_NAMES))


__version__ = "0.1.0"

__all__ = ["from_pretrained", *_SUBMODULES, "BertModel", "BertForSequenceClassification", "DPRQuestionEncoder",
           "DPRContextEncoder", "DPRReader", "DebertaV2Model", "DebertaV2ForSequenceClassification",
           "T5ForConditionalGeneration", "BartForConditionalGeneration",
           "__version__"]

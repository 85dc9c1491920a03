"""DPR question encoder, context encoder and reader, exact to transformers' DPR classes.

The encoders' embedding is the [CLS] hidden state (``pooler_output``), followed by ``encode_proj`` when
``projection_dim > 0``. The reader scores start/end per token and relevance per passage.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from rdr_jax.convert.mapping import linear
from rdr_jax.models import layers as L
from rdr_jax.models.base import PretrainedModel, register
from rdr_jax.models.bert import BertConfig, BertEncoderStack, bert_body_rules
from rdr_jax.models.config import ComputeSettings
from rdr_jax.models.outputs import BaseModelOutputWithPooling, DPRReaderOutput


@dataclasses.dataclass
class DPRConfig(BertConfig):
    model_type = "dpr"
    projection_dim: int = 0


class DPREncoder(nnx.Module):
    def __init__(self, config: DPRConfig, rt: ComputeSettings, *, rngs: nnx.Rngs):
        self.bert_model = BertEncoderStack(config, rt, add_pooling_layer=False, rngs=rngs)
        self.encode_proj = (L.Dense(config.hidden_size, config.projection_dim, (L.EMBED,), (L.MLP,),
                                    dtype=rt.dtype, param_dtype=rt.param_dtype,
                                    init_std=config.initializer_range, rngs=rngs)
                            if config.projection_dim > 0 else None)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, **kw) -> BaseModelOutputWithPooling:
        out = self.bert_model(input_ids, attention_mask, token_type_ids, **kw)
        pooled = out.last_hidden_state[:, 0]
        if self.encode_proj is not None:
            pooled = self.encode_proj(pooled)
        return out.replace(pooler_output=pooled)


def dpr_encoder_rules(config: DPRConfig, hf: str, jx: str):
    rules = bert_body_rules(config, f"{hf}bert_model.", f"{jx}bert_model.", pooler=False)
    if config.projection_dim > 0:
        rules += linear(f"{hf}encode_proj", f"{jx}encode_proj")
    return rules


class _DPRBase(PretrainedModel):
    config_class = DPRConfig
    supports_packing = True
    # transformers' DPR body has no pooler; checkpoints converted from BertModel may still carry one.
    hf_ignore_unexpected = ("*position_ids", "*bert_model.pooler.*")

    def __init__(self, config: DPRConfig, *, rngs: nnx.Rngs, **compute):
        """``compute``: the :class:`ComputeSettings` fields (dtype, param_dtype, remat, remat_policy,
        scan_layers)."""
        self.config = config
        self.compute = ComputeSettings(**compute)

    @classmethod
    def config_dict_for(cls, raw_config):
        if raw_config.get("model_type") == "bert":  # starting from a plain BERT checkpoint
            return {k: v for k, v in raw_config.items() if k not in ("architectures", "model_type")}
        return raw_config


class _DPRBiEncoderHalf(_DPRBase):
    """Shared by the two encoders, which differ only in the HF prefix of their weights."""
    hf_prefix = ""

    def __init__(self, config: DPRConfig, *, rngs: nnx.Rngs, **kw):
        super().__init__(config, rngs=rngs, **kw)
        setattr(self, self.hf_prefix, DPREncoder(config, self.compute, rngs=rngs))

    @property
    def encoder(self) -> DPREncoder:
        return getattr(self, self.hf_prefix)

    @classmethod
    def hf_rules(cls, config):
        return dpr_encoder_rules(config, f"{cls.hf_prefix}.", f"{cls.hf_prefix}.")

    @classmethod
    def adapt_state_dict(cls, state, config, source_config):
        """Accept a plain BertModel checkpoint (``embeddings.*``, ``encoder.*``, optional ``bert.`` prefix),
        or the other DPR encoder's checkpoint, as the start of DPR training."""
        own = f"{cls.hf_prefix}."
        if any(k.startswith(own) for k in state):
            return state
        out = {}
        for k, v in state.items():
            for other in ("ctx_encoder.", "question_encoder."):  # the other DPR encoder: same layout
                if k.startswith(other):
                    out[own + k[len(other):]] = v
                    break
            else:
                k = k[len("bert."):] if k.startswith("bert.") else k
                if not k.startswith(("pooler.", "cls.")):  # BERT's pooler / MLM head are not part of DPR
                    out[f"{own}bert_model.{k}"] = v
        return out

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, **kw) -> BaseModelOutputWithPooling:
        return self.encoder(input_ids, attention_mask, token_type_ids, **kw)


@register(default_for_model_type=True)
class DPRQuestionEncoder(_DPRBiEncoderHalf):
    hf_architecture = "DPRQuestionEncoder"
    hf_prefix = "question_encoder"


@register
class DPRContextEncoder(_DPRBiEncoderHalf):
    hf_architecture = "DPRContextEncoder"
    hf_prefix = "ctx_encoder"


@register
class DPRReader(_DPRBase):
    """Input ``[n_passages, length]`` (``[CLS] question [SEP] title [SEP] passage``); outputs
    ``start_logits``/``end_logits`` ``[n_passages, length]`` and ``relevance_logits`` ``[n_passages]``."""
    hf_architecture = "DPRReader"
    initializable_heads = ("span_predictor.qa_outputs.*", "span_predictor.qa_classifier.*")

    def __init__(self, config: DPRConfig, *, rngs: nnx.Rngs, **kw):
        super().__init__(config, rngs=rngs, **kw)
        self.span_predictor = DPRSpanPredictor(config, self.compute, rngs=rngs)

    @classmethod
    def hf_rules(cls, config):
        return (dpr_encoder_rules(config, "span_predictor.encoder.", "span_predictor.encoder.")
                + linear("span_predictor.qa_outputs", "span_predictor.qa_outputs")
                + linear("span_predictor.qa_classifier", "span_predictor.qa_classifier"))

    @classmethod
    def adapt_state_dict(cls, state, config, source_config):
        if any(k.startswith("span_predictor.") for k in state):
            return state
        body = _DPRBiEncoderHalf.adapt_state_dict.__func__(DPRContextEncoder, state, config, source_config)
        return {k.replace("ctx_encoder.", "span_predictor.encoder.", 1): v for k, v in body.items()}

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, **kw) -> DPRReaderOutput:
        return self.span_predictor(input_ids, attention_mask, token_type_ids, **kw)


class DPRSpanPredictor(nnx.Module):
    def __init__(self, config: DPRConfig, rt: ComputeSettings, *, rngs: nnx.Rngs):
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, init_std=config.initializer_range, rngs=rngs)
        self.encoder = DPREncoder(config, rt, rngs=rngs)
        size = config.projection_dim if config.projection_dim > 0 else config.hidden_size
        self.qa_outputs = L.Dense(size, 2, (L.EMBED,), (None,), **kw)
        self.qa_classifier = L.Dense(size, 1, (L.EMBED,), (None,), **kw)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, **kw) -> DPRReaderOutput:
        out = self.encoder(input_ids, attention_mask, token_type_ids, **kw)
        logits = self.qa_outputs(out.last_hidden_state)
        relevance = self.qa_classifier(out.last_hidden_state[:, 0])
        return DPRReaderOutput(start_logits=logits[..., 0], end_logits=logits[..., 1],
                               relevance_logits=relevance[:, 0], hidden_states=out.hidden_states)

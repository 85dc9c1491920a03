"""BERT in Flax NNX, exact to transformers' ``BertModel`` and ``BertForSequenceClassification``."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax.numpy as jnp
from flax import nnx

from rdr_jax.convert.mapping import Rule, embedding, layer_norm, linear
from rdr_jax.models import layers as L
from rdr_jax.models.base import PretrainedModel, register
from rdr_jax.models.config import ModelConfig, ComputeSettings
from rdr_jax.models.outputs import BaseModelOutputWithPooling, SequenceClassifierOutput
from rdr_jax.models.packing import TokenPacking
from rdr_jax.models.stacking import layer_keys, make_layers, run_layers


@dataclasses.dataclass
class BertConfig(ModelConfig):
    model_type = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    num_labels: int | None = None
    classifier_dropout: float | None = None
    id2label: dict | None = None
    label2id: dict | None = None
    problem_type: str | None = None

    def validate(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"position_embedding_type={self.position_embedding_type!r} is not supported "
                             "(only 'absolute')")
        L.activation(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def labels(self) -> int:
        """Number of classifier outputs, as transformers derives it (num_labels, else id2label, else 2)."""
        if self.num_labels is not None:
            return int(self.num_labels)
        return len(self.id2label) if self.id2label else 2

    def to_dict(self):
        out = super().to_dict()
        for key in ("num_labels", "classifier_dropout", "id2label", "label2id", "problem_type"):
            if out.get(key) is None:
                out.pop(key, None)
        return out


class BertEmbeddings(nnx.Module):
    def __init__(self, config: BertConfig, rt: ComputeSettings, *, rngs: nnx.Rngs):
        std = config.initializer_range
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, init_std=std, rngs=rngs)
        self.word_embeddings = L.Embed(config.vocab_size, config.hidden_size, (L.VOCAB, L.EMBED), **kw)
        self.position_embeddings = L.Embed(config.max_position_embeddings, config.hidden_size,
                                           (L.POSITIONS, L.EMBED), **kw)
        self.token_type_embeddings = L.Embed(config.type_vocab_size, config.hidden_size, (None, L.EMBED), **kw)
        self.layer_norm = L.LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=rt.dtype,
                                      param_dtype=rt.param_dtype)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids, position_ids, *, rngs=None, deterministic=True):
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(position_ids))
        return self.dropout(self.layer_norm(x), deterministic=deterministic, rngs=rngs)


class BertLayer(nnx.Module):
    """Post-LN transformer block: self-attention and feed-forward, each with residual + LayerNorm."""

    def __init__(self, config: BertConfig, rt: ComputeSettings, *, rngs: nnx.Rngs):
        E, H, D, F = config.hidden_size, config.num_attention_heads, config.head_dim, config.intermediate_size
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, init_std=config.initializer_range, rngs=rngs)
        ln = partial(L.LayerNorm, eps=config.layer_norm_eps, dtype=rt.dtype, param_dtype=rt.param_dtype)
        self.query = L.Dense(E, (H, D), (L.EMBED,), (L.HEADS, L.KV), **kw)
        self.key = L.Dense(E, (H, D), (L.EMBED,), (L.HEADS, L.KV), **kw)
        self.value = L.Dense(E, (H, D), (L.EMBED,), (L.HEADS, L.KV), **kw)
        self.attention_output = L.Dense((H, D), E, (L.HEADS, L.KV), (L.EMBED,), **kw)
        self.attention_norm = ln(E)
        self.intermediate = L.Dense(E, F, (L.EMBED,), (L.MLP,), **kw)
        self.output = L.Dense(F, E, (L.MLP,), (L.EMBED,), **kw)
        self.output_norm = ln(E)
        self.act = L.activation(config.hidden_act)
        self.attention_dropout = nnx.Dropout(config.attention_probs_dropout_prob)
        self.hidden_dropout = nnx.Dropout(config.hidden_dropout_prob)
        self.dtype = rt.dtype

    def __call__(self, x, mask, packing: TokenPacking | None = None, *, cls_only: bool = False, rngs=None,
                 deterministic=True):
        """``x`` is ``[batch, length, embed]``, or ``[tokens, embed]`` with ``packing``. With ``cls_only`` only
        position 0 is computed past the keys and values: the output is ``[batch, 1, embed]``."""
        drop = partial(self.hidden_dropout, deterministic=deterministic, rngs=rngs)
        attn_drop = L.active_dropout(self.attention_dropout, deterministic=deterministic, rngs=rngs)
        k, v = self.key(x), self.value(x)
        if cls_only:
            x = x[:, :1] if packing is None else packing.first(x)
        q = self.query(x)
        if packing is not None:  # only attention mixes positions: it runs in the padded layout
            k, v = packing.unpack(k), packing.unpack(v)
            q = q if cls_only else packing.unpack(q)
        context = L.dot_product_attention(q, k, v, mask=mask, dropout=attn_drop, dtype=self.dtype)
        if packing is not None and not cls_only:
            context = packing.pack(context)
        x = self.attention_norm(drop(self.attention_output(context)) + x)
        return self.output_norm(drop(self.output(self.act(self.intermediate(x)))) + x)


class BertEncoderStack(nnx.Module):
    """Embeddings + layers (+ optional pooler): the body shared by BERT, DPR and the BERT cross-encoder."""

    def __init__(self, config: BertConfig, rt: ComputeSettings, *, add_pooling_layer: bool, rngs: nnx.Rngs):
        self.config, self.rt = config, rt
        self.embeddings = BertEmbeddings(config, rt, rngs=rngs)
        self.layers = make_layers(lambda r: BertLayer(config, rt, rngs=r), config.num_hidden_layers, rt, rngs)
        self.pooler = (L.Dense(config.hidden_size, config.hidden_size, (L.EMBED,), (L.MLP,), dtype=rt.dtype,
                               param_dtype=rt.param_dtype, init_std=config.initializer_range, rngs=rngs)
                       if add_pooling_layer else None)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
                 output_hidden_states: bool = False, rngs: nnx.Rngs | None = None,
                 deterministic: bool = True, packing: TokenPacking | None = None,
                 cls_only: bool = False) -> BaseModelOutputWithPooling:
        """With ``packing`` (see :mod:`rdr_jax.models.packing`, built from this ``attention_mask``) the
        position-wise layers run on the real tokens only. Outputs are the same, except that hidden states are
        zero at padded positions (transformers leaves values there that nothing should read).

        ``cls_only``: the last layer computes position 0 alone, for callers that read only the [CLS] state
        (DPR's embeddings, a cross-encoder's pooled logits); ``last_hidden_state`` is then ``[batch, 1, embed]``.
        """
        if cls_only and output_hidden_states:
            raise ValueError("cls_only computes only the [CLS] state of the last layer; it cannot also return "
                             "every hidden state (output_hidden_states)")
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        mask = L.padding_mask(jnp.asarray(attention_mask))
        token_type_ids = jnp.asarray(token_type_ids)
        if packing is not None:
            input_ids, token_type_ids, position_ids = map(packing.pack, (input_ids, token_type_ids,
                                                                         jnp.asarray(position_ids)))
        x = self.embeddings(input_ids, token_type_ids, position_ids, rngs=rngs, deterministic=deterministic)
        padded = (lambda h: packing.check(packing.unpack(h))) if packing is not None else (lambda h: h)
        hidden_states = [padded(x)] if output_hidden_states else None
        def step(cls):
            return lambda layer, h, r: layer(h, mask, packing, cls_only=cls, rngs=r, deterministic=deterministic)

        n = self.config.num_hidden_layers
        keys = layer_keys(rngs, n, deterministic=deterministic)
        collect = padded if output_hidden_states else None
        x, states = run_layers(self.layers, step(False), x, rt=self.rt, keys=keys, stop=n - cls_only,
                               collect=collect)
        if cls_only:  # the last layer on its own: its output is [batch, 1, embed]
            x, _ = run_layers(self.layers, step(True), x, rt=self.rt, keys=keys, start=n - 1)
        if output_hidden_states:
            hidden_states += states
        if cls_only:  # already [batch, 1, embed]
            x = packing.check(x) if packing is not None else x
        else:
            x = padded(x)
        pooled = jnp.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled,
                                          hidden_states=tuple(hidden_states) if hidden_states else None)


def bert_body_rules(config: BertConfig, hf: str, jx: str, *, pooler: bool) -> list[Rule]:
    """Name map of a BertModel body whose HF names start with ``hf`` and JAX paths with ``jx``."""
    rules = (embedding(f"{hf}embeddings.word_embeddings.weight", f"{jx}embeddings.word_embeddings")
             + embedding(f"{hf}embeddings.position_embeddings.weight", f"{jx}embeddings.position_embeddings")
             + embedding(f"{hf}embeddings.token_type_embeddings.weight", f"{jx}embeddings.token_type_embeddings")
             + layer_norm(f"{hf}embeddings.LayerNorm", f"{jx}embeddings.layer_norm"))
    for i in range(config.num_hidden_layers):
        h, j = f"{hf}encoder.layer.{i}.", f"{jx}layers.{i}."
        for name in ("query", "key", "value"):
            rules += linear(f"{h}attention.self.{name}", f"{j}{name}")
        rules += linear(f"{h}attention.output.dense", f"{j}attention_output", n_in=2)
        rules += layer_norm(f"{h}attention.output.LayerNorm", f"{j}attention_norm")
        rules += linear(f"{h}intermediate.dense", f"{j}intermediate")
        rules += linear(f"{h}output.dense", f"{j}output")
        rules += layer_norm(f"{h}output.LayerNorm", f"{j}output_norm")
    if pooler:
        rules += linear(f"{hf}pooler.dense", f"{jx}pooler")
    return rules


class _BertBase(PretrainedModel):
    config_class = BertConfig
    supports_packing = True

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, **compute):
        """``compute``: the :class:`ComputeSettings` fields (dtype, param_dtype, remat, remat_policy,
        scan_layers)."""
        self.config = config
        self.compute = ComputeSettings(**compute)


@register(default_for_model_type=True)
class BertModel(_BertBase):
    hf_architecture = "BertModel"

    def __init__(self, config: BertConfig, *, add_pooling_layer: bool = True, rngs: nnx.Rngs, **kw):
        super().__init__(config, rngs=rngs, **kw)
        self.bert = BertEncoderStack(config, self.compute, add_pooling_layer=add_pooling_layer, rngs=rngs)

    @classmethod
    def hf_rules(cls, config):
        return bert_body_rules(config, "", "bert.", pooler=True)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, **kw):
        return self.bert(input_ids, attention_mask, token_type_ids, position_ids, **kw)


@register
class BertForSequenceClassification(_BertBase):
    hf_architecture = "BertForSequenceClassification"
    initializable_heads = ("classifier.*",)

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, **kw):
        super().__init__(config, rngs=rngs, **kw)
        self.bert = BertEncoderStack(config, self.compute, add_pooling_layer=True, rngs=rngs)
        rate = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nnx.Dropout(rate)
        self.classifier = L.Dense(config.hidden_size, config.labels, (L.EMBED,), (L.CLASSES,),
                                  dtype=self.compute.dtype, param_dtype=self.compute.param_dtype,
                                  init_std=config.initializer_range, rngs=rngs)

    @classmethod
    def hf_rules(cls, config):
        return bert_body_rules(config, "bert.", "bert.", pooler=True) + linear("classifier", "classifier")

    @classmethod
    def adapt_state_dict(cls, state, config, source_config):
        # A plain BertModel checkpoint (no "bert." prefix) starts a cross-encoder.
        if state and not any(k.startswith("bert.") for k in state):
            return {f"bert.{k}": v for k, v in state.items()}
        return state

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, rngs=None,
                 deterministic=True, output_hidden_states=False, packing=None) -> SequenceClassifierOutput:
        # the logits read only [CLS]: the last layer skips every other position unless states are asked for
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, rngs=rngs,
                        deterministic=deterministic, output_hidden_states=output_hidden_states, packing=packing,
                        cls_only=not output_hidden_states)
        pooled = self.dropout(out.pooler_output, deterministic=deterministic, rngs=rngs)
        return SequenceClassifierOutput(logits=self.classifier(pooled), hidden_states=out.hidden_states)

# One file, as bert.py/t5.py/bart.py: one family's config, modules, name map and classes (positions: deberta_relative).
"""DeBERTa-v2/v3 in Flax NNX, exact to transformers' ``DebertaV2Model`` and ``DebertaV2ForSequenceClassification``.

Disentangled attention adds to the content-content scores a content->position term (``c2p``: the query
against relative-position keys) and a position->content term (``p2c``: the key against relative-position
queries), each read at the log-bucketed relative distance of the token pair
(:mod:`rdr_jax.models.deberta_relative`: the buckets and the ``relative_attention_impl`` choices).
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rdr_jax.convert.mapping import Rule, embedding, layer_norm, linear
from rdr_jax.models import layers as L
from rdr_jax.models.base import PretrainedModel, register
from rdr_jax.models.config import ModelConfig, ComputeSettings
from rdr_jax.models.deberta_relative import relative_score_indices, relative_term
from rdr_jax.models.outputs import BaseModelOutputWithPooling, SequenceClassifierOutput
from rdr_jax.models.stacking import layer_keys, make_layers, run_layers

log = logging.getLogger(__name__)

POS_ATT_TYPES = ("c2p", "p2c")


@dataclasses.dataclass
class DebertaV2Config(ModelConfig):
    """The fields of transformers' ``DebertaV2Config``, including those it reads with ``getattr`` defaults
    (``position_buckets``, ``share_att_key``, ``norm_rel_ebd``, ``conv_*``, ``embedding_size``...)."""
    model_type = "deberta-v2"
    vocab_size: int = 128100
    hidden_size: int = 1536
    num_hidden_layers: int = 24
    num_attention_heads: int = 24
    intermediate_size: int = 6144
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-7
    relative_attention: bool = False
    max_relative_positions: int = -1
    position_buckets: int = -1
    pad_token_id: int | None = 0
    position_biased_input: bool = True
    pos_att_type: str | list[str] | None = None
    share_att_key: bool = False
    norm_rel_ebd: str = "none"
    conv_kernel_size: int = 0
    conv_groups: int = 1
    conv_act: str = "tanh"
    embedding_size: int | None = None
    attention_head_size: int | None = None
    pooler_hidden_size: int | None = None
    pooler_dropout: float = 0.0
    pooler_hidden_act: str = "gelu"
    cls_dropout: float | None = None
    num_labels: int | None = None
    id2label: dict | None = None
    label2id: dict | None = None
    problem_type: str | None = None

    def validate(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            # transformers' attention output projection is hidden -> hidden; other head sizes cannot load.
            raise ValueError(f"attention_head_size ({self.attention_head_size}) x num_attention_heads "
                             f"({self.num_attention_heads}) must equal hidden_size ({self.hidden_size})")
        unknown = [t for t in self.attention_terms if t not in POS_ATT_TYPES]
        if unknown:
            raise ValueError(f"pos_att_type has unsupported entries {unknown}; supported: {list(POS_ATT_TYPES)}")
        if self.conv_kernel_size > 0 and self.hidden_size % self.conv_groups:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by conv_groups "
                             f"({self.conv_groups})")
        if self.pooler_width != self.hidden_size:
            # transformers' classifier reads hidden_size features from the pooler output.
            raise ValueError(f"pooler_hidden_size ({self.pooler_hidden_size}) must equal hidden_size "
                             f"({self.hidden_size})")
        for field in ("hidden_act", "conv_act", "pooler_hidden_act"):
            try:
                L.activation(getattr(self, field))
            except ValueError as e:
                raise ValueError(f"{field}: {e}") from None

    # ---- values transformers derives from the raw fields ----------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.attention_head_size or self.hidden_size // self.num_attention_heads

    @property
    def embedding_width(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def pooler_width(self) -> int:
        return self.pooler_hidden_size or self.hidden_size

    @property
    def attention_terms(self) -> tuple[str, ...]:
        """``pos_att_type`` as a tuple, whether the config has a list or a "|"-joined string."""
        if self.pos_att_type is None:
            return ()
        if isinstance(self.pos_att_type, str):
            return tuple(x.strip() for x in self.pos_att_type.lower().split("|") if x.strip())
        return tuple(self.pos_att_type)

    @property
    def max_relative(self) -> int:
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def attention_span(self) -> int:
        """Half the number of relative embeddings (``pos_ebd_size`` in transformers)."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative

    @property
    def rel_embedding_layer_norm(self) -> bool:
        return "layer_norm" in [x.strip() for x in self.norm_rel_ebd.lower().split("|")]

    @property
    def labels(self) -> int:
        """Number of classifier outputs, as transformers derives it (num_labels, else id2label, else 2)."""
        if self.num_labels is not None:
            return int(self.num_labels)
        return len(self.id2label) if self.id2label else 2

    def to_dict(self):
        out = super().to_dict()
        for key in ("embedding_size", "attention_head_size", "pooler_hidden_size", "cls_dropout", "num_labels",
                    "id2label", "label2id", "problem_type"):
            if out.get(key) is None:
                out.pop(key, None)
        return out


def _scale(head_dim: int, scale_factor: int) -> float:
    # As transformers: sqrt of a float32 tensor (held as the Python float of that float32 value).
    return float(np.sqrt(np.float32(head_dim) * np.float32(scale_factor)))


# ---- modules -------------------------------------------------------------------------------------------------
class DebertaV2Embeddings(nnx.Module):
    def __init__(self, config: DebertaV2Config, rt: ComputeSettings, *, rngs: nnx.Rngs):
        W = config.embedding_width
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, init_std=config.initializer_range, rngs=rngs)
        self.word_embeddings = L.Embed(config.vocab_size, W, (L.VOCAB, L.EMBED), **kw)
        self.position_embeddings = (L.Embed(config.max_position_embeddings, W, (L.POSITIONS, L.EMBED), **kw)
                                    if config.position_biased_input else None)
        self.token_type_embeddings = (L.Embed(config.type_vocab_size, W, (None, L.EMBED), **kw)
                                      if config.type_vocab_size > 0 else None)
        # Factorised embeddings (embedding_size != hidden_size) are projected up, without bias.
        self.embed_proj = (L.Dense(W, config.hidden_size, (None,), (L.EMBED,), use_bias=False, **kw)
                           if W != config.hidden_size else None)
        self.layer_norm = L.LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=rt.dtype,
                                      param_dtype=rt.param_dtype)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids, position_ids, attention_mask, *, rngs=None, deterministic=True):
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(token_type_ids)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = self.layer_norm(x) * attention_mask[..., None].astype(x.dtype)
        return self.dropout(x, deterministic=deterministic, rngs=rngs)


class DisentangledSelfAttention(nnx.Module):
    """Content-content attention plus the c2p/p2c relative terms, all divided by sqrt(head_dim * (1 + terms))."""

    def __init__(self, config: DebertaV2Config, rt: ComputeSettings, *, rngs: nnx.Rngs):
        E, H, D = config.hidden_size, config.num_attention_heads, config.head_dim
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, init_std=config.initializer_range, rngs=rngs)
        proj = partial(L.Dense, E, (H, D), (L.EMBED,), (L.HEADS, L.KV), **kw)
        self.query_proj, self.key_proj, self.value_proj = proj(), proj(), proj()
        self.terms = config.attention_terms
        self.relative_attention = config.relative_attention
        self.share_att_key = config.share_att_key
        separate = config.relative_attention and not config.share_att_key
        self.pos_key_proj = proj() if separate and "c2p" in self.terms else None
        self.pos_query_proj = proj() if separate and "p2c" in self.terms else None
        self.scale = _scale(D, 1 + sum(t in self.terms for t in POS_ATT_TYPES))
        self.impl, self.dtype = rt.relative_attention_impl, rt.dtype
        self.pos_dropout = nnx.Dropout(config.hidden_dropout_prob)
        self.dropout = nnx.Dropout(config.attention_probs_dropout_prob)

    def relative_bias(self, query, key, rel_embeddings, c2p_index, p2c_index):
        """The c2p + p2c scores ``[batch, heads, query, key]`` (already divided by the scale)."""
        scale = jnp.asarray(self.scale, query.dtype)
        score = None
        if "c2p" in self.terms:
            pos_key = (self.key_proj if self.share_att_key else self.pos_key_proj)(rel_embeddings)  # [R, H, D]
            score = relative_term(query, pos_key, c2p_index, self.impl) / scale
        if "p2c" in self.terms:
            pos_query = (self.query_proj if self.share_att_key else self.pos_query_proj)(rel_embeddings)
            # Rows are keys here; the transpose puts queries first.
            p2c = jnp.swapaxes(relative_term(key, pos_query, p2c_index, self.impl), -1, -2) / scale
            score = p2c if score is None else score + p2c
        return score

    def __call__(self, x, mask, rel_embeddings, c2p_index, p2c_index, *, rngs=None, deterministic=True):
        query, key, value = self.query_proj(x), self.key_proj(x), self.value_proj(x)
        bias = None
        if self.relative_attention and self.terms:
            rel = self.pos_dropout(rel_embeddings, deterministic=deterministic, rngs=rngs)
            bias = self.relative_bias(query, key, rel, c2p_index, p2c_index)
        # transformers divides the keys (not the scores) by the scale; same rounding here.
        return L.dot_product_attention(query, key / jnp.asarray(self.scale, key.dtype), value, mask=mask, bias=bias,
                                       scale=1.0, dtype=self.dtype,
                                       dropout=L.active_dropout(self.dropout, deterministic=deterministic, rngs=rngs))


class DebertaV2Layer(nnx.Module):
    """Post-LN block: disentangled self-attention and feed-forward, each with residual + LayerNorm."""

    def __init__(self, config: DebertaV2Config, rt: ComputeSettings, *, rngs: nnx.Rngs):
        E, H, D, F = config.hidden_size, config.num_attention_heads, config.head_dim, config.intermediate_size
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, init_std=config.initializer_range, rngs=rngs)
        ln = partial(L.LayerNorm, eps=config.layer_norm_eps, dtype=rt.dtype, param_dtype=rt.param_dtype)
        self.attention = DisentangledSelfAttention(config, rt, rngs=rngs)
        self.attention_output = L.Dense((H, D), E, (L.HEADS, L.KV), (L.EMBED,), **kw)
        self.attention_norm = ln(E)
        self.intermediate = L.Dense(E, F, (L.EMBED,), (L.MLP,), **kw)
        self.output = L.Dense(F, E, (L.MLP,), (L.EMBED,), **kw)
        self.output_norm = ln(E)
        self.act = L.activation(config.hidden_act)
        self.hidden_dropout = nnx.Dropout(config.hidden_dropout_prob)

    def __call__(self, x, mask, rel_embeddings, c2p_index, p2c_index, *, rngs=None, deterministic=True):
        drop = partial(self.hidden_dropout, deterministic=deterministic, rngs=rngs)
        context = self.attention(x, mask, rel_embeddings, c2p_index, p2c_index, rngs=rngs,
                                 deterministic=deterministic)
        x = self.attention_norm(drop(self.attention_output(context)) + x)
        return self.output_norm(drop(self.output(self.act(self.intermediate(x)))) + x)


class ConvLayer(nnx.Module):
    """v2-xlarge's 1-D convolution over the embedding output, merged into the first layer's output."""

    def __init__(self, config: DebertaV2Config, rt: ComputeSettings, *, rngs: nnx.Rngs):
        E, K, G = config.hidden_size, config.conv_kernel_size, config.conv_groups
        # PyTorch Conv1d layout [out, in / groups, width], so conversion is a plain copy.
        self.kernel = L.param(rngs, L.normal_init(config.initializer_range), (E, E // G, K), (L.EMBED, None, None),
                              rt.param_dtype)
        self.bias = L.param(rngs, L.zeros_init, (E,), (L.EMBED,), rt.param_dtype)
        self.groups, self.padding, self.dtype = G, (K - 1) // 2, rt.dtype
        self.act = L.activation(config.conv_act)
        self.layer_norm = L.LayerNorm(E, config.layer_norm_eps, dtype=rt.dtype, param_dtype=rt.param_dtype)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob)

    def __call__(self, hidden_states, residual_states, attention_mask, *, rngs=None, deterministic=True):
        out = jax.lax.conv_general_dilated(
            hidden_states.astype(self.dtype), self.kernel[...].astype(self.dtype), window_strides=(1,),
            padding=[(self.padding, self.padding)], dimension_numbers=("NWC", "OIW", "NWC"),
            feature_group_count=self.groups)
        out = out + self.bias[...].astype(self.dtype)
        keep = attention_mask.astype(bool)[..., None]
        out = self.act(self.dropout(jnp.where(keep, out, 0), deterministic=deterministic, rngs=rngs))
        return self.layer_norm(residual_states + out) * keep.astype(self.dtype)


class DebertaV2Body(nnx.Module):
    """Embeddings + encoder (relative embeddings, layers, optional conv): transformers' ``DebertaV2Model``."""

    def __init__(self, config: DebertaV2Config, rt: ComputeSettings, *, rngs: nnx.Rngs):
        self.config, self.rt = config, rt
        self.embeddings = DebertaV2Embeddings(config, rt, rngs=rngs)
        self.layers = make_layers(lambda r: DebertaV2Layer(config, rt, rngs=r), config.num_hidden_layers, rt, rngs)
        self.rel_embeddings = (L.Embed(2 * config.attention_span, config.hidden_size, (L.POSITIONS, L.EMBED),
                                       dtype=rt.dtype, param_dtype=rt.param_dtype,
                                       init_std=config.initializer_range, rngs=rngs)
                               if config.relative_attention else None)
        self.rel_norm = (L.LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=rt.dtype,
                                     param_dtype=rt.param_dtype)
                         if config.rel_embedding_layer_norm else None)
        self.conv = ConvLayer(config, rt, rngs=rngs) if config.conv_kernel_size > 0 else None

    def relative_embeddings(self):
        if self.rel_embeddings is None:
            return None
        rel = self.rel_embeddings.embedding[...].astype(self.rt.dtype)
        return self.rel_norm(rel) if self.rel_norm is not None else rel

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
                 output_hidden_states: bool = False, rngs: nnx.Rngs | None = None,
                 deterministic: bool = True) -> BaseModelOutputWithPooling:
        input_ids = jnp.asarray(input_ids)
        length = input_ids.shape[-1]
        attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
        token_type_ids = jnp.zeros_like(input_ids) if token_type_ids is None else jnp.asarray(token_type_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
        keep = attention_mask.astype(bool)
        # As transformers: pair (i, j) attends when both tokens are real, so padded query rows are uniform.
        mask = keep[:, None, :, None] & keep[:, None, None, :]
        c2p_index = p2c_index = None
        if self.config.relative_attention:
            c2p_index, p2c_index = relative_score_indices(length, self.config)  # static numpy
        rel_embeddings = self.relative_embeddings()

        embedded = self.embeddings(input_ids, token_type_ids, position_ids, attention_mask, rngs=rngs,
                                   deterministic=deterministic)
        x = embedded
        hidden_states = [x] if output_hidden_states else None
        def step(layer, h, r):
            return layer(h, mask, rel_embeddings, c2p_index, p2c_index, rngs=r, deterministic=deterministic)

        keys = layer_keys(rngs, self.config.num_hidden_layers, deterministic=deterministic)
        first = 0
        if self.conv is not None:  # the conv joins layer 0's output: layer 0 runs on its own
            x, _ = run_layers(self.layers, step, x, rt=self.rt, keys=keys, stop=1)
            x = self.conv(embedded, x, attention_mask, rngs=rngs, deterministic=deterministic)
            hidden_states = hidden_states + [x] if output_hidden_states else None
            first = 1
        x, states = run_layers(self.layers, step, x, rt=self.rt, keys=keys, start=first,
                               collect=(lambda h: h) if output_hidden_states else None)
        if output_hidden_states:
            hidden_states += states
        return BaseModelOutputWithPooling(last_hidden_state=x,
                                          hidden_states=tuple(hidden_states) if hidden_states else None)


class ContextPooler(nnx.Module):
    """act(dense(dropout(hidden[:, 0]))), as transformers' DeBERTa ``ContextPooler``."""

    def __init__(self, config: DebertaV2Config, rt: ComputeSettings, *, rngs: nnx.Rngs):
        P = config.pooler_width
        self.dense = L.Dense(P, P, (L.EMBED,), (L.MLP,), dtype=rt.dtype, param_dtype=rt.param_dtype,
                             init_std=config.initializer_range, rngs=rngs)
        self.dropout = nnx.Dropout(config.pooler_dropout)
        self.act = L.activation(config.pooler_hidden_act)

    def __call__(self, hidden_states, *, rngs=None, deterministic=True):
        token = self.dropout(hidden_states[:, 0], deterministic=deterministic, rngs=rngs)
        return self.act(self.dense(token))


# ---- name map --------------------------------------------------------------------------------------------------
def deberta_body_rules(config: DebertaV2Config, hf: str, jx: str) -> list[Rule]:
    """Name map of a DebertaV2Model body whose HF names start with ``hf`` and JAX paths with ``jx``."""
    rules = embedding(f"{hf}embeddings.word_embeddings.weight", f"{jx}embeddings.word_embeddings")
    if config.position_biased_input:
        rules += embedding(f"{hf}embeddings.position_embeddings.weight", f"{jx}embeddings.position_embeddings")
    if config.type_vocab_size > 0:
        rules += embedding(f"{hf}embeddings.token_type_embeddings.weight", f"{jx}embeddings.token_type_embeddings")
    if config.embedding_width != config.hidden_size:
        rules += linear(f"{hf}embeddings.embed_proj", f"{jx}embeddings.embed_proj", bias=False)
    rules += layer_norm(f"{hf}embeddings.LayerNorm", f"{jx}embeddings.layer_norm")
    for i in range(config.num_hidden_layers):
        h, j = f"{hf}encoder.layer.{i}.", f"{jx}layers.{i}."
        names = ["query_proj", "key_proj", "value_proj"]
        if config.relative_attention and not config.share_att_key:
            names += [n for t, n in (("c2p", "pos_key_proj"), ("p2c", "pos_query_proj")) if t in config.attention_terms]
        for name in names:
            rules += linear(f"{h}attention.self.{name}", f"{j}attention.{name}")
        rules += linear(f"{h}attention.output.dense", f"{j}attention_output", n_in=2)
        rules += layer_norm(f"{h}attention.output.LayerNorm", f"{j}attention_norm")
        rules += linear(f"{h}intermediate.dense", f"{j}intermediate")
        rules += linear(f"{h}output.dense", f"{j}output")
        rules += layer_norm(f"{h}output.LayerNorm", f"{j}output_norm")
    if config.relative_attention:
        rules += embedding(f"{hf}encoder.rel_embeddings.weight", f"{jx}rel_embeddings")
    if config.rel_embedding_layer_norm:
        rules += layer_norm(f"{hf}encoder.LayerNorm", f"{jx}rel_norm")
    if config.conv_kernel_size > 0:
        rules += [Rule(f"{hf}encoder.conv.conv.weight", f"{jx}conv.kernel"),
                  Rule(f"{hf}encoder.conv.conv.bias", f"{jx}conv.bias")]
        rules += layer_norm(f"{hf}encoder.conv.LayerNorm", f"{jx}conv.layer_norm")
    return rules


# Pre-training heads in DeBERTa checkpoints (masked LM, replaced-token detection); not part of these classes.
_PRETRAINING_HEADS = ("cls.*", "lm_predictions.*", "mask_predictions.*")


class _DebertaV2Base(PretrainedModel):
    config_class = DebertaV2Config
    # transformers ignores stray absolute position tables (v3 checkpoints have position_biased_input false).
    hf_ignore_unexpected = ("*position_ids", "*embeddings.position_embeddings.weight") + _PRETRAINING_HEADS

    def __init__(self, config: DebertaV2Config, *, rngs: nnx.Rngs, **compute):
        """``compute``: the :class:`ComputeSettings` fields (dtype, param_dtype, remat, remat_policy,
        scan_layers, relative_attention_impl)."""
        self.config = config
        self.compute = ComputeSettings(**compute)


@register(default_for_model_type=True)
class DebertaV2Model(_DebertaV2Base):
    hf_architecture = "DebertaV2Model"

    def __init__(self, config: DebertaV2Config, *, rngs: nnx.Rngs, **kw):
        super().__init__(config, rngs=rngs, **kw)
        self.deberta = DebertaV2Body(config, self.compute, rngs=rngs)

    @classmethod
    def hf_rules(cls, config):
        return deberta_body_rules(config, "", "deberta.")

    @classmethod
    def adapt_state_dict(cls, state, config, source_config):
        # A checkpoint of a model with heads (classifier, masked LM): keep its "deberta." body, as transformers
        # does when loading the base model from it.
        if any(k.startswith("deberta.") for k in state):
            dropped = sorted(k for k in state if not k.startswith("deberta."))
            if dropped:
                log.info("DebertaV2Model: not loading head weights %s", ", ".join(dropped))
            return {k[len("deberta."):]: v for k, v in state.items() if k.startswith("deberta.")}
        return state

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, **kw):
        return self.deberta(input_ids, attention_mask, token_type_ids, position_ids, **kw)


@register
class DebertaV2ForSequenceClassification(_DebertaV2Base):
    hf_architecture = "DebertaV2ForSequenceClassification"
    initializable_heads = ("pooler.*", "classifier.*")

    def __init__(self, config: DebertaV2Config, *, rngs: nnx.Rngs, **kw):
        super().__init__(config, rngs=rngs, **kw)
        rt = self.compute
        self.deberta = DebertaV2Body(config, rt, rngs=rngs)
        self.pooler = ContextPooler(config, rt, rngs=rngs)
        rate = config.cls_dropout if config.cls_dropout is not None else config.hidden_dropout_prob
        self.dropout = nnx.Dropout(rate)
        self.classifier = L.Dense(config.hidden_size, config.labels, (L.EMBED,), (L.CLASSES,), dtype=rt.dtype,
                                  param_dtype=rt.param_dtype, init_std=config.initializer_range, rngs=rngs)

    @classmethod
    def hf_rules(cls, config):
        return (deberta_body_rules(config, "deberta.", "deberta.") + linear("pooler.dense", "pooler.dense")
                + linear("classifier", "classifier"))

    @classmethod
    def adapt_state_dict(cls, state, config, source_config):
        # A plain DebertaV2Model checkpoint (no "deberta." prefix) starts a cross-encoder.
        if state and not any(k.startswith("deberta.") for k in state):
            return {f"deberta.{k}": v for k, v in state.items()}
        return state

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, rngs=None,
                 deterministic=True, output_hidden_states=False) -> SequenceClassifierOutput:
        out = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, rngs=rngs,
                           deterministic=deterministic, output_hidden_states=output_hidden_states)
        pooled = self.pooler(out.last_hidden_state, rngs=rngs, deterministic=deterministic)
        pooled = self.dropout(pooled, deterministic=deterministic, rngs=rngs)
        return SequenceClassifierOutput(logits=self.classifier(pooled), hidden_states=out.hidden_states)

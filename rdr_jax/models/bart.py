"""BART in Flax NNX, exact to transformers' ``BartForConditionalGeneration``.

Post-LN encoder/decoder layers with biased projections, learned absolute positions (transformers offsets
the position ids by 2), optional ``sqrt(d_model)`` embedding scale, a LayerNorm on the embeddings, one token
embedding shared by encoder, decoder and the output projection, and ``final_logits_bias``: a PyTorch buffer,
kept here as a :class:`~rdr_jax.models.layers.Buffer` so optimizers never update it while conversion and
checkpoints still carry it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from functools import partial

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rdr_jax.convert.mapping import Rule, embedding, layer_norm, linear
from rdr_jax.models import layers as L
from rdr_jax.models.base import PretrainedModel, register
from rdr_jax.models.config import ModelConfig, ComputeSettings
from rdr_jax.models.seq2seq import DecoderCache, Seq2SeqBlock, Seq2SeqLM, Seq2SeqStack
from rdr_jax.models.stacking import make_layers

log = logging.getLogger(__name__)

POSITION_OFFSET = 2  # transformers' BartLearnedPositionalEmbedding looks up position + 2
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which BART uses


@dataclasses.dataclass
class BartConfig(ModelConfig):
    model_type = "bart"
    vocab_size: int = 50265
    max_position_embeddings: int = 1024
    encoder_layers: int = 12
    encoder_ffn_dim: int = 4096
    encoder_attention_heads: int = 16
    decoder_layers: int = 12
    decoder_ffn_dim: int = 4096
    decoder_attention_heads: int = 16
    encoder_layerdrop: float = 0.0
    decoder_layerdrop: float = 0.0
    activation_function: str = "gelu"
    d_model: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    scale_embedding: bool = False
    pad_token_id: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    decoder_start_token_id: int = 2
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = True

    def validate(self):
        for heads in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, heads):
                raise ValueError(f"d_model ({self.d_model}) must be divisible by {heads} ({getattr(self, heads)})")
        if not self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=False is not supported for BART (separate encoder, decoder and "
                             "output embeddings); every released BART checkpoint ties them")
        if self.encoder_layerdrop or self.decoder_layerdrop:
            log.warning("BART layerdrop (encoder %s, decoder %s) is not applied in training here",
                        self.encoder_layerdrop, self.decoder_layerdrop)
        L.activation(self.activation_function)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model) if self.scale_embedding else 1.0


class BartAttention(nnx.Module):
    """Multi-head attention with biased q/k/v/out projections and ``head_dim ** -0.5`` score scaling."""

    def __init__(self, config: BartConfig, rt: ComputeSettings, num_heads: int, *, rngs: nnx.Rngs):
        E = config.d_model
        H, D = num_heads, config.d_model // num_heads
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, init_std=config.init_std, rngs=rngs)
        self.q_proj = L.Dense(E, (H, D), (L.EMBED,), (L.HEADS, L.KV), **kw)
        self.k_proj = L.Dense(E, (H, D), (L.EMBED,), (L.HEADS, L.KV), **kw)
        self.v_proj = L.Dense(E, (H, D), (L.EMBED,), (L.HEADS, L.KV), **kw)
        self.out_proj = L.Dense((H, D), E, (L.HEADS, L.KV), (L.EMBED,), **kw)
        self.dropout = nnx.Dropout(config.attention_dropout)
        self.scale, self.dtype = D ** -0.5, rt.dtype

    def __call__(self, x, keys, values, mask, bias=None, *, rngs=None, deterministic=True):
        """``keys``/``values``: heads-first ``[batch or rows, heads, k_len, kv]``, as the cache holds them."""
        context = L.dot_product_attention(
            self.q_proj(x), keys, values, mask=mask, bias=bias, scale=self.scale, dtype=self.dtype, kv_heads_first=True,
            dropout=L.active_dropout(self.dropout, deterministic=deterministic, rngs=rngs))
        return self.out_proj(context)


class BartLayer(Seq2SeqBlock):
    """Post-LN layer: self-attention, cross-attention (decoder only), feed-forward; each ``norm(x + dropout(f(x)))``."""

    def __init__(self, config: BartConfig, rt: ComputeSettings, *, is_decoder: bool, rngs: nnx.Rngs):
        E = config.d_model
        heads = config.decoder_attention_heads if is_decoder else config.encoder_attention_heads
        ffn = config.decoder_ffn_dim if is_decoder else config.encoder_ffn_dim
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, init_std=config.init_std, rngs=rngs)
        norm = partial(L.LayerNorm, E, LAYER_NORM_EPS, dtype=rt.dtype, param_dtype=rt.param_dtype)
        self.is_decoder = is_decoder
        self.self_attn = BartAttention(config, rt, heads, rngs=rngs)
        self.self_attn_layer_norm = norm()
        if is_decoder:
            self.encoder_attn = BartAttention(config, rt, heads, rngs=rngs)
            self.encoder_attn_layer_norm = norm()
        self.fc1 = L.Dense(E, ffn, (L.EMBED,), (L.MLP,), **kw)
        self.fc2 = L.Dense(ffn, E, (L.MLP,), (L.EMBED,), **kw)
        self.final_layer_norm = norm()
        self.act = L.activation(config.activation_function)
        self.dropout = nnx.Dropout(config.dropout)
        self.activation_dropout = nnx.Dropout(config.activation_dropout)

    def self_kv(self, h):
        return self.self_attn.k_proj(h), self.self_attn.v_proj(h)

    def cross_kv(self, encoder_hidden):
        return self.encoder_attn.k_proj(encoder_hidden), self.encoder_attn.v_proj(encoder_hidden)

    def __call__(self, x, mask, bias=None, encoder_hidden=None, cross_mask=None, self_kv_cache=None, cross_kv=None,
                 *, rngs=None, deterministic=True):
        drop = partial(self.dropout, deterministic=deterministic, rngs=rngs)
        keys, values = self.self_attention_kv(x, self_kv_cache)
        h = self.self_attn(x, keys, values, mask, bias, rngs=rngs, deterministic=deterministic)
        x = self.self_attn_layer_norm(x + drop(h))
        if self.is_decoder:
            cross_kv = self.cross_attention_kv(encoder_hidden, cross_kv)
            h = self.encoder_attn(x, *cross_kv, cross_mask, rngs=rngs, deterministic=deterministic)
            x = self.encoder_attn_layer_norm(x + drop(h))
        h = self.activation_dropout(self.act(self.fc1(x)), deterministic=deterministic, rngs=rngs)
        x = self.final_layer_norm(x + drop(self.fc2(h)))
        return x, (keys, values)


class BartStack(Seq2SeqStack):
    """Encoder or decoder: token embedding (scaled) + learned positions, LayerNorm, dropout, layers."""

    def __init__(self, config: BartConfig, rt: ComputeSettings, *, is_decoder: bool, rngs: nnx.Rngs):
        self.config, self.rt = config, rt
        num_layers = config.decoder_layers if is_decoder else config.encoder_layers
        self.num_heads = config.decoder_attention_heads if is_decoder else config.encoder_attention_heads
        self.head_dim = config.d_model // self.num_heads
        self.embed_positions = L.Embed(config.max_position_embeddings + POSITION_OFFSET, config.d_model,
                                       (L.POSITIONS, L.EMBED), dtype=rt.dtype, param_dtype=rt.param_dtype,
                                       init_std=config.init_std, rngs=rngs)
        self.layernorm_embedding = L.LayerNorm(config.d_model, LAYER_NORM_EPS, dtype=rt.dtype,
                                               param_dtype=rt.param_dtype)
        self.layers = make_layers(lambda r: BartLayer(config, rt, is_decoder=is_decoder, rngs=r), num_layers, rt,
                                  rngs)
        self.dropout = nnx.Dropout(config.dropout)

    def embed(self, token_embeddings, offset, *, rngs=None, deterministic=True):
        positions = jnp.arange(token_embeddings.shape[1]) + offset + POSITION_OFFSET
        x = token_embeddings * jnp.asarray(self.config.embed_scale, token_embeddings.dtype)
        x = self.layernorm_embedding(x + self.embed_positions(positions)[None])
        return self.dropout(x, deterministic=deterministic, rngs=rngs)


def _stack_rules(config: BartConfig, stack: str) -> list[Rule]:
    is_decoder = stack == "decoder"
    hf, jx = f"model.{stack}.", f"{stack}."
    rules = (embedding(f"{hf}embed_positions.weight", f"{jx}embed_positions")
             + layer_norm(f"{hf}layernorm_embedding", f"{jx}layernorm_embedding"))
    for i in range(config.decoder_layers if is_decoder else config.encoder_layers):
        h, j = f"{hf}layers.{i}.", f"{jx}layers.{i}."
        for attn in ("self_attn", "encoder_attn") if is_decoder else ("self_attn",):
            for proj in ("q_proj", "k_proj", "v_proj"):
                rules += linear(f"{h}{attn}.{proj}", f"{j}{attn}.{proj}")
            rules += linear(f"{h}{attn}.out_proj", f"{j}{attn}.out_proj", n_in=2)
            rules += layer_norm(f"{h}{attn}_layer_norm", f"{j}{attn}_layer_norm")
        rules += linear(f"{h}fc1", f"{j}fc1") + linear(f"{h}fc2", f"{j}fc2")
        rules += layer_norm(f"{h}final_layer_norm", f"{j}final_layer_norm")
    return rules


_EMBEDDING_KEYS = ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")


@register(default_for_model_type=True)
class BartForConditionalGeneration(Seq2SeqLM, PretrainedModel):
    config_class = BartConfig
    hf_architecture = "BartForConditionalGeneration"
    # Copies of the shared embedding, and fairseq leftovers transformers also ignores.
    hf_ignore_unexpected = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                            "lm_head.weight", "*.version", "*position_ids")

    def __init__(self, config: BartConfig, *, rngs: nnx.Rngs, **compute):
        """``compute``: the :class:`ComputeSettings` fields (dtype, param_dtype, remat, remat_policy,
        scan_layers)."""
        self.config = config
        self.compute = rt = ComputeSettings(**compute)
        dtype, param_dtype = rt.dtype, rt.param_dtype
        self.shared = L.Embed(config.vocab_size, config.d_model, (L.VOCAB, L.EMBED), dtype=dtype,
                              param_dtype=param_dtype, init_std=config.init_std, rngs=rngs)
        self.encoder = BartStack(config, rt, is_decoder=False, rngs=rngs)
        self.decoder = BartStack(config, rt, is_decoder=True, rngs=rngs)
        self.final_logits_bias = L.Buffer(jnp.zeros((1, config.vocab_size), param_dtype),
                                          out_sharding=(None, L.VOCAB), eager_sharding=False)

    # ---- conversion --------------------------------------------------------------------------------------
    @classmethod
    def hf_rules(cls, config: BartConfig) -> list[Rule]:
        return (embedding("model.shared.weight", "shared") + _stack_rules(config, "encoder")
                + _stack_rules(config, "decoder") + [Rule("final_logits_bias", "final_logits_bias")])

    @classmethod
    def adapt_state_dict(cls, state, config, source_config):
        state = dict(state)
        # A BartModel checkpoint (no "model." prefix) starts a generation model, as in transformers.
        if state and not any(k.startswith("model.") for k in state):
            state = {k if k in ("final_logits_bias", "lm_head.weight") else f"model.{k}": v for k, v in state.items()}
        if "model.shared.weight" not in state:
            for key in _EMBEDDING_KEYS[1:] + ("lm_head.weight",):
                if key in state:
                    state["model.shared.weight"] = state[key]
                    break
        if "final_logits_bias" not in state:  # transformers leaves it at zeros when missing
            state["final_logits_bias"] = np.zeros((1, config.vocab_size), np.float32)
        return state

    # ---- seq2seq interface -------------------------------------------------------------------------------
    @property
    def decoder_start_token_id(self) -> int:
        return self.config.decoder_start_token_id

    def init_cache(self, batch_size: int, max_length: int, encoder_hidden=None, dtype=None) -> DecoderCache:
        if max_length > self.config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings} of the config")
        return super().init_cache(batch_size, max_length, encoder_hidden, dtype)

    def output_logits(self, hidden):
        return self.shared.attend(hidden) + self.final_logits_bias[...].astype(hidden.dtype)

"""T5 in Flax NNX, exact to transformers' ``T5ForConditionalGeneration`` (original T5, T5 v1.1, Flan-T5).

What differs from BERT-style models: relative position buckets added to unscaled attention scores (the bias
table lives in the first layer of each stack and is shared by the others; bidirectional buckets in the encoder,
causal ones in the decoder), RMS layer norm without bias, pre-norm residual blocks, ReLU or gated-GELU
feed-forwards, one embedding shared by encoder, decoder and (when tied) the output projection.

Tied vs untied output projection, as transformers 5 reads it: the config's ``tie_word_embeddings`` (before
transformers rewrites it) decides only ``scale_decoder_outputs`` (the ``d_model ** -0.5`` rescale); whether
``lm_head`` is its own matrix is decided by the checkpoint: an ``lm_head.weight`` that differs from
``shared.weight`` is untied. Here ``T5Config.tie_word_embeddings`` means "no separate lm_head" and both are
written back explicitly, so transformers loads our output with no missing keys and the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rdr_jax.convert.hf_io import checkpoint_files, torch_to_numpy
from rdr_jax.convert.mapping import Rule, embedding, linear
from rdr_jax.models import layers as L
from rdr_jax.models.base import ORBAX_SUBDIR, PretrainedModel, register
from rdr_jax.models.config import ModelConfig, ComputeSettings
from rdr_jax.models.seq2seq import Seq2SeqBlock, Seq2SeqLM, Seq2SeqStack
from rdr_jax.models.stacking import make_layers


@dataclasses.dataclass
class T5Config(ModelConfig):
    model_type = "t5"
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    is_encoder_decoder: bool = True
    pad_token_id: int = 0
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int | None = None
    # True: the output projection is the shared embedding (no lm_head matrix).
    tie_word_embeddings: bool = True
    # Multiply the decoder output by d_model ** -0.5 before the output projection. None: as transformers
    # derives it, from tie_word_embeddings.
    scale_decoder_outputs: bool | None = None

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings is not False

    def validate(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r} must be 'ACT' or 'gated-ACT' "
                             "(e.g. 'relu', 'gated-gelu')")
        L.activation(self.dense_act_fn)

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        # transformers maps "gated-gelu" to the tanh approximation (T5 v1.1's original activation).
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @property
    def start_token_id(self) -> int:
        """T5 starts decoding with the pad token unless the config says otherwise."""
        return self.pad_token_id if self.decoder_start_token_id is None else self.decoder_start_token_id

    def to_dict(self):
        out = super().to_dict()
        if out.get("decoder_start_token_id") is None:
            out.pop("decoder_start_token_id", None)
        out["dense_act_fn"], out["is_gated_act"] = self.dense_act_fn, self.is_gated_act
        return out


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """transformers' ``T5Attention._relative_position_bucket`` (memory position minus query position -> bucket).

    Half the buckets are exact small distances, the rest logarithmic up to ``max_distance``; bidirectional
    buckets split the range between keys before and after the query, causal ones map every future key to 0.
    The log is taken in float32 and truncated, as in transformers, so the bucket edges are the same.
    """
    relative_position = jnp.asarray(relative_position, jnp.int32)
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log(0) is -inf here, as in transformers; those entries are small and never selected.
    scaled = (jnp.log(distance.astype(jnp.float32) / max_exact)
              / jnp.float32(math.log(max_distance / max_exact)) * (num_buckets - max_exact))
    if_large = max_exact + jnp.where(is_small, 0, scaled).astype(jnp.int32)
    if_large = jnp.minimum(if_large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, if_large)


class T5LayerNorm(nnx.Module):
    """RMS norm: no mean subtraction, no bias, variance in float32."""

    def __init__(self, features: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=(L.NORM,), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return (self.scale[...].astype(jnp.float32) * (x32 * jax.lax.rsqrt(variance + self.eps))).astype(self.dtype)


class T5Attention(nnx.Module):
    """Multi-head attention without biases or score scaling (T5 folds the scale into its initialisation)."""

    def __init__(self, config: T5Config, rt: ComputeSettings, *, rngs: nnx.Rngs):
        E, H, D, f = config.d_model, config.num_heads, config.d_kv, config.initializer_factor
        kw = dict(use_bias=False, dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        self.q = L.Dense(E, (H, D), (L.EMBED,), (L.HEADS, L.KV), init_std=f * (E * D) ** -0.5, **kw)
        self.k = L.Dense(E, (H, D), (L.EMBED,), (L.HEADS, L.KV), init_std=f * E ** -0.5, **kw)
        self.v = L.Dense(E, (H, D), (L.EMBED,), (L.HEADS, L.KV), init_std=f * E ** -0.5, **kw)
        self.o = L.Dense((H, D), E, (L.HEADS, L.KV), (L.EMBED,), init_std=f * (H * D) ** -0.5, **kw)
        self.dropout = nnx.Dropout(config.dropout_rate)
        self.dtype = rt.dtype

    def __call__(self, x, keys, values, mask, bias, *, rngs=None, deterministic=True):
        """``keys``/``values``: heads-first ``[batch or rows, heads, k_len, kv]``, as the cache holds them."""
        context = L.dot_product_attention(
            self.q(x), keys, values, mask=mask, bias=bias, scale=1.0, dtype=self.dtype, kv_heads_first=True,
            dropout=L.active_dropout(self.dropout, deterministic=deterministic, rngs=rngs))
        return self.o(context)


class T5FeedForward(nnx.Module):
    """``DenseReluDense``: wi -> act -> dropout -> wo, or gated: act(wi_0 x) * wi_1 x -> dropout -> wo."""

    def __init__(self, config: T5Config, rt: ComputeSettings, *, rngs: nnx.Rngs):
        E, F, f = config.d_model, config.d_ff, config.initializer_factor
        kw = dict(use_bias=False, dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        self.gated = config.is_gated_act
        if self.gated:
            self.wi_0 = L.Dense(E, F, (L.EMBED,), (L.MLP,), init_std=f * E ** -0.5, **kw)
            self.wi_1 = L.Dense(E, F, (L.EMBED,), (L.MLP,), init_std=f * E ** -0.5, **kw)
        else:
            self.wi = L.Dense(E, F, (L.EMBED,), (L.MLP,), init_std=f * E ** -0.5, **kw)
        self.wo = L.Dense(F, E, (L.MLP,), (L.EMBED,), init_std=f * F ** -0.5, **kw)
        self.act = L.activation(config.dense_act_fn)
        self.dropout = nnx.Dropout(config.dropout_rate)

    def __call__(self, x, *, rngs=None, deterministic=True):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(self.dropout(h, deterministic=deterministic, rngs=rngs))


class T5Block(Seq2SeqBlock):
    """Pre-norm block: self-attention, cross-attention (decoder only), feed-forward, each x + dropout(f(norm(x)))."""

    def __init__(self, config: T5Config, rt: ComputeSettings, *, is_decoder: bool, rngs: nnx.Rngs):
        norm = partial(T5LayerNorm, config.d_model, config.layer_norm_epsilon, dtype=rt.dtype,
                       param_dtype=rt.param_dtype)
        self.self_attention = T5Attention(config, rt, rngs=rngs)
        self.self_attention_norm = norm()
        self.is_decoder = is_decoder
        if is_decoder:
            self.cross_attention = T5Attention(config, rt, rngs=rngs)
            self.cross_attention_norm = norm()
        self.feed_forward = T5FeedForward(config, rt, rngs=rngs)
        self.feed_forward_norm = norm()
        self.dropout = nnx.Dropout(config.dropout_rate)

    def self_kv(self, h):
        return self.self_attention.k(h), self.self_attention.v(h)

    def cross_kv(self, encoder_hidden):
        return self.cross_attention.k(encoder_hidden), self.cross_attention.v(encoder_hidden)

    def __call__(self, x, mask, bias, encoder_hidden=None, cross_mask=None, self_kv_cache=None, cross_kv=None,
                 *, rngs=None, deterministic=True):
        drop = partial(self.dropout, deterministic=deterministic, rngs=rngs)
        h = self.self_attention_norm(x)
        keys, values = self.self_attention_kv(h, self_kv_cache)
        x = x + drop(self.self_attention(h, keys, values, mask, bias, rngs=rngs, deterministic=deterministic))
        if self.is_decoder:
            cross_kv = self.cross_attention_kv(encoder_hidden, cross_kv)
            h = self.cross_attention_norm(x)
            x = x + drop(self.cross_attention(h, *cross_kv, cross_mask, None, rngs=rngs,
                                              deterministic=deterministic))
        x = x + drop(self.feed_forward(self.feed_forward_norm(x), rngs=rngs, deterministic=deterministic))
        return x, (keys, values)


class T5Stack(Seq2SeqStack):
    """Encoder or decoder: dropout, blocks over already embedded tokens, then the final norm and dropout.

    The relative position bias table is a stack-level parameter (transformers stores it in block 0, which
    computes the bias that every block then reuses; the numbers are the same).
    """

    def __init__(self, config: T5Config, rt: ComputeSettings, *, is_decoder: bool, rngs: nnx.Rngs):
        self.config, self.rt, self.is_decoder = config, rt, is_decoder
        self.num_heads, self.head_dim = config.num_heads, config.d_kv
        num_layers = config.num_decoder_layers if is_decoder else config.num_layers
        self.relative_attention_bias = L.param(
            rngs, L.normal_init(config.initializer_factor * config.d_model ** -0.5),
            (config.relative_attention_num_buckets, config.num_heads), (None, L.HEADS), rt.param_dtype)
        self.layers = make_layers(lambda r: T5Block(config, rt, is_decoder=is_decoder, rngs=r), num_layers, rt, rngs)
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, dtype=rt.dtype,
                                            param_dtype=rt.param_dtype)
        self.dropout = nnx.Dropout(config.dropout_rate)

    def position_bias(self, query_length: int, key_length: int, offset=0) -> jax.Array:
        """``[1, heads, query_length, key_length]``, queries at positions ``offset + t``."""
        query_pos = jnp.arange(query_length)[:, None] + offset
        buckets = relative_position_bucket(
            jnp.arange(key_length)[None, :] - query_pos, bidirectional=not self.is_decoder,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance)
        values = jnp.take(self.relative_attention_bias[...], buckets, axis=0)  # [q, k, heads]
        return jnp.transpose(values, (2, 0, 1))[None].astype(self.rt.dtype)

    def attention_bias(self, query_length, key_length, offset):
        return self.position_bias(query_length, key_length, offset)

    def embed(self, token_embeddings, offset, *, rngs=None, deterministic=True):
        return self.dropout(token_embeddings, deterministic=deterministic, rngs=rngs)

    def finish(self, x, *, rngs=None, deterministic=True):
        return self.dropout(self.final_layer_norm(x), deterministic=deterministic, rngs=rngs)


def _stack_rules(config: T5Config, stack: str) -> list[Rule]:
    is_decoder = stack == "decoder"
    num_layers = config.num_decoder_layers if is_decoder else config.num_layers
    rules = [Rule(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                  f"{stack}.relative_attention_bias"),
             Rule(f"{stack}.final_layer_norm.weight", f"{stack}.final_layer_norm.scale")]
    for i in range(num_layers):
        h, j = f"{stack}.block.{i}.layer.", f"{stack}.layers.{i}."
        attention = [("0.SelfAttention", "self_attention")]
        if is_decoder:
            attention.append(("1.EncDecAttention", "cross_attention"))
        for hf_name, jax_name in attention:
            for proj in ("q", "k", "v"):
                rules += linear(f"{h}{hf_name}.{proj}", f"{j}{jax_name}.{proj}", bias=False)
            rules += linear(f"{h}{hf_name}.o", f"{j}{jax_name}.o", n_in=2, bias=False)
            rules.append(Rule(f"{h}{hf_name.split('.')[0]}.layer_norm.weight", f"{j}{jax_name}_norm.scale"))
        ff = 2 if is_decoder else 1
        for proj in (("wi_0", "wi_1") if config.is_gated_act else ("wi",)) + ("wo",):
            rules += linear(f"{h}{ff}.DenseReluDense.{proj}", f"{j}feed_forward.{proj}", bias=False)
        rules.append(Rule(f"{h}{ff}.layer_norm.weight", f"{j}feed_forward_norm.scale"))
    return rules


def _read_tensors(model_dir: Path, names: set[str]) -> dict[str, np.ndarray]:
    """Only the named tensors of a checkpoint (safetensors read lazily, .bin memory-mapped)."""
    found = {}
    for path in checkpoint_files(model_dir):
        if path.name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), "np") as f:
                for name in names & set(f.keys()):
                    found[name] = f.get_tensor(name)
        else:
            import torch

            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            for name in names & set(state):
                found[name] = torch_to_numpy(state[name])
    return found


_EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


@register(default_for_model_type=True)
class T5ForConditionalGeneration(Seq2SeqLM, PretrainedModel):
    config_class = T5Config
    hf_architecture = "T5ForConditionalGeneration"
    # Copies of the shared embedding, and a tensor transformers itself ignores.
    hf_ignore_unexpected = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight",
                            "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, **compute):
        """``compute``: the :class:`ComputeSettings` fields (dtype, param_dtype, remat, remat_policy,
        scan_layers)."""
        self.config = config
        self.compute = rt = ComputeSettings(**compute)
        dtype, param_dtype = rt.dtype, rt.param_dtype
        self.shared = L.Embed(config.vocab_size, config.d_model, (L.VOCAB, L.EMBED), dtype=dtype,
                              param_dtype=param_dtype, init_std=config.initializer_factor, rngs=rngs)
        self.encoder = T5Stack(config, rt, is_decoder=False, rngs=rngs)
        self.decoder = T5Stack(config, rt, is_decoder=True, rngs=rngs)
        self.lm_head = (None if config.tie_word_embeddings else
                        L.Dense(config.d_model, config.vocab_size, (L.EMBED,), (L.VOCAB,), use_bias=False,
                                dtype=dtype, param_dtype=param_dtype, init_std=config.initializer_factor,
                                rngs=rngs))

    # ---- conversion --------------------------------------------------------------------------------------
    @classmethod
    def hf_rules(cls, config: T5Config) -> list[Rule]:
        rules = embedding("shared.weight", "shared") + _stack_rules(config, "encoder") + _stack_rules(config, "decoder")
        if not config.tie_word_embeddings:
            rules += linear("lm_head", "lm_head", bias=False)
        return rules

    @classmethod
    def config_for_checkpoint(cls, config: T5Config, model_dir: Path) -> T5Config:
        """Untied iff the checkpoint holds an ``lm_head.weight`` that differs from the embedding (as transformers
        decides); the rescale stays as the config says."""
        if (model_dir / ORBAX_SUBDIR).is_dir():
            return config
        tensors = _read_tensors(model_dir, {"lm_head.weight", *_EMBEDDING_KEYS})
        lm_head = tensors.get("lm_head.weight")
        embed = next((tensors[k] for k in _EMBEDDING_KEYS if k in tensors), None)
        separate = lm_head is not None and (embed is None or lm_head.shape != embed.shape
                                            or not np.array_equal(lm_head, embed))
        return config.replace(tie_word_embeddings=not separate)

    @classmethod
    def adapt_state_dict(cls, state, config, source_config):
        # Older checkpoints may store the embedding only under the stacks' names.
        if "shared.weight" not in state:
            for key in _EMBEDDING_KEYS[1:]:
                if key in state:
                    return {**state, "shared.weight": state[key]}
        return state

    # ---- seq2seq interface -------------------------------------------------------------------------------
    @property
    def decoder_start_token_id(self) -> int:
        return self.config.start_token_id

    def output_logits(self, hidden):
        if self.config.scale_decoder_outputs:
            hidden = hidden * (self.config.d_model ** -0.5)
        return self.shared.attend(hidden) if self.lm_head is None else self.lm_head(hidden)

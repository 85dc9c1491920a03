"""What the seq2seq families (T5, BART) share: the decoding interface, its cache, and the encoder/decoder stack.

Every seq2seq model implements::

    encode(input_ids, attention_mask) -> encoder_hidden [B, S, E]
    init_cache(batch_size, max_length, encoder_hidden=None) -> DecoderCache
    decode(decoder_input_ids [B, T], encoder_hidden, encoder_attention_mask, cache=None) -> (logits [B, T, V], cache)
    __call__(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None) -> Seq2SeqLMOutput

The cache is a plain pytree (:class:`DecoderCache`), not NNX state, so decoding stays purely functional and the
cache can be the carry of ``jax.lax.while_loop``/``scan``. ``decode`` with a cache writes the keys/values of its
``T`` new tokens at ``cache.index`` and returns the cache advanced by ``T``; every row of the batch decodes in
lockstep (one shared index), which is what beam search needs. The cache is kept heads-first
(``[batch, heads, length, kv]``), the layout attention reads, so a step transposes only its new tokens.

Cross-attention keys/values: when ``init_cache`` is given the encoder output, it projects it once per decoder
layer and stores the result in the cache (``cross_keys``/``cross_values``); ``decode`` then uses those and does
not project ``encoder_hidden`` again (it still needs ``encoder_attention_mask``). Without it they are recomputed
from ``encoder_hidden`` at every step: slower, same numbers. The encoder output may have fewer rows than the
decoder batch, ``batch = rows * group``: decoder rows ``r * group ... r * group + group - 1`` then share encoder
row ``r`` (the beams of one question), whose keys/values are projected and read once for all of them; pass the
same ``rows``-row ``encoder_attention_mask`` to ``decode``.

The families share one stack (:class:`Seq2SeqStack`: the loop over the blocks, remat, the cache threaded through
the layers) and one cache plumbing in the blocks (:class:`Seq2SeqBlock`); :class:`Seq2SeqLM` builds ``encode``,
``init_cache``, ``decode`` and ``__call__`` on them. A family supplies its blocks (attention, norms,
feed-forward), its embedding hooks and output projection, and its name map.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from rdr_jax.models.layers import heads_first, padding_mask
from rdr_jax.models.stacking import layer_at, layer_keys, num_layers, run_layers
from rdr_jax.models.outputs import Seq2SeqLMOutput


@struct.dataclass
class DecoderCache:
    """Preallocated decoder keys/values, one ``[batch, heads, max_length, kv]`` array per layer.

    ``index`` (int32 scalar) is the number of decoder positions already written.
    """
    self_keys: tuple[jax.Array, ...]
    self_values: tuple[jax.Array, ...]
    index: jax.Array
    cross_keys: tuple[jax.Array, ...] | None = None   # [encoder rows, heads, source_length, kv] per layer
    cross_values: tuple[jax.Array, ...] | None = None

    @property
    def max_length(self) -> int:
        return self.self_keys[0].shape[2]


def empty_cache(num_layers: int, batch_size: int, max_length: int, num_heads: int, head_dim: int, dtype,
                cross: tuple[list[jax.Array], list[jax.Array]] | None = None) -> DecoderCache:
    """An empty cache; ``cross``: the projected encoder keys and values of each layer, ``[rows, source, heads,
    kv]`` as the projections return them (stored heads-first)."""
    shape = (batch_size, num_heads, max_length, head_dim)
    if cross is not None and batch_size % cross[0][0].shape[0]:
        raise ValueError(f"the decoder batch ({batch_size}) must be a multiple of the encoder rows "
                         f"({cross[0][0].shape[0]}): each encoder row serves a block of decoder rows")
    stored = lambda arrays: tuple(heads_first(a).astype(dtype) for a in arrays)
    return DecoderCache(
        self_keys=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
        self_values=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
        index=jnp.zeros((), jnp.int32),
        cross_keys=stored(cross[0]) if cross is not None else None,
        cross_values=stored(cross[1]) if cross is not None else None)


def reorder_cache(cache: DecoderCache, batch_indices: jax.Array, *, cross: bool = True) -> DecoderCache:
    """The cache with its batch rows gathered by ``batch_indices`` (beam search keeping the surviving beams).

    ``cross=False`` leaves the cross-attention keys/values in place: exact when every row is replaced by a row
    with the same encoder input (beams of one question), and it saves the largest gather of each step. A cache
    whose encoder rows each serve a block of decoder rows must keep them (``cross=False``).
    """
    if cross and cache.cross_keys is not None and cache.cross_keys[0].shape[0] != cache.self_keys[0].shape[0]:
        raise ValueError("the cache's encoder rows each serve a block of decoder rows; reorder with cross=False")
    take = lambda arrays: None if arrays is None else tuple(jnp.take(a, batch_indices, axis=0) for a in arrays)
    moved = cache.replace(self_keys=take(cache.self_keys), self_values=take(cache.self_values))
    if cross:
        moved = moved.replace(cross_keys=take(cache.cross_keys), cross_values=take(cache.cross_values))
    return moved


def write_kv(cache_array: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """``new`` [B, H, T, D] written into ``cache_array`` [B, H, max_length, D] at position ``index``."""
    return jax.lax.dynamic_update_slice(cache_array, new.astype(cache_array.dtype),
                                        (0, 0, jnp.asarray(index, jnp.int32), 0))


def causal_mask(query_length: int, key_length: int, offset: jax.Array | int = 0,
                decoder_attention_mask: jax.Array | None = None) -> jax.Array:
    """Boolean ``[B or 1, 1, query_length, key_length]``: query ``t`` (at position ``offset + t``) sees keys at
    positions ``<= offset + t`` that ``decoder_attention_mask`` (``[B, key_length]``) does not mask."""
    query_pos = jnp.arange(query_length)[:, None] + offset
    mask = (jnp.arange(key_length)[None, :] <= query_pos)[None, None]
    if decoder_attention_mask is not None:
        mask = mask & jnp.asarray(decoder_attention_mask).astype(bool)[:, None, None, :]
    return mask


def shift_right(labels: jax.Array, decoder_start_token_id: int, pad_token_id: int) -> jax.Array:
    """transformers' ``shift_tokens_right``: start token first, labels shifted by one, -100 replaced by pad."""
    labels = jnp.asarray(labels)
    start = jnp.full(labels.shape[:-1] + (1,), decoder_start_token_id, labels.dtype)
    shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


class Seq2SeqBlock(nnx.Module):
    """An encoder or decoder block of a family, as :class:`Seq2SeqStack` drives it::

        block(x, mask, bias, encoder_hidden, cross_mask, self_kv_cache, cross_kv, *, rngs, deterministic)
            -> (x, (keys, values))

    ``bias`` is added to the self-attention scores (None: nothing); ``self_kv_cache`` is this layer's
    ``(keys, values, index)`` of the cache, the new keys/values being written at ``index``; ``cross_kv`` the
    cache's heads-first cross keys/values of this layer, or None to project ``encoder_hidden``. The returned
    keys/values are this layer's for the cache. A family gives the projections (:meth:`self_kv`,
    :meth:`cross_kv`); the cache plumbing is :meth:`self_attention_kv` / :meth:`cross_attention_kv`.
    """

    def self_kv(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Self-attention keys and values of ``h``, ``[batch, length, heads, kv]``."""
        raise NotImplementedError

    def cross_kv(self, encoder_hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Cross-attention keys and values of the encoder output, ``[rows, source_length, heads, kv]``."""
        raise NotImplementedError

    def self_attention_kv(self, h, self_kv_cache) -> tuple[jax.Array, jax.Array]:
        """Heads-first keys/values the self-attention reads: those of ``h``, or with a cache the cache's with
        those of ``h`` written at its index."""
        keys, values = (heads_first(a) for a in self.self_kv(h))
        if self_kv_cache is not None:
            cache_keys, cache_values, index = self_kv_cache
            keys, values = write_kv(cache_keys, keys, index), write_kv(cache_values, values, index)
        return keys, values

    def cross_attention_kv(self, encoder_hidden, cross_kv) -> tuple[jax.Array, jax.Array]:
        """Heads-first keys/values the cross-attention reads: the cache's when given, else projected."""
        if cross_kv is not None:
            return cross_kv
        return tuple(heads_first(a) for a in self.cross_kv(encoder_hidden))


class Seq2SeqStack(nnx.Module):
    """Encoder or decoder stack: :meth:`embed` -> the blocks -> :meth:`finish`.

    A family sets ``layers`` (:class:`Seq2SeqBlock` s from :func:`rdr_jax.models.stacking.make_layers`), ``rt`` (its
    :class:`~rdr_jax.models.config.ComputeSettings`), ``num_heads`` and ``head_dim`` (the decoder cache's shape), and
    overrides the hooks it needs. Without a cache the positions start at 0 and the blocks run through
    :func:`~rdr_jax.models.stacking.run_layers` (scanned with ``rt.scan_layers``, rematerialised under
    ``rt.remat_policy``); with one, the tokens sit at ``cache.index`` and the cache comes back advanced.
    """

    def embed(self, token_embeddings: jax.Array, offset, *, rngs=None, deterministic=True) -> jax.Array:
        """The blocks' input, from the token embeddings of positions ``offset, offset + 1, ...``."""
        return token_embeddings

    def attention_bias(self, query_length: int, key_length: int, offset) -> jax.Array | None:
        """Added to every block's self-attention scores (``[1, heads, query_length, key_length]``), or None."""
        return None

    def finish(self, x: jax.Array, *, rngs=None, deterministic=True) -> jax.Array:
        """The stack's output from the last block's."""
        return x

    def init_cache(self, batch_size: int, max_length: int, encoder_hidden: jax.Array | None = None,
                   dtype=None) -> DecoderCache:
        """An empty cache for these layers; with ``encoder_hidden``, its cross keys/values projected once."""
        cross = None
        if encoder_hidden is not None:
            projected = [layer_at(self.layers, i).cross_kv(encoder_hidden)
                         for i in range(num_layers(self.layers))]
            cross = ([k for k, _ in projected], [v for _, v in projected])
        return empty_cache(num_layers(self.layers), batch_size, max_length, self.num_heads, self.head_dim,
                           dtype or self.rt.dtype, cross)

    def __call__(self, token_embeddings, mask, *, encoder_hidden=None, cross_mask=None,
                 cache: DecoderCache | None = None, rngs=None, deterministic=True):
        """``(output, cache)``; ``mask`` is the self-attention mask, ``cross_mask`` the encoder padding."""
        length = token_embeddings.shape[1]
        offset, key_length = (0, length) if cache is None else (cache.index, cache.max_length)
        bias = self.attention_bias(length, key_length, offset)
        x = self.embed(token_embeddings, offset, rngs=rngs, deterministic=deterministic)
        if cache is None:
            def step(layer, h, r):
                return layer(h, mask, bias, encoder_hidden, cross_mask, rngs=r, deterministic=deterministic)[0]

            keys = layer_keys(rngs, num_layers(self.layers), deterministic=deterministic)
            x, _ = run_layers(self.layers, step, x, rt=self.rt, keys=keys)
        else:  # a decoding step: layer by layer, each with its slice of the cache
            new_keys, new_values = [], []
            for i in range(num_layers(self.layers)):
                layer = layer_at(self.layers, i)
                cross = (cache.cross_keys[i], cache.cross_values[i]) if cache.cross_keys is not None else None
                x, (k, v) = layer(x, mask, bias, encoder_hidden, cross_mask,
                                  (cache.self_keys[i], cache.self_values[i], cache.index), cross,
                                  rngs=rngs, deterministic=deterministic)
                new_keys.append(k)
                new_values.append(v)
            cache = cache.replace(self_keys=tuple(new_keys), self_values=tuple(new_values),
                                  index=cache.index + length)
        return self.finish(x, rngs=rngs, deterministic=deterministic), cache


class Seq2SeqLM:
    """Mixin of the seq2seq families: the interface above built on ``shared`` (the token embedding),
    ``encoder`` and ``decoder`` (:class:`Seq2SeqStack`); a family adds :meth:`output_logits` and the two
    token ids."""

    @property
    def decoder_start_token_id(self) -> int:
        raise NotImplementedError

    @property
    def pad_token_id(self) -> int:
        return self.config.pad_token_id

    def output_logits(self, hidden: jax.Array) -> jax.Array:
        """LM logits ``[B, T, V]`` from the decoder output."""
        raise NotImplementedError

    def encode(self, input_ids, attention_mask=None, *, rngs=None, deterministic: bool = True) -> jax.Array:
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        hidden, _ = self.encoder(self.shared(input_ids), padding_mask(jnp.asarray(attention_mask)),
                                 rngs=rngs, deterministic=deterministic)
        return hidden

    def init_cache(self, batch_size: int, max_length: int, encoder_hidden: jax.Array | None = None,
                   dtype=None) -> DecoderCache:
        return self.decoder.init_cache(batch_size, max_length, encoder_hidden, dtype)

    def decode(self, decoder_input_ids, encoder_hidden, encoder_attention_mask=None,
               cache: DecoderCache | None = None, *, decoder_attention_mask=None, rngs=None,
               deterministic: bool = True) -> tuple[jax.Array, DecoderCache | None]:
        decoder_input_ids = jnp.asarray(decoder_input_ids)
        length = decoder_input_ids.shape[1]
        if cache is None:
            mask = causal_mask(length, length, 0, decoder_attention_mask)
        else:
            if decoder_attention_mask is not None:
                raise ValueError("decoder_attention_mask is not supported with a cache (decode all rows in step)")
            mask = causal_mask(length, cache.max_length, cache.index)
        cross_mask = None if encoder_attention_mask is None else padding_mask(jnp.asarray(encoder_attention_mask))
        hidden, cache = self.decoder(self.shared(decoder_input_ids), mask, encoder_hidden=encoder_hidden,
                                     cross_mask=cross_mask, cache=cache, rngs=rngs, deterministic=deterministic)
        return self.output_logits(hidden), cache

    def constrained_beam_search(self, input_ids, attention_mask, trie, num_beams: int, max_length=None):
        """``(sequences [batch, num_beams, length], scores [batch, num_beams])``: only identifiers in ``trie``
        (a :class:`rdr_jax.decoding.PrefixTrie`), scores = summed token log-probabilities, best first.
        The same as :func:`rdr_jax.decoding.constrained_beam_search` of this model."""
        # The documented delegate to the decoding layer, which sits above the models: the one upward import
        # of rdr_jax.models, made at call time so that importing a model never imports rdr_jax.decoding.
        from rdr_jax.decoding import constrained_beam_search

        return constrained_beam_search(self, input_ids, attention_mask, trie, num_beams, max_length)

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, *,
                 rngs=None, deterministic: bool = True) -> Seq2SeqLMOutput:
        """transformers' forward without labels: LM logits of ``decoder_input_ids`` given the inputs."""
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids is required (build it with shift_right(labels, ...))")
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        encoder_hidden = self.encode(input_ids, attention_mask, rngs=rngs, deterministic=deterministic)
        logits, _ = self.decode(decoder_input_ids, encoder_hidden, attention_mask,
                                decoder_attention_mask=decoder_attention_mask, rngs=rngs,
                                deterministic=deterministic)
        return Seq2SeqLMOutput(logits=logits, encoder_last_hidden_state=encoder_hidden)


def sequence_log_probs(model: Any, input_ids, attention_mask, target_ids, target_mask, *, rngs=None,
                       deterministic: bool = True) -> jax.Array:
    """Summed token log-probabilities ``[B]`` of ``target_ids`` given the inputs (teacher forced).

    Decoder inputs are the targets shifted right behind the decoder start token; positions where
    ``target_mask`` is 0 (padding) count for nothing. Log-softmax is taken in float32.
    """
    target_ids, target_mask = jnp.asarray(target_ids), jnp.asarray(target_mask)
    targets = jnp.where(target_mask.astype(bool), target_ids, model.pad_token_id)
    decoder_input_ids = shift_right(targets, model.decoder_start_token_id, model.pad_token_id)
    logits = model(input_ids, attention_mask, decoder_input_ids, rngs=rngs, deterministic=deterministic).logits
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_log_probs * target_mask.astype(jnp.float32), axis=-1)

"""Trie-constrained beam search for the seq2seq models (T5, BART), one jit-compiled function.

The search is a function of a model (as t5x's and gemma's decode functions): it reads the model only through
the interface of :mod:`rdr_jax.models.seq2seq` (``encode``, ``init_cache``, ``decode``), so the models do not
depend on it; ``model.constrained_beam_search(...)`` is a delegate to :func:`constrained_beam_search`.

The search follows transformers' beam search (``generate(num_beams=K, early_stopping=True, length_penalty=0.0,
prefix_allowed_tokens_fn=...)``) so both return the same identifiers and scores:

- a beam's score is its summed token log-probabilities: log-softmax over the full vocabulary in float32, then
  tokens the trie does not allow set to -inf (as ``PrefixConstrainedLogitsProcessor`` does after log-softmax);
  no length penalty (transformers with ``length_penalty=0.0``: ``score / length ** 0``);
- the first token is chosen once per question (every beam holds the same prefix then: the start token), its
  best continuations seeding the K beams (transformers gets the same by starting beams 1..K-1 at -1e9);
- each step takes the top ``2K`` continuations of all beams; those ending with EOS among the first ``K`` join
  the finished set (best ``K`` kept), the best ``K`` others stay alive; a finished beam is never extended;
- a row stops once it has ``K`` finished identifiers (``early_stopping=True``) or nothing left alive; the loop
  stops when every row has, or after ``max_length`` tokens.

Differences from transformers, both about rows with too few identifiers: the beams that start dead are -inf
here (transformers: -1e9, which can later return the same identifier twice with a score near -1e9), and only
complete identifiers come out (transformers also returns unfinished beams cut at ``max_length``); missing
beams have score -inf and a sequence of padding.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from rdr_jax.decoding.substring_index import DeviceSubstringIndex, SubstringIndex
from rdr_jax.decoding.substring_parts import PartitionedSubstringIndex
from rdr_jax.decoding.substring_union import DeviceSubstringUnion
from rdr_jax.decoding.trie import DeviceTrie, PrefixTrie
from rdr_jax.models.seq2seq import DecoderCache, reorder_cache


@struct.dataclass
class _SearchState:
    step: jax.Array            # int32 scalar: tokens generated so far
    cache: DecoderCache        # batch * beams rows (batch before the first token), cross K/V one row per question
    alive_tokens: jax.Array    # [B, K, T] generated tokens (padding after the current step)
    alive_scores: jax.Array    # [B, K] summed log-probs; -inf for dead beams
    alive_nodes: Any           # [B, K] where each alive beam is in the constraint (a trie node, a suffix range)
    finished_tokens: jax.Array  # [B, K, T]
    finished_scores: jax.Array  # [B, K], best first; -inf for empty slots
    done: jax.Array            # [B] row has its K identifiers or nothing alive


def _take(values: jax.Array, indices: jax.Array) -> jax.Array:
    """``values [B, N, ...]`` gathered along axis 1 by ``indices [B, M]``."""
    indices = indices.reshape(indices.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, indices, axis=1)


def _log_probs(logits: jax.Array):
    """``logits [..., V]`` -> ``at(tokens [..., N])``: their log-softmax at ``tokens`` (``None``: every token),
    with jax.nn.log_softmax's arithmetic, ``(x - max) - log(sum(exp(x - max)))``, not materialised for all."""
    shift = jnp.max(logits, axis=-1, keepdims=True)
    log_normaliser = jnp.log(jnp.sum(jnp.exp(logits - shift), axis=-1, keepdims=True))

    def at(tokens):
        picked = logits if tokens is None else jnp.take_along_axis(logits, tokens, axis=-1)
        return (picked - shift) - log_normaliser

    return at


def _decode(model, tokens, encoder_hidden, encoder_mask, cache, vocab_size: int):
    """One token per cache row -> float32 logits ``[rows, vocab_size]`` and the advanced cache."""
    logits, cache = model.decode(tokens[:, None], encoder_hidden, encoder_mask, cache)
    return logits[:, 0, :vocab_size].astype(jnp.float32), cache


def _advance(state: _SearchState, candidates, cache: DecoderCache, *, num_beams: int, eos_token_id: int,
             rows_per_question: int) -> _SearchState:
    """The state after one token, from the top ``2K`` candidates ``(score, parent beam, token, trie node)``;
    ``cache`` (``rows_per_question`` rows per question) is gathered into the ``K`` surviving beams' rows."""
    K = num_beams
    top_scores, parent, token, child = candidates
    B = top_scores.shape[0]
    position = jnp.arange(state.alive_tokens.shape[-1]) == state.step
    top_tokens = jnp.where(position, token[..., None], _take(state.alive_tokens, parent))  # [B, 2K, T]
    is_eos = token == eos_token_id

    # Finished: EOS among the first K candidates (transformers' rule), while the row is still open.
    just_finished = is_eos & (jnp.arange(2 * K) < K) & jnp.isfinite(top_scores) & ~state.done[:, None]
    pool_scores = jnp.concatenate([state.finished_scores, jnp.where(just_finished, top_scores, -jnp.inf)], axis=1)
    pool_tokens = jnp.concatenate([state.finished_tokens, top_tokens], axis=1)
    finished_scores, keep = jax.lax.top_k(pool_scores, K)
    finished_tokens = _take(pool_tokens, keep)

    # Alive: the best K candidates that did not end.
    alive_scores, keep = jax.lax.top_k(jnp.where(is_eos, -jnp.inf, top_scores), K)
    alive_parent = _take(parent, keep)
    alive = jnp.isfinite(alive_scores)   # [B, K]; a node may have trailing axes (one suffix range per index part)
    alive_nodes = jax.tree.map(lambda c: jnp.where(alive.reshape(alive.shape + (1,) * (c.ndim - 2)),
                                                   _take(c, keep), -1), child)
    rows = (jnp.arange(B)[:, None] * rows_per_question + alive_parent).reshape(-1)

    done = (state.done | (jnp.sum(jnp.isfinite(finished_scores), axis=1) >= K)
            | ~jnp.isfinite(alive_scores[:, 0]))
    # Rows stay within their question, whose beams share the encoder output: the cross keys/values stay put.
    cache = reorder_cache(cache, rows, cross=False)
    return _SearchState(step=state.step + 1, cache=cache, alive_tokens=_take(top_tokens, keep),
                        alive_scores=alive_scores, alive_nodes=alive_nodes, finished_tokens=finished_tokens,
                        finished_scores=finished_scores, done=done)


def _first_step(model, trie: DeviceTrie, encoder_hidden, encoder_mask, state: _SearchState, *, num_beams: int,
                vocab_size: int) -> _SearchState:
    """Every beam starts from the same prefix (the start token), so one row per question decodes it; its best
    continuations seed the K beams, whose cache rows are copies of that row."""
    B = state.alive_scores.shape[0]
    start = jnp.full((B,), model.decoder_start_token_id, jnp.int32)
    logits, cache = _decode(model, start, encoder_hidden, encoder_mask, state.cache, vocab_size)
    candidates = trie.first_candidates(_log_probs(logits), 2 * num_beams, vocab_size)
    return _advance(state, candidates, cache, num_beams=num_beams, eos_token_id=trie.eos_token_id,
                    rows_per_question=1)


def _search_step(model, trie: DeviceTrie, encoder_hidden, encoder_mask, state: _SearchState, *, num_beams: int,
                 vocab_size: int) -> _SearchState:
    K = num_beams
    B = state.alive_scores.shape[0]
    previous = jnp.take(state.alive_tokens, state.step - 1, axis=2).reshape(B * K)
    logits, cache = _decode(model, previous, encoder_hidden, encoder_mask, state.cache, vocab_size)
    log_probs = _log_probs(logits.reshape(B, K, vocab_size))
    candidates = trie.next_candidates(log_probs, state.alive_scores, state.alive_nodes, 2 * K, state.step)
    return _advance(state, candidates, cache, num_beams=K, eos_token_id=trie.eos_token_id, rows_per_question=K)


def _search(graphdef, params, trie: DeviceTrie, input_ids, attention_mask, *, num_beams: int, max_length: int):
    model = nnx.merge(graphdef, params)
    K, (B, _) = num_beams, input_ids.shape
    vocab_size = model.config.vocab_size
    pad = model.pad_token_id
    # The K beams of a question share its encoder row: its cross keys/values are projected and read once.
    encoder_hidden = model.encode(input_ids, attention_mask)
    empty = jnp.full((B, K, max_length), pad, jnp.int32)
    state = _SearchState(
        step=jnp.zeros((), jnp.int32),
        cache=model.init_cache(B, max_length, encoder_hidden),  # one row per question until the first token
        alive_tokens=empty,
        alive_scores=jnp.zeros((B, K), jnp.float32),
        alive_nodes=trie.initial_state((B, K)),
        finished_tokens=empty,
        finished_scores=jnp.full((B, K), -jnp.inf, jnp.float32),
        done=jnp.zeros((B,), bool))
    context = dict(model=model, trie=trie, encoder_hidden=encoder_hidden, encoder_mask=attention_mask,
                   num_beams=K, vocab_size=vocab_size)
    state = _first_step(state=state, **context)
    step = lambda s: _search_step(state=s, **context)
    state = jax.lax.while_loop(lambda s: (s.step < max_length) & ~jnp.all(s.done), step, state)
    found = jnp.isfinite(state.finished_scores)
    return jnp.where(found[..., None], state.finished_tokens, pad), state.finished_scores


# model -> its jit-compiled search (the graph definition closed over: it holds the unhashable config)
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled_search(model, graphdef):
    entry = _COMPILED.get(model)
    if entry is None or entry[0] != graphdef:
        entry = (graphdef, jax.jit(partial(_search, graphdef), static_argnames=("num_beams", "max_length")))
        _COMPILED[model] = entry
    return entry[1]


def constrained_beam_search(model, input_ids, attention_mask,
                            trie: PrefixTrie | DeviceTrie | SubstringIndex | DeviceSubstringIndex
                            | PartitionedSubstringIndex | DeviceSubstringUnion, num_beams: int,
                            max_length: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The ``num_beams`` best identifiers of ``trie`` for each input row, by beam search.

    Args:
      model: a seq2seq model with the ``encode`` / ``init_cache`` / ``decode`` interface (T5, BART).
      input_ids, attention_mask: ``[batch, source_length]``.
      trie: the identifiers: a :class:`PrefixTrie` of whole identifiers, or a
        :class:`~rdr_jax.decoding.substring_index.SubstringIndex` whose every corpus n-gram is one (MINDER) or
        its :class:`~rdr_jax.decoding.substring_parts.PartitionedSubstringIndex` (past 2**31 positions), or
        any of these's ``to_device()`` arrays.
      num_beams: beams kept per row, and identifiers returned per row.
      max_length: most tokens generated, EOS included (default: the trie's longest identifier, or the index's
        longest n-gram plus EOS). transformers' ``generate`` counts the decoder start token too: its
        ``max_length`` is this plus one.

    Returns:
      ``(sequences [batch, num_beams, max_length], scores [batch, num_beams])``: the generated tokens (no
      decoder start token; padding after EOS) and their summed log-probabilities, best first. Every finite-score
      sequence is an identifier of the trie; a row with fewer than ``num_beams`` reachable identifiers has
      score -inf and padding in the missing places.
    """
    vocab_size = model.config.vocab_size
    if isinstance(trie, PrefixTrie):
        if trie.max_token >= vocab_size:  # such identifiers could never be generated
            raise ValueError(f"the trie holds token id {trie.max_token}, outside the model's vocabulary "
                             f"of {vocab_size}")
        max_length = max_length or trie.max_length
        trie = trie.to_device()
    elif isinstance(trie, (SubstringIndex, PartitionedSubstringIndex)):
        if trie.vocab_size > vocab_size:
            raise ValueError(f"the n-gram index was built for a vocabulary of {trie.vocab_size} tokens, more than "
                             f"the model's {vocab_size}")
        trie = trie.to_device(vocab_size)
    if isinstance(trie, (DeviceSubstringIndex, DeviceSubstringUnion)):
        max_length = max_length or trie.max_length
        if trie.vocab_size != vocab_size:  # the candidates span the index's vocabulary: pad it to the model's
            raise ValueError(f"the n-gram index's vocabulary ({trie.vocab_size}) must be the model's ({vocab_size}): "
                             "pass it as SubstringIndex, or to_device(model.config.vocab_size)")
    elif max_length is None:
        raise ValueError("max_length is required when the trie is given as device arrays")
    if num_beams < 1 or max_length < 1:
        raise ValueError(f"num_beams ({num_beams}) and max_length ({max_length}) must be positive")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if trie.eos_token_id >= vocab_size:
        raise ValueError(f"trie EOS token {trie.eos_token_id} is outside the model's vocabulary ({vocab_size})")
    graphdef, params = nnx.split(model)
    search = _compiled_search(model, graphdef)
    return search(params, trie, input_ids, attention_mask, num_beams=num_beams, max_length=max_length)


__all__ = ["constrained_beam_search"]

"""Teacher-forced scores of identifiers under a seq2seq model: per-token log-probabilities of given target
sequences, and s(p|q), the summed log-probability of each candidate passage's identifier given its question
(what DGR ranks with and DSI trains on)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rdr_jax.models.seq2seq import shift_right


def identifier_token_log_probs(model, encoder_hidden, encoder_mask, target_ids, target_mask, *, rngs=None,
                               deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probabilities ``[N, Lt]`` of ``target_ids`` given the encoder output (0 where
    ``target_mask`` is 0), and whether each target token is the model's argmax ``[N, Lt]`` (bool).

    The same computation as :func:`rdr_jax.models.seq2seq.sequence_log_probs` (decoder inputs = targets shifted
    right behind the start token, float32 log-softmax), starting from an encoder output.
    """
    mask = jnp.asarray(target_mask).astype(bool)
    targets = jnp.where(mask, jnp.asarray(target_ids), model.pad_token_id)
    decoder_input_ids = shift_right(targets, model.decoder_start_token_id, model.pad_token_id)
    logits, _ = model.decode(decoder_input_ids, encoder_hidden, encoder_mask, rngs=rngs, deterministic=deterministic)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets) & mask
    return jnp.where(mask, token, 0.0), correct


def passage_scores(model, input_ids, attention_mask, target_ids, target_mask, *, rngs=None,
                   deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """s(p|q): the summed log-probability of each candidate's identifier given its question (teacher forced).

    ``input_ids``/``attention_mask`` ``[B, Ls]`` (one row per question), ``target_ids``/``target_mask``
    ``[B*K, Lt]`` (question ``i``'s K candidates at rows ``i*K .. i*K+K-1``). Each question is encoded once and
    its encoder output broadcast over its K candidates (K times less encoder work than repeating the question;
    the candidates of a question are also scored against the same encoder dropout mask, so their scores compare
    like with like). Returns ``(scores [B, K], token_log_probs [B, K, Lt])``.
    """
    b = input_ids.shape[0]
    k = target_ids.shape[0] // b
    if k * b != target_ids.shape[0]:
        raise ValueError(f"{target_ids.shape[0]} target rows are not a multiple of the {b} questions")
    hidden = model.encode(input_ids, attention_mask, rngs=rngs, deterministic=deterministic)
    hidden = jnp.repeat(hidden, k, axis=0)
    mask = jnp.repeat(jnp.asarray(attention_mask), k, axis=0)
    token, _ = identifier_token_log_probs(model, hidden, mask, target_ids, target_mask, rngs=rngs,
                                          deterministic=deterministic)
    return token.sum(-1).reshape(b, k), token.reshape(b, k, -1)

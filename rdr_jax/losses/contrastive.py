"""DPR and RDR objectives (in-batch negatives, reader-to-retriever distillation, the DPR reader) as pure
functions of arrays.

Each is computed in float32 whatever the model's compute dtype, and masks use ``jnp.where`` with the
float32 minimum (never ``-inf``), so fully padded rows cannot produce NaNs.

Under ``jax.jit`` with sharded inputs these functions see the *global* batch: the in-batch negatives of
``dpr_nll`` are every passage of the global batch, the cross-device gather being inserted by XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rdr_jax.losses.masking import NEG, masked_mean


def dot_scores(q_emb: jax.Array, p_emb: jax.Array) -> jax.Array:
    """s[i, j] = <q_i, p_j> in float32: [B, E] x [N, E] -> [B, N]."""
    return jnp.einsum("be,ne->bn", q_emb.astype(jnp.float32), p_emb.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def dpr_nll(q_emb: jax.Array, p_emb: jax.Array, positive_index: jax.Array,
            mask: jax.Array | None = None, passage_mask: jax.Array | None = None) -> jax.Array:
    """DPR's loss: negative log-likelihood of each question's positive among all passages of the batch.

        s[i, j] = q_i . p_j                              (i < B questions, j < N = B*P passages)
        loss    = mean_i [ -s[i, pos_i] + log sum_j exp(s[i, j]) ]

    The passages are the question's own positive and hard negatives plus every other question's passages
    (in-batch negatives). ``mask`` [B] (optional) leaves questions out of the mean (no gold positive:
    ``positive_index < 0`` is also left out); ``passage_mask`` [N] (optional) removes padding passages from
    the softmax.
    """
    scores = dot_scores(q_emb, p_emb)
    valid = positive_index >= 0
    if mask is not None:
        valid = valid & mask.astype(bool)
    return dpr_nll_from_scores(scores, jnp.maximum(positive_index, 0), valid, passage_mask)


def dpr_nll_from_scores(scores: jax.Array, positive_index: jax.Array, valid: jax.Array | None = None,
                        passage_mask: jax.Array | None = None) -> jax.Array:
    """``dpr_nll`` given the score matrix [B, N]."""
    scores = scores.astype(jnp.float32)
    if passage_mask is not None:
        scores = jnp.where(passage_mask.astype(bool)[None, :], scores, NEG)
    log_probs = jax.nn.log_softmax(scores, axis=-1)
    nll = -jnp.take_along_axis(log_probs, positive_index[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return masked_mean(nll, valid)


def in_batch_accuracy(scores: jax.Array, positive_index: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Share of questions whose top-scoring passage in the batch is their positive."""
    correct = (jnp.argmax(scores, axis=-1) == positive_index).astype(jnp.float32)
    if valid is None:
        valid = positive_index >= 0
    return masked_mean(correct, valid)


def rdr_kl(student_scores: jax.Array, teacher_scores: jax.Array, mask: jax.Array | None = None,
           temperature: float = 1.0, scale_by_temperature_squared: bool = False) -> jax.Array:
    """Reader-to-retriever distillation: KL(teacher || student) over each question's top-K passages.

        p_t = softmax(t / T),  p_s = softmax(s / T)     (over the K passages, padding masked out)
        loss = mean_i sum_k p_t[i,k] (log p_t[i,k] - log p_s[i,k])       (x T^2 if scale_by_temperature_squared)

    Only questions with at least one unmasked passage count in the mean. The T^2 factor (Hinton et al.)
    keeps gradient magnitudes comparable across temperatures; it is off by default because RDR's
    default is T = 1, where it changes nothing.
    """
    s = student_scores.astype(jnp.float32) / temperature
    t = teacher_scores.astype(jnp.float32) / temperature
    if mask is None:
        mask = jnp.ones(s.shape, bool)
    mask = mask.astype(bool)
    s = jnp.where(mask, s, NEG)
    t = jnp.where(mask, t, NEG)
    log_ps = jax.nn.log_softmax(s, axis=-1)
    log_pt = jax.nn.log_softmax(t, axis=-1)
    pt = jnp.exp(log_pt)
    per_question = jnp.sum(jnp.where(mask, pt * (log_pt - log_ps), 0.0), axis=-1)
    loss = masked_mean(per_question, jnp.any(mask, axis=-1))
    if scale_by_temperature_squared:
        loss = loss * temperature ** 2
    return loss


def reader_losses(start_logits: jax.Array, end_logits: jax.Array, relevance_logits: jax.Array,
                  text_mask: jax.Array, span_starts: jax.Array, span_ends: jax.Array,
                  span_mask: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """DPR reader training: (relevance loss, span loss, metrics), the positive passage first in each list.

        relevance = mean_i -log softmax(r_i)[0]                          r_i: [M] relevance logits
        span      = mean_i -log sum_{(s,e) in gold_i} p_start(s) p_end(e)  over passage 0's text tokens

    Shapes: start/end ``[B, M, L]``, relevance ``[B, M]``, ``text_mask`` ``[B, M, L]`` (1 on passage text),
    spans ``[B, S]`` token positions with ``span_mask``. Questions without a gold span in their positive
    passage are left out of the span mean.
    """
    relevance = jax.nn.log_softmax(relevance_logits.astype(jnp.float32), axis=-1)
    relevance_loss = -jnp.mean(relevance[:, 0])
    text = text_mask[:, 0].astype(bool)
    log_start = jax.nn.log_softmax(jnp.where(text, start_logits[:, 0].astype(jnp.float32), NEG), axis=-1)
    log_end = jax.nn.log_softmax(jnp.where(text, end_logits[:, 0].astype(jnp.float32), NEG), axis=-1)
    span_ll = (jnp.take_along_axis(log_start, span_starts.astype(jnp.int32), axis=-1)
               + jnp.take_along_axis(log_end, span_ends.astype(jnp.int32), axis=-1))
    spans = span_mask.astype(bool)
    marginal = jax.nn.logsumexp(jnp.where(spans, span_ll, NEG), axis=-1)
    has_span = jnp.any(spans, axis=-1)
    span_loss = masked_mean(jnp.where(has_span, -marginal, 0.0), has_span)
    metrics = {"relevance_loss": relevance_loss, "span_loss": span_loss,
               "relevance_accuracy": jnp.mean((jnp.argmax(relevance_logits, axis=-1) == 0).astype(jnp.float32))}
    return relevance_loss, span_loss, metrics

"""Ranking and distillation objectives for cross-encoders and generative retrievers, as pure functions.

Same conventions as the DPR/RDR objectives (:mod:`rdr_jax.losses.contrastive`): float32 whatever the
model's dtype; lists are padded to a fixed K with a boolean ``mask`` [B, K] (True = a real entry); masked
entries are replaced with ``jnp.where`` (by 0, or by the float32 minimum inside softmaxes, never ``-inf``)
*before* any arithmetic, so padding — even NaN or inf padding — gets exactly zero gradient and fully
padded rows give no NaNs. A mean over nothing (no valid pair, no valid row) is 0.

Objectives (xpmir, "Reproducing and Comparing Distillation Techniques for Cross-Encoders"; DGR, Li et al.
2024):

- ``distill_ranknet``   pairwise logistic loss on the teacher's order (xpmir's DistillRankNet)
- ``margin_mse`` / ``margin_mse_list``   MSE between student and teacher score margins (Hofstätter et al.)
- ``infonce``           softmax cross-entropy of the positive(s) in the list
- ``pointwise_bce``     binary cross-entropy on each score
- ``listwise_kl``       KL(softmax(t/T) || softmax(s/T)) (ListNet-style distillation)
- ``dgr_margin_ranknet`` / ``dgr_ranknet``   DGR's released margin loss and its logistic variant
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rdr_jax.losses.contrastive import rdr_kl
from rdr_jax.losses.masking import NEG, masked_mean


def _mask_or_all(scores: jax.Array, mask: jax.Array | None) -> jax.Array:
    return jnp.ones(scores.shape, bool) if mask is None else jnp.broadcast_to(mask.astype(bool), scores.shape)


def _valid_pairs(mask: jax.Array) -> jax.Array:
    """[B, K, K]: both entries real."""
    return mask[:, :, None] & mask[:, None, :]


def distill_ranknet(student: jax.Array, teacher: jax.Array, mask: jax.Array | None = None, *,
                    per_query: bool = False) -> jax.Array:
    """xpmir's DistillRankNet: a logistic loss on every pair the teacher orders.

        P     = {(b, i, j) : t[b,i] > t[b,j], both unmasked}        (ties give no pair)
        loss  = 1/|P| sum_{(b,i,j) in P} log(1 + exp(-(s[b,i] - s[b,j])))

    The mean is over the pairs of the whole batch, as xpmir does it (``DistillRankNetLoss`` in
    xpmir.letor.distillation.listwise: ``binary_cross_entropy_with_logits`` with mean reduction over the
    pairs ``nonzero(t[..., None] > t[:, None])`` of the batch); with one query list per step, as in the
    paper, both readings agree. ``per_query=True`` averages each query's pairs first, then over the queries
    that have a pair (queries with long lists then weigh no more than short ones).
    """
    mask = _mask_or_all(student, mask)
    s = jnp.where(mask, student.astype(jnp.float32), 0.0)
    t = jnp.where(mask, teacher.astype(jnp.float32), 0.0)
    pairs = _valid_pairs(mask) & (t[:, :, None] > t[:, None, :])
    # log(1 + exp(-(s_i - s_j))) = softplus(s_j - s_i), stable for large margins
    losses = jnp.where(pairs, jax.nn.softplus(s[:, None, :] - s[:, :, None]), 0.0)
    if not per_query:
        return masked_mean(losses, pairs)
    counts = jnp.sum(pairs, axis=(1, 2)).astype(jnp.float32)
    per_row = jnp.sum(losses, axis=(1, 2)) / jnp.maximum(counts, 1.0)
    return masked_mean(per_row, counts > 0)


def margin_mse(student_pos: jax.Array, student_neg: jax.Array, teacher_pos: jax.Array, teacher_neg: jax.Array,
               mask: jax.Array | None = None) -> jax.Array:
    """MarginMSE (Hofstätter et al., 2020) on (query, positive, negative) triples.

        loss = mean_n [ (s+_n - s-_n) - (t+_n - t-_n) ]^2

    Arrays of any matching (broadcastable) shape, e.g. [B] triples or [B, N] negatives per positive;
    ``mask`` (same shape) leaves entries out of the mean.
    """
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    diff = (f32(student_pos) - f32(student_neg)) - (f32(teacher_pos) - f32(teacher_neg))
    valid = _mask_or_all(diff, mask)
    return masked_mean(jnp.square(jnp.where(valid, diff, 0.0)), valid)


def margin_mse_list(student: jax.Array, teacher: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """MarginMSE over a query's list ``[positive, negative_1, ..., negative_{K-1}]`` (positive at index 0).

        loss = mean_{b, j >= 1, unmasked} [ (s[b,0] - s[b,j]) - (t[b,0] - t[b,j]) ]^2

    A row whose positive is masked contributes nothing.
    """
    mask = _mask_or_all(student, mask)
    s = jnp.where(mask, student.astype(jnp.float32), 0.0)
    t = jnp.where(mask, teacher.astype(jnp.float32), 0.0)
    valid = mask[:, 1:] & mask[:, :1]
    return margin_mse(s[:, :1], s[:, 1:], t[:, :1], t[:, 1:], valid)


def infonce(scores: jax.Array, positive_index: jax.Array | int | None = 0, mask: jax.Array | None = None,
            temperature: float = 1.0, *, labels: jax.Array | None = None) -> jax.Array:
    """Listwise softmax cross-entropy (InfoNCE) of each query's positive among its list.

        p[b, k] = softmax_k(s[b, k] / T)          (masked entries excluded)
        loss    = mean_b -log p[b, pos_b]                          (one positive per row)
        loss    = mean_b -log sum_{k : labels[b,k]} p[b, k]         (``labels`` [B, K]: several positives)

    The positive is at index 0 by default (lists ``[positive, negatives...]``); ``positive_index`` [B] may
    give it per row (< 0 leaves the row out). With ``labels``, rows without an unmasked positive are left
    out. The mean is over the rows that count.
    """
    mask = _mask_or_all(scores, mask)
    logits = jnp.where(mask, scores.astype(jnp.float32) / temperature, NEG)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if labels is not None:
        positives = labels.astype(bool) & mask
        log_p_pos = jax.nn.logsumexp(jnp.where(positives, log_probs, NEG), axis=-1)
        row_valid = jnp.any(positives, axis=-1)
    else:
        index = jnp.broadcast_to(jnp.asarray(0 if positive_index is None else positive_index, jnp.int32),
                                 scores.shape[:1])
        safe = jnp.clip(index, 0, scores.shape[-1] - 1)
        log_p_pos = jnp.take_along_axis(log_probs, safe[:, None], axis=-1)[:, 0]
        row_valid = (index >= 0) & jnp.take_along_axis(mask, safe[:, None], axis=-1)[:, 0]
    return masked_mean(-log_p_pos, row_valid)


def pointwise_bce(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Binary cross-entropy with logits, averaged over the unmasked entries.

        loss = mean [ max(x, 0) - x * y + log(1 + exp(-|x|)) ]       (= -y log sigmoid(x) - (1-y) log sigmoid(-x))

    ``labels`` in [0, 1] (hard relevance or soft teacher probabilities).
    """
    valid = _mask_or_all(logits, mask)
    x = jnp.where(valid, logits.astype(jnp.float32), 0.0)
    y = jnp.where(valid, jnp.asarray(labels, jnp.float32), 0.0)
    values = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
    return masked_mean(values, valid)


def listwise_kl(student: jax.Array, teacher: jax.Array, mask: jax.Array | None = None,
                temperature: float = 1.0) -> jax.Array:
    """ListNet-style distillation: KL(softmax(t / T) || softmax(s / T)) per query, mean over queries with an
    unmasked entry (no T^2 factor). The same function as RDR's :func:`rdr_jax.losses.rdr_kl`."""
    mask = _mask_or_all(student, mask)
    s = jnp.where(mask, student.astype(jnp.float32), 0.0)
    t = jnp.where(mask, teacher.astype(jnp.float32), 0.0)
    return rdr_kl(s, t, mask, temperature)


def dgr_margin_ranknet(scores: jax.Array, mask: jax.Array | None = None, margin: float = 300.0,
                       margin_step: float = 100.0, positive_weight: float = 3.0) -> jax.Array:
    """DGR's released "distilled RankNet" margin loss over lists ordered by the teacher.

    Each row is ``[positive, negatives sorted by teacher score, best first]``, padded at the end. For list
    positions i < j (both unmasked):

        d_ij = max(0, s_j - s_i + margin + (j - i - 1) * margin_step)     (the required gap grows with rank distance)
        w_i  = positive_weight if i == 0 else 1 / (i + 1)
        V    = {(b, i, j) : d_ij > 0}                                      (violated pairs, whole batch)
        loss = sum_V w_i d_ij / |V|          (0 when no pair is violated)

    Positions are the list positions as given, so padding must be at the end of each row.
    """
    mask = _mask_or_all(scores, mask)
    s = jnp.where(mask, scores.astype(jnp.float32), 0.0)
    k = scores.shape[-1]
    i = jnp.arange(k)[:, None]
    j = jnp.arange(k)[None, :]
    required = margin + (j - i - 1).astype(jnp.float32) * margin_step
    d = jnp.maximum(s[:, None, :] - s[:, :, None] + required, 0.0)   # d[b, i, j]
    pairs = _valid_pairs(mask) & (j > i)
    violated = pairs & (d > 0)
    weight = jnp.where(i == 0, positive_weight, 1.0 / (i + 1).astype(jnp.float32))
    total = jnp.sum(jnp.where(violated, weight * d, 0.0))
    return total / jnp.maximum(jnp.sum(violated).astype(jnp.float32), 1.0)


def dgr_ranknet(scores: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """The logistic (RankNet) variant over DGR's list order: every pair i < j of ``[positive, negatives by
    teacher score]`` wants s_i > s_j,

        loss = mean_{b, i < j, unmasked} log(1 + exp(-(s_i - s_j)))

    i.e. :func:`distill_ranknet` with the list position as the teacher. (The listwise variant is
    :func:`listwise_kl` with the teacher's scores.)
    """
    order = -jnp.broadcast_to(jnp.arange(scores.shape[-1], dtype=jnp.float32), scores.shape)
    return distill_ranknet(scores, order, mask)

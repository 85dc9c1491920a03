"""The best span score of every reader row, computed on the device next to the forward pass.

RDR's ``relevance+span`` teacher needs, per passage, ``max start[i] + end[j]`` over the spans ``i <= j <
i + max_answer_length`` inside the passage text. On the host that is a ``[n, n]`` band per row (~60 ms per
question of 100 passages, the cost that kept ``teacher-scores`` host-bound); here it is ``max_answer_length``
shifted adds over the whole ``[rows, length]`` batch inside the jitted step, and only ``[rows]`` floats come
back instead of two ``[rows, length]`` logit arrays.

The passage segment of a row is ``[passage_start, end)``: ``passage_start`` as
:func:`rdr_jax.data.tokenization.encode_reader_inputs` returns it (after ``[CLS] question [SEP] title
[SEP]``), ``end`` the row's real length (its attention mask), as
:meth:`rdr_jax.retrieval.spans.ReaderSpanSelector.passage_segment` finds them. A row with no passage tokens
scores ``-inf``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def best_span_scores(start_logits: jax.Array, end_logits: jax.Array, input_ids: jax.Array,
                     attention_mask: jax.Array, passage_start: jax.Array, max_answer_length: int,
                     sep_token_id: int) -> jax.Array:
    """``[rows]`` float32: each row's best ``start[i] + end[j]`` with ``passage_start <= i <= j < end`` and
    ``j - i < max_answer_length``; ``end`` is the row's length, or an earlier ``[SEP]`` inside the passage."""
    start = start_logits.astype(jnp.float32)
    end = end_logits.astype(jnp.float32)
    length = start.shape[1]
    positions = jnp.arange(length)[None, :]
    real = jnp.sum(attention_mask.astype(jnp.int32), axis=1, keepdims=True)
    after_start = positions >= passage_start[:, None]
    sep_at = jnp.where(after_start & (input_ids == sep_token_id), positions, length)
    end_at = jnp.minimum(real, jnp.min(sep_at, axis=1, keepdims=True))
    in_passage = after_start & (positions < end_at)
    start = jnp.where(in_passage, start, -jnp.inf)
    end = jnp.where(in_passage, end, -jnp.inf)
    best = jnp.full(start.shape[:1], -jnp.inf, jnp.float32)
    for width in range(min(max_answer_length, length)):
        # span (i, i + width): end logits shifted left by `width`, -inf past the row
        shifted = jnp.pad(end[:, width:], ((0, 0), (0, width)), constant_values=-jnp.inf)
        best = jnp.maximum(best, jnp.max(start + shifted, axis=1))
    return best

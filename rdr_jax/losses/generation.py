"""Objectives of generative retrievers: the teacher-forced cross-entropy of identifier tokens."""

from __future__ import annotations

import jax

from rdr_jax.losses.masking import masked_mean


def sequence_cross_entropy(token_log_probs: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean negative log-likelihood over the unmasked target tokens (0 when there are none), as transformers'
    ``labels`` loss averages over the tokens of a batch."""
    return masked_mean(-token_log_probs, mask)

"""What every objective shares: the float32 minimum that masks scores, and the masked mean."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Masked scores are set to this with jnp.where (never -inf), so fully padded rows give no NaNs.
NEG = jnp.finfo(jnp.float32).min


def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean of ``values`` where ``mask`` (every entry when None); 0 when the mask selects nothing.

    Masked entries are replaced by 0 before the sum (``jnp.where``), so their values, even NaN or inf, reach
    neither the result nor the gradient.
    """
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask > 0, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)

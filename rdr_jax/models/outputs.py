"""Model outputs, with the field names transformers uses. Registered as pytrees so they cross jit."""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class BaseModelOutputWithPooling:
    last_hidden_state: jax.Array
    pooler_output: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None


@struct.dataclass
class SequenceClassifierOutput:
    logits: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


@struct.dataclass
class DPRReaderOutput:
    start_logits: jax.Array
    end_logits: jax.Array
    relevance_logits: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


@struct.dataclass
class Seq2SeqLMOutput:
    logits: jax.Array
    encoder_last_hidden_state: jax.Array | None = None

"""Analytic FLOPs of the model families' forward passes, and of a training step built from them.

Why: XLA's cost analysis (``flops.step_flops``) does not see the GEMMs a GPU hands to cuBLAS (on an H200 it
reported 1.10 TFLOP for a bert-base DPR step of 18.7), so the trainer's MFU comes from this count instead, as
MaxText's ``calculate_tflops`` does. XLA's count stays as a cross-check on CPU (tests/test_model_flops.py).

What is counted (2 FLOPs per multiply-add):

- every matmul: projections, feed-forwards, poolers, classifier and reader heads, the LM head (tied or not);
- attention, per layer: ``QK^T`` and ``AV``, ``2 * 2 * batch * heads * q_len * kv_len * head_dim``, over
  the full ``q_len x kv_len`` square even where a causal mask hides half of it (the step computes it all);
- DeBERTa-v2's relative terms (c2p, p2c), per term and layer: the projection of the ``2 * span`` relative
  embeddings (``2 * 2span * hidden * heads * head_dim``, batch-independent) and the scores of every query
  against relative positions as the configured ``relative_attention_impl`` computes them: ``skew`` against the
  ``2L - 1`` relative rows (``2 * batch * heads * L * (2L - 1) * head_dim``), ``gather`` against the
  ``2 * span`` table, ``onehot`` the same plus the one-hot read (``2 * batch * heads * L * L * 2span``);
- a DeBERTa conv layer (v2-xlarge) as the matmul it is (``2 * tokens * hidden * hidden / groups * kernel``).

Not counted: embedding lookups (0: a gather), layer norms, activations, softmax, dropout, losses and the
optimizer (elementwise work, a few percent of a real model's step; XLA counts them, which is most of the gap
between the two counts on small models).

Shapes are the padded ones the step computes on, so MFU counts the padded work (a batch that is a quarter
padding is credited with the padding's FLOPs too). Two exceptions follow the work actually done: the last
BERT layer under ``cls_only`` (DPR embeddings, the BERT cross-encoder) computes position 0 alone past its keys
and values, and ``model.unpad`` runs position-wise layers on the packed rows (``tokens``).

Training: a trained module costs 3 x its forward (the backward's two matmuls per forward matmul: input and
weight gradients), plus one more forward of its layers under full remat (recomputed in the backward: ``recomputes_layers``); a
frozen module run inside the step (an in-step teacher, RDR's frozen context encoder) costs 1 x its forward.
"""

from __future__ import annotations

import dataclasses

from rdr_jax.models.bart import BartConfig
from rdr_jax.models.bert import BertConfig
from rdr_jax.models.deberta_v2 import DebertaV2Config
from rdr_jax.models.t5 import T5Config


@dataclasses.dataclass(frozen=True)
class Forward:
    """Forward FLOPs of a module: ``layers`` inside its transformer blocks (recomputed under remat), ``other``
    outside them (embedding projections, heads, poolers, the LM head)."""
    layers: float = 0.0
    other: float = 0.0

    @property
    def total(self) -> float:
        return self.layers + self.other

    def __add__(self, o: "Forward") -> "Forward":
        return Forward(self.layers + o.layers, self.other + o.other)


def matmul(rows: float, inner: float, cols: float) -> float:
    """``[rows, inner] @ [inner, cols]``: 2 FLOPs per multiply-add."""
    return 2.0 * rows * inner * cols


def attention(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> float:
    """``QK^T`` and ``AV`` of one layer."""
    return 2 * matmul(batch * heads * q_len, head_dim, kv_len)


def recomputes_layers(compute) -> bool:
    """Whether a model's remat recomputes its layers' matmuls in the backward: the full-remat policy
    (``nothing_saveable``). The ``dots_*`` policies keep matmul results, so what they recompute (elementwise work,
    and for ``dots_with_no_batch_dims_saveable`` the attention products) is not counted: MFU then errs low."""
    return getattr(compute, "remat_policy", None) == "nothing_saveable" or (
        getattr(compute, "remat_policy", None) is None and bool(compute.remat))


def train_flops(forward: Forward, *, trained: bool, remat: bool = False) -> float:
    """A module's FLOPs in a training step: 3 x forward (+ its layers once more under remat) when it trains,
    1 x forward when it is frozen (no backward, so nothing to recompute)."""
    if not trained:
        return forward.total
    return 3 * forward.total + (forward.layers if remat else 0.0)


# ---- BERT, DPR ------------------------------------------------------------------------------------------------
def _bert_layer(c: BertConfig, batch: int, length: int, tokens: int, cls_only: bool) -> float:
    E, H, D, F = c.hidden_size, c.num_attention_heads, c.head_dim, c.intermediate_size
    rows = batch if cls_only else tokens   # rows past the keys and values
    return (matmul(tokens, E, 2 * H * D) + matmul(rows, E, H * D)
            + attention(batch, H, 1 if cls_only else length, length, D)
            + matmul(rows, H * D, E) + matmul(rows, E, F) + matmul(rows, F, E))


def bert_encoder(c: BertConfig, batch: int, length: int, *, cls_only: bool = False, tokens: int | None = None,
                 pooler: bool = False) -> Forward:
    """``BertEncoderStack``: the layers (``cls_only``: the last one past its keys/values on position 0 alone;
    ``tokens``: packed rows under ``model.unpad``, default ``batch * length``) and the optional pooler."""
    tokens = batch * length if tokens is None else tokens
    n = c.num_hidden_layers
    layers = ((n - 1) * _bert_layer(c, batch, length, tokens, False)
              + _bert_layer(c, batch, length, tokens, cls_only)) if n else 0.0
    return Forward(layers, matmul(batch, c.hidden_size, c.hidden_size) if pooler else 0.0)


def _projection(c: BertConfig, batch: int) -> float:
    dim = getattr(c, "projection_dim", 0)
    return matmul(batch, c.hidden_size, dim) if dim > 0 else 0.0


def embedding_dim(c: BertConfig) -> int:
    """Width of a DPR encoder's embedding: ``projection_dim`` when set, else the hidden size."""
    dim = getattr(c, "projection_dim", 0)
    return dim if dim > 0 else c.hidden_size


def dpr_encoder(c: BertConfig, batch: int, length: int, *, cls_only: bool = True,
                tokens: int | None = None) -> Forward:
    """A DPR question/context encoder: the BERT body (no pooler) and ``encode_proj`` on [CLS]."""
    return bert_encoder(c, batch, length, cls_only=cls_only, tokens=tokens) + Forward(0.0, _projection(c, batch))


def dpr_reader(c: BertConfig, batch: int, length: int) -> Forward:
    """``DPRReader``: the full encoder, start/end logits on every token and the relevance logit on [CLS]."""
    width = embedding_dim(c)
    heads = _projection(c, batch) + matmul(batch * length, width, 2) + matmul(batch, width, 1)
    return bert_encoder(c, batch, length) + Forward(0.0, heads)


def bert_classifier(c: BertConfig, batch: int, length: int) -> Forward:
    """``BertForSequenceClassification`` as trained and used (logits read [CLS]: ``cls_only``): pooler +
    classifier."""
    return (bert_encoder(c, batch, length, cls_only=True, pooler=True)
            + Forward(0.0, matmul(batch, c.hidden_size, c.labels)))


# ---- DeBERTa-v2/v3 --------------------------------------------------------------------------------------------
def _relative_scores(c: DebertaV2Config, batch: int, length: int, impl: str) -> float:
    """The c2p/p2c terms of one layer (see the module docstring)."""
    if not (c.relative_attention and c.attention_terms):
        return 0.0
    E, H, D, R = c.hidden_size, c.num_attention_heads, c.head_dim, 2 * c.attention_span
    cols = 2 * length - 1 if impl == "skew" else R
    per_term = matmul(R, E, H * D) + matmul(batch * H * length, D, cols)
    if impl == "onehot":
        per_term += matmul(batch * H * length, R, length)
    return len(c.attention_terms) * per_term


def deberta_v2_encoder(c: DebertaV2Config, batch: int, length: int, *, impl: str = "skew") -> Forward:
    """``DebertaV2Body``: the layers with their relative terms, the factorised-embedding projection, the conv."""
    E, H, D, F = c.hidden_size, c.num_attention_heads, c.head_dim, c.intermediate_size
    t = batch * length
    layer = (matmul(t, E, 3 * H * D) + attention(batch, H, length, length, D) + matmul(t, H * D, E)
             + matmul(t, E, F) + matmul(t, F, E) + _relative_scores(c, batch, length, impl))
    other = matmul(t, c.embedding_width, E) if c.embedding_width != E else 0.0
    if c.conv_kernel_size > 0:
        other += matmul(t, E // c.conv_groups * c.conv_kernel_size, E)
    return Forward(c.num_hidden_layers * layer, other)


def deberta_v2_classifier(c: DebertaV2Config, batch: int, length: int, *, impl: str = "skew") -> Forward:
    """``DebertaV2ForSequenceClassification``: the body, the context pooler on [CLS], the classifier."""
    heads = matmul(batch, c.pooler_width, c.pooler_width) + matmul(batch, c.hidden_size, c.labels)
    return deberta_v2_encoder(c, batch, length, impl=impl) + Forward(0.0, heads)


def classifier(c, batch: int, length: int, *, impl: str = "skew") -> Forward:
    """A cross-encoder of either family (BERT or DeBERTa-v2), by its config."""
    if isinstance(c, DebertaV2Config):
        return deberta_v2_classifier(c, batch, length, impl=impl)
    return bert_classifier(c, batch, length)


# ---- T5, BART -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Seq2SeqShape:
    width: int
    heads: int
    head_dim: int
    encoder_layers: int
    decoder_layers: int
    encoder_ffn: int
    decoder_ffn: int
    ffn_matrices: int      # 2, or 3 for a gated feed-forward (T5 v1.1)
    vocab: int


def _seq2seq_shape(c) -> _Seq2SeqShape:
    if isinstance(c, T5Config):
        mats = 3 if c.is_gated_act else 2
        return _Seq2SeqShape(c.d_model, c.num_heads, c.d_kv, c.num_layers, c.num_decoder_layers, c.d_ff, c.d_ff,
                             mats, c.vocab_size)
    if isinstance(c, BartConfig):
        if c.encoder_attention_heads != c.decoder_attention_heads:
            raise ValueError("a BART with different encoder and decoder head counts is not counted")
        h = c.encoder_attention_heads
        return _Seq2SeqShape(c.d_model, h, c.d_model // h, c.encoder_layers, c.decoder_layers, c.encoder_ffn_dim,
                             c.decoder_ffn_dim, 2, c.vocab_size)
    raise TypeError(f"no FLOP count for a {type(c).__name__}: expected a T5Config or a BartConfig")


def seq2seq(c, encoder_rows: int, source_length: int, decoder_rows: int, target_length: int, *,
            cross_rows: int | None = None) -> Forward:
    """T5 or BART, teacher forced: the encoder on ``encoder_rows x source_length``, the decoder on
    ``decoder_rows x target_length`` (self-attention, cross-attention, feed-forward) and the LM head on every
    decoder position. ``cross_rows``: rows of the encoder output the decoder's cross keys/values are projected
    from (default ``encoder_rows``; DGR repeats each question's output over its K candidates first)."""
    s = _seq2seq_shape(c)
    E, inner = s.width, s.heads * s.head_dim
    src, tgt = encoder_rows * source_length, decoder_rows * target_length
    cross = (encoder_rows if cross_rows is None else cross_rows) * source_length
    encoder = (matmul(src, E, 3 * inner) + attention(encoder_rows, s.heads, source_length, source_length, s.head_dim)
               + matmul(src, inner, E) + s.ffn_matrices * matmul(src, E, s.encoder_ffn))
    decoder = (matmul(tgt, E, 3 * inner) + attention(decoder_rows, s.heads, target_length, target_length, s.head_dim)
               + matmul(tgt, inner, E)
               + matmul(tgt, E, inner) + matmul(cross, E, 2 * inner)
               + attention(decoder_rows, s.heads, target_length, source_length, s.head_dim) + matmul(tgt, inner, E)
               + s.ffn_matrices * matmul(tgt, E, s.decoder_ffn))
    return Forward(s.encoder_layers * encoder + s.decoder_layers * decoder, matmul(tgt, E, s.vocab))


__all__ = ["Forward", "matmul", "attention", "train_flops", "bert_encoder", "dpr_encoder", "dpr_reader",
           "bert_classifier", "deberta_v2_encoder", "deberta_v2_classifier", "classifier", "seq2seq",
           "embedding_dim"]

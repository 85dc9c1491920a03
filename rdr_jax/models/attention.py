"""Dot-product attention and its dispatch: the reference XLA computation, cuDNN's fused attention on NVIDIA GPUs,
Pallas flash attention on TPUs, chosen per call at trace time.

Every model family calls :func:`dot_product_attention` (re-exported by :mod:`rdr_jax.models.layers`). Which
kernel runs is decided by :func:`select_implementation`, a pure function of the call (backend, dtype, dropout,
bias, mask kind, layout) and of ``RDR_JAX_ATTENTION``:

- ``auto`` (default): the fused kernel where it applies, the reference path elsewhere;
- ``xla``: the reference path everywhere (the numbers of the CPU parity tests);
- ``cudnn`` / ``pallas``: as ``auto``, restricted to that kernel; ``cudnn`` also fuses an additive bias
  (opt-in: cuDNN computes the bias gradient only for some shapes).

Where a fused kernel applies:

- **NVIDIA GPU, bf16/fp16: cuDNN flash attention through JAX** (``jax._src.cudnn.fused_attention_stablehlo``,
  the function behind ``jax.nn.dot_product_attention(implementation="cudnn")``, which alone takes
  ``dropout_rate``), padding or segment masks as a ``[b, 1, q, k]`` mask (exact for any mask), attention
  dropout fused. Chosen over Transformer Engine for JAX because it ships with jaxlib (no extra wheel, no
  version pin between TE, jax and CUDA; the benchmark machine has no TE) and covers what the encoder families
  need. Its limit, and the reason dropout is fused only in unrolled stacks: cuDNN's dropout seed is a
  compile-time constant and XLA advances a per-call-site RNG offset each time the call runs, so the forward and
  the backward call of one site agree only when each runs once per step, in the same order. In an unrolled stack
  (``scan_layers`` false, the default) each layer is its own call site, remat included (the recomputed forward
  is one more site advancing in step); each site takes its own seed at trace time (:data:`_SEEDS`), so layers
  draw independent masks, and masks change every step. Under ``jax.lax.scan`` the backward visits the layers
  in reverse and would replay other masks: :func:`scanned_layers` marks that trace and dropout there runs the
  reference path. The masks are not drawn from the Flax key (nothing traced can reach a compile-time seed):
  a run is reproducible from its start, but a resumed run replays the first steps' attention masks, and every
  data-parallel device draws the same ones. Transformer Engine's ``fused_attn`` takes a traced seed and keeps
  the RNG state as a residual: the way forward if that matters more than the extra dependency.
- **TPU: Pallas flash attention** (``jax.experimental.pallas.ops.tpu.flash_attention``) with segment ids: a
  padding mask ``[b, 1, 1, k]`` becomes query ids 1 and key ids ``mask`` (exactly the reference), packed
  ``segment_ids`` pass through; lengths a multiple of 128 (its block). No dropout in that kernel: with
  attention dropout active the reference path runs (training with attention dropout on TPU is unfused;
  dropout 0 fuses).
- **Elsewhere, the reference path**: other backends, float32, a mask with a query axis (causal) on TPU, an
  additive bias (DeBERTa's relative terms, T5's position bias), keys/values in the decoder cache's heads-first
  layout, query rows sharing key rows (beams), a dropout given as a bare callable (its rate unknown), and any
  call the fused kernel refuses at trace time (cuDNN: a head size over 128/256 or not a multiple of 8, an odd
  length with a mask in training, e.g. a [CLS]-only last layer).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import itertools
import logging
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

ATTENTION_ENV = "RDR_JAX_ATTENTION"
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")
FUSED_DTYPES = (jnp.bfloat16, jnp.float16)
PALLAS_BLOCK = 128  # the Pallas TPU kernel's default block, forward and backward

# Seeds of the cuDNN dropout call sites, one per traced call: independent masks per layer. Trace order is
# deterministic, so a program traced again in a new process gets the same seeds.
_SEEDS = itertools.count(1)
_IN_SCAN: contextvars.ContextVar[bool] = contextvars.ContextVar("rdr_jax_attention_in_scan", default=False)


class AttentionDropout:
    """Attention dropout with its rate known, so a fused kernel can apply it: ``apply(weights)`` is the reference
    path's dropout (an ``nnx.Dropout`` call), ``skip()`` advances its RNG stream as ``apply`` would (the fused
    kernel draws its own masks; later dropouts of the layer then see the same keys on either path)."""

    def __init__(self, rate: float, apply: Callable[[jax.Array], jax.Array], skip: Callable[[], None]):
        self.rate, self.apply, self.skip = float(rate), apply, skip

    def __call__(self, weights: jax.Array) -> jax.Array:
        return self.apply(weights)


@contextlib.contextmanager
def scanned_layers():
    """Marks the trace of a scanned layer body (rdr_jax.models.stacking): cuDNN's dropout does not fuse there."""
    token = _IN_SCAN.set(True)
    try:
        yield
    finally:
        _IN_SCAN.reset(token)


def requested_implementation() -> str:
    value = os.environ.get(ATTENTION_ENV, "auto").strip().lower() or "auto"
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"{ATTENTION_ENV}={value!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    return value


def mask_kind(mask: jax.Array | None) -> str | None:
    """None, ``"padding"`` (``[b, 1, 1, k]``: per key, the same for every query and head) or ``"general"``."""
    if mask is None:
        return None
    return "padding" if mask.ndim == 4 and mask.shape[1] == mask.shape[2] == 1 else "general"


def select_implementation(*, backend: str, dtype, dropout_rate: float | None, bias: bool, mask: str | None,
                          segments: bool, grouped: bool, kv_heads_first: bool, requested: str = "auto",
                          scanned: bool = False, cudnn: bool = True, pallas: bool = True) -> tuple[str, str]:
    """``(implementation, reason)`` for one attention call: ``"xla"`` (the reference), ``"cudnn"`` or
    ``"pallas"``. ``dropout_rate``: None without dropout, ``nan`` for a dropout whose rate is unknown;
    ``mask``: :func:`mask_kind`; ``segments``: segment ids given; ``cudnn``/``pallas``: the kernel is importable."""
    if requested == "xla":
        return "xla", f"{ATTENTION_ENV}=xla"
    if grouped or kv_heads_first:
        return "xla", "decoder cache layout or query rows sharing key rows"
    if dropout_rate is not None and math.isnan(dropout_rate):
        return "xla", "dropout of unknown rate"
    dropout = bool(dropout_rate)
    if backend == "gpu":
        if requested == "pallas":
            return "xla", "the Pallas kernel is TPU-only"
        if jnp.dtype(dtype) not in map(jnp.dtype, FUSED_DTYPES):
            return "xla", f"cuDNN fused attention needs bf16/fp16, not {jnp.dtype(dtype).name}"
        if not cudnn:
            return "xla", "this jax has no cuDNN fused attention with dropout"
        if bias and requested != "cudnn":
            return "xla", "additive bias (relative positions): opt-in with cudnn"
        if dropout and requested != "cudnn":
            # jax's cuDNN kernel draws its masks from a seed fixed at compile time, not from the step's key: a
            # resumed run would not repeat them and every data-parallel replica would draw the same ones, so the
            # default keeps exact resume and fuses only where dropout is off
            return "xla", "attention dropout (cuDNN's masks ignore the step's key): opt in with cudnn"
        if dropout and scanned:
            return "xla", "dropout in a scanned stack (cuDNN's backward would replay other masks)"
        return "cudnn", "cuDNN fused attention" + (" with dropout" if dropout else "")
    if backend == "tpu":
        if requested == "cudnn":
            return "xla", "cuDNN is GPU-only"
        if dropout:
            return "xla", "Pallas flash attention has no dropout"
        if bias:
            return "xla", "additive bias (relative positions)"
        if mask == "general" or (mask is not None and segments):
            return "xla", "a mask with a query axis (Pallas takes segment ids only)"
        if not pallas:
            return "xla", "this jax has no Pallas TPU flash attention"
        return "pallas", "Pallas flash attention"
    return "xla", f"no fused attention on {backend}"


@functools.lru_cache(maxsize=None)
def _cudnn_module():
    """jax's cuDNN attention module when its entry point takes a dropout rate and a seed, else None."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError:
        return None
    fn = getattr(fa, "dot_product_attention", None)
    params = inspect.signature(fn).parameters if fn is not None else {}
    return fa if {"dropout_rate", "seed", "mask", "scale"} <= set(params) else None


@functools.lru_cache(maxsize=None)
def _pallas_flash():
    try:
        from jax.experimental.pallas.ops.tpu import flash_attention as fa
    except ImportError:
        return None
    return fa if hasattr(fa, "flash_attention") and hasattr(fa, "SegmentIds") else None


def segment_mask(q_segments: jax.Array, kv_segments: jax.Array) -> jax.Array:
    """``[b, q]`` and ``[b, k]`` segment ids -> boolean ``[b, 1, q, k]``: a query attends to the keys of its own
    segment (packed sequences; padding is a segment of its own, whose rows nothing reads)."""
    return (q_segments[:, None, :, None] == kv_segments[:, None, None, :])


def cudnn_attention(query, key, value, mask, bias, scale, dropout_rate: float = 0.0):
    """cuDNN's fused attention, ``[batch, len, heads, kv]`` in and out, or None where jax refuses the call at
    trace time (head size, versions). ``mask`` is broadcast to ``[b, 1, q, k]`` (cuDNN wants the query axis;
    exact for any mask). With ``dropout_rate`` this call site takes the next seed of :data:`_SEEDS`."""
    fa = _cudnn_module()
    if fa is None or not key.dtype == value.dtype == query.dtype:
        return None
    q_len, k_len = query.shape[1], key.shape[1]
    if mask is not None:
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (q_len, k_len))
    if bias is not None:
        bias = jnp.broadcast_to(bias, bias.shape[:2] + (q_len, k_len)).astype(query.dtype)
    seed = next(_SEEDS) if dropout_rate else 42
    try:
        return fa.dot_product_attention(query, key, value, bias=bias, mask=mask, scale=float(scale), seed=seed,
                                        dropout_rate=float(dropout_rate), qkv_layout="BTNH")
    except (NotImplementedError, ValueError, TypeError, RuntimeError) as e:
        log.debug("cuDNN attention refused (%s): reference path", e)
        return None


def pallas_attention(query, key, value, mask, segment_ids, scale):
    """Pallas TPU flash attention, ``[batch, len, heads, kv]`` in and out, or None where the kernel refuses the
    shapes. A padding mask is passed as segment ids (query 1, key ``mask``): the reference's numbers."""
    fa = _pallas_flash()
    batch, q_len, k_len = query.shape[0], query.shape[1], key.shape[1]
    # its default blocks are 128 rows in both passes: other lengths (a 32-token question, a [CLS]-only layer)
    # would fail in the backward's trace, past the try below
    if fa is None or q_len % PALLAS_BLOCK or k_len % PALLAS_BLOCK:
        return None
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids
    elif mask is not None:
        q_ids = jnp.ones((batch, q_len), jnp.int32)
        kv_ids = jnp.broadcast_to(mask[:, 0, 0, :], (batch, k_len)).astype(jnp.int32)
    else:
        q_ids = kv_ids = None
    ids = None if q_ids is None else fa.SegmentIds(q=q_ids.astype(jnp.int32), kv=kv_ids.astype(jnp.int32))
    try:
        out = fa.flash_attention(*(heads_first(a) for a in (query, key, value)), segment_ids=ids,
                                 sm_scale=float(scale))
    except (NotImplementedError, ValueError) as e:
        log.debug("Pallas flash attention refused (%s): reference path", e)
        return None
    return heads_first(out)


def heads_first(x: jax.Array) -> jax.Array:
    """``[batch, length, heads, kv]`` <-> ``[batch, heads, length, kv]``: the layout attention's matmuls run in
    (and the decoder cache is kept in)."""
    return jnp.swapaxes(x, 1, 2)


def _segment_pair(segment_ids, q_len: int, k_len: int):
    if segment_ids is None:
        return None
    q_ids, kv_ids = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    if q_ids.shape[-1] != q_len or kv_ids.shape[-1] != k_len:
        raise ValueError(f"segment_ids of lengths {q_ids.shape[-1]}/{kv_ids.shape[-1]} do not match queries of "
                         f"{q_len} and keys of {k_len}")
    return jnp.asarray(q_ids), jnp.asarray(kv_ids)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, mask: jax.Array | None = None,
                          segment_ids=None, bias: jax.Array | None = None, scale: float | None = None,
                          dropout: Callable[[jax.Array], jax.Array] | None = None, dtype=jnp.float32,
                          kv_heads_first: bool = False) -> jax.Array:
    """Attention of ``[batch, q_len, heads, kv]`` queries; returns the same layout, through the kernel
    :func:`select_implementation` picks (see the module docstring).

    ``key``/``value`` are ``[batch, k_len, heads, kv]``, or ``[batch, heads, k_len, kv]`` with
    ``kv_heads_first`` (a decoder cache kept in that layout is then read without a transpose). ``bias`` is
    added to the scaled scores; ``mask`` (broadcast to ``[batch, heads, q_len, k_len]``) keeps the True keys;
    ``segment_ids`` (``[batch, len]`` for self-attention, or a ``(query ids, key ids)`` pair) keeps the keys of
    the query's own segment, on top of ``mask``. ``dropout``: an :class:`AttentionDropout` (fusable) or any
    callable on the attention weights (reference path only).

    Keys/values may have fewer rows than the queries, ``batch = rows * group``: query rows
    ``r * group ... r * group + group - 1`` then all attend to key row ``r`` (the beams of one question reading
    its encoder output); ``mask`` and ``bias`` are then per key row and the same for every query.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    k_len = key.shape[2] if kv_heads_first else key.shape[1]
    segments = _segment_pair(segment_ids, query.shape[1], k_len)
    rate = None
    if dropout is not None:
        rate = dropout.rate if isinstance(dropout, AttentionDropout) else math.nan
    impl, _ = select_implementation(
        backend=jax.default_backend(), dtype=query.dtype, dropout_rate=rate, bias=bias is not None,
        mask=mask_kind(mask), segments=segments is not None, grouped=key.shape[0] != query.shape[0],
        kv_heads_first=kv_heads_first, requested=requested_implementation(), scanned=_IN_SCAN.get(),
        cudnn=_cudnn_module() is not None, pallas=_pallas_flash() is not None)
    if impl == "cudnn":
        full = mask if segments is None else _and(mask, segment_mask(*segments))
        out = cudnn_attention(query, key, value, full, bias, scale, rate or 0.0)
        if out is not None:
            if rate:
                dropout.skip()
            return out
    elif impl == "pallas":
        out = pallas_attention(query, key, value, mask, segments, scale)
        if out is not None:
            return out
    if segments is not None:
        mask = _and(mask, segment_mask(*segments))
    return reference_attention(query, key, value, mask=mask, bias=bias, scale=scale, dropout=dropout, dtype=dtype,
                               kv_heads_first=kv_heads_first)


def _and(mask, other):
    return other if mask is None else jnp.logical_and(mask, other)


def reference_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, mask: jax.Array | None = None,
                        bias: jax.Array | None = None, scale: float, dropout=None, dtype=jnp.float32,
                        kv_heads_first: bool = False) -> jax.Array:
    """The XLA computation (arguments as :func:`dot_product_attention`, segments already in ``mask``).

    Both matmuls run heads-first (``[b, h, len, kv]``): with the heads axis in the middle XLA:CPU emits much
    slower batched matmuls. The softmax is normalised after the value matmul, on ``[b, h, q, kv]`` instead of
    ``[b, h, q, k]``: the same numbers up to rounding (dropout scales the kept entries, so it commutes with the
    division)."""
    batch, q_len = query.shape[:2]
    rows = key.shape[0]
    if rows != batch:
        if batch % rows or any(m is not None and (m.ndim != 4 or m.shape[2] != 1) for m in (mask, bias)):
            raise ValueError(f"{batch} query rows cannot share {rows} key rows (needs batch = rows * group and a "
                             f"mask/bias without a query axis)")
        query = query.reshape((rows, batch // rows * q_len) + query.shape[2:])
    query = heads_first(query)
    if not kv_heads_first:
        key, value = heads_first(key), heads_first(value)
    scores = jnp.einsum("bhqd,bhkd->bhqk", query, key) * jnp.asarray(scale, query.dtype)
    if bias is not None:
        scores = scores + bias
    scores = scores.astype(jnp.float32)
    if mask is not None:  # jnp.where, not a large negative bias: bf16 scores cannot overflow to -inf
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    normaliser = jnp.sum(weights, axis=-1, keepdims=True)
    if dropout is not None:
        weights = dropout(weights)
    context = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(dtype), value) / normaliser.astype(dtype)
    return heads_first(context).reshape((batch, q_len) + context.shape[1:2] + context.shape[3:])

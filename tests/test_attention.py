"""layers.dot_product_attention (models.attention) on its own: heads-first matmuls and the softmax normalised after the value
matmul must give the textbook softmax(q k^T * scale + bias) v, masks and layouts included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rdr_jax.models import attention as A
from rdr_jax.models import layers as L


def reference(q, k, v, mask=None, bias=None, scale=None):
    """numpy float64: q, k, v [b, len, h, d]; mask/bias broadcast to [b, h, q, k]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    if mask is not None:
        s = np.where(np.asarray(mask), s, np.finfo(np.float32).min)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def inputs(b=3, lq=5, lk=7, h=4, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(b, n, h, d)).astype(np.float32) for n in (lq, lk, lk))
    return q, k, v, rng


def test_matches_softmax_with_padding_mask_bias_and_scale():
    q, k, v, rng = inputs()
    lengths = np.array([7, 4, 1])
    mask = (np.arange(7)[None, :] < lengths[:, None])[:, None, None, :]
    bias = rng.normal(size=(1, 4, 5, 7)).astype(np.float32)
    out = L.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=jnp.asarray(mask),
                                  bias=jnp.asarray(bias), scale=0.3)
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, mask, bias, 0.3), rtol=1e-5, atol=1e-6)
    # a row with one visible key returns that key's value exactly
    np.testing.assert_allclose(np.asarray(out)[2], np.broadcast_to(v[2, :1], (5, 4, 8)), rtol=1e-6)


def test_fully_masked_rows_average_the_values_like_softmax():
    q, k, v, _ = inputs()
    mask = np.zeros((3, 1, 5, 7), bool)
    mask[0] = True
    out = np.asarray(L.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                             mask=jnp.asarray(mask)))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[1:], np.broadcast_to(v[1:].mean(1, keepdims=True), (2, 5, 4, 8)), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(out, reference(q, k, v, mask), rtol=1e-5, atol=1e-6)


def test_causal_mask_and_heads_first_keys_values():
    q, k, v, _ = inputs(lq=7)
    mask = np.tril(np.ones((7, 7), bool))[None, None]
    heads_first = [jnp.swapaxes(jnp.asarray(a), 1, 2) for a in (k, v)]
    out = L.dot_product_attention(jnp.asarray(q), *heads_first, mask=jnp.asarray(mask), kv_heads_first=True)
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, mask), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out)[:, 0], v[:, 0], rtol=1e-6)  # position 0 sees itself only


def test_bf16_masked_scores_do_not_overflow():
    q, k, v, _ = inputs()
    mask = jnp.asarray((np.arange(7) < 3)[None, None, None, :])
    big = [jnp.asarray(a * 300, jnp.bfloat16) for a in (q, k, v)]  # scores far beyond bf16's exact range
    out = L.dot_product_attention(*big, mask=mask, dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out, np.float32)).all()
    small = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    out = np.asarray(L.dot_product_attention(*small, mask=mask, dtype=jnp.bfloat16), np.float32)
    np.testing.assert_allclose(out, reference(q, k, v, np.asarray(mask)), rtol=0.05, atol=0.05)


def test_dropout_after_normalising_equals_dropout_of_the_probabilities():
    """Dropout is applied to the unnormalised weights; with the same mask that is dropout(softmax) exactly."""
    q, k, v, _ = inputs()
    rate = 0.3
    out = L.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                  dropout=lambda w: nnx.Dropout(rate, rngs=nnx.Rngs(dropout=7))(w))
    # the same dropout mask, drawn again on a tensor of the same shape
    keep = nnx.Dropout(rate, rngs=nnx.Rngs(dropout=7))(jnp.ones((3, 4, 5, 7))) > 0
    s = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p = np.where(np.asarray(keep), p / (1 - rate), 0.0)
    np.testing.assert_allclose(np.asarray(out), np.einsum("bhqk,bkhd->bqhd", p, v), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(out), reference(q, k, v), atol=1e-3)  # dropout did act


def test_jit_and_grad_through_the_stop_gradient_max():
    q, k, v, _ = inputs()
    f = lambda q: jnp.sum(L.dot_product_attention(q, jnp.asarray(k), jnp.asarray(v)) ** 2)
    g = jax.jit(jax.grad(f))(jnp.asarray(q))

    def ref_f(q):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.asarray(k)) / np.sqrt(8)
        return jnp.sum(jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), jnp.asarray(v)) ** 2)

    np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(ref_f)(jnp.asarray(q))), rtol=1e-4, atol=1e-5)


def test_query_rows_sharing_key_rows():
    # Beam search: 3 query rows per key row (the beams of one question) equal the key rows repeated.
    q, k, v, rng = inputs(b=6, lq=1, lk=7)
    k, v = k[:2], v[:2]
    mask = np.ones((2, 1, 1, 7), bool)
    mask[1, ..., 5:] = False
    heads_first = [jnp.swapaxes(jnp.asarray(a), 1, 2) for a in (k, v)]
    out = L.dot_product_attention(jnp.asarray(q), *heads_first, mask=jnp.asarray(mask), kv_heads_first=True)
    rows = np.repeat(np.arange(2), 3)
    np.testing.assert_allclose(np.asarray(out), reference(q, k[rows], v[rows], mask[rows]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot share"):  # a causal mask has a query axis: no grouping
        L.dot_product_attention(jnp.asarray(q), *heads_first, mask=jnp.ones((2, 1, 1, 7), bool)[:, :, [0, 0]],
                                kv_heads_first=True)
    with pytest.raises(ValueError, match="cannot share"):
        L.dot_product_attention(jnp.asarray(q[:5]), *heads_first, kv_heads_first=True)


def test_active_dropout_is_none_when_it_would_keep_every_weight():
    rngs = nnx.Rngs(dropout=0)
    assert L.active_dropout(nnx.Dropout(0.1), deterministic=True, rngs=rngs) is None
    assert L.active_dropout(nnx.Dropout(0.0), deterministic=False, rngs=rngs) is None
    drop = L.active_dropout(nnx.Dropout(0.5), deterministic=False, rngs=rngs)
    kept = np.asarray(drop(jnp.ones((64, 64))))
    assert set(np.unique(kept)) == {0.0, 2.0}  # inverted dropout: kept weights scaled by 1 / (1 - rate)


def test_active_dropout_carries_its_rate_and_skip_draws_the_same_key():
    drop = L.active_dropout(nnx.Dropout(0.25), deterministic=False, rngs=nnx.Rngs(dropout=3))
    assert isinstance(drop, A.AttentionDropout) and drop.rate == 0.25
    a, b = nnx.Rngs(dropout=3), nnx.Rngs(dropout=3)
    L.active_dropout(nnx.Dropout(0.25), deterministic=False, rngs=a)(jnp.ones(4))
    L.active_dropout(nnx.Dropout(0.25), deterministic=False, rngs=b).skip()
    # a fused kernel skipping the draw leaves the layer's later dropouts on the reference path's keys
    np.testing.assert_array_equal(jax.random.key_data(a["dropout"]()), jax.random.key_data(b["dropout"]()))


def test_segment_ids_attend_within_their_segment_only():
    q, k, v, _ = inputs(b=2, lq=6, lk=6)
    seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    out = np.asarray(L.dot_product_attention(*(jnp.asarray(a) for a in (q, k, v)), segment_ids=jnp.asarray(seg)))
    # segment by segment, the same as attention over that segment alone
    for b, lo, hi in [(0, 0, 3), (0, 3, 5), (0, 5, 6), (1, 0, 6)]:
        np.testing.assert_allclose(out[b, lo:hi], reference(q[b:b + 1, lo:hi], k[b:b + 1, lo:hi],
                                                             v[b:b + 1, lo:hi])[0], rtol=1e-5, atol=1e-6)
    # combined with a padding mask; a (query ids, key ids) pair for cross-attention
    mask = jnp.asarray(np.arange(6)[None, None, None, :] < 4)
    both = L.dot_product_attention(*(jnp.asarray(a) for a in (q, k, v)), mask=mask,
                                   segment_ids=(jnp.asarray(seg), jnp.asarray(seg)))
    want = reference(q, k, v, np.logical_and(np.asarray(mask), np.asarray(A.segment_mask(seg, seg))))
    np.testing.assert_allclose(np.asarray(both), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="segment_ids of lengths 5/5"):
        L.dot_product_attention(*(jnp.asarray(a) for a in (q, k, v)), segment_ids=jnp.asarray(seg[:, :5]))


def select(**kw):
    call = dict(backend="gpu", dtype=jnp.bfloat16, dropout_rate=None, bias=False, mask="padding", segments=False,
                grouped=False, kv_heads_first=False)
    return A.select_implementation(**{**call, **kw})[0]


@pytest.mark.parametrize("case, want", [
    # NVIDIA GPU: cuDNN in bf16/fp16 unless biased, cached or grouped; with dropout only when asked for
    # (its masks ignore the step's key, so the default keeps exact resume), and never in a scanned stack
    (dict(), "cudnn"),
    (dict(dropout_rate=0.1), "xla"),
    (dict(dtype=jnp.float16, dropout_rate=0.1, mask="general", segments=True, requested="cudnn"), "cudnn"),
    (dict(dtype=jnp.float32), "xla"),
    (dict(dropout_rate=0.1, scanned=True, requested="cudnn"), "xla"),
    (dict(scanned=True), "cudnn"),  # without dropout a scanned stack fuses too
    (dict(dropout_rate=float("nan")), "xla"),  # a bare callable: its rate is unknown
    (dict(bias=True), "xla"),  # DeBERTa's relative terms, T5's position bias
    (dict(bias=True, requested="cudnn"), "cudnn"),
    (dict(kv_heads_first=True), "xla"),  # decoder caches
    (dict(grouped=True), "xla"),  # beams sharing an encoder row
    (dict(cudnn=False), "xla"),  # a jax without the dropout-capable entry point
    (dict(requested="xla"), "xla"),
    (dict(requested="pallas"), "xla"),
    # TPU: Pallas flash attention with segment ids, no dropout, no bias, no query-axis mask
    (dict(backend="tpu"), "pallas"),
    (dict(backend="tpu", dtype=jnp.float32, mask=None, segments=True), "pallas"),
    (dict(backend="tpu", dropout_rate=0.1), "xla"),
    (dict(backend="tpu", mask="general"), "xla"),
    (dict(backend="tpu", segments=True), "xla"),  # a padding mask and segment ids together
    (dict(backend="tpu", bias=True), "xla"),
    (dict(backend="tpu", requested="cudnn"), "xla"),
    (dict(backend="tpu", pallas=False), "xla"),
    # everything else: the reference
    (dict(backend="cpu"), "xla"),
    (dict(backend="cpu", requested="cudnn"), "xla"),
])
def test_dispatch_picks_the_kernel_per_backend_dtype_dropout_bias_and_layout(case, want):
    assert select(**case) == want


def test_dispatch_reads_the_environment_and_names_bad_values(monkeypatch):
    monkeypatch.delenv(A.ATTENTION_ENV, raising=False)
    assert A.requested_implementation() == "auto"
    monkeypatch.setenv(A.ATTENTION_ENV, "Pallas")
    assert A.requested_implementation() == "pallas"
    monkeypatch.setenv(A.ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="RDR_JAX_ATTENTION='flash': expected one of auto, xla, cudnn, pallas"):
        A.requested_implementation()


def test_dispatch_at_trace_time_follows_the_backend_and_the_scan_mark(monkeypatch):
    """With the backend name patched to "gpu", a bf16 call traces into the cuDNN path (here a recorder standing in
    for the kernel, which needs a GPU to lower), dropout skipping its draw; a scanned body or float32 does not."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv(A.ATTENTION_ENV, "cudnn")   # dropout fuses only when asked for
    calls = []

    def recorder(query, key, value, mask, bias, scale, rate=0.0):
        calls.append((None if mask is None else mask.shape, rate))
        return jnp.zeros_like(query)

    monkeypatch.setattr(A, "cudnn_attention", recorder)
    monkeypatch.setattr(A, "_cudnn_module", lambda: object())
    q, k, v, _ = inputs(lq=7)
    bf = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    mask = jnp.ones((3, 1, 1, 7), bool)
    rngs = nnx.Rngs(dropout=0)
    drop = L.active_dropout(nnx.Dropout(0.1), deterministic=False, rngs=rngs)
    out = L.dot_product_attention(*bf, mask=mask, dropout=drop)
    assert calls == [((3, 1, 1, 7), 0.1)] and not np.asarray(out, np.float32).any()
    assert rngs["dropout"].count[...] == 1  # the reference path's draw, skipped
    with A.scanned_layers():
        L.dot_product_attention(*bf, mask=mask, dropout=drop)
    L.dot_product_attention(*(jnp.asarray(a) for a in (q, k, v)), mask=mask)
    assert len(calls) == 1  # neither reached cuDNN
    seg = jnp.asarray(np.array([[1] * 7, [1] * 3 + [2] * 4, [1] * 7]))
    L.dot_product_attention(*bf, segment_ids=seg)
    assert calls[-1] == ((3, 1, 7, 7), 0.0)  # segment ids reach cuDNN as a mask with the query axis


def test_a_scanned_stack_marks_its_trace(monkeypatch):
    from rdr_jax.models.config import ComputeSettings
    from rdr_jax.models.stacking import make_layers, run_layers

    seen = []

    class Probe(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jnp.ones(()))

        def __call__(self, x):
            seen.append(A._IN_SCAN.get())
            return x * self.w[...]

    for scan in (False, True):
        rt = ComputeSettings(scan_layers=scan)
        run_layers(make_layers(Probe, 3, rt, nnx.Rngs(0)), lambda layer, h, r: layer(h), jnp.ones(2), rt=rt)
    assert seen == [False, False, False, True] and not A._IN_SCAN.get()


ACCELERATOR = jax.default_backend() in ("gpu", "tpu")


@pytest.mark.skipif(not ACCELERATOR, reason="fused attention needs an NVIDIA GPU (cuDNN) or a TPU (Pallas)")
@pytest.mark.parametrize("masking", ["padding", "segments"])
def test_fused_attention_matches_the_reference_on_the_device(masking, monkeypatch):
    """bf16 on the device: the dispatch's fused kernel agrees with float64 to bf16 accuracy and its gradients with
    the reference path's (RDR_JAX_ATTENTION=xla) on the same device."""
    monkeypatch.delenv(A.ATTENTION_ENV, raising=False)
    q, k, v, rng = inputs(b=4, lq=128, lk=128, h=4, d=64, seed=1)
    lengths = np.array([128, 80, 17, 1])
    if masking == "padding":
        mask, seg = (np.arange(128)[None, :] < lengths[:, None])[:, None, None, :], None
        full = mask
    else:
        seg = np.minimum(np.arange(128)[None, :] // lengths[:, None], 3).astype(np.int32)
        mask, full = None, np.asarray(A.segment_mask(seg, seg))
    kind = A.mask_kind(None if mask is None else jnp.asarray(mask))
    assert select(backend=jax.default_backend(), mask=kind, segments=seg is not None) != "xla"
    qb, kb, vb = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    kw = dict(mask=None if mask is None else jnp.asarray(mask), segment_ids=None if seg is None else jnp.asarray(seg),
              scale=0.125, dtype=jnp.bfloat16)
    fused = L.dot_product_attention(qb, kb, vb, **kw)
    ref = reference(*(np.asarray(a.astype(jnp.float32)) for a in (qb, kb, vb)), full, None, 0.125)
    err = np.linalg.norm(np.asarray(fused, np.float64) - ref) / np.linalg.norm(ref)
    assert err < 1e-2, err

    def grads():
        loss = lambda *a: jnp.sum(L.dot_product_attention(*a, **kw).astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(loss, (0, 1, 2)))(qb, kb, vb)

    fused_grads = grads()
    monkeypatch.setenv(A.ATTENTION_ENV, "xla")
    for a, b in zip(fused_grads, grads()):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 3e-2


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN fused attention needs an NVIDIA GPU")
def test_cudnn_dropout_backward_replays_the_forward_masks(monkeypatch):
    """With the values an identity matrix the output is the dropped-out attention matrix P', and the gradient of
    <out, G> with respect to the values is P'^T G: the backward's masks must be the forward's, within one jitted
    step and again in the next call (new masks), in an unrolled two-layer stack."""
    monkeypatch.setenv(A.ATTENTION_ENV, "cudnn")
    q, k, _, _ = inputs(b=2, lq=64, lk=64, h=2, d=64, seed=2)
    qb, kb = jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)
    eye = jnp.broadcast_to(jnp.eye(64, dtype=jnp.bfloat16)[None, :, None, :], (2, 64, 2, 64))
    g = jnp.asarray(np.random.default_rng(3).normal(size=(2, 64, 2, 64)), jnp.bfloat16)
    drop = A.AttentionDropout(0.5, lambda w: w, lambda: None)

    def two_layers(v):
        first = L.dot_product_attention(qb, kb, v, dropout=drop, dtype=jnp.bfloat16)
        second = L.dot_product_attention(qb, kb, v, dropout=drop, dtype=jnp.bfloat16)
        return first, second

    def forward_and_backward(v):  # one trace: the outputs and the gradient come from the same call sites
        outputs, pullback = jax.vjp(two_layers, v)
        return outputs, pullback((g, g))[0]

    run = jax.jit(forward_and_backward)
    masks = []
    for _ in range(2):
        (first, second), dv = run(eye)
        p1, p2 = (np.asarray(o, np.float64) for o in (first, second))  # [b, q, h, k] = P'
        want = np.einsum("bqhk,bqhd->bkhd", p1 + p2, np.asarray(g, np.float64))
        assert np.linalg.norm(np.asarray(dv, np.float64) - want) / np.linalg.norm(want) < 2e-2
        assert ((p1 == 0).mean() > 0.3) and not np.array_equal(p1 == 0, p2 == 0)  # dropout acts, per layer
        masks.append(p1 == 0)
    assert not np.array_equal(*masks)  # and changes between steps


def lowered_for(platform, fn, *args):
    import re

    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return re.findall(r"custom_call @([\w$]+)", text), re.findall(r'\\22seed\\22: (\d+)', text), text


def test_the_cudnn_path_lowers_for_cuda_with_dropout_on_a_cpu_host(monkeypatch):
    """The dispatch's real call into jax's cuDNN attention, lowered for CUDA here (jax's cuDNN version and
    compute-capability checks patched, as no GPU is present): forward and backward are cuDNN custom calls with
    the dropout rate, each call site has its own seed shared by its forward and backward, and no XLA matmul
    of the attention is left."""
    fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    for name, value in [("check_cudnn_version", lambda: 91000), ("check_compute_capability", lambda c: True),
                        ("is_cuda_compute_capability_equal", lambda c: False)]:
        if not hasattr(fa, name):
            pytest.skip(f"this jax has no {name} to patch")
        monkeypatch.setattr(fa, name, value)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv(A.ATTENTION_ENV, "cudnn")   # dropout fuses only when asked for
    q = jnp.zeros((2, 64, 2, 64), jnp.bfloat16)
    mask = jnp.ones((2, 1, 1, 64), bool)
    drop = A.AttentionDropout(0.1, lambda w: w, lambda: None)

    def loss(q, k, v):
        first = L.dot_product_attention(q, k, v, mask=mask, dropout=drop)
        return jnp.sum(L.dot_product_attention(first, k, v, mask=mask, dropout=drop).astype(jnp.float32))

    calls, seeds, text = lowered_for("cuda", jax.grad(loss, (0, 1, 2)), q, q, q)
    assert sorted(set(calls)) == ["__cudnn$fmhaScaleBiasSoftmaxDropout",
                                  "__cudnn$fmhaScaleBiasSoftmaxDropoutBackward"], calls
    assert len(seeds) == 4 and len(set(seeds)) == 2 and sorted(seeds)[0::2] == sorted(seeds)[1::2]
    assert '\\22dropout_rate\\22: 1.000000e-01' in text or '\\22dropout_rate\\22: 0.1' in text
    assert "dot_general" not in text


def test_the_pallas_path_lowers_for_tpu_on_a_cpu_host(monkeypatch):
    """A padding-masked bf16 call, lowered for TPU here: Mosaic kernels for the forward and both backward passes
    and no XLA matmul of the attention."""
    if A._pallas_flash() is None:
        pytest.skip("this jax has no Pallas TPU flash attention")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.delenv(A.ATTENTION_ENV, raising=False)
    q = jnp.zeros((2, 128, 2, 64), jnp.bfloat16)
    mask = jnp.ones((2, 1, 1, 128), bool)
    loss = lambda *a: jnp.sum(L.dot_product_attention(*a, mask=mask).astype(jnp.float32))
    calls, _, text = lowered_for("tpu", jax.grad(loss, (0, 1, 2)), q, q, q)
    assert calls.count("tpu_custom_call") == 3 and "dot_general" not in text

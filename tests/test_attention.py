"""layers.dot_product_attention on its own: heads-first matmuls and the softmax normalised after the value
matmul must give the textbook softmax(q k^T * scale + bias) v, masks and layouts included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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


def test_cudnn_attention_steps_aside_unless_asked_for_on_a_gpu_in_bf16(monkeypatch):
    q, k, v, _ = inputs()
    q, k, v = (jnp.asarray(a) for a in (q, k, v))
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    monkeypatch.delenv(L.ATTENTION_ENV, raising=False)
    assert L.cudnn_attention(*bf, None, None, 0.3) is None  # opt-in
    monkeypatch.setenv(L.ATTENTION_ENV, "cudnn")
    assert L.cudnn_attention(q, k, v, None, None, 0.3) is None  # float32
    if jax.default_backend() != "gpu":
        assert L.cudnn_attention(*bf, None, None, 0.3) is None


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN fused attention needs an NVIDIA GPU")
@pytest.mark.parametrize("with_bias", [False, True])
def test_cudnn_attention_matches_the_reference_on_gpu(with_bias, monkeypatch):
    """bf16 on the GPU: the fused path runs (not None), agrees with float64 to bf16 accuracy, and its
    gradients agree with the unfused path's."""
    monkeypatch.setenv(L.ATTENTION_ENV, "cudnn")
    q, k, v, rng = inputs(b=4, lq=64, lk=64, h=4, d=64, seed=1)
    lengths = np.array([64, 40, 17, 1])
    mask = (np.arange(64)[None, :] < lengths[:, None])[:, None, None, :]
    bias = rng.normal(size=(4, 4, 64, 64)).astype(np.float32) if with_bias else None
    qb, kb, vb = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    args = (jnp.asarray(mask), None if bias is None else jnp.asarray(bias), 0.125)
    fused = L.cudnn_attention(qb, kb, vb, *args)
    assert fused is not None
    ref = reference(*(np.asarray(a.astype(jnp.float32)) for a in (qb, kb, vb)), mask, bias, 0.125)
    err = np.linalg.norm(np.asarray(fused, np.float64) - ref) / np.linalg.norm(ref)
    assert err < 1e-2, err

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)

    fused_grads = jax.grad(lambda *a: loss(lambda q, k, v: L.cudnn_attention(q, k, v, *args), *a), (0, 1, 2))(
        qb, kb, vb)
    plain = lambda q, k, v: L.dot_product_attention(q, k, v, mask=args[0], bias=args[1], scale=0.125,
                                                    dtype=jnp.bfloat16, dropout=lambda w: w)  # not fused
    plain_grads = jax.grad(lambda *a: loss(plain, *a), (0, 1, 2))(qb, kb, vb)
    for a, b in zip(fused_grads, plain_grads):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 3e-2

"""Each loss against a direct numpy formula on hand-made arrays, masks and padding included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdr_jax import losses


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _softmax(x):
    return np.exp(_log_softmax(x))


def test_dpr_nll_matches_numpy_with_in_batch_negatives():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(3, 5)).astype(np.float32)
    p = rng.normal(size=(6, 5)).astype(np.float32)          # 2 passages per question
    pos = np.array([0, 2, 4], np.int32)
    scores = q.astype(np.float64) @ p.T.astype(np.float64)
    expected = np.mean([-_log_softmax(scores[i])[pos[i]] for i in range(3)])
    got = losses.dpr_nll(jnp.asarray(q), jnp.asarray(p), jnp.asarray(pos))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    # A hand-made case: identical passages give log(N) whatever the positive.
    same = losses.dpr_nll(jnp.ones((2, 4)), jnp.ones((4, 4)), jnp.array([0, 3]))
    np.testing.assert_allclose(float(same), np.log(4.0), rtol=1e-6)


def test_dpr_nll_masks_questions_and_padding_passages():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(3, 4)).astype(np.float32)
    p = rng.normal(size=(6, 4)).astype(np.float32)
    pos = np.array([0, -1, 4], np.int32)                    # question 1 has no gold positive
    pmask = np.array([1, 1, 1, 0, 1, 1], np.int32)          # passage 3 is padding
    scores = q.astype(np.float64) @ p.T.astype(np.float64)
    keep = pmask.astype(bool)
    expected = np.mean([-(_log_softmax(scores[i][keep]))[list(np.flatnonzero(keep)).index(pos[i])]
                        for i in (0, 2)])
    got = losses.dpr_nll(jnp.asarray(q), jnp.asarray(p), jnp.asarray(pos), passage_mask=jnp.asarray(pmask))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    # An explicit question mask drops question 2 as well.
    got0 = losses.dpr_nll(jnp.asarray(q), jnp.asarray(p), jnp.asarray(pos), mask=jnp.array([1, 1, 0]),
                          passage_mask=jnp.asarray(pmask))
    expected0 = -(_log_softmax(scores[0][keep]))[0]
    np.testing.assert_allclose(float(got0), expected0, rtol=1e-5)


def test_in_batch_accuracy():
    scores = jnp.array([[3.0, 1.0, 0.0], [0.0, 1.0, 5.0], [2.0, 0.0, 1.0]])
    acc = losses.in_batch_accuracy(scores, jnp.array([0, 1, -1]))
    assert float(acc) == pytest.approx(0.5)     # question 2 has no positive and does not count


@pytest.mark.parametrize("temperature,scale", [(1.0, False), (2.0, False), (2.0, True)])
def test_rdr_kl_matches_numpy_with_padding(temperature, scale):
    rng = np.random.default_rng(2)
    s = rng.normal(size=(3, 4)).astype(np.float32) * 3
    t = rng.normal(size=(3, 4)).astype(np.float32) * 3
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], bool)   # last question: no passages at all
    s_pad, t_pad = s.copy(), t.copy()
    s_pad[~mask], t_pad[~mask] = 1e4, -1e4       # padding values must not matter
    per_q = []
    for i in range(2):
        k = mask[i]
        pt = _softmax(t[i][k].astype(np.float64) / temperature)
        ps = _softmax(s[i][k].astype(np.float64) / temperature)
        per_q.append(np.sum(pt * (np.log(pt) - np.log(ps))))
    expected = np.mean(per_q) * (temperature ** 2 if scale else 1.0)
    got = losses.rdr_kl(jnp.asarray(s_pad), jnp.asarray(t_pad), jnp.asarray(mask), temperature, scale)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    grad = jax.grad(lambda x: losses.rdr_kl(x, jnp.asarray(t_pad), jnp.asarray(mask), temperature))(jnp.asarray(s_pad))
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad)[~mask] == 0)


def test_rdr_kl_is_zero_when_student_matches_teacher_and_positive_otherwise():
    t = jnp.array([[1.0, 2.0, 0.5]])
    assert float(losses.rdr_kl(t + 7.0, t)) == pytest.approx(0.0, abs=1e-6)   # shift-invariant
    assert float(losses.rdr_kl(-t, t)) > 0.1


def test_losses_are_float32_for_bfloat16_inputs():
    q = jnp.ones((2, 4), jnp.bfloat16)
    p = jnp.ones((4, 4), jnp.bfloat16)
    out = losses.dpr_nll(q, p, jnp.array([0, 2]))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(float(out), np.log(4.0), rtol=1e-6)


def test_reader_losses_match_a_direct_formula():
    from rdr_jax.losses import reader_losses

    rng = np.random.RandomState(3)
    b, m, length, s = 3, 4, 10, 2
    start, end = rng.randn(b, m, length).astype(np.float32), rng.randn(b, m, length).astype(np.float32)
    relevance = rng.randn(b, m).astype(np.float32)
    text = np.zeros((b, m, length), np.int32)
    text[:, :, 4:9] = 1
    starts = np.array([[4, 6], [5, 0], [4, 4]])
    ends = np.array([[5, 6], [7, 0], [4, 4]])
    span_mask = np.array([[1, 1], [1, 0], [0, 0]])  # question 2 has no gold span in its positive

    rel_loss, span_loss, metrics = reader_losses(start, end, relevance, text, starts, ends, span_mask)

    def log_softmax(x):
        x = x - x.max()
        return x - np.log(np.exp(x).sum())

    expected_rel = -np.mean([log_softmax(relevance[i])[0] for i in range(b)])
    per_question = []
    for i in range(b):
        if not span_mask[i].any():
            continue
        ls = np.full(length, -np.inf)
        le = np.full(length, -np.inf)
        ls[4:9] = log_softmax(start[i, 0, 4:9])
        le[4:9] = log_softmax(end[i, 0, 4:9])
        likelihood = sum(np.exp(ls[a] + le[e]) for a, e, k in zip(starts[i], ends[i], span_mask[i]) if k)
        per_question.append(-np.log(likelihood))
    np.testing.assert_allclose(float(rel_loss), expected_rel, rtol=1e-5)
    np.testing.assert_allclose(float(span_loss), np.mean(per_question), rtol=1e-5)
    assert float(metrics["relevance_accuracy"]) == np.mean(relevance.argmax(-1) == 0)


def test_masked_mean_shared_by_every_loss():
    values = jnp.array([1.0, 2.0, jnp.nan, 4.0])
    mask = jnp.array([True, True, False, False])
    assert float(losses.masked_mean(values, mask)) == 1.5
    assert float(losses.masked_mean(values, jnp.zeros(4, bool))) == 0.0  # a mean over nothing is 0
    assert float(losses.masked_mean(jnp.array([1.0, 3.0]))) == 2.0
    grad = jax.grad(lambda v: losses.masked_mean(v, mask))(values)
    np.testing.assert_array_equal(np.asarray(grad), [0.5, 0.5, 0.0, 0.0])  # masked NaN reaches nothing

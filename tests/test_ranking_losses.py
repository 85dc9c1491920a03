"""Ranking / distillation losses checked against direct numpy loops on hand-made scores (ties, ragged lists
padded to K with a mask), plus gradient sanity: finite, and exactly zero through padded entries."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdr_jax import losses as rl

# Three queries, lists padded to K = 5: row 0 full with a teacher tie, row 1 has 3 real entries, row 2 has 2.
STUDENT = np.array([[2.0, 0.5, -1.0, 0.5, 3.0],
                    [0.1, 1.2, -0.4, 9.0, 9.0],
                    [-2.0, 1.5, 7.0, 7.0, 7.0]], np.float32)
TEACHER = np.array([[5.0, 3.0, 3.0, 1.0, 4.0],     # 3.0 appears twice: that pair is no pair
                    [0.0, 2.0, 1.0, -5.0, 8.0],
                    [1.0, 0.5, 0.0, 0.0, 0.0]], np.float32)
MASK = np.array([[1, 1, 1, 1, 1],
                 [1, 1, 1, 0, 0],
                 [1, 1, 0, 0, 0]], bool)
# Padding holding garbage must not matter: NaN / inf where the mask is off.
GARBAGE = np.where(MASK, 0.0, np.nan).astype(np.float32)


def softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def log_softmax(values):
    m = max(values)
    lse = m + math.log(sum(math.exp(v - m) for v in values))
    return [v - lse for v in values]


def close(a, b, tol=1e-5):
    assert abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b))), (float(a), float(b))


# ---- reference loops -----------------------------------------------------------------------------------------
def ranknet_reference(s, t, mask, per_query=False):
    all_losses, per_row = [], []
    for b in range(s.shape[0]):
        row = []
        for i in range(s.shape[1]):
            for j in range(s.shape[1]):
                if mask[b, i] and mask[b, j] and t[b, i] > t[b, j]:
                    row.append(math.log(1 + math.exp(-(s[b, i] - s[b, j]))))
        all_losses += row
        if row:
            per_row.append(sum(row) / len(row))
    values = per_row if per_query else all_losses
    return sum(values) / len(values) if values else 0.0


def dgr_reference(s, mask, margin=300.0, step=100.0, positive_weight=3.0):
    total, violated = 0.0, 0
    for b in range(s.shape[0]):
        n = int(mask[b].sum())
        for i in range(n):
            for j in range(i + 1, n):
                d = max(0.0, float(s[b, j] - s[b, i]) + margin + (j - i - 1) * step)
                if d > 0:
                    total += (positive_weight if i == 0 else 1.0 / (i + 1)) * d
                    violated += 1
    return total / violated if violated else 0.0


# ---- DistillRankNet ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_query", [False, True])
def test_distill_ranknet_matches_loop(per_query):
    got = rl.distill_ranknet(STUDENT, TEACHER, MASK, per_query=per_query)
    close(got, ranknet_reference(STUDENT, TEACHER, MASK, per_query))


def test_distill_ranknet_pairs_and_ties_by_hand():
    # One list: teacher (2, 1, 1): pairs (0,1), (0,2) only; the tied pair (1,2) gives nothing.
    s = np.array([[0.0, 1.0, -3.0]], np.float32)
    t = np.array([[2.0, 1.0, 1.0]], np.float32)
    expected = (softplus(1.0 - 0.0) + softplus(-3.0 - 0.0)) / 2
    close(rl.distill_ranknet(s, t), expected)
    # Changing the students' order inside the tie leaves the loss unchanged.
    close(rl.distill_ranknet(np.array([[0.0, -3.0, 1.0]], np.float32), t), expected)
    # All ties: no pair, loss 0.
    assert float(rl.distill_ranknet(s, np.ones_like(t))) == 0.0


def test_batch_mean_differs_from_per_query_mean():
    a = float(rl.distill_ranknet(STUDENT, TEACHER, MASK))
    b = float(rl.distill_ranknet(STUDENT, TEACHER, MASK, per_query=True))
    assert abs(a - b) > 1e-3  # rows have 9, 3 and 1 pairs: the two means really are different choices


# ---- MarginMSE -----------------------------------------------------------------------------------------------
def test_margin_mse_triples():
    sp, sn = np.array([3.0, 1.0, 0.0], np.float32), np.array([1.0, 2.0, 0.5], np.float32)
    tp, tn = np.array([10.0, 4.0, 1.0], np.float32), np.array([9.0, 1.0, 1.0], np.float32)
    expected = np.mean([((a - b) - (c - d)) ** 2 for a, b, c, d in zip(sp, sn, tp, tn)])
    close(rl.margin_mse(sp, sn, tp, tn), expected)
    close(rl.margin_mse(sp, sn, tp, tn, np.array([True, False, True])),
          np.mean([((sp[k] - sn[k]) - (tp[k] - tn[k])) ** 2 for k in (0, 2)]))


def test_margin_mse_list_matches_loop():
    values = [((STUDENT[b, 0] - STUDENT[b, j]) - (TEACHER[b, 0] - TEACHER[b, j])) ** 2
              for b in range(3) for j in range(1, 5) if MASK[b, j]]
    close(rl.margin_mse_list(STUDENT, TEACHER, MASK), sum(values) / len(values))


# ---- InfoNCE -------------------------------------------------------------------------------------------------
def infonce_reference(s, mask, temperature, positives):
    losses = []
    for b in range(s.shape[0]):
        keep = [k for k in range(s.shape[1]) if mask[b, k]]
        lp = dict(zip(keep, log_softmax([s[b, k] / temperature for k in keep])))
        pos = [k for k in positives[b] if k in lp]
        if pos:
            m = max(lp[k] for k in pos)
            losses.append(-(m + math.log(sum(math.exp(lp[k] - m) for k in pos))))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_infonce_positive_first(temperature):
    close(rl.infonce(STUDENT, mask=MASK, temperature=temperature),
          infonce_reference(STUDENT, MASK, temperature, [[0]] * 3))


def test_infonce_positive_index_and_labels():
    index = np.array([4, 2, -1])  # row 2 has no positive: left out
    close(rl.infonce(STUDENT, index, MASK), infonce_reference(STUDENT[:2], MASK[:2], 1.0, [[4], [2]]))
    labels = np.array([[1, 0, 0, 1, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0]], bool)  # row 2: positive is padding
    close(rl.infonce(STUDENT, mask=MASK, labels=labels),
          infonce_reference(STUDENT[:2], MASK[:2], 1.0, [[0, 3], [1, 2]]))


# ---- pointwise BCE -------------------------------------------------------------------------------------------
def test_pointwise_bce_matches_loop():
    labels = np.array([[1, 0, 0, 1, 0], [0.25, 1, 0, 1, 1], [1, 0, 1, 1, 1]], np.float32)
    values = []
    for b in range(3):
        for k in range(5):
            if MASK[b, k]:
                p = 1 / (1 + math.exp(-STUDENT[b, k]))
                y = labels[b, k]
                values.append(-(y * math.log(p) + (1 - y) * math.log(1 - p)))
    close(rl.pointwise_bce(STUDENT, labels, MASK), sum(values) / len(values))
    close(rl.pointwise_bce(np.array([80.0]), np.array([0.0])), 80.0)  # stable far from 0


# ---- listwise KL ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_listwise_kl_matches_loop(temperature):
    losses = []
    for b in range(3):
        keep = [k for k in range(5) if MASK[b, k]]
        ls = log_softmax([STUDENT[b, k] / temperature for k in keep])
        lt = log_softmax([TEACHER[b, k] / temperature for k in keep])
        losses.append(sum(math.exp(t) * (t - s) for s, t in zip(ls, lt)))
    close(rl.listwise_kl(STUDENT, TEACHER, MASK, temperature), sum(losses) / 3)
    assert float(rl.listwise_kl(TEACHER, TEACHER, MASK, temperature)) == pytest.approx(0.0, abs=1e-6)


# ---- DGR -----------------------------------------------------------------------------------------------------
def test_dgr_margin_ranknet_matches_loop_with_default_margins():
    # Scores on the scale of summed log-probabilities, some pairs satisfied, most violated.
    s = np.array([[-10.0, -700.0, -400.0, -2000.0], [-50.0, -20.0, -900.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)
    close(rl.dgr_margin_ranknet(s, mask), dgr_reference(s, mask))


def test_dgr_margin_ranknet_by_hand_and_when_nothing_is_violated():
    s = np.array([[0.0, -1.0, -2.0]], np.float32)
    # margin 1, step 1: d01 = max(0, -1 + 1 + 0) = 0 (not violated), d02 = -2 + 1 + 1 = 0, d12 = -1 + 1 + 0 = 0
    assert float(rl.dgr_margin_ranknet(s, margin=1.0, margin_step=1.0)) == 0.0
    # margin 2, step 1: d01 = 1 (w 3), d02 = 1 (w 3), d12 = 1 (w 1/2): (3 + 3 + 0.5) / 3
    close(rl.dgr_margin_ranknet(s, margin=2.0, margin_step=1.0), 6.5 / 3)
    close(rl.dgr_margin_ranknet(s, margin=2.0, margin_step=1.0, positive_weight=1.0), 2.5 / 3)


def test_dgr_ranknet_is_ranknet_on_list_order():
    values = [math.log(1 + math.exp(-(STUDENT[b, i] - STUDENT[b, j])))
              for b in range(3) for i in range(5) for j in range(i + 1, 5) if MASK[b, i] and MASK[b, j]]
    close(rl.dgr_ranknet(STUDENT, MASK), sum(values) / len(values))


# ---- gradients -----------------------------------------------------------------------------------------------
LABELS = np.array([[1, 0, 0, 1, 0], [0, 1, 1, 0, 0], [1, 0, 0, 0, 0]], np.float32)
LOSSES = {
    "distill_ranknet": lambda s: rl.distill_ranknet(s, TEACHER + GARBAGE, MASK),
    "distill_ranknet_per_query": lambda s: rl.distill_ranknet(s, TEACHER, MASK, per_query=True),
    "margin_mse_list": lambda s: rl.margin_mse_list(s, TEACHER + GARBAGE, MASK),
    "infonce": lambda s: rl.infonce(s, mask=MASK, temperature=0.5),
    "infonce_labels": lambda s: rl.infonce(s, mask=MASK, labels=LABELS),
    "pointwise_bce": lambda s: rl.pointwise_bce(s, LABELS + GARBAGE, MASK),
    "listwise_kl": lambda s: rl.listwise_kl(s, TEACHER + GARBAGE, MASK, 2.0),
    "dgr_margin_ranknet": lambda s: rl.dgr_margin_ranknet(s * 100.0, MASK),
    "dgr_ranknet": lambda s: rl.dgr_ranknet(s, MASK),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_finite_and_zero_through_padding(name):
    fn = LOSSES[name]
    student = jnp.asarray(STUDENT + GARBAGE)  # NaN in every padded slot
    value, grad = jax.value_and_grad(fn)(student)
    grad = np.asarray(grad)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad)), name
    assert np.all(grad[~MASK] == 0.0), name
    assert np.any(grad[MASK] != 0.0), name  # the real entries do get a signal
    # Padding values change nothing.
    close(fn(jnp.asarray(np.where(MASK, STUDENT, 123.0))), value)


def test_fully_padded_rows_and_empty_batches_give_zero():
    mask = np.zeros((2, 4), bool)
    s = jnp.zeros((2, 4))
    for value in (rl.distill_ranknet(s, s, mask), rl.margin_mse_list(s, s, mask), rl.infonce(s, mask=mask),
                  rl.pointwise_bce(s, s, mask), rl.listwise_kl(s, s, mask), rl.dgr_margin_ranknet(s, mask),
                  rl.dgr_ranknet(s, mask)):
        assert float(value) == 0.0


def test_losses_are_float32_under_bfloat16_inputs():
    s = jnp.asarray(STUDENT, jnp.bfloat16)
    assert rl.distill_ranknet(s, TEACHER, MASK).dtype == jnp.float32
    assert rl.infonce(s, mask=MASK).dtype == jnp.float32
    assert rl.dgr_margin_ranknet(s, MASK).dtype == jnp.float32

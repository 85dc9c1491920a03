"""tests/parity.py: |actual - expected| <= atol + rtol * |expected|, and a message that says where and by how much."""

import numpy as np
import pytest
import torch

from parity import assert_close


def test_large_values_get_a_relative_tolerance():
    # the reported case: a logit of 11.6 off by 1.05e-5 (relative 9e-7) is a correct float32 result
    expected = np.zeros((2, 3), np.float32)
    expected[1, 2] = 11.6
    actual = expected.copy()
    actual[1, 2] += 1.05e-5
    assert_close(actual, expected)
    assert_close(expected + 9e-6, expected)                 # near zero: the absolute term
    actual[1, 2] = 11.6 + 3e-5
    with pytest.raises(AssertionError) as err:
        assert_close(actual, expected, what="logits")
    message = str(err.value)
    assert message.startswith("logits: 1 of 6 outside") and "index (1, 2)" in message and "11.6" in message


def test_inputs_and_non_finite_values():
    assert_close(torch.tensor([1.0, 2.0], dtype=torch.bfloat16), np.array([1.0, 2.0]))
    assert_close(np.array([np.nan, np.inf, 1.0]), np.array([np.nan, np.inf, 1.0]))
    for bad in ([np.nan, np.inf, 1.0], [0.0, -np.inf, 1.0]):
        with pytest.raises(AssertionError):
            assert_close(np.array(bad), np.array([0.0, np.inf, 1.0]))
    with pytest.raises(AssertionError, match="shape"):
        assert_close(np.zeros(3), np.zeros(4))
    assert_close(3.0, 3.0 + 1e-5)                            # scalars

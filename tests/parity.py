"""One tolerance rule for comparing our numbers with transformers' (and with our own other code paths).

    |actual - expected| <= atol + rtol * |expected|      elementwise

An absolute tolerance alone fails on machines whose float32 rounding differs a little (another BLAS, another
CPU's vector width): a logit of 11.6 is off by 1.05e-5 with a relative error of 9e-7, a correct result. The
absolute term covers values near zero, the relative one large values. The message gives the worst violation:
where, both values, the difference and what was allowed there.
"""

from __future__ import annotations

import numpy as np

ATOL = 1e-5
RTOL = 1e-6


def as_float64(x) -> np.ndarray:
    """JAX / numpy / PyTorch (any float dtype, bf16 included) as a float64 numpy array."""
    if hasattr(x, "detach"):   # torch.Tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close(actual, expected, *, atol: float = ATOL, rtol: float = RTOL, what: str = "") -> None:
    a, e = as_float64(actual), as_float64(expected)
    name = what or "values"
    assert a.shape == e.shape, f"{name}: shape {a.shape}, expected {e.shape}"
    same_nonfinite = (~np.isfinite(a) | ~np.isfinite(e)) & ((a == e) | (np.isnan(a) & np.isnan(e)))
    allowed = atol + rtol * np.abs(e)
    with np.errstate(invalid="ignore"):
        excess = np.where(same_nonfinite, -np.inf, np.abs(a - e) - allowed)
    excess = np.where(np.isnan(excess), np.inf, excess)   # NaN against a number
    if a.size == 0 or not (excess > 0).any():
        return
    bad = int((excess > 0).sum())
    i = np.unravel_index(int(np.argmax(excess)), excess.shape)
    raise AssertionError(
        f"{name}: {bad} of {a.size} outside |actual - expected| <= {atol:g} + {rtol:g} * |expected|; worst at "
        f"index {tuple(int(k) for k in i)}: actual {a[i]!r}, expected {e[i]!r}, |diff| {abs(a[i] - e[i]):.3g} > "
        f"allowed {allowed[i]:.3g}")

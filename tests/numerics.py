"""How backends are judged against the reference: same value class, then close values."""

from __future__ import annotations

import numpy as np


def value_class(x: np.ndarray) -> np.ndarray:
    """0 finite, 1 NaN, 2 +inf, 3 -inf."""
    return np.select([np.isnan(x), x == np.inf, x == -np.inf], [1, 2, 3], 0)


def close(a: np.ndarray, b: np.ndarray, rtol: float) -> np.ndarray:
    """Elementwise: same class, and for finite pairs |a - b| <= rtol * |b| (plus a hair)."""
    with np.errstate(all="ignore"):
        same_class = value_class(a) == value_class(b)
        finite = np.isfinite(a) & np.isfinite(b)
        near = np.abs(a.astype(np.float64) - b) <= rtol * np.maximum(np.abs(b), 1e-30) + 1e-37
    return same_class & (~finite | near)

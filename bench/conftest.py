"""Shared by the benchmark modules: a best-of timer for peers measured in the same run."""

from __future__ import annotations

import time
from typing import Callable

import pytest


def best_of(fn: Callable[[], object], repeat: int = 10, warmup: int = 2) -> float:
    """Best wall time of `repeat` calls after `warmup`: on a shared machine the minimum is the
    figure least disturbed by other work, and the one pytest-benchmark's `min` column shows."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.fixture(scope="session")
def timer() -> Callable[..., float]:
    return best_of

"""Shared by the benchmark modules: peers timed in the same run, interleaved with ours.

The machine these run on is often shared (2 cores, other jobs), and a step that needs both cores
waits a scheduler quantum whenever another process holds one. Timing our row and then the peer's
row lets one land in a busy spell and the other in a quiet one; timing them in alternation, and
keeping each one's best, gives ratios that both saw the same machine.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import pytest


def interleaved_best(fns: dict[str, Callable[[], object]], repeat: int,
                     warmup: int = 2) -> dict[str, float]:
    """Best wall time of each function over `repeat` rounds, one call of each per round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: math.inf for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@pytest.fixture(scope="session")
def interleaved() -> Callable[..., dict[str, float]]:
    return interleaved_best

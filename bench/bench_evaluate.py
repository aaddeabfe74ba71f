"""Evaluations per hour on the `quick` preset: the local process pool against serial.

Why it matters: evaluation is where a run spends its time, and the pool is what the main job
uses by default. Both executors train the same four candidates (distinct programs, fresh store,
so every one trains); the peer is the serial executor in the same run, and `extra_info` carries
evaluations per hour for both and the speed-up.

    .venv/bin/python -m pytest bench/bench_evaluate.py --benchmark-only
"""

from __future__ import annotations

import functools
import tempfile
import time

import pytest

from engine.evaluate import Evaluator
from engine.executors import make_executor
from engine.store import Store
from engine.training import configure_process

pytestmark = pytest.mark.slow

# Four optimizers that train normally on quick (distinct hashes and fingerprints).
CANDIDATES = [f"weight: mul({c}, grad)" for c in (0.05, 0.03)] + [
    f"alpha: mul(0.1, sub(alpha, grad))\nbeta: mul(0.001, sub(beta, square(grad)))\n"
    f"weight: mul({c}, div(alpha, add(sqrt(beta), 1e-08)))" for c in (0.001, 0.002)]


def evaluate_all(executor_name: str, preset: str) -> float:
    """Seconds to train every candidate once from a cold store."""
    init = functools.partial(configure_process, threads=1)
    with tempfile.TemporaryDirectory() as tmp, Store(f"{tmp}/store.sqlite") as store, \
            make_executor(executor_name, initializer=init) as executor:
        evaluator = Evaluator("alr", preset, 0, store, executor, time_limit=600)
        start = time.perf_counter()
        results = evaluator.evaluate(CANDIDATES)
        elapsed = time.perf_counter() - start
    assert all(r.source == "trained" and r.reason is None for r in results), results
    return elapsed


def test_evaluations_per_hour_local_vs_serial(benchmark):
    preset = "quick" if benchmark.enabled else "smoke"  # make test only checks that it runs
    serial = evaluate_all("serial", preset)
    benchmark.group = f"evaluate {len(CANDIDATES)} candidates, {preset} preset"
    local = benchmark.pedantic(evaluate_all, args=("local", preset), rounds=1, iterations=1)
    benchmark.extra_info.update({
        "serial_seconds": serial,
        "local_seconds": local,
        "serial_evaluations_per_hour": len(CANDIDATES) * 3600 / serial,
        "local_evaluations_per_hour": len(CANDIDATES) * 3600 / local,
        "speedup_local_over_serial": serial / local,
    })

"""Evaluations per hour on the `quick` preset: the local process pool against serial.

Why it matters: evaluation is where a run spends its time, and the pool is what the main job
uses by default. Both executors train the same eight candidates (distinct programs, fresh store,
so every one trains); the peer is the serial executor in the same run, and `extra_info` carries
evaluations per hour for both and the speed-up. Each executor first answers one warm-up
candidate, untimed, so that what is timed is the steady state of a run: its workers started,
torch and Numba imported, the data loaded and split. The warm-up's own seconds are reported as
`*_first_seconds`: start-up is paid once per run, not per candidate.

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

# Eight optimizers that train normally on quick (distinct hashes and fingerprints), and two
# more to warm each executor up with (one per worker).
def sgd(c: float) -> str:
    return f"weight: mul({c}, grad)"


def rmsprop(c: float) -> str:
    return (f"alpha: mul(0.1, sub(alpha, grad))\nbeta: mul(0.001, sub(beta, square(grad)))\n"
            f"weight: mul({c}, div(alpha, add(sqrt(beta), 1e-08)))")


CANDIDATES = [sgd(c) for c in (0.05, 0.03, 0.02, 0.04)] + [
    rmsprop(c) for c in (0.001, 0.002, 0.0015, 0.0007)]
WARM_UP = [sgd(0.01), rmsprop(0.0005)]


def evaluate_all(executor_name: str, preset: str) -> tuple[float, float]:
    """Seconds to train every candidate once from a cold store, after a warm-up; and the
    warm-up's seconds (start-up included)."""
    init = functools.partial(configure_process, threads=1)
    with tempfile.TemporaryDirectory() as tmp, Store(f"{tmp}/store.sqlite") as store, \
            make_executor(executor_name, initializer=init) as executor:
        evaluator = Evaluator("alr", preset, 0, store, executor, time_limit=600)
        start = time.perf_counter()
        warm = evaluator.evaluate(WARM_UP)
        first = time.perf_counter() - start
        start = time.perf_counter()
        results = evaluator.evaluate(CANDIDATES)
        elapsed = time.perf_counter() - start
    assert all(r.source == "trained" and r.reason is None for r in warm + results), results
    return elapsed, first


def test_evaluations_per_hour_local_vs_serial(benchmark):
    preset = "quick" if benchmark.enabled else "smoke"  # make test only checks that it runs
    serial, serial_first = evaluate_all("serial", preset)
    benchmark.group = f"evaluate {len(CANDIDATES)} candidates, {preset} preset"
    runs: list[tuple[float, float]] = []
    # pedantic's own time includes the warm-up; the figures to read are in extra_info.
    benchmark.pedantic(lambda: runs.append(evaluate_all("local", preset)), rounds=1,
                       iterations=1)
    local, local_first = runs[-1]
    benchmark.extra_info.update({
        "serial_seconds": serial,
        "local_seconds": local,
        "serial_first_seconds": serial_first,
        "local_first_seconds": local_first,
        "serial_evaluations_per_hour": len(CANDIDATES) * 3600 / serial,
        "local_evaluations_per_hour": len(CANDIDATES) * 3600 / local,
        "speedup_local_over_serial": serial / local,
    })

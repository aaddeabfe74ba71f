"""Evaluations per hour: the local process pool against serial.

Why it matters: evaluation is where a run spends its time, and the pool is what the main job
uses by default. Both executors train the same eight candidates (distinct programs, a fresh store
each time, so every one trains); the peer is the serial executor in the same run, and `extra_info`
carries evaluations per hour for both and the speed-up. Each executor first answers two warm-up
candidates (one per pool worker), untimed, so that what is timed is the steady state of a run:
its workers started, torch and Numba imported, the data loaded and split. The warm-up's own
seconds are reported as `*_first_seconds`: start-up is paid once per run, not per candidate. The
two executors then alternate, serial, local, local, serial, each keeping its best, so that both
saw the same machine (it is often shared).

The default run uses the `smoke` preset (trainings of about a second, so the parent's own work
between them weighs more); the `quick` preset, the main job's default, is long: `--bench-long`.

    .venv/bin/python -m pytest bench/bench_evaluate.py --benchmark-only --bench-long -k quick
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import time
from typing import Iterator

import pytest

from engine.fitness.evaluator import Evaluator
from engine.modes import ALR
from engine.exec import Executor, make_executor
from engine.fitness.store import Store
from engine.tasks.training import configure_process

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


@contextlib.contextmanager
def warmed_up(executor_name: str, preset: str) -> Iterator[tuple[Executor, float]]:
    """An executor that has answered the warm-up candidates, and the seconds that took (its
    start-up included)."""
    init = functools.partial(configure_process, threads=1)
    with make_executor(executor_name, initializer=init) as executor:
        start = time.perf_counter()
        train_all(executor, preset, WARM_UP)
        yield executor, time.perf_counter() - start


def train_all(executor: Executor, preset: str, programs: list[str] = CANDIDATES) -> float:
    """Seconds for `executor` to train every program once, from a fresh store."""
    with tempfile.TemporaryDirectory() as tmp, Store(f"{tmp}/store.sqlite") as store:
        evaluator = Evaluator(ALR, preset, 0, store, executor, time_limit=600)
        start = time.perf_counter()
        results = evaluator.evaluate(programs)
        elapsed = time.perf_counter() - start
    assert all(r.source == "trained" and r.reason is None for r in results), results
    return elapsed


@pytest.mark.parametrize("preset", ["smoke", pytest.param("quick", marks=pytest.mark.bench_long)])
def test_local_vs_serial(benchmark, preset):
    benchmark.group = f"evaluate {len(CANDIDATES)} candidates, {preset} preset"
    times: dict[str, list[float]] = {"serial": [], "local": []}
    with warmed_up("serial", preset) as (serial, serial_first), \
            warmed_up("local", preset) as (local, local_first):
        # serial, local, local, serial: a drift in the machine's load over the run reaches both
        # sides alike. Under --benchmark-disable (`make test`) one of each proves both run.
        before_local = iter([True, False])

        def serial_before_first_local() -> None:
            if next(before_local):
                times["serial"].append(train_all(serial, preset))

        benchmark.pedantic(lambda: times["local"].append(train_all(local, preset)),
                           setup=serial_before_first_local, rounds=2, iterations=1)
        if benchmark.enabled:
            times["serial"].append(train_all(serial, preset))
    if benchmark.disabled:
        return
    serial_s, local_s = min(times["serial"]), min(times["local"])
    benchmark.extra_info.update({
        "serial_seconds": round(serial_s, 2),
        "local_seconds": round(local_s, 2),
        "rounds_each": len(times["local"]),
        "serial_first_seconds": round(serial_first, 2),
        "local_first_seconds": round(local_first, 2),
        "serial_evaluations_per_hour": round(len(CANDIDATES) * 3600 / serial_s),
        "local_evaluations_per_hour": round(len(CANDIDATES) * 3600 / local_s),
        "speedup_local_over_serial": round(serial_s / local_s, 3),
    })

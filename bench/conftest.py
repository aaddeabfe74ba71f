"""The pytest side of bench/: what `pytest --benchmark-only` collects, runs and prints.

`pytest --benchmark-only` from the repository root is the throughput run: it collects bench/
alone (not tests/), leaves out the benchmarks marked `bench_long` unless `--bench-long` is given,
and ends with one short table of each benchmark's ratios to its peers, read from `extra_info`
(the figures BENCHMARKS.md quotes), after pytest-benchmark's own tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numba
import pytest
import torch

from benchlib import interleaved_best, ratio_table

BENCH_DIR = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def interleaved() -> Callable[..., dict[str, float]]:
    return interleaved_best


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    """A benchmark that sets the process up as a worker (`configure_process(1)`, the serial
    executor's initializer) would leave every benchmark after it on one thread."""
    before = numba.get_num_threads(), torch.get_num_threads()
    yield
    if (numba.get_num_threads(), torch.get_num_threads()) != before:
        numba.set_num_threads(before[0])  # first: it can reset torch's OpenMP thread count
        torch.set_num_threads(before[1])


_RESULTS = pytest.StashKey[list]()
_LONG_LEFT_OUT = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("benchmark").addoption(
        "--bench-long", action="store_true", default=False,
        help="also run the benchmarks marked bench_long (training epochs and ablations, the "
             "`quick` evaluation, the 50M-parameter model): tens of minutes on 2 cores")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "bench_long: a benchmark of minutes, run only with --bench-long")
    config.stash[_RESULTS] = []
    config.stash[_LONG_LEFT_OUT] = 0


@pytest.hookimpl(tryfirst=True)
def pytest_collection(session: pytest.Session) -> bool | None:
    """`pytest --benchmark-only` with no paths collects bench/ only: importing the test suite
    costs seconds, and every one of its tests would only be listed as skipped."""
    config = session.config
    if (config.getoption("benchmark_only", False)
            and config.args_source is pytest.Config.ArgsSource.TESTPATHS):
        session.perform_collect([str(BENCH_DIR)])
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip: no line each) what a benchmark run does not run: tests, under
    --benchmark-only, when paths outside bench/ were given; long benchmarks, without
    --bench-long (under --benchmark-disable too: `make test` checks the default set)."""
    only = config.getoption("benchmark_only", False)
    long_ok = config.getoption("bench_long", False)
    kept, dropped, long_left_out = [], [], 0
    for item in items:
        is_benchmark = "benchmark" in getattr(item, "fixturenames", ())
        if only and not is_benchmark:
            dropped.append(item)
        elif not long_ok and item.get_closest_marker("bench_long"):
            dropped.append(item)
            long_left_out += 1
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    config.stash[_LONG_LEFT_OUT] = long_left_out


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    if (call.when == "call" and report.passed and fixture is not None
            and getattr(fixture, "enabled", False) and fixture.extra_info):
        name = f"{item.path.stem.removeprefix('bench_')}::{item.name.removeprefix('test_')}"
        item.config.stash[_RESULTS].append((name, dict(fixture.extra_info)))
    return report


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    lines = ratio_table(config.stash.get(_RESULTS, []))
    if lines:
        terminalreporter.write_sep(
            "-", "ratios to peers, from extra_info (A / B: A's time over B's, unless named)")
        for line in lines:
            terminalreporter.write_line(line)
    left_out = config.stash.get(_LONG_LEFT_OUT, 0)
    if left_out:
        terminalreporter.write_line(
            f"{left_out} long benchmarks (marked bench_long) not run: --bench-long runs them")

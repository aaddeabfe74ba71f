"""Helpers of the benchmark modules: peers timed in alternation with ours, the figures recorded
per round, and the closing table of ratios (bench/conftest.py prints it).

The machine these run on is often shared (2 cores, other jobs), and a step that needs both cores
waits a scheduler quantum whenever another process holds one. Timing our row and then the peer's
row lets one land in a busy spell and the other in a quiet one; timing them in alternation, and
keeping each one's best, gives ratios that both saw the same machine.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

# The ratios the closing table shows, in its order: extra_info key -> (unit suffix, what it is).
# A "speedup" is the peer's time over ours, so above 1 means ours is faster. ADES is a different
# algorithm from Adam, so its ratio to fused Adam has a key of its own that says so.
RATIOS: dict[str, tuple[str, str]] = {
    "speedup_vs_fused_adam": ("x", "fused Adam / ours (same algorithm)"),
    "speedup_vs_fused_adam_different_algorithm": ("x", "fused Adam / ours (different algorithm)"),
    "speedup_vs_foreach_adam": ("x", "foreach Adam / ours (same algorithm)"),
    "speedup_vs_foreach_adam_different_algorithm": ("x", "foreach Adam / ours (different algorithm)"),
    "fraction_of_bandwidth_limit": ("", "of the bandwidth limit"),
    "speedup_local_over_serial": ("x", "evaluations/hour, local pool / serial"),
    "speedup_vs_stock": ("x", "stock torch / ours, same run"),
    "recorded_tf_over_ours": ("x", "recorded TF/Keras time / ours (TF not run)"),
    "engine_over_ir_parse": ("", "engine per generation / IR parse of it"),
    "map_over_ir_parse": ("", "mapping / IR parse, same 100 texts"),
    "speedup_batched_over_one_at_a_time": ("x", "candidates/hour, batched / one at a time"),
    "interpreter_over_kernels": ("x", "IR interpreter step / generated kernels (one call each)"),
    "interpreter_over_kernel": ("x", "IR interpreter step / generated kernel"),
    "compile_over_interpreter": ("x", "new program's first step: compile / interpreter"),
}


def peer_ratio_key(program: str, peer: str) -> str:
    """The extra_info key of `program`'s speedup over torch's `peer` Adam ("fused", "foreach"):
    marked as comparing different algorithms unless the program is Adam."""
    key = f"speedup_vs_{peer}_adam"
    return key if program == "adam" else f"{key}_different_algorithm"


def ratio_table(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Lines of the closing table: one per (benchmark, known ratio in its extra_info).

    `rows` are (benchmark name, extra_info) in run order; keys not in RATIOS are not ratios to a
    peer (seconds, GB/s...) and stay in the JSON and in pytest-benchmark's own output.
    """
    found = [(name, key, info[key]) for name, info in rows for key in RATIOS
             if isinstance(info.get(key), (int, float)) and not isinstance(info.get(key), bool)]
    if not found:
        return []
    width = max(len("benchmark"), *(len(name) for name, _, _ in found))
    lines = [f"{'benchmark':<{width}}  {'ratio':>7}  to its peer"]
    previous = None
    for name, key, value in found:
        suffix, meaning = RATIOS[key]
        shown = name if name != previous else ""
        lines.append(f"{shown:<{width}}  {value:>6.2f}{suffix or ' '}  {meaning}")
        previous = name
    return lines


def interleaved_best(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 2,
                     setups: dict[str, Callable[[], object]] | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Best wall time of each function over `repeat` rounds, one call of each per round.

    `setups[name]`, when given, runs before every call of `fns[name]`, untimed, as
    pytest-benchmark's `pedantic(setup=...)` does, so both timings of a row measure the same work.
    """
    setups = setups or {}

    def call(name: str) -> float:
        if name in setups:
            setups[name]()
        start = clock()
        fns[name]()
        return clock() - start

    for name in fns:
        for _ in range(warmup):
            call(name)
    best = {name: math.inf for name in fns}
    for _ in range(repeat):
        for name in fns:
            best[name] = min(best[name], call(name))
    return best


class Rounds:
    """A callable that runs `fn` and records each call's seconds and the growth of a counter
    (page faults...), so that a figure reported next to the best time comes from that round."""

    def __init__(self, fn: Callable[[], object], counter: Callable[[], int],
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.fn, self.counter, self.clock = fn, counter, clock
        self.records: list[tuple[float, int]] = []

    def __call__(self) -> None:
        count, start = self.counter(), self.clock()
        self.fn()
        seconds = self.clock() - start
        self.records.append((seconds, self.counter() - count))

    def best(self) -> tuple[float, int]:
        """(seconds, counter growth) of the fastest round."""
        if not self.records:
            raise ValueError("no round has run yet")
        return min(self.records, key=lambda record: record[0])

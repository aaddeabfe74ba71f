"""The serial executor: jobs one after another in the calling thread (debugging and tests)."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterator, Sequence

from engine.exec.base import (
    J, R, Failed, Outcome, _call, _check_timeout, _Closing, _initializer_failed, _timed_out)


class SerialExecutor(_Closing):
    """Runs jobs one after another in the calling thread; timeouts are judged after the fact."""

    workers = 1

    def __init__(self, initializer: Callable[[], object] | None = None) -> None:
        if initializer is not None:
            try:
                initializer()
            except Exception as error:
                raise _initializer_failed(traceback.format_exc()) from error

    def run(self, fn: Callable[[J], R], jobs: Sequence[J],
            timeout: float | None = None) -> Iterator[tuple[int, Outcome[R]]]:
        _check_timeout(timeout)
        return self._run(fn, jobs, timeout)

    def _run(self, fn, jobs, timeout):
        for index, job in enumerate(jobs):
            start = time.monotonic()
            outcome = _call(fn, job)
            elapsed = time.monotonic() - start
            if timeout is not None and elapsed > timeout:
                # The local and ray executors would have stopped this job at its deadline.
                outcome = Failed(_timed_out(timeout), f"ran {elapsed:.1f} s in the calling process")
            yield index, outcome

    def close(self) -> None:
        pass

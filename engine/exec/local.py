"""The local executor: a pool of spawned worker processes, one thread and one pipe each.

No queue or lock is shared between workers, so a worker killed at any moment (by us at its
deadline, by a segfault, by the OOM killer) can lose only its own job; see engine.exec.base for
the contract every executor keeps."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from engine.exec.base import (
    _INIT_FAILED, _READY, ExecutorError, Failed, J, Outcome, R, _call, _check_timeout, _Closing,
    _died, _initializer_failed, _one_thread_per_process, _raised, _retry_or_fail, _timed_out)

_START_FAILURES = 3  # workers that die before they are ready, in a row, before we give up


def _worker_main(conn: Connection, initializer: bytes | None) -> None:
    """A pool worker: set up, then answer one (fn, job) message at a time until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C hits the whole group; the parent decides
    _one_thread_per_process()
    if initializer is not None:
        try:
            pickle.loads(initializer)()  # unpickled after the thread set-up: it may import torch
        except BaseException:
            conn.send((_INIT_FAILED, traceback.format_exc()))
            return
    conn.send((_READY, os.getpid()))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return  # the parent closed our pipe (or died): nothing more will come
        except BaseException as error:  # the job did not unpickle here (a missing module, ...)
            outcome: Outcome = Failed(f"{_raised(error)} (loading the job in the worker)",
                                      traceback.format_exc())
        else:
            if message is None:
                return
            fn, job = message
            outcome = _call(fn, job)
        try:
            conn.send(outcome)
        except BaseException as error:  # pickling happens before any byte is written
            conn.send(Failed(f"unpicklable result: {type(error).__name__}: {error}",
                             traceback.format_exc()))


class _Worker:
    """One spawned worker process and our end of its pipe."""

    def __init__(self, context: Any, initializer: bytes | None) -> None:
        ours, theirs = context.Pipe(duplex=True)
        self.process = context.Process(target=_worker_main, args=(theirs, initializer),
                                       name="autolr-worker", daemon=True)
        self.process.start()
        theirs.close()  # else our copy keeps the pipe open and we would never see EOF
        self.conn: Connection = ours
        self.state = "starting"  # -> "idle" <-> "busy"
        self.job = -1
        self.deadline = float("inf")

    def exitcode(self) -> int | None:
        self.process.join(timeout=5)  # it is exiting: EOF or its sentinel told us
        return self.process.exitcode

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout=2)
        self.kill()


def _stop_workers(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop() if worker.state == "idle" else worker.kill()
    workers.clear()


class LocalExecutor(_Closing):
    """A pool of spawned worker processes, one thread each, kept between runs."""

    def __init__(self, workers: int | None = None,
                 initializer: Callable[[], object] | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        self._context = multiprocessing.get_context("spawn")
        self._initializer = None if initializer is None else _pickle(initializer, "initializer")
        self._pool: list[_Worker] = []
        self._running = False
        self._closed = False
        # A pool nobody closed must not outlive its owner's interest (or block interpreter exit).
        self._finalizer = weakref.finalize(self, _stop_workers, self._pool)

    def run(self, fn: Callable[[J], R], jobs: Sequence[J],
            timeout: float | None = None) -> Iterator[tuple[int, Outcome[R]]]:
        _check_timeout(timeout)
        if self._closed:
            raise ExecutorError("this local executor is closed")
        if self._running:
            raise ExecutorError("run() called while the previous run is still being iterated")
        _pickle(fn, "fn")
        return self._run(fn, list(jobs), timeout)

    def _run(self, fn, jobs, timeout):
        """The pool's event loop: hand out jobs, wait for a message, a death or a deadline, and
        yield each answer. Over 60 lines because it is one generator whose every branch may
        yield or change the loop's state (pending jobs, first deaths, start failures in a row);
        split, each helper would take and hand back all of it, and the order of a kill, a yield
        and a retry -- what the fault tests pin down -- would be spread over several places."""
        self._running = True
        pending = deque(range(len(jobs)))
        deaths: dict[int, str] = {}  # job index -> how its worker died on the first attempt
        start_failures = 0
        try:
            while pending or any(w.state == "busy" for w in self._pool):
                idle = [w for w in self._pool if w.state == "idle"]
                while pending and idle:
                    worker = idle.pop()
                    problem = self._dispatch(worker, fn, jobs, pending, timeout)
                    if problem is not None:
                        yield problem
                        idle.append(worker)
                self._pool[:] = [w for w in self._pool if w.state != "dead"]
                self._start_workers(len(pending))

                active = [w for w in self._pool if w.state in ("starting", "busy")]
                deadline = min((w.deadline for w in active), default=float("inf"))
                wait_for = (None if deadline == float("inf")
                            else max(0.0, deadline - time.monotonic()))
                ready = set(wait([w.conn for w in active] + [w.process.sentinel for w in active],
                                 wait_for))

                for worker in active:
                    if worker.conn in ready:
                        try:
                            message = worker.conn.recv()
                        except (EOFError, OSError):
                            message = None
                    elif worker.process.sentinel in ready:
                        message = None
                    elif worker.state == "busy" and time.monotonic() >= worker.deadline:
                        worker.kill()
                        worker.state = "dead"
                        yield worker.job, Failed(_timed_out(timeout), "the worker was killed")
                        continue
                    else:
                        continue

                    if message is None:  # the process is gone
                        code = worker.exitcode()
                        worker.kill()
                        was, worker.state = worker.state, "dead"
                        if was == "busy":
                            failure = _retry_or_fail(deaths, worker.job, Failed(_died(code)))
                            if failure is None:
                                pending.appendleft(worker.job)
                            else:
                                yield worker.job, failure
                            continue
                        start_failures += 1
                        if start_failures >= _START_FAILURES:
                            raise ExecutorError(
                                f"local workers keep dying before they are ready ({_died(code)}, "
                                f"{start_failures} in a row); see their stderr above. Workers are "
                                "spawned, so they import the main module: its top-level code "
                                "belongs under `if __name__ == '__main__':`")
                    elif worker.state == "starting":
                        if message[0] == _INIT_FAILED:
                            worker.kill()
                            worker.state = "dead"
                            raise _initializer_failed(message[1])
                        worker.state = "idle"
                        start_failures = 0
                    else:
                        worker.state = "idle"
                        yield worker.job, message
                self._pool[:] = [w for w in self._pool if w.state != "dead"]
        finally:
            # Jobs still running belong to a run nobody is listening to any more: stop them, so a
            # later run never receives their stale answers.
            for worker in self._pool:
                if worker.state == "busy":
                    worker.kill()
                    worker.state = "dead"
            self._pool[:] = [w for w in self._pool if w.state != "dead"]
            self._running = False

    # A worker is "starting" (spawned, not yet ready), "idle", "busy" (running `job` until
    # `deadline`) or "dead" (killed or gone; dropped from the pool at the next sweep).

    def _dispatch(self, worker: _Worker, fn, jobs, pending: deque,
                  timeout: float | None) -> tuple[int, Failed] | None:
        index = pending.popleft()
        try:
            worker.conn.send((fn, jobs[index]))
        except OSError:  # it died while idle (the OOM killer does not wait for a job)
            pending.appendleft(index)
            worker.kill()
            worker.state = "dead"
            return None
        except Exception as error:  # the job does not pickle: nothing was written
            return index, Failed(f"unpicklable job: {type(error).__name__}: {error}",
                                 traceback.format_exc())
        worker.state, worker.job = "busy", index
        worker.deadline = float("inf") if timeout is None else time.monotonic() + timeout
        return None

    def _start_workers(self, pending: int) -> None:
        starting = sum(w.state == "starting" for w in self._pool)
        idle = sum(w.state == "idle" for w in self._pool)
        wanted = min(pending - starting - idle, self.workers - len(self._pool))
        for _ in range(max(0, wanted)):
            self._pool.append(_Worker(self._context, self._initializer))

    def close(self) -> None:
        """Stop the workers (idle ones politely, busy ones by force); safe to call twice."""
        self._closed = True
        self._finalizer()


def _pickle(obj: object, what: str) -> bytes:
    try:
        return pickle.dumps(obj)
    except Exception as error:
        raise TypeError(
            f"{what} must be picklable (a module-level function, or functools.partial of one) "
            f"to reach worker processes; {obj!r} is not: {error}"
        ) from error

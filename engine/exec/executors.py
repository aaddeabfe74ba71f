"""Executors: where evaluation jobs run. In-process, in a local process pool, or on Ray.

Every candidate's fitness comes from training a model, and training can raise, hang, or kill its
process (a segfault in generated code, the OOM killer). An executor's job is to turn each of those
into an answer for that one job while the others carry on, through one interface:

    for index, outcome in executor.run(fn, jobs, timeout):  # in completion order
        match outcome:
            case Ok(value): ...
            case Failed(reason): ...  # 'raised: ValueError: boom', 'timeout after 30.0 s',
                                      # 'worker died (exit code -11 / signal SIGSEGV)'

A worker that dies under a job (the OOM killer, kill -9, a node lost) may not be the job's fault,
so the job runs once more on another worker, with a fresh deadline; only a second death in a row
is its answer. A timeout or an exception is the job's own and is not retried.

`fn` must be a module-level function and the jobs picklable (they cross process boundaries).
`run` is lazy: jobs start when iteration starts, and a caller that stops iterating early gets its
unfinished jobs stopped, so a later run never sees their answers. The three executors differ only
in where `fn(job)` runs and in how a hang is stopped:

- `serial` runs each job in the calling thread. It cannot stop a hang (nothing can kill the
  caller's own thread); it measures each job and reports one that overran `timeout` as a timeout
  after it returns, so it agrees with the other executors. A job that kills its process kills the
  caller. It is for debugging and tests; the evaluator's in-training deadline guards real hangs.
- `local` is a pool of worker processes started with 'spawn', one thread each. Each worker has its
  own pipe; there is no queue or lock shared between workers, so a worker killed at any moment
  (by us at its deadline, by a segfault, by the OOM killer) can lose only its own job. A job's
  clock starts when it is handed to an idle, started worker; past its deadline the worker gets
  SIGKILL and is replaced when there is work for it.
- `ray` submits Ray tasks, at most one per worker slot so that a submitted task starts at once;
  the clock starts at submission, and a task past its deadline is cancelled with force (Ray kills
  its worker process). The retry after a death is ours (max_retries=0): Ray's own would keep the
  first attempt's clock running and apply to no other executor. Ray does not say how a crashed
  worker ended, so its 'worker died' reasons carry Ray's error instead of an exit code; any other
  Ray failure that is not an exception in the job ('ray error: ...') is retried the same way. With
  no address it starts a private local Ray that listens on loopback only, with no dashboard and
  usage reporting off (a new one even where RAY_ADDRESS or a `ray start` names another), and shuts
  it down on close; with an address it joins that cluster (whose workers must be able to import
  autolr) and only disconnects on close. Before joining it checks that something accepts
  connections at the address, since ray.init alone retries a dead one for minutes, deaf to Ctrl-C;
  a cluster that refuses us for want of its authentication token gets a message that says how to
  give it. A Ray already running in this process is used as it is and left running.

A worker initializer (a picklable callable, e.g. `functools.partial(configure_process, threads=1)`)
runs once in every worker process before its first job. Workers always run one thread each: the
OMP/MKL/OpenBLAS/Numba thread variables are set to 1 before the job's modules are imported, and
torch/numba are told directly if something imported them first. The serial executor leaves the
caller's threads alone, so pass the same initializer to it when results must match bit for bit.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, ClassVar, Generic, Protocol, TypeVar

__all__ = [
    "EXECUTORS",
    "Executor",
    "ExecutorError",
    "Failed",
    "LocalExecutor",
    "Ok",
    "Outcome",
    "RayExecutor",
    "SerialExecutor",
    "make_executor",
]

J = TypeVar("J")
R = TypeVar("R")

EXECUTORS = ("serial", "local", "ray")

_THREAD_VARIABLES = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
_START_FAILURES = 3  # workers that die before they are ready, in a row, before we give up
_RAY_OBJECT_STORE_BYTES = 100 * 2**20  # jobs and results are small; the data sets load in workers


@dataclass(frozen=True)
class Ok(Generic[R]):
    """A job that returned `value`."""

    value: R
    ok: ClassVar[bool] = True


@dataclass(frozen=True)
class Failed:
    """A job that gave no value; `reason` is one line, `detail` a traceback where there is one."""

    reason: str
    detail: str = field(default="", compare=False, repr=False)
    ok: ClassVar[bool] = False


Outcome = Ok[R] | Failed


class ExecutorError(RuntimeError):
    """The executor itself cannot run jobs: an initializer failed, workers cannot start, no Ray."""


class Executor(Protocol):
    """Runs `fn` over jobs and yields (job index, outcome) pairs in completion order."""

    workers: int

    def run(self, fn: Callable[[J], R], jobs: Sequence[J],
            timeout: float | None = None) -> Iterator[tuple[int, Outcome[R]]]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc_info: object) -> None: ...


def make_executor(name: str, workers: int | None = None, ray_address: str | None = None,
                  initializer: Callable[[], object] | None = None) -> Executor:
    """The executor called `name`: 'serial', 'local' (default: os.cpu_count() workers) or 'ray'."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; choose one of: {', '.join(EXECUTORS)}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer, not {workers!r}")
    if ray_address is not None and name != "ray":
        raise ValueError(f"ray_address={ray_address!r} applies to the ray executor, not {name!r}")
    if name == "serial":
        if workers not in (None, 1):
            raise ValueError(f"the serial executor runs one job at a time, not workers={workers}")
        return SerialExecutor(initializer=initializer)
    if name == "local":
        return LocalExecutor(workers=workers, initializer=initializer)
    return RayExecutor(address=ray_address, workers=workers, initializer=initializer)


# -- what every executor shares -------------------------------------------------------------

def _call(fn: Callable[[J], R], job: J) -> Outcome[R]:
    """fn(job) as an Outcome: the one place a job's exception becomes a reason."""
    try:
        return Ok(fn(job))
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # SystemExit too: a job must not end its worker politely
        return Failed(_raised(error), traceback.format_exc())


def _raised(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    return f"raised: {type(error).__name__}" + (f": {message[0]}" if message else "")


def _timed_out(timeout: float) -> str:
    return f"timeout after {timeout:.1f} s"


def _died(exitcode: int | None) -> str:
    if exitcode is None:
        return "worker died (exit code unknown)"
    if exitcode < 0:
        try:
            return f"worker died (exit code {exitcode} / signal {signal.Signals(-exitcode).name})"
        except ValueError:
            pass
    return f"worker died (exit code {exitcode})"


def _retry_or_fail(deaths: dict[int, str], index: int, failure: Failed) -> Failed | None:
    """None when job `index` gets another attempt (its first such failure), else `failure`.

    A worker's death is seldom the job's doing (the OOM killer picks the biggest process, a
    node goes away), so one death costs the job nothing but a second attempt on another worker,
    as Ray retries tasks; a job that dies twice in a row probably kills its worker itself."""
    first = deaths.pop(index, None)
    if first is None:
        deaths[index] = failure.reason
        return None
    return Failed(failure.reason, f"{failure.detail}\nBoth attempts failed so; the first: {first}"
                  .lstrip())


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")


def _one_thread_per_process() -> None:
    """Make this worker use one core: env for what is imported later, setters for what was.

    Numba needs care. A spawned worker re-imports the parent's main module first, so Numba is
    often imported already, its pool size read from the environment of the time (every core).
    Numba re-reads NUMBA_NUM_THREADS before each compile and refuses a different value once its
    threads are running ("Cannot set NUMBA_NUM_THREADS ... once the threads have been
    launched": every candidate of `python -m engine.run` failed so). So the environment and
    Numba's config change together, before its threads start; if they had started, the
    environment is left as Numba read it and only the active thread count drops to 1."""
    numba = sys.modules.get("numba")
    launched = numba is not None and _numba_threads_launched()
    for name in _THREAD_VARIABLES:
        if not (name == "NUMBA_NUM_THREADS" and launched):
            os.environ[name] = "1"
    if (torch := sys.modules.get("torch")) is not None:
        torch.set_num_threads(1)
    if numba is not None:
        if not launched:
            numba.config.NUMBA_NUM_THREADS = 1
        numba.set_num_threads(1)


def _numba_threads_launched() -> bool:
    from numba.np.ufunc import parallel

    return bool(getattr(parallel, "_is_initialized", False))  # what numba.core.config checks


def _initializer_failed(detail: str) -> ExecutorError:
    last = detail.strip().splitlines()[-1] if detail.strip() else "unknown error"
    return ExecutorError(f"the worker initializer failed: {last}\n{detail}")


class _Closing:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()  # type: ignore[attr-defined]


# -- serial ---------------------------------------------------------------------------------

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


# -- local process pool ---------------------------------------------------------------------

_READY, _INIT_FAILED = "ready", "init-failed"


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


# -- Ray ------------------------------------------------------------------------------------

_ray_initialized: set[str] = set()  # per Ray worker process: the executors whose initializer ran


def _ray_entry(token: str, initializer: Callable[[], object] | None, fn: Callable[[J], R],
               job: J) -> Outcome[R] | tuple[str, str]:
    """A Ray task: set up this worker process once per executor, then run the job."""
    if token not in _ray_initialized:
        _one_thread_per_process()
        if initializer is not None:
            try:
                initializer()
            except BaseException:
                return (_INIT_FAILED, traceback.format_exc())
        _ray_initialized.add(token)
    return _call(fn, job)


class RayExecutor(_Closing):
    """Ray tasks, on a private loopback-only local Ray or on the cluster at `address`."""

    def __init__(self, address: str | None = None, workers: int | None = None,
                 initializer: Callable[[], object] | None = None) -> None:
        try:
            import ray
        except ImportError as error:
            raise ExecutorError("the ray executor needs Ray: pip install 'autolr[ray]'") from error
        self._ray = ray
        self._connected = False  # whether close() disconnects (it never stops a cluster it joined)
        env = dict.fromkeys(_THREAD_VARIABLES, "1")
        if ray.is_initialized():  # the caller's Ray: use it as it is, and leave it running
            if address is not None:
                raise ExecutorError(
                    f"Ray is already initialised in this process, so address={address!r} cannot "
                    "apply: pass no address to use that Ray, or call ray.shutdown() first")
        elif address is None:
            with _caller_keeps_sigterm():
                _start_local_ray(ray, workers or os.cpu_count() or 1)
            self._connected = True
        else:
            _check_reachable(address)
            try:
                with _caller_keeps_sigterm():
                    ray.init(address=address, log_to_driver=False)
            except Exception as error:
                raise ExecutorError(_join_failed(address, error)) from error
            self._connected = True
        if address is None:
            # A Ray on this machine: let its workers import what this process imports (a checkout
            # that is not installed, a test module), as spawned pool workers do.
            env["PYTHONPATH"] = os.pathsep.join(_user_paths())
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._token = uuid.uuid4().hex
        self._initializer = initializer
        self._task = ray.remote(_ray_entry).options(
            num_cpus=1, max_retries=0, runtime_env={"env_vars": env})
        self._running = False

    def run(self, fn: Callable[[J], R], jobs: Sequence[J],
            timeout: float | None = None) -> Iterator[tuple[int, Outcome[R]]]:
        _check_timeout(timeout)
        if self._task is None:
            raise ExecutorError("this ray executor is closed")
        if self._running:
            raise ExecutorError("run() called while the previous run is still being iterated")
        return self._run(fn, list(jobs), timeout)

    def _run(self, fn, jobs, timeout):
        ray = self._ray
        pending = deque(range(len(jobs)))
        running: dict[Any, tuple[int, float]] = {}  # ref -> (job index, deadline)
        deaths: dict[int, str] = {}  # job index -> how its worker died on the first attempt
        fn_ref = ray.put(fn)
        self._running = True
        try:
            while pending or running:
                while pending and len(running) < self.workers:
                    index = pending.popleft()
                    ref = self._task.remote(self._token, self._initializer, fn_ref, jobs[index])
                    deadline = float("inf") if timeout is None else time.monotonic() + timeout
                    running[ref] = (index, deadline)
                soonest = min(deadline for _, deadline in running.values())
                wait_for = None if soonest == float("inf") else max(0.0, soonest - time.monotonic())
                ray.wait(list(running), num_returns=1, timeout=wait_for)  # one done, or a deadline
                ready, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
                for ref in ready:  # before any cancel: a task done by its deadline keeps its answer
                    index, _ = running.pop(ref)
                    outcome, systemic = self._outcome(ref)
                    if systemic:
                        outcome = _retry_or_fail(deaths, index, outcome)
                        if outcome is None:
                            pending.appendleft(index)  # resubmitted, with a fresh deadline
                            continue
                    yield index, outcome
                now = time.monotonic()
                for ref, (index, deadline) in list(running.items()):
                    if now >= deadline:
                        ray.cancel(ref, force=True)  # kills the worker process running it
                        del running[ref]
                        yield index, Failed(_timed_out(timeout), "the Ray task was cancelled")
        finally:
            for ref in running:  # nobody is listening to these any more
                ray.cancel(ref, force=True)
            self._running = False

    def _outcome(self, ref) -> tuple[Outcome, bool]:
        """The task's outcome, and whether Ray (not the job) failed it: those get a retry."""
        ray = self._ray
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as error:  # raised in the task outside the job itself
            cause = getattr(error, "cause", None) or error
            return Failed(_raised(cause), str(error)), False
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError,
                ray.exceptions.NodeDiedError) as error:
            return Failed(f"worker died ({type(error).__name__}: {_first_sentence(error)})",
                          str(error)), True
        except ray.exceptions.RayError as error:
            return Failed(f"ray error: {type(error).__name__}: {_first_sentence(error)}",
                          str(error)), True
        if isinstance(result, tuple) and result[0] == _INIT_FAILED:
            raise _initializer_failed(result[1])
        return result, False

    def close(self) -> None:
        """Disconnect; stops the local Ray this executor started, never a cluster it joined."""
        if self._task is None:
            return
        self._task = None
        if self._connected:
            self._ray.shutdown()


def _first_sentence(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text.split(". ")[0].rstrip(".") if text else "no message"


_REACH_SECONDS = 5.0  # a head that takes longer to accept a TCP connection is not usable anyway
# What Ray 2.60's errors say when the cluster wants a token we did not send (or sent wrong).
_AUTH_FAILURE_MARKS = ("AuthenticationError", "InvalidAuthToken", "Unauthenticated")


def _check_reachable(address: str) -> None:
    """Fail fast, naming `address`, when nothing accepts a connection there.

    ray.init retries an address where nothing listens for minutes, in calls to Ray's C++ client
    that hold off Ctrl-C and SIGTERM for half a minute each; this connect has a short timeout and
    Ctrl-C stops it. Addresses that are not host:port ('auto', ...) are left to Ray."""
    import socket

    host, _, port = address.split("://")[-1].rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=_REACH_SECONDS).close()
    except OSError as error:
        why = "timed out" if isinstance(error, TimeoutError) else error.strerror or str(error)
        raise ExecutorError(
            f"could not join the Ray cluster at {address}: nothing accepts connections there "
            f"({why}); is its head running (`ray start --head`)? Pass the address that `ray "
            "start` printed") from error


def _join_failed(address: str, error: BaseException) -> str:
    """The one-line message for a failed ray.init(address), with the fix for a refused token."""
    chain, cause = [], error
    while cause is not None and len(chain) < 10:
        chain.append(f"{type(cause).__name__}: {cause}")
        cause = cause.__cause__ or cause.__context__
    if not any(mark in text for mark in _AUTH_FAILURE_MARKS for text in chain):
        # Ray's own first line ('Failed to connect to Ray cluster at ...'); its causes hold a
        # whole traceback as text.
        return f"could not join the Ray cluster at {address}: {' '.join(str(error).split())}"
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        problem, fix = "our token is missing or is not its token", "give this machine its token"
    else:
        problem = "RAY_AUTH_MODE is not 'token' here"
        fix = "set RAY_AUTH_MODE=token and give this machine its token"
    return (f"could not join the Ray cluster at {address}: it requires token authentication and "
            f"{problem}; {fix} (on the head, `ray get-auth-token` prints it; here it is read from "
            "RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token)")


@contextlib.contextmanager
def _caller_keeps_sigterm() -> Iterator[None]:
    """ray.init replaces the SIGTERM handler with its own sys.exit and leaves it so; a caller's
    handler (engine.run's stops and saves, like Ctrl-C) must survive it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread has handlers, and ray.init leaves them alone there
        return
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if handler is not None:  # None: set outside Python, so it cannot be put back
            signal.signal(signal.SIGTERM, handler)


def _user_paths() -> list[str]:
    """sys.path entries outside the interpreter's own prefixes: the code a worker must see."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    paths = []
    for entry in sys.path:
        path = os.path.realpath(entry or os.getcwd())
        if os.path.isdir(path) and not any(path.startswith(p + os.sep) or path == p
                                           for p in prefixes):
            paths.append(path)
    return list(dict.fromkeys(paths))


def _start_local_ray(ray: Any, num_cpus: int) -> None:
    """Start a Ray that only this machine can reach: Ray has no authentication to speak of by
    default, so a port open to the network is an open door."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports to Anyscale from our runs
    # ray.init replaces a loopback node address with the host's network address whenever this
    # flag (the default on Linux) is set, and Ray's gRPC servers then listen on every interface.
    # It is read at call time, so clear it for the start-up only; the check below catches a Ray
    # that no longer honours it.
    from ray._private import ray_constants

    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        # address="local": a new Ray, even where RAY_ADDRESS or a `ray start` on this machine
        # names one (ray.init() would join that, then refuse our num_cpus).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1",
                 object_store_memory=_RAY_OBJECT_STORE_BYTES, log_to_driver=False)
    except Exception as error:
        raise ExecutorError(f"could not start a local Ray: {error}") from error
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
    address = ray.util.get_node_ip_address()
    if address != "127.0.0.1":
        ray.shutdown()
        raise ExecutorError(f"the local Ray came up on {address}, not loopback; refusing to use it")

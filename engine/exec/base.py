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

import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Protocol, TypeVar

J = TypeVar("J")
R = TypeVar("R")

EXECUTORS = ("serial", "local", "ray")

_THREAD_VARIABLES = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
_READY, _INIT_FAILED = "ready", "init-failed"  # what a worker says once its set-up is done


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
    # Imported here: each executor's module imports this one for the types it shares.
    if name == "serial":
        from engine.exec.serial import SerialExecutor


        if workers not in (None, 1):
            raise ValueError(f"the serial executor runs one job at a time, not workers={workers}")
        return SerialExecutor(initializer=initializer)
    if name == "local":
        from engine.exec.local import LocalExecutor

        return LocalExecutor(workers=workers, initializer=initializer)
    from engine.exec.ray import RayExecutor

    return RayExecutor(address=ray_address, workers=workers, initializer=initializer)


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

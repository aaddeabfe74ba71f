"""The ray executor: Ray tasks on a private loopback-only local Ray or on a cluster.

At most one task per worker slot is submitted, so a submitted task starts at once and its clock
starts at submission; see engine.exec.base for the contract every executor keeps."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from engine.exec.base import (
    _INIT_FAILED, _THREAD_VARIABLES, ExecutorError, Failed, J, Outcome, R, _call, _check_timeout,
    _Closing, _initializer_failed, _one_thread_per_process, _raised, _retry_or_fail, _timed_out)

_RAY_OBJECT_STORE_BYTES = 100 * 2**20  # jobs and results are small; the data sets load in workers
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

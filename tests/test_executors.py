"""Executors: same answers everywhere, and every kind of fault contained to its own job.

The jobs are the module-level functions below (the executors pickle them by reference; workers
import this module). One local pool and one local Ray serve the whole module, so the fault tests
also show that a pool keeps working after its workers were killed. Ray starts once, here, on
loopback with 2 CPUs; if it cannot start, these tests fail rather than skip.
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.exec import (
    EXECUTORS,
    ExecutorError,
    Failed,
    LocalExecutor,
    Ok,
    RayExecutor,
    SerialExecutor,
    make_executor,
)
from engine.exec.ray import _join_failed

pytestmark = pytest.mark.timeout(180)  # a hung executor is a bug: fail, do not wait forever

MARK = "AUTOLR_TEST_INITIALIZED"


# -- jobs (module level: they travel by reference) -------------------------------------------

def checksum(seed: int) -> float:
    """A deterministic float computation that any executor must reproduce exactly."""
    rng = random.Random(seed)
    total = 0.0
    for _ in range(2000):
        total = total * 0.999 + rng.random() ** 0.5
    return total


def act(job: tuple[str, object]) -> object:
    kind, value = job
    if kind == "raise":
        raise ValueError(f"boom {value}")
    if kind == "hang":
        Path(value).write_text(str(os.getpid()))
        time.sleep(600)
    if kind == "exit":
        os._exit(3)
    if kind == "segfault":
        ctypes.string_at(0)
    if kind == "sleep":
        time.sleep(value)
    if kind == "killed-once":  # as the OOM killer would, the first time only
        marker = Path(value)
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return f"survived {marker.read_text()}"
    if kind == "killed-always":
        with open(value, "a") as log:
            log.write(f"{os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGKILL)
    return value


def whoami(_: object) -> tuple[int, str | None, str, str]:
    return os.getpid(), os.environ.get(MARK), os.environ["OMP_NUM_THREADS"], os.environ[
        "NUMBA_NUM_THREADS"]


def thread_counts(_: object) -> tuple[int, int]:
    import numba
    import torch

    return torch.get_num_threads(), numba.get_num_threads()


def mark_worker(log: str) -> None:
    """An initializer: say which process ran it, once per run of it."""
    with open(log, "a") as file:
        file.write(f"{os.getpid()}\n")
    os.environ[MARK] = str(os.getpid())


def broken_initializer() -> None:
    raise RuntimeError("no such device")


def crashing_initializer() -> None:
    os._exit(7)


# -- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local():
    with LocalExecutor(workers=2) as executor:
        yield executor


SIGTERM_BEFORE_RAY = []


@pytest.fixture(scope="module")
def ray_executor():
    SIGTERM_BEFORE_RAY.append(signal.getsignal(signal.SIGTERM))
    # As after a `ray start` on this machine: ray.init() would join that Ray, not start ours.
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{closed_port()}"
    try:
        executor = make_executor("ray", workers=2)
    finally:
        del os.environ["RAY_ADDRESS"]
    with executor:
        yield executor


@pytest.fixture(params=EXECUTORS)
def executor(request):
    if request.param == "serial":
        return SerialExecutor()
    return request.getfixturevalue("local" if request.param == "local" else "ray_executor")


def run_all(executor, fn, jobs, timeout=None) -> dict[int, object]:
    results = dict(executor.run(fn, jobs, timeout))
    assert sorted(results) == list(range(len(jobs))), "every job answered exactly once"
    return results


def pid_gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        status = Path(f"/proc/{pid}/stat")
        if status.exists() and status.read_text().split(") ")[-1].startswith("Z"):
            return True  # a zombie: dead, waiting for its parent (Ray's raylet) to reap it
        time.sleep(0.05)
    return False


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # free, and closed again once this returns


# -- the same answers everywhere -------------------------------------------------------------

def test_same_results_on_every_executor(local, ray_executor):
    jobs = list(range(12))
    expected = {i: Ok(checksum(i)) for i in jobs}
    assert run_all(SerialExecutor(), checksum, jobs, timeout=30) == expected
    assert run_all(local, checksum, jobs, timeout=30) == expected
    assert run_all(ray_executor, checksum, jobs, timeout=30) == expected


def test_no_jobs_no_answers(executor):
    assert list(executor.run(checksum, [], timeout=1)) == []


def test_raising_job_fails_with_its_reason(executor):
    results = run_all(executor, act, [("ok", 1), ("raise", 2), ("ok", 3)], timeout=30)
    assert results[0] == Ok(1) and results[2] == Ok(3)
    assert results[1] == Failed("raised: ValueError: boom 2")
    assert "Traceback" in results[1].detail and "boom 2" in results[1].detail


# -- faults that only a separate process can survive ----------------------------------------

@pytest.mark.parametrize("name", ["local", "ray"])
def test_faults_are_contained_and_the_pool_keeps_working(request, tmp_path, name):
    executor = request.getfixturevalue("local" if name == "local" else "ray_executor")
    # Ray's clock starts at submission and a replacement worker takes seconds to start on a busy
    # 2-core machine, so its limit is looser; the pool's clock starts when the job does.
    timeout = 2.0 if name == "local" else 8.0
    hang_pid = tmp_path / "hang.pid"
    jobs = [("ok", 0), ("hang", str(hang_pid)), ("raise", 2), ("exit", 3), ("ok", 4),
            ("segfault", 5), ("ok", 6), ("sleep", 0.2), ("ok", 8)]
    results = run_all(executor, act, jobs, timeout=timeout)

    assert {i: results[i] for i in (0, 4, 6, 7, 8)} == {0: Ok(0), 4: Ok(4), 6: Ok(6), 7: Ok(0.2),
                                                        8: Ok(8)}
    assert results[1] == Failed(f"timeout after {timeout:.1f} s")
    assert results[2] == Failed("raised: ValueError: boom 2")
    if name == "local":
        assert results[3] == Failed("worker died (exit code 3)")
        assert results[5] == Failed("worker died (exit code -11 / signal SIGSEGV)")
    else:  # Ray does not say how its worker ended
        for index in (3, 5):
            assert results[index].reason.startswith("worker died (WorkerCrashedError: ")
    assert pid_gone(int(hang_pid.read_text())), "the hung job's worker was killed"

    # The same executor, after three of its workers died: still whole.
    assert run_all(executor, checksum, [1, 2, 3], timeout=30) == {
        i: Ok(checksum(j)) for i, j in enumerate([1, 2, 3])}


@pytest.mark.parametrize("name", ["local", "ray"])
def test_a_killed_worker_costs_its_job_a_retry_and_two_in_a_row_fail_it(request, tmp_path, name):
    executor = request.getfixturevalue("local" if name == "local" else "ray_executor")
    once, always = tmp_path / "killed-once", tmp_path / "killed-always.log"
    jobs = [("ok", 0), ("killed-once", str(once)), ("ok", 2), ("killed-always", str(always)),
            ("ok", 4)]
    results = run_all(executor, act, jobs, timeout=60)

    first_pid = once.read_text()
    assert results[1] == Ok(f"survived {first_pid}"), "the retry gave the job's real result"
    assert pid_gone(int(first_pid))
    attempts = always.read_text().split()
    assert len(attempts) == 2 and len(set(attempts)) == 2, "two attempts, on two workers"
    if name == "local":
        assert results[3] == Failed("worker died (exit code -9 / signal SIGKILL)")
    else:
        assert results[3].reason.startswith("worker died (WorkerCrashedError: ")
    assert "Both attempts failed" in results[3].detail
    assert {i: results[i] for i in (0, 2, 4)} == {0: Ok(0), 2: Ok(2), 4: Ok(4)}


def test_serial_reports_an_overrun_as_a_timeout():
    results = run_all(SerialExecutor(), act, [("sleep", 0.3), ("ok", 1)], timeout=0.1)
    assert results == {0: Failed("timeout after 0.1 s"), 1: Ok(1)}


def test_local_stops_unfinished_jobs_when_the_caller_stops_listening(local, tmp_path):
    hang_pid = tmp_path / "hang.pid"
    results = local.run(act, [("hang", str(hang_pid)), ("sleep", 0.3)], timeout=None)
    assert next(results) == (1, Ok(0.3))
    results.close()  # e.g. the caller broke out of its loop
    assert pid_gone(int(hang_pid.read_text()))
    assert run_all(local, act, [("ok", "fresh")]) == {0: Ok("fresh")}  # no stale answers


def test_local_unpicklable_job_fails_alone(local):
    results = run_all(local, act, [("ok", 1), ("ok", lambda: None), ("ok", 3)], timeout=30)
    assert results[0] == Ok(1) and results[2] == Ok(3)
    assert results[1].reason.startswith("unpicklable job: ")


def test_local_refuses_an_unpicklable_function(local):
    with pytest.raises(TypeError, match="module-level function"):
        local.run(lambda job: job, [1])


# -- worker set-up ----------------------------------------------------------------------------

def test_local_initializer_runs_once_in_every_worker(tmp_path):
    log = tmp_path / "init.log"
    with make_executor("local", workers=2, initializer=functools.partial(mark_worker, str(log))) \
            as executor:
        outcomes = [*run_all(executor, whoami, list(range(8)), timeout=30).values(),
                    *run_all(executor, whoami, list(range(8)), timeout=30).values()]
    pids = {outcome.value[0] for outcome in outcomes}
    assert all(outcome.value[1] == str(outcome.value[0]) for outcome in outcomes)
    initialised = list(map(int, log.read_text().split()))
    # Workers start on demand and quick jobs may all land on one of them, so the log may name a
    # worker that ran no job; what must hold is: once per process, in every process that ran one.
    assert len(initialised) == len(set(initialised)) <= 2
    assert pids <= set(initialised)
    assert {outcome.value[2:] for outcome in outcomes} == {("1", "1")}


def test_local_workers_run_one_thread(local):
    assert run_all(local, thread_counts, [0], timeout=120) == {0: Ok((1, 1))}


def test_ray_initializer_runs_once_per_worker_and_joins_a_running_ray(ray_executor, tmp_path):
    log = tmp_path / "init.log"
    with RayExecutor(workers=2, initializer=functools.partial(mark_worker, str(log))) as executor:
        results = run_all(executor, whoami, list(range(8)), timeout=60)
    pids = {outcome.value[0] for outcome in results.values()}
    assert all(outcome.value[1] == str(outcome.value[0]) for outcome in results.values())
    assert sorted(map(int, log.read_text().split())) == sorted(pids)
    assert {outcome.value[2:] for outcome in results.values()} == {("1", "1")}
    # That executor found Ray running, so closing it left Ray alone.
    assert run_all(ray_executor, checksum, [5], timeout=30) == {0: Ok(checksum(5))}


def test_ray_address_cannot_apply_to_a_running_ray(ray_executor):
    with pytest.raises(ExecutorError, match="already initialised in this process"):
        RayExecutor(address="127.0.0.1:6379")


@pytest.mark.parametrize("name", ["local", "ray"])
def test_failing_initializer_is_an_executor_error(request, name):
    if name == "ray":
        request.getfixturevalue("ray_executor")  # reuse the module's Ray
    with make_executor(name, workers=1, initializer=broken_initializer) as executor:
        with pytest.raises(ExecutorError, match="initializer failed: RuntimeError: no such device"):
            list(executor.run(checksum, [1], timeout=60))


def test_local_workers_that_cannot_start_are_an_executor_error():
    with LocalExecutor(workers=1, initializer=crashing_initializer) as executor:
        with pytest.raises(ExecutorError,
                           match=r"dying before they are ready \(worker died \(exit code 7\)"):
            list(executor.run(checksum, [1, 2], timeout=60))


def test_local_one_run_at_a_time_and_not_after_close():
    executor = LocalExecutor(workers=1)
    first = executor.run(checksum, [1, 2], timeout=60)
    assert next(first) == (0, Ok(checksum(1)))
    with pytest.raises(ExecutorError, match="previous run is still being iterated"):
        executor.run(checksum, [3])
    first.close()
    executor.close()
    executor.close()  # twice is fine
    with pytest.raises(ExecutorError, match="closed"):
        executor.run(checksum, [3])


def test_serial_initializer_runs_at_once():
    with pytest.raises(ExecutorError, match="no such device"):
        SerialExecutor(initializer=broken_initializer)


# -- choosing an executor ---------------------------------------------------------------------

def test_unknown_executor_name_lists_the_valid_ones():
    with pytest.raises(ValueError,
                       match="unknown executor 'dask'; choose one of: serial, local, ray"):
        make_executor("dask")


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="local", workers=0), "workers must be a positive integer"),
    (dict(name="serial", workers=4), "one job at a time"),
    (dict(name="local", ray_address="10.0.0.1:6379"), "applies to the ray executor"),
])
def test_bad_executor_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_executor(**kwargs)


def test_bad_timeout(executor):
    with pytest.raises(ValueError, match="timeout must be a positive"):
        executor.run(checksum, [1], timeout=0)


# -- Ray's network exposure -------------------------------------------------------------------

def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def _listening(pids: set[int]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses of the TCP sockets these processes listen on (from /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    addresses = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, width // 2, 4))  # host order
            addresses.append(ipaddress.ip_address(words))
    return addresses


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets from Linux's /proc")
def test_local_ray_listens_on_loopback_only(ray_executor):
    addresses = _listening(_descendants(os.getpid()))
    assert addresses, "found none of Ray's listening sockets: the check itself is broken"
    exposed = [a for a in addresses if not (
        a.is_loopback or (a.version == 6 and a.ipv4_mapped and a.ipv4_mapped.is_loopback))]
    assert exposed == []


# -- joining a Ray cluster ---------------------------------------------------------------------

def test_starting_ray_leaves_the_callers_sigterm_handler(ray_executor):
    # ray.init installs its own (sys.exit) and keeps it: engine.run's stop-and-save would be lost.
    assert signal.getsignal(signal.SIGTERM) is SIGTERM_BEFORE_RAY[0]


def test_joining_an_address_where_nothing_listens_fails_at_once(tmp_path):
    address = f"127.0.0.1:{closed_port()}"
    # Ray alone retries this for minutes, deaf to Ctrl-C: the timeout makes that a failure.
    result = subprocess.run(
        [sys.executable, "-m", "engine.run", "--preset", "smoke", "--executor", "ray",
         "--ray-address", address, "--out", tmp_path / "run", "--store", tmp_path / "store.db"],
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])), cwd=tmp_path,
        capture_output=True, text=True, timeout=90)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"engine.run: error: could not join the Ray cluster at {address}: nothing accepts "
        "connections there (Connection refused); is its head running (`ray start --head`)? Pass "
        "the address that `ray start` printed"]


# What ray.init(address=...) raised (Ray 2.60) when joining a `ray start --head` cluster, whose
# token authentication is on by default, without RAY_AUTH_MODE=token: a ConnectionError from a
# RuntimeError whose text holds the AuthenticationError's traceback (Ray's help text trimmed).
_RAY_AUTH_TRACEBACK = """Failed to connect to GCS. Last connection error: Traceback (most \
recent call last):
  File ".../ray/_private/node.py", line 996, in _init_gcs_client
    client = GcsClient(
             ^^^^^^^^^^
  File "python/ray/_raylet.pyx", line 3198, in ray._raylet.GcsClient.__cinit__
  File "python/ray/includes/gcs_client.pxi", line 78, in ray._raylet.InnerGcsClient.standalone
  File "python/ray/includes/common.pxi", line 146, in ray._raylet.check_status_timeout_as_rpc_error
  File "python/ray/includes/common.pxi", line 119, in ray._raylet.check_status
ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token is missing \
or incorrect. Note: RAY_AUTH_MODE is currently 'disabled' (not 'token'). Ensure that the token for \
the cluster is available in a local file (e.g., ~/.ray/auth_token or via RAY_AUTH_TOKEN_PATH) or \
as the `RAY_AUTH_TOKEN` environment variable.
"""
# ... and with RAY_AUTH_MODE=token but no token on this machine (raised before any connection).
_RAY_NO_TOKEN = ("Token authentication is enabled but no authentication token was found. Ensure "
                 "that the token for the cluster is available in a local file (e.g., "
                 "~/.ray/auth_token or via RAY_AUTH_TOKEN_PATH) or as the `RAY_AUTH_TOKEN` "
                 "environment variable.")


def _raised_by_ray(text: str, cause: str) -> ConnectionError:
    """A ConnectionError chained from a RuntimeError, as ray.init raises them."""
    try:
        try:
            raise RuntimeError(cause)
        except RuntimeError as error:
            raise ConnectionError(text) from error
    except ConnectionError as error:
        return error


def test_a_refused_token_says_how_to_authenticate(monkeypatch):
    import ray.exceptions

    address = "192.0.2.2:46379"
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    refused = _raised_by_ray(f"Failed to connect to Ray cluster at {address}", _RAY_AUTH_TRACEBACK)
    message = _join_failed(address, refused)
    assert message.startswith(f"could not join the Ray cluster at {address}: it requires token "
                              "authentication and RAY_AUTH_MODE is not 'token' here; set "
                              "RAY_AUTH_MODE=token and give this machine its token")
    assert "`ray get-auth-token`" in message and "\n" not in message

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    for error in (refused, ray.exceptions.AuthenticationError(_RAY_NO_TOKEN)):
        assert "our token is missing or is not its token; give this machine its token" in \
            _join_failed(address, error)


def test_other_join_failures_keep_rays_first_line():
    address = "192.0.2.2:46379"
    error = _raised_by_ray(f"Failed to connect to Ray cluster at {address}",
                           "Failed to get cluster ID from GCS server: TimedOut: Timed out while "
                           "waiting for GCS to become available.")
    assert _join_failed(address, error) == (f"could not join the Ray cluster at {address}: "
                                            f"Failed to connect to Ray cluster at {address}")

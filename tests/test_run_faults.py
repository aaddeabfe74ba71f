"""`python -m engine.run` under faults that are not a candidate's own: a broken set-up, two
processes on one run, a resumed or copied run. Real subprocesses on the smoke preset (serial
executor), real signals; the helpers and the data set-up are test_run's."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.app.runlock import LOCK_NAME, RunLock, RunLocked
from test_run import engine_run, env, events, history_rows, smoke, wait_for  # noqa: F401

TINY = "0.000001"  # a --time-limit no training can meet: every training times out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):  # noqa: F811
    """An uninterrupted smoke ALR run, seed 0, with a store of its own."""
    base = tmp_path_factory.mktemp("reference")
    engine_run(smoke("alr", base / "run", base / "store.sqlite"), env, cwd=base)
    return base / "run"


@pytest.fixture(scope="module")
def reference_off(tmp_path_factory, env):  # noqa: F811
    """The same with --tiers off: every candidate trained, no funnel."""
    base = tmp_path_factory.mktemp("reference_off")
    engine_run(smoke("alr", base / "run", base / "store.sqlite", "--tiers", "off"), env, cwd=base)
    return base / "run"


def error_line(result: subprocess.CompletedProcess) -> str:
    """The run's error: its last line on stderr (a worker's warnings may come before it)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("engine.run: error: "), result.stderr
    return line


def counts(run_dir: Path) -> dict:
    """summary.json's evaluation counts, less what is not a count of candidates."""
    found = json.loads((run_dir / "summary.json").read_text())["evaluations"]
    return {k: v for k, v in found.items() if k not in ("train_seconds", "trainings", "answered_again")}


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# -- item 10: a set-up in which nothing can train ends the run, never a "finished" report -------

@pytest.mark.slow
def test_a_kernel_cache_that_is_a_file_stops_the_run_before_it_starts(env, tmp_path):  # noqa: F811
    """Every candidate and the baseline used to fail with NotADirectoryError and the run ended
    'finished', exit 0, the best 'tying the baseline'."""
    (tmp_path / "not-a-dir").write_text("")
    result = engine_run(smoke("alr", tmp_path / "run", tmp_path / "store.sqlite"),
                        dict(env, AUTOLR_CACHE=str(tmp_path / "not-a-dir")), cwd=tmp_path,
                        check=False)
    line = error_line(result)
    assert f"AUTOLR_CACHE={tmp_path / 'not-a-dir'}" in line and "is a file" in line
    assert not (tmp_path / "run").exists()  # nothing that blocks a retry


@pytest.mark.slow
def test_a_baseline_that_cannot_compile_in_the_workers_stops_the_run(env, tmp_path):  # noqa: F811
    """The cache directory is fine, but what the workers write under it is not: the one
    compile of the baseline before generation 0 finds it."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "numba").write_text("")  # where the numba kernels go
    result = engine_run(smoke("alr", tmp_path / "run", tmp_path / "store.sqlite"),
                        dict(env, AUTOLR_CACHE=str(cache)), cwd=tmp_path, check=False)
    line = error_line(result)
    assert "the baseline Adam (lr=1e-3) does not compile in a worker" in line
    assert str(cache / "numba") in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_trainings_that_all_fail_not_by_their_own_fault_stop_the_run(reference, env, tmp_path):  # noqa: F811
    """Every training of generation 0 times out: the run stops with exit 2 before that
    generation is checkpointed, and a resume with a sane limit gives the uninterrupted run,
    its counts included (the timed-out answers are not counted twice)."""
    run_dir = tmp_path / "run"
    args = smoke("alr", run_dir, tmp_path / "store.sqlite", "--time-limit", TINY)
    line = error_line(engine_run(args, env, cwd=tmp_path, check=False))
    assert "every training of generation 0" in line and "not the candidate's own" in line
    assert "timeout" in line and "--time-limit" in line
    assert line.endswith(f"--resume --out {run_dir}")
    assert not list((run_dir / "checkpoints").glob("gen-*.json"))
    assert not (run_dir / "summary.json").exists()
    assert [e["event"] for e in events(run_dir)][-1] == "failed"

    engine_run(["--resume", "--out", run_dir, "--time-limit", "120"], env, cwd=tmp_path)
    assert history_rows(run_dir) == history_rows(reference)
    assert counts(run_dir) == counts(reference)


@pytest.mark.slow
def test_a_baseline_that_fails_leaves_no_finished_report(reference, env, tmp_path):  # noqa: F811
    """Every generation is done and the baseline is trained afresh (a new store), under a time
    limit it cannot meet: exit 2 naming the baseline, and no summary or report."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for name in ("summary.json", "report.md"):
        (run_dir / name).unlink()
    result = engine_run(["--resume", "--out", run_dir, "--store", tmp_path / "fresh.sqlite",
                         "--time-limit", TINY], env, cwd=tmp_path, check=False)
    line = error_line(result)
    assert "the baseline Adam (lr=1e-3) failed (timeout" in line
    assert not (run_dir / "summary.json").exists() and not (run_dir / "report.md").exists()


# -- item 12: one process per run directory ----------------------------------------------------

def test_a_second_lock_on_a_run_directory_is_refused_with_the_holder(tmp_path):
    with RunLock(tmp_path / "run", "python -m engine.run --out run"):
        with pytest.raises(RunLocked, match=rf"pid {os.getpid()}: python -m "
                                            r"engine.run --out run"):
            RunLock(tmp_path / "run").acquire()
    with RunLock(tmp_path / "run"):  # released: free again
        pass


def start_until(event: str, run_dir: Path, env, tmp_path) -> subprocess.Popen:  # noqa: F811
    """A smoke run started in the background, once it has logged an `event` line."""
    args = smoke("alr", run_dir, tmp_path / "store.sqlite")
    process = subprocess.Popen([sys.executable, "-m", "engine.run", *map(str, args)], env=env,
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    if not wait_for(lambda: any(e.get("event") == event for e in events(run_dir)), process):
        process.kill()
        raise AssertionError(f"the run logged no {event}: {process.communicate()}")
    return process


@pytest.mark.slow
def test_a_second_run_of_the_same_directory_is_refused(env, tmp_path):  # noqa: F811
    """Two `--resume` of one directory used to both evolve it (generations 0,1,1,2,2). The
    first is frozen (SIGSTOP) while it holds the run, so the second surely meets it."""
    run_dir = tmp_path / "run"
    first = start_until("session", run_dir, env, tmp_path)  # it holds the run from then on
    try:
        first.send_signal(signal.SIGSTOP)
        before = snapshot(run_dir)
        second = engine_run(["--resume", "--out", run_dir], env, cwd=tmp_path, check=False)
        line = error_line(second)
        assert f"{run_dir} is in use by another engine.run (pid {first.pid}:" in line
        assert snapshot(run_dir) == before  # the second read and wrote nothing of the run
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert [e["generation"] for e in events(run_dir) if e["event"] == "generation"] == [0, 1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["sessions"] == 1


@pytest.mark.slow
def test_a_lock_left_by_a_killed_run_does_not_block_its_resume(env, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    process = start_until("evaluation", run_dir, env, tmp_path)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert (run_dir / LOCK_NAME).read_text().startswith(f"pid {process.pid}\n")  # left behind
    engine_run(["--resume", "--out", run_dir], env, cwd=tmp_path)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


# -- items 13 and 14: a resumed run counts each candidate once; a copied run writes to the copy -

@pytest.mark.slow
def test_a_resumed_run_counts_each_candidate_once(reference_off, env, tmp_path):  # noqa: F811
    """Stopped by its time budget after the first answer of generation 0, then resumed: the
    replayed answers (from the store) used to be counted again (requested 22 against 16)."""
    run_dir = tmp_path / "run"
    # The old path: the funnel answers a generation's trained candidates at its end, so a stop
    # this early leaves nothing to replay (its resume is tests/test_run.py's mid-funnel test).
    engine_run(smoke("alr", run_dir, tmp_path / "store.sqlite", "--time-budget", "0.3",
                     "--tiers", "off"), env, cwd=tmp_path)
    assert any(e["event"] == "stopped" for e in events(run_dir))
    engine_run(["--resume", "--out", run_dir, "--time-budget", "1h"], env, cwd=tmp_path)
    assert history_rows(run_dir) == history_rows(reference_off)
    assert counts(run_dir) == counts(reference_off)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sessions"] == 2 and summary["evaluations"]["answered_again"] >= 1
    report = (run_dir / "report.md").read_text()
    assert f"answered {summary['evaluations']['answered_again']} of them again" in report


@pytest.mark.slow
def test_a_copied_run_resumes_into_the_copy(reference, env, tmp_path):  # noqa: F811
    """It used to say it was writing to the original (the config.json it copied said so)."""
    before = snapshot(reference)
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    result = engine_run(["--resume", "--out", copy, "--generations", "4"], env, cwd=tmp_path)
    assert f"writing to {copy}\n" in result.stdout and str(reference) not in result.stdout
    assert json.loads((copy / "config.json").read_text())["out"] == str(copy)
    assert json.loads((copy / "summary.json").read_text())["generations_done"] == 4
    assert snapshot(reference) == before


def test_counts_take_the_answer_an_uninterrupted_run_would_have_given():
    """A replayed answer (from the store) is not counted again; a failure that was not the
    candidate's own was trained again, and the new answer is the one that counts."""
    from engine.app.report import evaluation_counts

    def answer(generation, text, source, reason=None, seconds=1.0):
        return {"event": "evaluation", "generation": generation, "text": text, "source": source,
                "reason": reason, "seconds": seconds}

    log = [{"event": "session"},
           answer(0, "a", "trained"), answer(0, "b", "trained", "timeout: deadline passed"),
           answer(0, "c", "screened", "screened: the weight never changes", 0.0),
           {"event": "session"},
           answer(0, "a", "store"), answer(0, "b", "trained"),
           answer(0, "c", "store", "screened: the weight never changes", 0.0),
           answer(1, "a", "store")]
    assert evaluation_counts(log) == {
        "requested": 4,
        "outcomes": {"trained": 2, "store": 1, "micro": 0, "twin": 0, "screened": 1, "diverged": 0,
                     "timeout": 0, "error": 0, "unparseable": 0},
        "reasons": {"screened: the weight never changes": 1}, "answered_again": 3,
        "trainings": 3, "train_seconds": 3.0}

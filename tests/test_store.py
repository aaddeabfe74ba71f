"""The results store: round trips, the cache key, idempotence, concurrency and damaged files.

Everything runs on SQLite files in a temporary directory; the concurrency test starts four
processes that open one new file at the same moment and put overlapping keys.
"""

from __future__ import annotations

import math
import multiprocessing
import pickle
import random
import sqlite3
import subprocess
from pathlib import Path

import pytest

from engine.fitness.store import SCHEMA_VERSION, SOURCES, Record, Store, StoreError, not_reusable, \
    versions

PROGRAM = "alpha: mul(0.1, sub(alpha, grad))\nweight: mul(lr, alpha)"


def record(n: int = 0, **changes) -> Record:
    fields = dict(hash=f"h{n:04d}", task="fmnist-cnn", protocol="smoke", seed=7,
                  fitness=0.5 + n / 1000, source="trained", program=PROGRAM)
    fields.update(changes)
    return Record(**fields)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "results.sqlite") as store:
        yield store


def test_round_trip_keeps_every_field(store):
    full = record(
        fingerprint="fp-1", accuracies=(0.8125, 0.83, 1 / 3), reason=None, seconds=12.5,
        compile_seconds=0.25, versions={"torch": "2.13.0", "autolr": "0.1.0"}, run="run-1",
        created="2026-01-02T03:04:05.678+00:00",
    )
    assert store.put(full) is True
    assert store.lookup(full.hash, full.task, full.protocol, full.seed) == full


def test_defaults_record_provenance(store):
    fresh = record()
    assert fresh.versions == versions() and "python" in fresh.versions
    assert "torch" in fresh.versions  # installed here; what a fitness depends on
    assert fresh.created.endswith("+00:00")
    store.put(fresh)
    assert store.lookup(fresh.hash, fresh.task, fresh.protocol, fresh.seed) == fresh


def test_failure_with_reason_round_trips(store):
    reason = "diverged: training loss nan at epoch 0, step 3"
    failed = record(fitness=0.0, reason=reason, source="trained", accuracies=())
    store.put(failed)
    assert store.lookup(failed.hash, "fmnist-cnn", "smoke", 7).reason == reason


@pytest.mark.parametrize("reason", [
    "raised: RuntimeError: Cannot set NUMBA_NUM_THREADS to a different value once the threads "
    "have been launched", "timeout after 30.0 s", "worker died (exit code -11, SIGSEGV)"])
def test_failures_that_are_not_the_candidates_are_never_answered_and_get_replaced(store, reason):
    """A store written while something was broken (the Numba thread bug floored every candidate
    of a run with "raised") must not floor those candidates in every later run."""
    assert not_reusable(reason) and not not_reusable("diverged: loss nan") and \
        not not_reusable(None)
    store.put(record(1, fitness=0.0, reason=reason, fingerprint="fp"))
    assert store.counts()["total"] == 1  # kept: it is what happened, and runs report it
    assert store.lookup("h0001", "fmnist-cnn", "smoke", 7) is None
    assert store.lookup_fingerprint("fp", "fmnist-cnn", "smoke", 7) is None
    assert store.put(record(1, fitness=0.8, fingerprint="fp")) is True  # trained again: replaces
    assert store.lookup("h0001", "fmnist-cnn", "smoke", 7).fitness == 0.8
    assert store.lookup_fingerprint("fp", "fmnist-cnn", "smoke", 7).fitness == 0.8
    assert store.counts()["total"] == 1
    assert store.put(record(1, fitness=0.0, reason=reason)) is False  # a real answer stays


def test_put_is_idempotent_and_keeps_the_first_answer(store):
    assert store.put(record(1, fitness=0.9)) is True
    assert store.put(record(1, fitness=0.1, run="other")) is False
    assert store.lookup("h0001", "fmnist-cnn", "smoke", 7).fitness == 0.9
    assert store.counts()["total"] == 1


def test_lookup_is_keyed_by_hash_task_protocol_and_seed(store):
    store.put(record(1))
    assert store.lookup("h0001", "fmnist-cnn", "smoke", 7) is not None
    assert store.lookup("h0002", "fmnist-cnn", "smoke", 7) is None
    assert store.lookup("h0001", "other-task", "smoke", 7) is None
    assert store.lookup("h0001", "fmnist-cnn", "quick", 7) is None
    assert store.lookup("h0001", "fmnist-cnn", "smoke", 8) is None
    store.put(record(1, seed=8, fitness=0.25))  # same program, other seed: its own row
    assert store.lookup("h0001", "fmnist-cnn", "smoke", 8).fitness == 0.25


def test_lookup_by_fingerprint_finds_the_first_equivalent(store):
    store.put(record(1, fingerprint=None))
    store.put(record(2, fingerprint="fp"))
    store.put(record(3, fingerprint="fp", source="fingerprint"))
    found = store.lookup_fingerprint("fp", "fmnist-cnn", "smoke", 7)
    assert found is not None and found.hash == "h0002"
    assert store.lookup_fingerprint("fp", "fmnist-cnn", "smoke", 8) is None
    assert store.lookup_fingerprint("nope", "fmnist-cnn", "smoke", 7) is None


def test_records_and_counts_by_run(store):
    store.put(record(1, run="a"))
    store.put(record(2, run="b", source="screened", fitness=0.0, reason="no grad in weight"))
    store.put(record(3, run="a", source="fingerprint"))
    store.put(record(4, run="b", reason="worker died (exit code -11 / signal SIGSEGV)"))
    assert [r.hash for r in store.records()] == ["h0001", "h0002", "h0003", "h0004"]
    assert [r.hash for r in store.records(run="a")] == ["h0001", "h0003"]
    assert store.records(run="c") == []
    assert store.counts() == {"trained": 2, "screened": 1, "fingerprint": 1, "store": 0,
                              "failed": 2, "total": 4}
    assert store.counts(run="a") == {"trained": 1, "screened": 0, "fingerprint": 1, "store": 0,
                                     "failed": 0, "total": 2}


def test_store_is_reused_across_runs(tmp_path):
    path = tmp_path / "sub" / "dir" / "results.sqlite"  # parents are created
    with Store(path) as first:
        first.put(record(1, run="first"))
    with Store(path) as second:
        assert second.lookup("h0001", "fmnist-cnn", "smoke", 7).run == "first"
        assert second.put(record(1, run="second")) is False


def test_store_pickles_as_its_path(store):
    store.put(record(1))
    clone = pickle.loads(pickle.dumps(store))
    try:
        assert clone.path == store.path and clone.lookup("h0001", "fmnist-cnn", "smoke", 7)
    finally:
        clone.close()


def test_bad_records_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        record(fitness=math.nan)
    with pytest.raises(ValueError, match="source must be one of"):
        record(source="guessed")
    assert set(SOURCES) == {"trained", "screened", "fingerprint", "store"}


def _writer(path: str, barrier, worker: int, keys: int, queue) -> None:
    """One of several processes that open a new store at once and put overlapping keys."""
    order = list(range(keys))
    random.Random(worker).shuffle(order)
    barrier.wait()
    inserted = 0
    with Store(path) as store:
        for n in order:
            inserted += store.put(record(n, run=f"worker-{worker}", accuracies=(n / keys,)))
            assert store.lookup(f"h{n:04d}", "fmnist-cnn", "smoke", 7) is not None
    queue.put(inserted)


def test_concurrent_writers_from_several_processes(tmp_path):
    path, processes, keys = tmp_path / "shared.sqlite", 4, 40
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_writer, args=(str(path), barrier, i, keys, queue))
               for i in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0] * processes
    inserted = [queue.get(timeout=5) for _ in workers]
    assert sum(inserted) == keys  # every key went in exactly once, whoever won it
    with Store(path) as store:
        rows = store.records()
        assert sorted(r.hash for r in rows) == [f"h{n:04d}" for n in range(keys)]
        assert all(r.accuracies == (int(r.hash[1:]) / keys,) for r in rows)  # no torn rows


def not_ours_is_left_alone(path: Path, match: str) -> str:
    """Opening `path` fails with `match` and no advice to move it, and changes nothing in it."""
    before = {p: p.read_bytes() for p in path.parent.rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match=match) as caught:
        Store(path)
    message = str(caught.value)
    assert str(path) in message and "--store" in message and "mv " not in message, message
    assert {p: p.read_bytes() for p in path.parent.rglob("*") if p.is_file()} == before
    return message


def test_garbage_file_is_left_alone_with_a_clear_error(tmp_path):
    path = tmp_path / "results.sqlite"
    path.write_bytes(b"this is not a database, it is a shopping list\n" * 100)
    not_ours_is_left_alone(path, "not an AutoLR results store")


def test_a_directory_is_not_a_store_and_is_not_to_be_moved(tmp_path):
    """`--store DIR` once advised `mv DIR DIR.bad`: moving the user's whole directory."""
    directory = tmp_path / "my results"
    directory.mkdir()
    (directory / "notes.txt").write_text("mine")
    message = not_ours_is_left_alone(directory, "is a directory")
    assert "'" + str(directory / "results.sqlite") + "'" in message  # a file path to pass instead


def test_a_store_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="cannot make its directory.*pass a file path"):
        Store(tmp_path / "notes.txt" / "results.sqlite")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_another_programs_database_is_left_untouched(tmp_path):
    path = tmp_path / "contacts.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE contacts (name TEXT)")
        db.execute("INSERT INTO contacts VALUES ('Ada')")
    db.close()
    not_ours_is_left_alone(path, "SQLite database but not an AutoLR results store.*contacts")
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not switched to WAL
    db.close()


def test_a_store_with_one_page_overwritten_is_refused_on_opening_with_a_way_out(tmp_path):
    """A damaged page once surfaced at some later lookup as "database disk image is
    malformed"; the advice must name only the store's own files, quoted for the shell."""
    path = tmp_path / "it's mine" / "results.sqlite"
    with Store(path) as store:
        for n in range(300):
            store.put(record(n, program=PROGRAM * 20))
    data = bytearray(path.read_bytes())
    data[4096:8192] = random.Random(1).randbytes(4096)  # page 2: the table's root
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="the AutoLR results store is damaged") as caught:
        Store(path)
    message = str(caught.value)
    command = message.split("Move it aside (", 1)[1].split(") and run again", 1)[0]
    assert command.startswith("mv ") and "--store FILE" in message
    subprocess.run(["bash", "-c", command], check=True)  # the advice works as written
    assert (path.parent / "results.sqlite.damaged").read_bytes() == bytes(data)
    with Store(path) as store:  # a new store in its place
        assert store.records() == []


def test_damage_found_after_opening_gets_the_same_advice(tmp_path):
    path = tmp_path / "results.sqlite"
    with Store(path) as store:
        for n in range(300):
            store.put(record(n, program=PROGRAM * 20))
    with Store(path) as store:
        data = bytearray(path.read_bytes())
        assert len(data) > 16384
        data[8192:] = random.Random(0).randbytes(len(data) - 8192)  # ruin all but the header
        path.write_bytes(bytes(data))
        # Another process's write (of the intact first page) makes this one read the file
        # again instead of answering from the pages it read on opening.
        other = sqlite3.connect(path, isolation_level=None)
        other.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        other.close()
        with pytest.raises(StoreError, match="damaged.*Move it aside") as caught:
            store.records()
        assert f"mv {path} {path}.damaged" in str(caught.value)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "results.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer AutoLR"):
        Store(path)


def test_a_store_locked_too_long_says_so(tmp_path):
    path = tmp_path / "results.sqlite"
    Store(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process in the middle of a long write
    try:
        with Store(path, timeout=0.2) as store:
            with pytest.raises(StoreError, match="locked by another process"):
                store.put(record(1))
            assert store.lookup("h0001", "fmnist-cnn", "smoke", 7) is None  # readers still read
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_schema_file_is_wal(tmp_path):
    path = tmp_path / "results.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert Path(path).stat().st_size > 0


# -- the task's definition is part of the key ---------------------------------------------------

def _fitness_by_definition(job):
    """A training stand-in whose answer depends on the task's definition the job carries (its
    epochs), so a stale answer shows as a wrong number. What is under test is the key, not
    training."""
    from engine.tasks.protocol import EvalResult

    return EvalResult(fitness=job.task.alr.max_epochs / 10, trials=(), seconds=0.0)


@pytest.mark.parametrize("lookup", ["hash", "fingerprint"])
def test_a_redefined_task_is_not_answered_from_its_old_definition(tmp_path, monkeypatch, lookup):
    """A preset given one more epoch is another task: neither the program's own row nor a
    behavioural twin's row measured under the old definition may answer for it."""
    import dataclasses
    import types

    from engine.tasks import protocol as tasks
    from engine.fitness.evaluator import Evaluator
    from engine.modes import ALR
    from engine.exec import make_executor

    trained = "weight: mul(0.05, grad)"
    asked = trained if lookup == "hash" else "weight: mul(0.025, add(grad, grad))"  # a twin

    def evaluate(text):
        with Store(tmp_path / "store.sqlite") as store, make_executor("serial") as executor:
            evaluator = Evaluator(ALR, "smoke", 0, store, executor,
                                  worker=_fitness_by_definition)
            (answer,) = evaluator.evaluate([text])
            return answer

    old = tasks.get_task("smoke")
    assert evaluate(trained).fitness == old.alr.max_epochs / 10
    # The same definition answers from the store: the test can tell an answer from a training.
    assert evaluate(asked).source == {"hash": "store", "fingerprint": "fingerprint"}[lookup]
    longer = dataclasses.replace(old, alr=dataclasses.replace(old.alr,
                                                               max_epochs=old.alr.max_epochs + 1))
    monkeypatch.setattr(tasks, "PRESETS", types.MappingProxyType({**tasks.PRESETS,
                                                                  "smoke": longer}))
    answer = evaluate(asked)
    assert (answer.source, answer.fitness) == ("trained", longer.alr.max_epochs / 10)

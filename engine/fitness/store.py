"""The results store: one SQLite row per evaluation, the fitness cache across runs.

Training a candidate costs seconds to minutes, so an answer once computed is never computed again:
not in this run, not in the next one, not by another process of the same run. The store is keyed
by what the answer depends on, (program hash, task, protocol, seed) -- the evaluator's protocol
names the mode, the task and a digest of the task's definition -- and keeps with each answer
how it was obtained and with what software, so a result can be traced and a stale one recognised.

Why SQLite, and how it is used:
- One file, no server, in the standard library; transactions make each `put` all or nothing, so a
  crash mid-write never leaves half a row.
- WAL journal mode lets readers run while one process writes; a busy timeout makes concurrent
  writers (pool workers, a second run) wait their turn instead of failing. WAL needs the file on a
  local filesystem (not NFS).
- The key is UNIQUE and `put` is INSERT OR IGNORE: putting the same key twice is harmless and the
  first answer stays, which is what a cache of deterministic results wants. (A caller that knows
  an answer was transient, such as a timeout on an overloaded machine, should not put it.)
- Some failures say more about the machine or AutoLR's own code than about the candidate
  (`not_reusable`: timeouts, dead workers, exceptions). Lookups never answer with such a row, and
  `put` replaces one, so a store written while something was broken heals on the next training
  instead of flooring those candidates forever.
- `PRAGMA user_version` records the schema version, so a file from a newer AutoLR is refused with
  a clear message instead of being misread.

Opening checks what the file is, and every failure is a `StoreError` naming the file and the fix:
a directory, garbage bytes or another program's SQLite database is left untouched (pass another
file path); an AutoLR store with a damaged page (found by a quick check of every page on opening,
or by a later read) is to be moved aside, its -wal file with it, and a new store is made in its
place. A `Store` holds one connection and belongs to one thread; another process opens its own (a
`Store` pickles as its path).
"""

from __future__ import annotations

import functools
import json
import math
import shlex
import sqlite3
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from os import PathLike
from pathlib import Path
from typing import Literal, get_args

__all__ = [
    "SCHEMA_VERSION",
    "SOURCES",
    "Record",
    "Source",
    "Store",
    "StoreError",
    "not_reusable",
    "versions",
]

SCHEMA_VERSION = 1

Source = Literal["trained", "screened", "fingerprint", "store"]
SOURCES: tuple[str, ...] = get_args(Source)
"""How an answer was obtained: trained on the task; floor fitness from screening (no training);
copied from a behaviourally identical program (same fingerprint); reused from the store."""

_DISTRIBUTIONS = ("autolr", "torch", "numba", "numpy", "triton")  # what a fitness can depend on

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS evaluations (
    id              INTEGER PRIMARY KEY,
    hash            TEXT    NOT NULL,
    fingerprint     TEXT,
    task            TEXT    NOT NULL,
    protocol        TEXT    NOT NULL,
    seed            INTEGER NOT NULL,
    fitness         REAL    NOT NULL,
    accuracies      TEXT    NOT NULL,   -- JSON list, one accuracy per trial
    reason          TEXT,               -- why a failure got the floor fitness; NULL on success
    source          TEXT    NOT NULL
                    CHECK (source IN ('trained', 'screened', 'fingerprint', 'store')),
    seconds         REAL    NOT NULL,
    compile_seconds REAL    NOT NULL,
    program         TEXT    NOT NULL,
    versions        TEXT    NOT NULL,   -- JSON object, distribution -> version
    created         TEXT    NOT NULL,   -- ISO 8601, UTC
    run             TEXT,               -- the run that produced the row (provenance)
    UNIQUE (hash, task, protocol, seed)
)""",
    """CREATE INDEX IF NOT EXISTS evaluations_fingerprint
    ON evaluations (fingerprint, task, protocol, seed) WHERE fingerprint IS NOT NULL""",
    "CREATE INDEX IF NOT EXISTS evaluations_run ON evaluations (run)",
)

_COLUMNS = (
    "hash", "fingerprint", "task", "protocol", "seed", "fitness", "accuracies", "reason", "source",
    "seconds", "compile_seconds", "program", "versions", "created", "run",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM evaluations"
# Failure reasons that are not the candidate's doing (see the module docstring). "raised" is an
# exception in the worker: candidates cannot raise (a NaN is "diverged"), so it is a bug or the
# environment, e.g. Numba refusing to compile after a thread-count change.
NOT_REUSABLE = ("timeout", "worker died", "raised")
_REUSABLE = "(reason IS NULL OR NOT (" + " OR ".join(
    f"reason LIKE '{prefix}%'" for prefix in NOT_REUSABLE) + "))"
_DROP_UNUSABLE = (f"DELETE FROM evaluations WHERE hash = ? AND task = ? AND protocol = ? "
                  f"AND seed = ? AND NOT {_REUSABLE}")
_INSERT = (
    f"INSERT OR IGNORE INTO evaluations ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_COLUMNS))})"
)


class StoreError(RuntimeError):
    """The store file cannot be used; the message names the file and what to do about it."""


@functools.cache
def _versions() -> tuple[tuple[str, str], ...]:
    found = [("python", ".".join(map(str, sys.version_info[:3])))]
    for name in _DISTRIBUTIONS:
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            pass
    return tuple(found)


def versions() -> dict[str, str]:
    """The versions of everything a fitness value can depend on, for a record's provenance."""
    return dict(_versions())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Record:
    """One evaluation: the answer for (hash, task, protocol, seed) and where it came from.

    `reason` is None for a success and says why otherwise (the fitness is then the floor).
    `versions`, `created` and `run` are provenance; by default `versions` is this process's
    (see `versions()`) and `created` the current UTC time.
    """

    hash: str
    task: str
    protocol: str
    seed: int
    fitness: float
    source: Source
    program: str
    fingerprint: str | None = None
    accuracies: tuple[float, ...] = ()
    reason: str | None = None
    seconds: float = 0.0
    compile_seconds: float = 0.0
    versions: Mapping[str, str] = field(default_factory=versions, hash=False)
    run: str | None = None
    created: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, not {self.source!r}")
        if math.isnan(self.fitness):
            # SQLite would store NaN as NULL; a NaN fitness is the evaluator's job to floor.
            raise ValueError(f"fitness is NaN for {self.hash}: store the floor and a reason")
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "fitness", float(self.fitness))
        object.__setattr__(self, "accuracies", tuple(float(a) for a in self.accuracies))
        object.__setattr__(self, "versions", dict(self.versions))

    def _row(self) -> tuple:
        return (
            self.hash, self.fingerprint, self.task, self.protocol, self.seed, self.fitness,
            json.dumps(self.accuracies), self.reason, self.source, float(self.seconds),
            float(self.compile_seconds), self.program, json.dumps(self.versions, sort_keys=True),
            self.created, self.run,
        )

    @classmethod
    def _from_row(cls, row: tuple) -> Record:
        values = dict(zip(_COLUMNS, row, strict=True))
        values["accuracies"] = tuple(json.loads(values["accuracies"]))
        values["versions"] = json.loads(values["versions"])
        return cls(**values)


class Store:
    """The evaluation results in one SQLite file, created with its schema on first use.

    Use as a context manager or call `close()`. `timeout` is how long a write waits for another
    process's write before giving up with `StoreError`.
    """

    def __init__(self, path: str | PathLike[str], *, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self._timeout = timeout
        self._ours = False  # known to be an AutoLR store: only then is moving it aside advised
        if self.path.is_dir():
            inside = shlex.quote(str(self.path / "results.sqlite"))
            raise StoreError(f"{self.path} is a directory; the results store is one file: pass a "
                             f"file path (e.g. --store {inside})")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"{self.path}: cannot make its directory ({error}); pass a file path "
                             "in a directory that exists or can be made") from None
        with self._errors():
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        try:
            with self._errors():
                self._set_up()
        except BaseException:
            self._db.close()
            raise

    def _set_up(self) -> None:
        db = self._db
        # Before anything is written: switching to WAL would change someone else's database.
        version, tables = self._schema_version(), self._tables()
        self._ours = "evaluations" in tables
        if not self._ours and (version != 0 or tables):
            raise StoreError(
                f"{self.path} is an SQLite database but not an AutoLR results store (tables: "
                f"{', '.join(sorted(tables)) or 'none'}); it was left as it is: pass the path of "
                "an AutoLR store or of a new file (--store FILE)")
        # Switching to WAL takes an exclusive lock; when processes open a new file at once, the
        # loser may get SQLITE_BUSY without the busy handler being consulted, so retry here.
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash may lose, never corrupt
        if self._ours:
            # A damaged page otherwise surfaces at some lookup hours into a run. The check reads
            # the whole file once (~0.2 s for 70 MB) and does not block other processes' writes.
            found = db.execute("PRAGMA quick_check(1)").fetchone()[0]
            if found != "ok":
                raise self._unusable(sqlite3.DatabaseError(found.splitlines()[-1]))
        if self._schema_version() == SCHEMA_VERSION:
            return  # the usual case: open without taking the write lock
        with self._transaction():
            if self._schema_version() == 0:  # still new now that we hold the lock
                # Statement by statement: executescript would COMMIT the open transaction first.
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._ours = True

    def _tables(self) -> set[str]:
        rows = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {name for (name,) in rows}

    def _schema_version(self) -> int:
        found = self._db.execute("PRAGMA user_version").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: written by a newer AutoLR (store schema {found}; this version "
                f"reads schema {SCHEMA_VERSION}). Upgrade AutoLR, or use another store file."
            )
        return found

    # -- reading ----------------------------------------------------------------------------

    def lookup(self, hash: str, task: str, protocol: str, seed: int) -> Record | None:
        """The stored answer for this program on this task, protocol and seed, if any."""
        return self._one(
            f"{_SELECT} WHERE hash = ? AND task = ? AND protocol = ? AND seed = ? AND {_REUSABLE}",
            (hash, task, protocol, int(seed)),
        )

    def lookup_fingerprint(self, fingerprint: str, task: str, protocol: str,
                           seed: int) -> Record | None:
        """The first answer stored for any program that behaved identically (same fingerprint)."""
        return self._one(
            f"{_SELECT} WHERE fingerprint = ? AND task = ? AND protocol = ? AND seed = ? "
            f"AND {_REUSABLE} ORDER BY id LIMIT 1",
            (fingerprint, task, protocol, int(seed)),
        )

    def records(self, run: str | None = None) -> list[Record]:
        """Every record in the order they were stored, or only those of one run."""
        query, args = (f"{_SELECT} ORDER BY id", ()) if run is None else (
            f"{_SELECT} WHERE run = ? ORDER BY id", (run,))
        with self._errors():
            return [Record._from_row(row) for row in self._db.execute(query, args)]

    def counts(self, run: str | None = None) -> dict[str, int]:
        """Rows per source, plus 'failed' (rows with a reason, any source) and 'total'."""
        where, args = ("", ()) if run is None else (" WHERE run = ?", (run,))
        with self._errors():
            rows = self._db.execute(
                f"SELECT source, COUNT(*), COUNT(reason) FROM evaluations{where} GROUP BY source",
                args,
            ).fetchall()
        counts = dict.fromkeys(SOURCES, 0)
        counts.update((source, n) for source, n, _ in rows)
        counts["failed"] = sum(failed for _, _, failed in rows)
        counts["total"] = sum(n for _, n, _ in rows)
        return counts

    # -- writing ----------------------------------------------------------------------------

    def put(self, record: Record) -> bool:
        """Store a record in one transaction; False (and nothing changed) if its key was there
        with a reusable answer. A row that is not reusable (`not_reusable`) is replaced."""
        with self._errors(), self._transaction():
            self._db.execute(_DROP_UNUSABLE, (record.hash, record.task, record.protocol,
                                              int(record.seed)))
            cursor = self._db.execute(_INSERT, record._row())
        return cursor.rowcount == 1

    # -- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> tuple:
        # A connection cannot cross a process boundary; the file can. The other side reopens it.
        return (type(self), (self.path,), None)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    def _one(self, query: str, args: tuple) -> Record | None:
        with self._errors():
            row = self._db.execute(query, args).fetchone()
        return None if row is None else Record._from_row(row)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front, so the busy timeout applies to it (a deferred
        # transaction that upgrades from read to write can fail at once with SQLITE_BUSY).
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # never leave one open: the next put could not begin
                self._db.execute("ROLLBACK")
            raise

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn sqlite's errors into StoreErrors that name the file and the way out."""
        try:
            yield
        except StoreError:
            raise
        except sqlite3.OperationalError as error:
            if "locked" in str(error) or "busy" in str(error):
                raise StoreError(
                    f"{self.path}: still locked by another process after {self._timeout:g} s "
                    f"({error}). Is another run writing to it? Wait, or use another store file."
                ) from None
            raise self._unusable(error) from None  # its text is in ours; its traceback is noise
        except sqlite3.DatabaseError as error:
            raise self._unusable(error) from None  # its text is in ours; its traceback is noise

    def _unusable(self, error: sqlite3.Error) -> StoreError:
        detail = " ".join(str(error).split())
        if getattr(self, "_db", None) is not None:
            # Done with it: closing lets SQLite fold in and delete the -wal and -shm files, so
            # the advice below names only the files that stay.
            self._db.close()
        if not self._ours:  # garbage, or not ours at all: never advise moving a user's file
            return StoreError(
                f"{self.path} is not an AutoLR results store ({detail}); it was left as it is: "
                "pass the path of an AutoLR store or of a new file (--store FILE)")
        # Its -wal file goes with it: SQLite would replay it into the new store made in its place.
        aside = [f"mv {shlex.quote(str(self.path))} {shlex.quote(str(self.path) + '.damaged')}"]
        aside += [f"mv {shlex.quote(str(self.path) + tail)} "
                  f"{shlex.quote(str(self.path) + '.damaged' + tail)}"
                  for tail in ("-wal", "-shm") if Path(f"{self.path}{tail}").exists()]
        return StoreError(
            f"{self.path}: the AutoLR results store is damaged ({detail}). Move it aside "
            f"({'; '.join(aside)}) and run again: a new, empty store is made in its place and "
            "results are recomputed as needed; or keep it and pass another file (--store FILE)."
        )


def not_reusable(reason: str | None) -> bool:
    """Whether a failure says more about the machine or AutoLR than about the candidate: such
    answers are not put in the store, and rows of them from earlier versions are not read."""
    return reason is not None and reason.startswith(NOT_REUSABLE)

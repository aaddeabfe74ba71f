"""The files of a run directory, written and read in one place.

A run may be killed at any moment, copied while it runs, or read by `engine.show` while it
writes; so every file a reader needs whole is written to a temporary file next to it and moved
into place (`write_atomic`), checkpoints carry a checksum of their body (`load_checkpoint` refuses
anything else, and `newest_checkpoint` falls back to the previous one), and the event log is
append-only JSON lines whose reader (`read_events`) tolerates the line a kill cut short.

Layout (see `engine.run`): ``checkpoints/gen-NNNNNN.json`` (the evolve loop's state after each
generation, the `KEEP` newest kept), ``events.jsonl`` (one line per answered candidate,
generation and session), and the outputs of `engine.app.report`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CHECKPOINTS", "EVENTS", "KEEP", "CheckpointError", "CheckpointScan", "EventLog",
           "append_event", "checkpoint_files", "end_line", "is_event", "load_checkpoint",
           "newest_checkpoint", "read_events", "write_atomic", "write_checkpoint", "write_json"]

CHECKPOINTS = "checkpoints"  # the directory of a run's checkpoints
EVENTS = "events.jsonl"

_FORMAT = "autolr-evolve-checkpoint"
_VERSION = 1
KEEP = 2  # checkpoints kept on disk: the newest and the one to fall back to


# -- atomic writes -----------------------------------------------------------------------------


def write_atomic(path: str | Path, text: str, *, durable: bool = False) -> Path:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never a
    part: through a temporary file in the same directory (named per process, so two writers
    never share one) and ``os.replace``. ``durable`` flushes it to the disk first (a checkpoint
    must survive a power cut, not only a kill)."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(temp, path)
    return path


def write_json(path: str | Path, data: object, *, allow_nan: bool = False) -> Path:
    """``data`` as indented JSON, atomically. NaN is refused unless ``allow_nan``: it is not
    JSON, and other readers of a run's files would choke on it."""
    return write_atomic(path, json.dumps(data, indent=2, allow_nan=allow_nan) + "\n")


# -- checkpoints -------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or does not belong to this run; the message says why."""


def _digest(body: object) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def checkpoint_files(directory: str | Path) -> list[Path]:
    """Checkpoint files, newest generation first."""
    return sorted(Path(directory).glob("gen-*.json"), reverse=True)


def write_checkpoint(directory: str | Path, generation: int, fields: dict) -> Path:
    """Write generation ``generation``'s checkpoint (``fields`` is its body, less the format),
    durably, with a checksum of its body; then drop all but the `KEEP` newest."""
    body = {"format": _FORMAT, "version": _VERSION, **fields}
    text = json.dumps({"sha256": _digest(body), "body": body}, allow_nan=False)
    final = write_atomic(Path(directory) / f"gen-{generation:06d}.json", text, durable=True)
    for old in checkpoint_files(directory)[KEEP:]:
        old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint file and return its body, refusing anything damaged.

    Raises CheckpointError for a truncated, non-JSON, wrong-format or checksum-failing file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a complete JSON checkpoint ({err}); the file is "
                              "truncated or corrupt") from None
    if not isinstance(data, dict) or "body" not in data or "sha256" not in data:
        raise CheckpointError(f"{path}: not an AutoLR checkpoint (no body/sha256 fields)")
    if data["sha256"] != _digest(data["body"]):
        raise CheckpointError(f"{path}: checksum mismatch; the file was corrupted or edited "
                              "after it was written")
    body = data["body"]
    if body.get("format") != _FORMAT or body.get("version") != _VERSION:
        raise CheckpointError(f"{path}: format {body.get('format')!r} version "
                              f"{body.get('version')!r}, expected {_FORMAT!r} version {_VERSION}")
    return body


@dataclass(frozen=True)
class CheckpointScan:
    """The newest checkpoint that loads (``path`` and ``body`` None when none does), and why
    each newer one was refused, newest first. Callers decide what a refusal is worth: a
    warning (resuming), a line of `engine.show`, or nothing."""

    path: Path | None
    body: dict | None
    refused: tuple[CheckpointError, ...]


def newest_checkpoint(directory: str | Path) -> CheckpointScan:
    """The newest checkpoint in ``directory`` that loads, as a resume continues from it."""
    refused = []
    for path in checkpoint_files(directory):
        try:
            return CheckpointScan(path, load_checkpoint(path), tuple(refused))
        except CheckpointError as err:
            refused.append(err)
    return CheckpointScan(None, None, tuple(refused))


# -- the event log -----------------------------------------------------------------------------


def append_event(path: str | Path, event: dict) -> None:
    """One event as one JSON line, appended: a kill loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(event, allow_nan=False) + "\n")


def end_line(path: str | Path) -> None:
    """End the log's last line if a kill cut it short, so the next event starts a line of its
    own (and only the cut line is lost)."""
    try:
        with open(path, "rb+") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() and (handle.seek(-1, os.SEEK_END), handle.read(1))[1] != b"\n":
                handle.write(b"\n")
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class EventLog:
    """The events of a log, and the numbers (from 1) of its ``lines`` that are not events."""

    events: list[dict]
    bad: list[int]
    lines: int

    @property
    def damaged(self) -> bool:
        """Whether a line other than the last is bad: a kill cuts the last line short, which is
        expected; anything else was garbled (a disk, a copy, an editor)."""
        return bool(self.bad) and self.bad != [self.lines]


def is_event(event: object) -> bool:
    """Whether a parsed line is an event that the counts and times can read."""
    if not (isinstance(event, dict) and "event" in event and "time" in event
            and isinstance(event["time"], (int, float))):
        return False
    return event["event"] != "evaluation" or (
        isinstance(event.get("source"), str) and isinstance(event.get("reason"), (str, type(None)))
        and isinstance(event.get("seconds", 0.0), (int, float)))


def read_events(path: str | Path) -> EventLog:
    """Every event of the log at ``path`` (none when there is no log), skipping the lines that
    are not events: a line cut short by a kill, a garbled one (`EventLog.damaged`)."""
    path = Path(path)
    if not path.is_file():
        return EventLog([], [], 0)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    events, bad = [], []
    for number, line in enumerate(lines, 1):
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if is_event(event):
            events.append(event)
        else:
            bad.append(number)
    return EventLog(events, bad, len(lines))

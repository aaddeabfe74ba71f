"""One process per run directory: an exclusive `flock` on ``RUN_DIR/.lock``.

Two `engine.run --resume` of one directory would both evolve it (each generation twice, every
training doubled, their checkpoints and events interleaved). The lock makes the second one stop
before it reads or writes anything of the run, with the first one's pid in the message.

Why `flock` on a file that stays: the kernel drops the lock when its holder dies, however it
dies (kill -9 included), so a lock file left behind by a killed run never blocks a resume and
nothing has to judge whether a recorded pid is stale. The file only says who holds the lock, for
the message. The descriptor is close-on-exec, so processes the run starts (spawned workers, Ray)
never hold the lock after it. `flock` is per host: two machines sharing the directory over NFS
are not kept apart (the results store needs a local filesystem anyway).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["LOCK_NAME", "RunLock", "RunLocked"]

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """Another process holds the run directory; the message names it."""


class RunLock:
    """``with RunLock(directory, what):`` holds the directory (created if missing) or raises
    `RunLocked`. ``what`` (e.g. the command line) is recorded for the message a second process
    gets."""

    def __init__(self, directory: str | os.PathLike[str], what: str = "") -> None:
        self.path = Path(directory) / LOCK_NAME
        self.what = " ".join(what.split())
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunLocked(f"{self.path.parent} is in use by another engine.run ({holder}); "
                            "wait for it to finish, or stop it (Ctrl-C or kill -INT) and then "
                            "resume") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n{self.what}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        if self._fd is None:  # a second flock of ours would be refused like another process's
            self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says: 'pid 123: python -m engine.run ...'."""
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
    except OSError:
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("pid "):
        return "pid unknown: it is just starting"  # locked, not yet written: a moment's window
    return ": ".join(lines[:2])

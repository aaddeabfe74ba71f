"""The content-addressed kernel cache: `<root>/<backend>/<hash>.py`, one generated module per program.

Files are written atomically (temp file + rename), so a concurrent reader sees the old file or the
new one, never half of one. The first line of every file carries the cache version and a digest of
the rest, as a label: the stamp's version is VERSION plus a digest of the code generator's own
source, so any change to the IR or an emitter invalidates every old entry without anyone
remembering to bump, and such a file is replaced silently.

What it protects against: executing a byte it did not generate. On every load the module is
generated afresh for the program (cheap: no compiler runs) and compared byte for byte with the
file; a file that differs in any way (truncated, corrupted, edited, however it was re-stamped) is
regenerated with a CacheWarning. The module is then executed from that generated text, never read
back from disk, and no `.pyc` of it is written or read.

What it does not protect against: someone who can write to the cache directory. Numba's own cache
(`cache=True`) keeps compiled machine code and a pickled index in `__pycache__/` next to these
files, and loads them whenever their stamp matches the source file's size and mtime, so such a
person can still run code through it. Keep `$AUTOLR_CACHE` writable only by the users who run
AutoLR.
"""

from __future__ import annotations

import hashlib
import linecache
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

from codegen import backends
from codegen.ir import Program
from codegen.lower import KernelPlan, lower

VERSION = 1


def _generator_digest(here: Path = Path(__file__).parent) -> str:
    # Every file of codegen/backends/ (a backend added is a generator changed), by name.
    files = [here / "ir.py", here / "lower.py", *sorted((here / "backends").glob("*.py"))]
    parts = [f.relative_to(here).as_posix().encode() + b"\0" + f.read_bytes() for f in files]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


STAMP_VERSION = f"{VERSION}-{_generator_digest()}"
_STAMP = re.compile(r"# autolr-kernel v([0-9a-f-]+) sha256=([0-9a-f]{64})\n")


class CacheWarning(UserWarning):
    """A cache file was unreadable or not what the generator makes, and has been regenerated."""


def cache_root() -> Path:
    """`$AUTOLR_CACHE`, or ~/.cache/autolr."""
    return Path(os.environ.get("AUTOLR_CACHE") or Path.home() / ".cache" / "autolr")


def source(program: Program | KernelPlan, backend: str) -> str:
    """The generated module text, stamped with the cache version and its own digest."""
    emit = backends.get(backend).emit
    plan = program if isinstance(program, KernelPlan) else lower(program)
    body = emit(plan)
    return f"# autolr-kernel v{STAMP_VERSION} sha256={_sha256(body)}\n" + body


def kernel_path(program_hash: str, backend: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / backend / f"{program_hash}.py"


def load(program: Program | KernelPlan, backend: str, root: Path | None = None) -> ModuleType:
    """Import the generated module for `program`, writing (or rewriting) its file first when it
    is missing or differs from what the generator makes for the program now."""
    plan = program if isinstance(program, KernelPlan) else lower(program)
    path = kernel_path(plan.hash, backend, root)
    text = source(plan, backend)
    if not _holds(path, text):
        _write_atomically(path, text)
    name = f"autolr_kernels.{backend}_{plan.hash}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    return _execute(name, path, text)


def _execute(name: str, path: Path, text: str) -> ModuleType:
    # The code run is `text`, the source just generated, not the file's bytes read again (which
    # could change in between) nor a `.pyc` beside it (which an import would prefer). The file's
    # path is the module's, because Numba's cache and Triton's source lookup go by it; Triton
    # reads source through linecache, primed here with the same text (mtime None: never re-read).
    module = ModuleType(name)
    module.__file__ = str(path)
    linecache.cache[str(path)] = (len(text), None, text.splitlines(keepends=True), str(path))
    code = compile(text, str(path), "exec", dont_inherit=True)
    # Registered before exec: numba's cache=True and triton's source lookup find it by name.
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)  # noqa: S102 - the text this module generated, checked above
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _holds(path: Path, text: str) -> bool:
    """Whether the file at `path` is `text`, byte for byte; warns about a file that is not."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    except OSError as exc:
        warnings.warn(f"kernel cache file {path} is unreadable ({exc}); regenerating it",
                      CacheWarning, stacklevel=3)
        return False
    if data == text.encode():
        return True
    stamp = _STAMP.match(data[:200].decode("ascii", "replace"))
    if stamp and stamp.group(1) != STAMP_VERSION:
        return False  # another version of the generator wrote it: silently replaced
    warnings.warn(f"kernel cache file {path} differs from the kernel generated for its program "
                  "(truncated, corrupted or edited); regenerating it, not importing it",
                  CacheWarning, stacklevel=3)
    return False


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""The content-addressed kernel cache: `<root>/<backend>/<hash>.py`, one generated module per program.

Files are written atomically (temp file + rename), so a concurrent reader sees the old file or the
new one, never half of one. The first line of every file carries the cache version and a digest of
the rest; a file whose digest does not match (truncated, edited, corrupted) is regenerated and never
imported. The stamp's version is VERSION plus a digest of the code generator's own source, so
any change to the IR or an emitter invalidates every old entry without anyone remembering to bump.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable

from codegen import numba_emit, torch_emit, triton_emit
from codegen.ir import Program
from codegen.lower import KernelPlan, lower

VERSION = 1


def _generator_digest() -> str:
    here = Path(__file__).parent
    parts = [(here / f).read_bytes() for f in
             ("ir.py", "lower.py", "numba_emit.py", "triton_emit.py", "torch_emit.py")]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


STAMP_VERSION = f"{VERSION}-{_generator_digest()}"
EMITTERS: dict[str, Callable[[KernelPlan], str]] = {
    "numba": numba_emit.emit,
    "triton": triton_emit.emit,
    "torch": torch_emit.emit,
}
BACKENDS = tuple(EMITTERS)
_STAMP = re.compile(r"# autolr-kernel v([0-9a-f-]+) sha256=([0-9a-f]{64})\n")


class CacheWarning(UserWarning):
    """A cache file was unreadable or corrupt and has been regenerated."""


def cache_root() -> Path:
    """`$AUTOLR_CACHE`, or ~/.cache/autolr."""
    return Path(os.environ.get("AUTOLR_CACHE") or Path.home() / ".cache" / "autolr")


def check_backend(backend: str) -> None:
    if backend not in EMITTERS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def source(program: Program | KernelPlan, backend: str) -> str:
    """The generated module text, stamped with the cache version and its own digest."""
    check_backend(backend)
    plan = program if isinstance(program, KernelPlan) else lower(program)
    body = EMITTERS[backend](plan)
    return f"# autolr-kernel v{STAMP_VERSION} sha256={_sha256(body)}\n" + body


def kernel_path(program_hash: str, backend: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / backend / f"{program_hash}.py"


def load(program: Program | KernelPlan, backend: str, root: Path | None = None) -> ModuleType:
    """Import the generated module for `program`, generating (or regenerating) its file first
    when it is missing, stale or corrupt."""
    plan = program if isinstance(program, KernelPlan) else lower(program)
    path = kernel_path(plan.hash, backend, root)
    if not _is_valid(path, plan.hash):
        _write_atomically(path, source(plan, backend))
    name = f"autolr_kernels.{backend}_{plan.hash}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before exec: numba's cache=True and triton's source lookup find it by name.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _is_valid(path: Path, program_hash: str) -> bool:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError) as exc:
        warnings.warn(f"kernel cache file {path} is unreadable ({exc}); regenerating it",
                      CacheWarning, stacklevel=3)
        return False
    stamp = _STAMP.match(text)
    if stamp and stamp.group(1) != STAMP_VERSION:
        return False  # another version of the generator wrote it: silently replaced
    body = text[stamp.end():] if stamp else ""
    if not stamp or stamp.group(2) != _sha256(body) or f"program hash: {program_hash}\n" not in body:
        warnings.warn(f"kernel cache file {path} does not match its digest (truncated or edited); "
                      "regenerating it", CacheWarning, stacklevel=3)
        return False
    return True


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

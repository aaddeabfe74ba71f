"""The backend registry: every module of this package that defines `BACKEND` is a backend.

Adding a backend is adding one file here (its templates, `emit`, the dtypes it takes, where it
runs and how its modules launch: see base.Backend); the cache, the runtime, the optimizer, the
command lines and the shared differential tests all read `BACKENDS`.
"""

from __future__ import annotations

import importlib
import pkgutil

from codegen.backends.base import Backend

__all__ = ["BACKENDS", "Backend", "auto", "cuda_present", "get", "names"]


def _discover() -> dict[str, Backend]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        backend = getattr(importlib.import_module(f"{__name__}.{info.name}"), "BACKEND", None)
        if isinstance(backend, Backend):
            found.append(backend)
    return {b.name: b for b in sorted(found, key=lambda b: (b.rank, b.name))}


BACKENDS: dict[str, Backend] = _discover()


def names() -> tuple[str, ...]:
    """The registered backends' names, in rank order."""
    return tuple(BACKENDS)


def get(name: str) -> Backend:
    """The backend called `name`, or a ValueError naming the choices."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}") from None


def cuda_present() -> bool:
    import torch  # only here: generating code needs no torch

    return torch.cuda.is_available()


def auto(device: str | None = None, dtype: str = "float32") -> str:
    """The backend `auto` means for tensors of `dtype` on `device` (a device type; None: this
    machine's best, CUDA when present): the lowest-ranked backend native to CUDA there, else to
    the CPU, that takes `dtype`."""
    on_cuda = device == "cuda" if device is not None else cuda_present()
    kind = "cuda" if on_cuda else "cpu"
    for backend in BACKENDS.values():
        if (backend.native is None or kind in backend.native) and dtype in backend.dtypes:
            return backend.name
    raise ValueError(f"no backend takes {dtype} tensors on {kind}: choose one of "
                     f"{', '.join(BACKENDS)} and a dtype it takes")

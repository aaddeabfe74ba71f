"""What a backend is: the record each file of codegen/backends/ ends with, as `BACKEND`.

Everything that differs between backends sits here (the ops' templates, the emitter, the dtypes
taken, where it runs, how a compiled module is launched), so the cache, the runtime, the arena
and the command lines all read one record and none of them tests a backend's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from codegen.lower import KernelPlan

Launch = Callable[[Sequence[Any], Sequence[float]], None]


def module_kernel(module: Any) -> Callable[..., None]:
    """The generated module's `kernel`: the entry point of a backend with a single one."""
    return module.kernel


def launch_kernel(module: Any, plan: KernelPlan) -> Launch:
    """Launch the generated `kernel` with torch tensors as they are."""
    fn = module.kernel

    def launch(buffers: Sequence[Any], values: Sequence[float]) -> None:
        fn(*buffers, *values)
    return launch


def never_multi(module: Any) -> bool:
    return False


@dataclass(frozen=True)
class Backend:
    """One code generator and how its modules run.

    `rank` orders the backends (listings, and `auto`'s preference: the lowest-ranked backend
    native to the device that takes the dtype); `native` names the device types `auto` chooses it
    for (None: any). `available(device_type)` says whether it can run on that device type here
    (None: on some device of this machine). `runs_on` and `instead` complete "the NAME backend
    runs on RUNS_ON, and these parameters are on DEVICE: INSTEAD"; `missing` is the whole message
    when it cannot run on this machine at all. `launcher(module, plan)` is the runtime's checked
    launch over torch tensors; a backend whose kernels take host arrays sets `host` (tensor ->
    array), and the arena then calls `entry(module)` on its own cached arrays, skipping the
    launcher's per-call checks. `multi(module)` says whether the module's `kernel_multi` (one
    launch over many ranges, for the arena) should be used now.
    """

    name: str
    rank: int
    templates: Mapping[str, str]
    emit: Callable[[KernelPlan], str]
    dtypes: tuple[str, ...]
    native: tuple[str, ...] | None
    available: Callable[[str | None], bool]
    runs_on: str
    instead: str
    missing: str
    launcher: Callable[[Any, KernelPlan], Launch] = launch_kernel
    entry: Callable[[Any], Callable[..., None]] = module_kernel
    host: Callable[[Any], Any] | None = None
    multi: Callable[[Any], bool] = never_multi

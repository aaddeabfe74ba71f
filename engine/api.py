"""`engine.search`: a whole AutoLR run from Python, exactly what `python -m engine.run` runs.

The run goes through the command's own path (flags, the pre-flight task check, screening, the
results store, the executors, the report and the export), so a search from a notebook and one
from the shell give the same run directory and the same answers. What differs is only how it
ends: a `SearchResult` instead of an exit status, and a `SearchError` (a ValueError, one line)
instead of exit status 2. No signal handler is installed and nothing global is left changed.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["SearchError", "SearchResult", "search"]


class SearchError(ValueError):
    """A search that could not start or go on: the one line the command would print."""


@dataclass(frozen=True)
class SearchResult:
    """A finished (or budget-stopped) search: its best program and where everything else is."""

    best: Any  # codegen.ir.Program (ALR) or Schedule (DLR)
    fitness: float
    run_dir: Path
    status: str  # "finished", or "stopped: <why>" (a time budget); resume=True continues
    baseline: float | None  # the mode's baseline (Adam, SGD) on the same task
    summary: dict  # summary.json


def _reference(task: str | Callable[[], Any] | None) -> str | None:
    """A task reference from a reference string or a module-level factory function."""
    if task is None or isinstance(task, str):
        return task
    from engine.tasks.supervised import SupervisedTask

    if isinstance(task, SupervisedTask):
        raise SearchError(f"pass the task's reference ('mytask.py:task') or its factory "
                          f"function, not the SupervisedTask {task.name!r} itself: workers "
                          "import the task by reference")
    if callable(task) and getattr(task, "__name__", "<lambda>").isidentifier():
        try:
            source = inspect.getsourcefile(task)
        except TypeError:
            source = None
        if source and Path(source).is_file() and "<" not in task.__qualname__:
            return f"{Path(source).resolve()}:{task.__name__}"
    raise SearchError(f"{task!r} is not a task reference: pass 'FILE.py:CALLABLE', "
                      "'MODULE:CALLABLE', a built-in task name, or a function defined at the "
                      "top level of a .py file")


def _flags(options: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            if key == "seed_zoo":
                argv.append(flag if value else "--no-seed-zoo")
            elif value:
                argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv


def search(task: str | Callable[[], Any] | None = None, mode: str = "alr", *,
           generations: int | None = None, population: int | None = None,
           out: str | Path | None = None, executor: str = "local", workers: int | None = None,
           seed: int = 0, resume: bool = False, **more: Any) -> SearchResult:
    """Evolve an optimizer (mode="alr") or a learning-rate schedule (mode="dlr") for `task`.

    `task` is what `--task` takes (None: the preset's Fashion-MNIST CNN). `more` takes any
    other flag of `python -m engine.run` by its name: preset="smoke", time_budget="10m",
    time_limit=60, store=..., backend=..., device="cpu", seed_zoo=False, config="run.json".
    `resume=True` continues the run in `out`. Raises SearchError with the command's one line.
    """
    from engine.app.cli import UsageError
    from engine.app.config import _fresh_dir, _task_label
    from engine.app.session import _main
    from engine.fitness.store import StoreError

    ref = _reference(task)
    if out is None:
        if resume:
            raise SearchError("resume=True needs out=RUN_DIR, the run to continue")
        label = _task_label(None if ref in (None, "fmnist-cnn") else ref)
        out = _fresh_dir(mode, label or more.get("preset") or "quick", seed)
    options = {"mode": mode, "task": ref, "generations": generations, "population": population,
               "out": out, "executor": executor, "workers": workers,
               "seed": None if resume else seed, "resume": resume, **more}
    if resume:
        options["mode"] = None  # the run's own, from its config.json
    try:
        with _process_settings_kept():
            code = _main(_flags(options))
    except (UsageError, StoreError) as err:
        raise SearchError(" ".join(str(err).split())) from None
    if code == 130:
        raise KeyboardInterrupt
    return _result(Path(out))


@contextlib.contextmanager
def _process_settings_kept():
    """Undo what training in this process sets for itself (the serial executor configures its
    caller as a worker: one thread, freed heap kept), so a notebook is left as it was."""
    import sys

    import torch

    threads = torch.get_num_threads()
    numba = sys.modules.get("numba")
    numba_threads = numba.get_num_threads() if numba is not None else None
    try:
        yield
    finally:
        if numba is not None and numba_threads is not None:
            numba.set_num_threads(numba_threads)
        torch.set_num_threads(threads)  # after numba's: its OpenMP layer resets torch's
        from engine.tasks.training import retain_heap

        retain_heap(False)


def _result(run_dir: Path) -> SearchResult:
    from engine import modes

    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise SearchError(f"{run_dir}: the search stopped before its first generation "
                          "finished; nothing to report yet (resume=True continues it)") from None
    best = summary["best"]
    baseline = summary.get("baseline") or {}
    return SearchResult(best=modes.get(summary["mode"]).parse(best["program"]),
                        fitness=float(best["fitness"]), run_dir=run_dir,
                        status=summary["status"], baseline=baseline.get("fitness"),
                        summary=summary)

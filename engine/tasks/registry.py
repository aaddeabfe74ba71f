"""The one registry of tasks, and how a task reference becomes a task.

A task is named the way a user types it: a built-in family (`fmnist-cnn`, `fmnist-mlp`,
`digits-mlp`, `charlm`, `diabetes`, and the held-out `wine-mlp`, `cancer-mlp`, `digits-cnn`), a
file (`path/to/mytask.py:task`) or a module (`my.package.tasks:task`), then `:` and a
zero-argument callable that returns a `SupervisedTask`. Each built-in family is one file under engine/tasks/families/.

`engine.compare --task` reads the same names (engine/tasks/compare_tasks.py builds its tasks
from them, defining none of its own): a preset size of fmnist-cnn (`quick`, `paper`, `smoke`),
a family, or a reference. `ALIASES` keeps older names working (`digits` is `digits-mlp`).

`fmnist-cnn` is the original Fashion-MNIST CNN protocol (several trials on chunks of the
training file, engine/tasks/protocol.py); its sizes are the presets (`SIZES`: smoke, quick,
paper) and it is what a run trains on when no --task is given.

A reference travels to worker processes as a `TaskRef`: the reference text and a digest of the
task's definition (its source file's content and its settings), never a pickled closure. Each
worker resolves it once and loads the data once (`worker_task`); a worker that finds a different
digest (the file was edited after the run checked it) fails the candidate with a reason instead
of training on a task the run never checked. The results store keys a user task by the same
digest, so an edited task never answers from stale fitnesses.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.tasks.supervised import Loaded, SupervisedTask, TaskError, load_data

__all__ = ["ALIASES", "FAMILIES", "TaskRef", "absolute", "canonical", "family_module",
           "is_builtin_cnn", "resolve", "supervised_fitness", "worker_task"]

# Built-in families: the name a user types -> the reference it stands for.
FAMILIES: Mapping[str, str] = types.MappingProxyType({
    "fmnist-cnn": "engine.tasks.families.fmnist_cnn",  # the presets' protocol, not a SupervisedTask
    "fmnist-mlp": "engine.tasks.families.fmnist_mlp:task",
    "digits-mlp": "engine.tasks.families.digits_mlp:task",
    "charlm": "engine.tasks.families.charlm:task",
    "diabetes": "engine.tasks.families.diabetes:task",
    # Held out from a discovery search on images: other data, architectures or metrics.
    "wine-mlp": "engine.tasks.families.wine_mlp:task",
    "cancer-mlp": "engine.tasks.families.cancer_mlp:task",
    "digits-cnn": "engine.tasks.families.digits_cnn:task",
})

# Older names users still type (engine.compare's `--task digits`) -> the family they mean.
ALIASES: Mapping[str, str] = types.MappingProxyType({"digits": "digits-mlp"})


def canonical(name: str) -> str:
    """The family name behind `name` (an alias resolved); anything else unchanged."""
    return ALIASES.get(name, name)


def family_module(name: str) -> types.ModuleType | None:
    """The module that defines the built-in family `name` (or its alias); None for others."""
    full = FAMILIES.get(canonical(name))
    return None if full is None else importlib.import_module(full.partition(":")[0])


# Bump when this module's training protocol changes what a fitness is for an unchanged task.
SUPERVISED_FITNESS_VERSION = 1


def is_builtin_cnn(ref: str | None) -> bool:
    """Whether `ref` means the presets' Fashion-MNIST CNN (None: no --task given)."""
    return ref is None or ref == "fmnist-cnn"


@dataclass(frozen=True)
class TaskRef:
    """A user task as a job carries it: small, picklable, and naming exactly one definition."""

    ref: str  # a built-in's reference, or the user's with a file path made absolute
    name: str  # the task's own name
    digest: str  # of the source file's content and the task's settings
    device: str = "cpu"

    @property
    def key(self) -> str:
        """The results store's task column: the task's name and its definition's digest."""
        return f"{self.name}@{self.digest}"


def _split(ref: str) -> tuple[str, str]:
    where, sep, attr = ref.rpartition(":")
    if not sep or not where or not attr:
        raise TaskError(f"task reference {ref!r} must be FILE.py:CALLABLE, MODULE:CALLABLE or "
                        f"a built-in task ({', '.join(FAMILIES)})")
    if not attr.isidentifier():
        raise TaskError(f"task reference {ref!r}: {attr!r} is not a Python name")
    return where, attr


def _module(where: str, ref: str) -> types.ModuleType:
    if where.endswith(".py") or "/" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise TaskError(f"task reference {ref!r}: no file {path}")
        return _load_file(path.resolve())
    try:
        return importlib.import_module(where)
    except ImportError as err:
        raise TaskError(f"task reference {ref!r}: cannot import module {where!r} "
                        f"({err})") from None


_FILE_MODULES: dict[tuple[Path, str], types.ModuleType] = {}


def _load_file(path: Path) -> types.ModuleType:
    """The module of `path`, executed once per content: an edited file is loaded afresh."""
    content = hashlib.sha256(path.read_bytes()).hexdigest()
    key = (path, content)
    if key not in _FILE_MODULES:
        name = f"autolr_task_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}_{content[:8]}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.path.insert(0, str(path.parent))  # its sibling modules, while it loads
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as err:
            sys.modules.pop(name, None)
            raise TaskError(f"task file {path} raised {type(err).__name__} while loading: "
                            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                            ) from err
        finally:
            sys.path.remove(str(path.parent))
        _FILE_MODULES[key] = module
    return _FILE_MODULES[key]


def absolute(ref: str) -> str:
    """The reference with a file path made absolute, so workers elsewhere find the same file."""
    where, attr = _split(ref)
    if where.endswith(".py") or "/" in where:
        return f"{Path(where).expanduser().resolve()}:{attr}"
    return ref


def resolve(ref: str, device: str = "cpu") -> tuple[SupervisedTask, TaskRef]:
    """The task `ref` names, and the TaskRef its jobs carry; a TaskError (one line) else."""
    if not isinstance(ref, str) or not ref.strip():
        raise TaskError(f"a task reference is a non-empty string, got {ref!r}")
    if ref == "fmnist-cnn":
        raise TaskError("fmnist-cnn is the presets' protocol; choose its size with --preset")
    full = absolute(FAMILIES.get(canonical(ref), ref))
    where, attr = _split(full)
    module = _module(where, ref)
    factory = getattr(module, attr, None)
    if factory is None:
        raise TaskError(f"task reference {ref!r}: {where} has no {attr!r}")
    if not callable(factory):
        raise TaskError(f"task reference {ref!r}: {attr} is a {type(factory).__name__}, not a "
                        "zero-argument callable returning a SupervisedTask")
    try:
        task = factory()
    except TaskError:
        raise
    except Exception as err:
        raise TaskError(f"task reference {ref!r}: {attr}() raised {type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
    if not isinstance(task, SupervisedTask):
        raise TaskError(f"task reference {ref!r}: {attr}() returned {type(task).__name__}, not "
                        "an engine.tasks.SupervisedTask")
    source = Path(module.__file__).read_bytes() if getattr(module, "__file__", None) else b""
    digest = hashlib.sha256(b"%d\0" % SUPERVISED_FITNESS_VERSION + source + b"\0"
                            + task.settings().encode()).hexdigest()[:12]
    return task, TaskRef(ref=full, name=task.name, digest=digest, device=device)


_WORKER: dict[TaskRef, tuple[SupervisedTask, Loaded]] = {}


def worker_task(tref: TaskRef) -> tuple[SupervisedTask, Loaded]:
    """The task and its data in this process: resolved and loaded once per process."""
    if tref not in _WORKER:
        task, found = resolve(tref.ref, tref.device)
        if found.digest != tref.digest:
            raise TaskError(f"task {tref.name!r} changed since the run checked it "
                            f"({tref.ref}); start a new run to evolve on the edited task")
        _WORKER.clear()  # one task per worker at a time: the data can be large
        _WORKER[tref] = (task, load_data(task, tref.device))
    return _WORKER[tref]


def supervised_fitness(tref: TaskRef, make_optimizer, *, seed: int,
                       time_limit: float | None = None, schedule=None):
    """A candidate's fitness on the task `tref` names, in a worker. ALR's `make_optimizer(model)`
    builds the candidate; DLR's `make_optimizer(model, lr)` builds SGD at the task's
    initial_lr, which `schedule` then drives."""
    from engine.tasks import supervised

    task, data = worker_task(tref)
    factory = make_optimizer if schedule is None else \
        (lambda model: make_optimizer(model, task.initial_lr))
    return supervised.supervised_fitness(task, data, factory, seed=seed, time_limit=time_limit,
                                         schedule=schedule)

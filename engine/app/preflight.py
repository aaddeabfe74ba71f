"""Checks a run makes once, in the parent, before generation 0 and before its directory is
touched (engine.app.session calls them): each failure is a UsageError, one line and exit status
2, and leaves nothing behind that blocks a retry."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from engine.app.cli import UsageError
from engine.app.config import RunConfig
from engine.app.runlock import LOCK_NAME

__all__ = ["check_data", "check_kernel_cache", "check_out_dir", "check_store", "check_task",
           "check_tiers"]


def check_task(config: RunConfig):
    """The run's --task resolved and checked once, here, before any worker or file exists: a
    TaskRef for the jobs, or None for the preset's Fashion-MNIST CNN."""
    import torch

    if config.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA GPU on this machine; use "
                         "--device cpu (or leave --device out)")
    if config.task is None:
        return None
    from engine.tasks.registry import resolve
    from engine.tasks.supervised import TaskError, check_task as check

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        task, ref = resolve(config.task, device)
        check(task, device)
    except TaskError as err:
        raise UsageError(str(err)) from None
    return ref


def check_tiers(config: RunConfig) -> None:
    """The run's tiers (--tiers, --config) checked as the funnel will use them: micro tiers
    only for ALR and only with micro tasks, and every trained tier's task resolved and checked
    (the run's own --task is check_task's)."""
    if config.tiers is None:
        return
    from engine.fitness.funnel import micro_tiers, task_definition
    from engine.fitness.tiers import Tier

    try:
        tiers = [Tier.from_json(t) for t in config.tiers]
        micro = micro_tiers(config.mode, tiers)
        names = {n for t in tiers if t.name not in micro for n in t.tasks} - {config.task}
        for name in sorted(names):
            task_definition(name, config.device)
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"tiers: {err}") from None


def check_store(path: Path) -> None:
    """Open the store once before the run directory is made: a damaged or foreign file must
    not leave a half-made run behind that a retry then refuses."""
    from engine.fitness.store import Store

    Store(path).close()  # a StoreError is main's one line


def check_data() -> None:
    from engine.tasks.data import DataCorruptError, DataNotFoundError, load_fashion_mnist

    try:
        load_fashion_mnist("train")
    except (DataNotFoundError, DataCorruptError) as err:
        raise UsageError(str(err)) from None


def check_kernel_cache() -> None:
    """The kernel cache must be a directory we can write: else every compile fails."""
    from codegen.cache import cache_root

    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as err:
        named = (f"AUTOLR_CACHE={os.environ['AUTOLR_CACHE']}" if os.environ.get("AUTOLR_CACHE")
                 else str(root))
        why = "it is a file" if root.exists() and not root.is_dir() else err.strerror or err
        raise UsageError(f"the kernel cache {named} is not a directory this user can write "
                         f"({why}); point AUTOLR_CACHE at one (or unset it for "
                         "~/.cache/autolr)") from None


def check_out_dir(out: Path, config: RunConfig) -> None:
    """A fresh run needs a new or empty directory: never mix two runs' files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    saved = out / "config.json"
    if saved.exists():
        try:
            old = json.loads(saved.read_text(encoding="utf-8"))
            mine = config.to_json()
            same = all(old.get(k) == mine[k] for k in ("mode", "preset", "seed", "evolution"))
            what = "this run" if same else (f"a different run ({old.get('mode')}, preset "
                                            f"{old.get('preset')}, seed {old.get('seed')})")
        except (OSError, ValueError):
            what = "a run"
        raise UsageError(f"{out} already holds {what}; pass --resume to continue it, or choose "
                         "another --out")
    if any(p.name != LOCK_NAME for p in out.iterdir()):  # a lock alone: a run killed at start
        raise UsageError(f"{out} is not empty and holds no AutoLR run; choose a new or empty "
                         "directory for --out")


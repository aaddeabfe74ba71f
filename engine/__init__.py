"""AutoLR's engine: evolve optimizers and schedules (`python -m engine.run`, `engine.search`).

`engine.search(task, ...)` runs a whole search from Python (engine/api.py). It is looked up on
first use, so `import engine` stays cheap (no torch) for the command-line entry points.
"""

from __future__ import annotations

__all__ = ["SearchError", "SearchResult", "search"]


def __getattr__(name: str):
    if name in __all__:
        from engine import api

        return getattr(api, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")

"""AutoLR's engine: evolve optimizers and schedules (`python -m engine.run`, `engine.search`).

`engine.search(task, ...)` runs a whole search from Python (engine/api.py). The name is also the
subpackage engine/search/ (grammar, SGE, evolve): that module is made callable and forwards to
the API, so both `engine.search(...)` and `engine.search.evolve` work; importing a submodule
cannot then replace the function with the package.
"""

from __future__ import annotations

__all__ = ["SearchError", "SearchResult", "search"]


def __getattr__(name: str):
    if name in ("SearchError", "SearchResult"):
        from engine import api

        return getattr(api, name)
    if name == "search":
        import engine.search

        return engine.search
    raise AttributeError(f"module 'engine' has no attribute {name!r}")

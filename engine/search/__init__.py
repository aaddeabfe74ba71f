"""The search: grammar, SGE derivation, the evolve loop, seeds and the grammars.

Calling this package, `engine.search(task, ...)`, runs a whole AutoLR search from Python
(engine/api.py): the public API shares its name with this package, so the package forwards.
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from engine.api import search

        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

"""Code generation for AutoLR: the optimizer IR and its text form, one emitter per backend, the
kernel cache.

`codegen` imports nothing else of ours; `kernels` and `engine` build on it.
"""

from codegen.ir import ParseError, Program, Schedule, reference_step

__all__ = ["ParseError", "Program", "Schedule", "reference_step"]

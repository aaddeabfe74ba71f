"""Runtime for generated optimizer kernels: compile-and-load, EvolvedOptimizer, the optimizer zoo."""

from kernels.runtime import BackendUnavailable, UpdateKernel, compile, resolve_backend

__all__ = ["BackendUnavailable", "UpdateKernel", "compile", "resolve_backend"]

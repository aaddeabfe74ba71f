"""Runtime for generated optimizer kernels: compile-and-load, EvolvedOptimizer, the zoo."""

from kernels import zoo
from kernels.optimizer import EvolvedOptimizer
from kernels.runtime import BackendUnavailable, UpdateKernel, compile, resolve_backend

__all__ = ["BackendUnavailable", "EvolvedOptimizer", "UpdateKernel", "compile", "resolve_backend",
           "zoo"]

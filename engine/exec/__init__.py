"""Where evaluation jobs run: in-process, a local process pool, or Ray (see engine.exec.base)."""

from engine.exec.base import (
    EXECUTORS, Executor, ExecutorError, Failed, Ok, Outcome, make_executor)
from engine.exec.local import LocalExecutor
from engine.exec.ray import RayExecutor
from engine.exec.serial import SerialExecutor

__all__ = [
    "EXECUTORS",
    "Executor",
    "ExecutorError",
    "Failed",
    "LocalExecutor",
    "Ok",
    "Outcome",
    "RayExecutor",
    "SerialExecutor",
    "make_executor",
]

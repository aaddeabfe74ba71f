"""What an optimizer costs besides accuracy: its step time and its state memory, per row of a
comparison, each also as a ratio to Adam's.

- Step time: the median wall time of `optimizer.step()` alone on the task's model, one CPU
  thread, after a few warm-up steps (the first compiles or loads the kernel and builds the
  arena). The gradients are fixed seeded noise of each parameter's shape: an update rule costs
  the same whatever the gradient's values, and timing forward and backward passes as well would
  bury the optimizer's share under the model's. A median, since one preempted step on a shared
  machine should not move the figure.
- State memory: the bytes of the optimizer's per-weight state tensors (those the program stores,
  `EvolvedOptimizer.tensor_states`) over the number of parameters: Adam's two float32 moments are
  8 bytes per parameter, SGD's none. Step counters (one scalar per parameter tensor, a few bytes
  per tensor, not per weight) are left out, as they are from the usual "2x the parameters" figure.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from engine.tasks.compare_tasks import CompareTask

__all__ = ["REFERENCE", "WARMUP", "STEPS", "failed", "measure", "with_ratios"]

WARMUP, STEPS = 3, 15
REFERENCE = "Adam"  # the row every ratio divides by


def _one_thread() -> Callable[[], None]:
    """One thread for torch and for numba's parallel kernels, as every training of the
    comparison has (numba's default of every core would time a different kernel run); returns
    what puts both back. numba first: its OpenMP layer resets torch's count."""
    try:
        import numba
    except ImportError:
        numba = None
    before = (numba.get_num_threads() if numba else None, torch.get_num_threads())
    if numba:
        numba.set_num_threads(1)
    torch.set_num_threads(1)

    def restore() -> None:
        if numba:
            numba.set_num_threads(before[0])
        torch.set_num_threads(before[1])
    return restore


def measure(task: CompareTask, program: str, lr: float, weight_decay: float = 0.0,
            backend: str = "auto", seed: int = 0) -> dict:
    """Step time (seconds, median of STEPS after WARMUP) and state bytes per parameter of
    `program` run by EvolvedOptimizer at `lr` / `weight_decay` on `task`'s model."""
    from kernels import EvolvedOptimizer

    restore = _one_thread()
    try:
        model = task.build_model(seed)
        params = [p for p in model.parameters() if p.requires_grad]
        generator = torch.Generator().manual_seed(seed)
        for p in params:
            p.grad = 1e-3 * torch.randn(p.shape, generator=generator, dtype=p.dtype)
        optimizer = EvolvedOptimizer(params, program, lr, weight_decay=weight_decay,
                                     backend=backend)
        times = []
        for k in range(WARMUP + STEPS):
            start = time.perf_counter()
            optimizer.step()
            if k >= WARMUP:
                times.append(time.perf_counter() - start)
        count = sum(p.numel() for p in params)
        state_bytes = sum(optimizer.state[p][name].nbytes for p in params
                          for name in optimizer.tensor_states if name in optimizer.state[p])
    finally:
        restore()
    return {"step_seconds": statistics.median(times), "state_bytes": int(state_bytes),
            "parameters": count, "bytes_per_param": state_bytes / count}


def failed(reason: str) -> dict:
    """The cost of a row whose optimizer raised while measured: no figures, the reason."""
    return {"step_seconds": None, "state_bytes": None, "parameters": None,
            "bytes_per_param": None, "error": reason}


def _ratio(mine: float | None, adams: float | None) -> float | None:
    return None if mine is None or not adams else mine / adams


def with_ratios(costs: dict[str, dict], reference: Callable[[], dict]) -> dict[str, dict]:
    """Each row's cost with `step_vs_adam` and `memory_vs_adam`: the ratio to the REFERENCE
    row's, or to `reference()` (Adam measured apart) when the table has no Adam row. A ratio is
    None where either side has no figure (a row that failed)."""
    adam = costs.get(REFERENCE) or reference()
    return {name: {**cost, "step_vs_adam": _ratio(cost["step_seconds"], adam["step_seconds"]),
                   "memory_vs_adam": _ratio(cost["bytes_per_param"], adam["bytes_per_param"])}
            for name, cost in costs.items()}

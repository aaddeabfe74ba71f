"""Compile-and-load: a Program becomes an UpdateKernel that applies one step in place.

`compile()` is memoised in-process by (hash, backend) and on disk by codegen.cache, so the
generated source is written once per program and machine, and Numba's own cache (cache=True)
keeps the machine code next to it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from codegen import backends, cache
from codegen.ir import Program, UniformStepper
from codegen.lower import KernelPlan, lower


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (no CUDA for Triton, say)."""


def resolve_backend(backend: str, device: torch.device | None = None,
                    dtype: torch.dtype = torch.float32) -> str:
    """`auto` is triton for CUDA tensors (or when CUDA is available and no device is given),
    numba for other float32/float64 ones, torch for other float16/bfloat16 ones."""
    if backend == "auto":
        return backends.auto(device.type if device is not None else None, _name(dtype))
    return backends.get(backend).name


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_dtype(backend: str, dtype: torch.dtype, where: str = "these parameters") -> str:
    """The plan dtype name for `dtype` on `backend`, or a TypeError naming what it takes and
    which backend takes `dtype`."""
    name = _name(dtype)
    if name in backends.get(backend).dtypes:
        return name
    takes = ", ".join(backends.get(backend).dtypes)
    # Those that run anywhere first; the others with the devices they are native to.
    others = sorted((b for b in backends.BACKENDS.values() if name in b.dtypes),
                    key=lambda b: b.native is not None)
    fix = "convert them to float32"
    if others:
        alts = [f"{b.name!r} on {'/'.join(d.upper() for d in b.native)}" if b.native
                else repr(b.name) for b in others[1:]]
        fix = f"use backend={others[0].name!r}" + (f" (or {' or '.join(alts)})" if alts else "")
    raise TypeError(f"the {backend} backend updates {takes} parameters, and {where} are "
                    f"{dtype}: {fix}")


@dataclass(frozen=True, eq=False)
class UpdateKernel:
    """One fused optimizer step for one program on one backend.

    Call it with flat, contiguous tensors: `kernel(weight, grad, states, lr, scalars, decay)`,
    the weight and grad of the plan's dtype and the states of its compute dtype (float32 for
    float32 parameters), where `states` holds a tensor for each of `tensor_states` and `scalars`
    the *new* value of each of `scalar_states` (see `advance_scalars`); `decay` (``1 - lr *
    weight_decay``) is read by a decay plan only. Everything is updated in place.
    """

    plan: KernelPlan
    backend: str
    module: object
    _launch: Callable
    stepper: UniformStepper = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stepper", self.plan.program.stepper())

    @property
    def hash(self) -> str:
        return self.plan.hash

    @property
    def tensor_states(self) -> tuple[str, ...]:
        return self.plan.tensor_states

    @property
    def scalar_states(self) -> tuple[str, ...]:
        return self.plan.scalar_states

    def advance_scalars(self, scalars: Mapping[str, float], lr: float) -> dict[str, float]:
        """New values of the uniform states, by the reference semantics in float32."""
        return self.stepper.step(scalars, lr)

    def warm_up(self, device: str = "cpu") -> None:
        """Compile now (Numba compiles on first call) by stepping a throwaway one-element
        weight, so the cost is paid and measured before training starts."""
        dtype = getattr(torch, self.plan.dtype)
        one = torch.zeros(1, device=device, dtype=dtype)
        states = {s: torch.zeros(1, device=device, dtype=getattr(torch, self.plan.compute_dtype))
                  for s in self.tensor_states}
        self(one, torch.zeros(1, device=device, dtype=dtype), states, 1.0,
             self.advance_scalars({}, 1.0))

    def __call__(self, weight: torch.Tensor, grad: torch.Tensor,
                 states: Mapping[str, torch.Tensor], lr: float,
                 scalars: Mapping[str, float] | None = None, decay: float = 1.0) -> None:
        scalars = scalars or {}
        buffers = [weight, grad, *(states[s] for s in self.plan.tensor_states)]
        values = [float(lr), *(float(scalars[s]) for s in self.plan.scalar_states)]
        if self.plan.decay:
            values.append(float(decay))
        self._launch(buffers, values)


def compile(program: Program | str, backend: str = "auto", *,  # noqa: A001
            maximize: bool = False, decay: bool = False,
            dtype: torch.dtype = torch.float32) -> UpdateKernel:
    """The update kernel for `program` (a Program or its text) on `backend`
    (`auto`, `numba`, `triton` or `torch`), for parameters of `dtype`; `maximize` and `decay`
    as codegen.lower describes them."""
    if isinstance(program, str):
        program = Program.parse(program)
    backend = resolve_backend(backend, dtype=dtype)
    name = check_dtype(backend, dtype)
    return _compile(lower(program, maximize=maximize, decay=decay, dtype=name), backend)


@functools.lru_cache(maxsize=4096)
def _compile_cached(plan: KernelPlan, backend: str) -> UpdateKernel:
    module = cache.load(plan, backend)
    return UpdateKernel(plan, backend, module, backends.get(backend).launcher(module, plan))


def _compile(plan: KernelPlan, backend: str) -> UpdateKernel:
    spec = backends.get(backend)
    if not spec.available(None):
        raise BackendUnavailable(spec.missing)
    return _compile_cached(plan, backend)

"""EvolvedOptimizer: any ALR program as a real `torch.optim.Optimizer`, one fused launch per step.

The parameters, gradients and states of each param group live in one flat buffer each (see
`kernels.arena` for the layout and the torch semantics kept on top of it), so the common step is
one kernel launch per group.
"""


from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from codegen.cache import BACKENDS
from codegen.ir import Program
from codegen.lower import lower
from kernels.arena import Arena, host_scalar
from kernels.runtime import UpdateKernel, resolve_backend, triton_usable_on
from kernels.runtime import compile as compile_kernel

__all__ = ["EvolvedOptimizer"]


class EvolvedOptimizer(Optimizer):
    r"""Runs an ALR program (evolved, or from :mod:`kernels.zoo`) as a torch optimizer.

    For every parameter :math:`p` with gradient :math:`g`, elementwise in float32, with states
    :math:`\alpha, \beta, \sigma` that start at 0 and the program's deltas
    :math:`F_\alpha, F_\beta, F_\sigma, F_w`::

        alpha <- alpha - F_alpha(alpha, g, lr)
        beta  <- beta  - F_beta(alpha, beta, g, lr)              # the new alpha
        sigma <- sigma - F_sigma(alpha, beta, sigma, g, lr)      # the new alpha and beta
        p     <- p     - F_w(alpha, beta, sigma, g, lr)          # all three new

    ``lr`` is the program's runtime input, kept in ``param_groups[i]['lr']`` so that torch's
    LR schedulers drive it; a program that never reads ``lr`` ignores it. States that cannot
    reach the weight update are never stored; states whose delta reads only constants, ``lr`` and
    other such states (a step counter) are scalars per parameter.

    Args:
        params: parameters or param groups (dicts), as for any torch optimizer. float32, on the
            CPU (numba or torch backend) or CUDA (triton or torch backend).
        program: a :class:`codegen.ir.Program` or its text.
        backend: ``"auto"`` (triton for CUDA parameters, numba for CPU ones), ``"numba"``,
            ``"triton"`` or ``"torch"`` (the eager reference).
        lr: the value of the program's ``lr`` input (default 1.0: evolved programs carry their
            own step sizes).

    Note:
        At the first step each param group's parameters (their ``.data``), gradients and states
        move into flat buffers, so that one kernel launch updates the whole group. The
        parameters stay the same ``Parameter`` objects; code that kept a reference to a
        parameter's old ``.data`` keeps stale memory. See :mod:`kernels.arena` for how fresh
        gradients, skipped parameters and step counters are handled.

    Example::

        >>> opt = EvolvedOptimizer(model.parameters(), zoo.adam(), lr=1e-3)  # == torch Adam
        >>> opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                 program: Program | str, backend: str = "auto", lr: float = 1.0) -> None:
        if isinstance(program, str):
            program = Program.parse(program)  # a ParseError (ValueError) names line and column
        elif not isinstance(program, Program):
            raise TypeError(f"program must be a Program or its text, not {type(program).__name__}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: choose auto, {', '.join(BACKENDS)}")
        _check_lr(lr, "lr")
        self.program = program
        self.backend = backend
        plan = lower(program)
        self.tensor_states: tuple[str, ...] = plan.tensor_states
        self.scalar_states: tuple[str, ...] = plan.scalar_states
        self._kernels: dict[str, UpdateKernel] = {}
        self._arenas: dict[int, Arena] = {}
        super().__init__(params, {"lr": lr})

    # ---- param groups and their checks ----------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_lr(group["lr"], f"param_groups[{len(self.param_groups) - 1}]['lr']")
            self._group_backend(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _group_backend(self, group: dict[str, Any]) -> str:
        """The backend for a group's device, after checking every parameter can live in one
        float32 arena on a device that backend runs on."""
        params = group["params"]
        if not params:
            return "torch"
        device = params[0].device
        for i, p in enumerate(params):
            if p.dtype != torch.float32:
                raise TypeError(f"EvolvedOptimizer updates float32 parameters; parameter {i} of "
                                f"its group is {p.dtype}: convert the model with model.float()")
            if p.device != device:
                raise ValueError(f"all parameters of a param group must be on one device; "
                                 f"parameter 0 is on {device}, parameter {i} on {p.device}: put "
                                 "them in separate param groups or move the model first")
        backend = resolve_backend(self.backend, device)
        if backend == "numba" and device.type != "cpu":
            raise ValueError(f"the numba backend runs on CPU tensors, and these parameters are on "
                             f"{device}: use backend='triton' (CUDA) or backend='torch'")
        if backend == "triton" and not triton_usable_on(device):
            raise ValueError(f"the triton backend runs on CUDA tensors, and these parameters are "
                             f"on {device}: use backend='numba' on the CPU (or set "
                             "TRITON_INTERPRET=1 before importing triton to run it, slowly, in "
                             "its interpreter)")
        return backend

    def _kernel(self, backend: str) -> UpdateKernel:
        if backend not in self._kernels:
            self._kernels[backend] = compile_kernel(self.program, backend)
        return self._kernels[backend]

    # ---- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient. Returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            lr = _check_lr(group["lr"], f"param_groups[{index}]['lr']")
            params = group["params"]
            if not params:
                continue
            arena = self._arenas.get(index)
            where = None if arena is None else arena.survey(params, self.state)
            if where is None:  # first step, or something moved out of the arena: (re)build
                kernel = self._kernel(self._group_backend(group))
                arena = self._arenas[index] = Arena.build(params, self.state, kernel,
                                                           self.scalar_states)
                where = arena.survey(params, self.state)
            arena.step(self.state, lr, where)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's: `set_to_none=True` (the default) drops the gradients; `set_to_none=False`
        zeroes them in place, which for gradients in the arena is one fill per group and lets the
        next backward accumulate straight into the arena."""
        if set_to_none:
            super().zero_grad(set_to_none=True)
            return
        for index, group in enumerate(self.param_groups):
            arena = self._arenas.get(index)
            in_arena = arena.grad_slots(group["params"]) if arena is not None else set()
            if in_arena:
                arena.grad.zero_()
            for i, p in enumerate(group["params"]):
                if p.grad is not None and i not in in_arena:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    # ---- saving and loading ---------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # torch pickles only defaults, state and param groups; the program must travel too.
        return {**super().__getstate__(), "program": str(self.program), "backend": self.backend}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also what load_state_dict calls, without the program
        if isinstance(self.__dict__.get("program"), str):
            self.program = Program.parse(self.program)
            plan = lower(self.program)
            self.tensor_states, self.scalar_states = plan.tensor_states, plan.scalar_states
        self.__dict__.setdefault("_kernels", {})
        self.__dict__.setdefault("_arenas", {})

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus the program text, so loading checks it is the same program."""
        state = super().state_dict()
        state["program"] = str(self.program)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        text = state_dict.get("program")
        if text is not None and Program.parse(text).hash != self.program.hash:
            raise ValueError("this state dict was saved by an EvolvedOptimizer running another "
                             f"program:\n{text}\nnot\n{self.program}")
        ours = set(self.tensor_states + self.scalar_states)
        for index, param_state in state_dict["state"].items():
            if isinstance(param_state, dict) and set(param_state) - ours:
                raise ValueError(f"the state of parameter {index} holds {sorted(param_state)}, but "
                                 f"this program keeps {sorted(ours) or 'no state'}: the state dict "
                                 "comes from another optimizer")
        state_dict = {k: v for k, v in state_dict.items() if k != "program"}
        super().load_state_dict(state_dict)
        # torch casts every tensor in the state to the parameter's device; the step counters stay
        # on the host (read every step, so no device sync), as torch keeps Adam's `step`.
        for param_state in self.state.values():
            for s in self.scalar_states:
                if s in param_state:
                    param_state[s] = host_scalar(float(param_state[s]))
        self._arenas.clear()  # rebuilt from self.state at the next step


def _check_lr(lr: Any, where: str) -> float:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where} must be a number or a one-element tensor, got shape "
                             f"{tuple(lr.shape)}")
        lr = lr.item()
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"{where} must be a number, not {type(lr).__name__} ({lr!r})")
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"invalid learning rate {where} = {lr!r}: expected a finite number >= 0 "
                         "(it is the value of the program's `lr` input)")
    return float(lr)

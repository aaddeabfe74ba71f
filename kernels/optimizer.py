"""EvolvedOptimizer: any ALR program as a real `torch.optim.Optimizer`, one fused launch per step.

The parameters, gradients and states of each param group live in one flat buffer each (see
`kernels.arena` for the layout and the torch semantics kept on top of it), so the common step is
one kernel launch per group.
"""


from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from codegen import backends
from codegen.ir import Program
from codegen.lower import DTYPES, KernelPlan, lower
from kernels.arena import Arena, host_scalar
from kernels.runtime import UpdateKernel, check_dtype, resolve_backend
from kernels.runtime import compile as compile_kernel

__all__ = ["EvolvedOptimizer"]


class EvolvedOptimizer(Optimizer):
    r"""Runs an ALR program (evolved, or from :mod:`kernels.zoo`) as a torch optimizer.

    For every parameter :math:`p` with gradient :math:`g` (negated under ``maximize``),
    elementwise, with states :math:`\alpha, \beta, \sigma` that start at 0 and the program's
    deltas :math:`F_\alpha, F_\beta, F_\sigma, F_w`::

        alpha <- alpha - F_alpha(alpha, g, lr)
        beta  <- beta  - F_beta(alpha, beta, g, lr)              # the new alpha
        sigma <- sigma - F_sigma(alpha, beta, sigma, g, lr)      # the new alpha and beta
        p     <- p * (1 - lr * weight_decay)                     # only when weight_decay != 0
        p     <- p     - F_w(alpha, beta, sigma, g, lr)          # all three new

    ``lr`` is kept in ``param_groups[i]['lr']``, so that torch's LR schedulers drive it. A
    program that reads ``lr`` (every :mod:`kernels.zoo` program) uses it where it reads it; one
    that never reads it (most evolved programs) has its weight update scaled by it,
    ``p <- p - lr * F_w``, so the default ``lr=1.0`` runs the evolved step unchanged and a
    scheduler scales it. Weight decay is decoupled, as AdamW's, and fused into the same kernel
    launch. States that cannot reach the weight update are never stored; states whose delta reads
    only constants, ``lr`` and other such states (a step counter) are scalars per parameter.

    Dtypes: float32 and float64 parameters on every backend (float64 ones compute in float64,
    with float64 state tensors); float16 and bfloat16 ones on the torch and triton backends, with
    float32 state tensors and float32 math, the weight rounded once on store. Step counters
    (uniform states) are float32 on the host for every dtype, as torch keeps Adam's ``step``.
    One param group holds parameters of one dtype and one device.

    Args:
        params: parameters or param groups (dicts), as for any torch optimizer, on the CPU
            (numba or torch backend) or CUDA (triton or torch backend).
        program: a :class:`codegen.ir.Program` or its text.
        lr: the learning rate (default 1.0); see above for what it does to a program.
        weight_decay: decoupled weight decay (default 0), as torch.optim.AdamW's.
        maximize: maximize the objective (the gradient negated), as torch's ``maximize``.
        backend: ``"auto"`` (triton for CUDA parameters; numba for CPU float32/float64 ones,
            torch for CPU float16/bfloat16 ones), ``"numba"``, ``"triton"`` or ``"torch"``
            (the eager reference).
        kernel: `program`'s kernel, already compiled by :func:`kernels.compile` (an evaluator
            compiles it once to time the compile, then builds an optimizer per training); used
            for every param group it fits (its backend, dtype, maximize and decay), so the
            program is not lowered again. Other groups get their own kernels as usual.

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
                 program: Program | str, lr: float = 1.0, *, weight_decay: float = 0.0,
                 maximize: bool = False, backend: str = "auto",
                 kernel: UpdateKernel | None = None) -> None:
        if isinstance(program, str):
            program = Program.parse(program)  # a ParseError (ValueError) names line and column
        elif not isinstance(program, Program):
            raise TypeError(f"program must be a Program or its text, not {type(program).__name__}")
        if backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: choose auto, "
                             f"{', '.join(backends.BACKENDS)}")
        _check_lr(lr, "lr")
        _check_weight_decay(weight_decay, "weight_decay")
        _check_maximize(maximize, "maximize")
        self.program = program
        self.backend = backend
        self._kernels: dict[tuple, UpdateKernel] = {}
        if kernel is None:
            plan = lower(program)
        else:
            plan = _given(kernel, program)
            self._kernels[(kernel.backend, getattr(torch, plan.dtype), plan.maximize,
                           plan.decay)] = kernel
        self.tensor_states: tuple[str, ...] = plan.tensor_states
        self.scalar_states: tuple[str, ...] = plan.scalar_states
        self._arenas: dict[int, Arena] = {}
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "maximize": maximize})

    # ---- param groups and their checks ----------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        with warnings.catch_warnings():
            # torch only warns about a parameter listed twice; it is refused below instead.
            warnings.filterwarnings("ignore", "optimizer contains a parameter group with "
                                    "duplicate parameters")
            super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param_groups[{len(self.param_groups) - 1}]"
        try:
            seen: dict[int, int] = {}
            for i, p in enumerate(group["params"]):
                if seen.setdefault(id(p), i) != i:
                    raise ValueError(f"parameter {i} of {where} is parameter {seen[id(p)]} again: "
                                     "list each parameter once (each step updates it once)")
            _check_lr(group["lr"], f"{where}['lr']")
            _check_weight_decay(group["weight_decay"], f"{where}['weight_decay']")
            _check_maximize(group["maximize"], f"{where}['maximize']")
            self._group_backend(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _group_backend(self, group: dict[str, Any]) -> tuple[str, torch.dtype]:
        """The backend and dtype for a group, after checking every parameter can live in one
        arena on a device that backend runs on, in a dtype it takes."""
        params = group["params"]
        if not params:
            return "torch", torch.float32
        device, dtype = params[0].device, params[0].dtype
        for i, p in enumerate(params):
            if str(p.dtype).removeprefix("torch.") not in DTYPES:
                raise TypeError(f"EvolvedOptimizer updates float32, float64, float16 and bfloat16 "
                                f"parameters; parameter {i} of its group is {p.dtype}: convert "
                                "the model with model.float()")
            if p.dtype != dtype:
                raise ValueError(f"all parameters of a param group must have one dtype; "
                                 f"parameter 0 is {dtype}, parameter {i} {p.dtype}: put them in "
                                 "separate param groups or convert the model first")
            if p.device != device:
                raise ValueError(f"all parameters of a param group must be on one device; "
                                 f"parameter 0 is on {device}, parameter {i} on {p.device}: put "
                                 "them in separate param groups or move the model first")
        backend = resolve_backend(self.backend, device, dtype)
        check_dtype(backend, dtype, f"the parameters of this group (on {device})")
        spec = backends.get(backend)
        if not spec.available(device.type):
            raise ValueError(f"the {backend} backend runs on {spec.runs_on}, and these parameters "
                             f"are on {device}: {spec.instead}")
        return backend, dtype

    def _kernel(self, backend: str, dtype: torch.dtype, maximize: bool, decay: bool
                ) -> UpdateKernel:
        key = (backend, dtype, maximize, decay)
        if key not in self._kernels:
            self._kernels[key] = compile_kernel(self.program, backend, maximize=maximize,
                                                decay=decay, dtype=dtype)
        return self._kernels[key]

    # ---- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient. Returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            # (_check_number directly: this runs every step, and a wrapper call is not free)
            lr = _check_number(group["lr"], f"param_groups[{index}]['lr']", "learning rate",
                               _LR_MEANING)
            params = group["params"]
            if not params:
                continue
            # The kernel takes no decay argument, and does no multiply, without weight decay.
            wd, maximize = group["weight_decay"], group["maximize"]
            options = (maximize, wd != 0)
            arena = self._arenas.get(index)
            where = None if arena is None else arena.survey(params, self.state)
            if where is None:  # first step, or something moved out of the arena: (re)build
                kernel = self._kernel(*self._group_backend(group), *options)
                arena = self._arenas[index] = Arena.build(params, self.state, kernel,
                                                           self.scalar_states)
                where = arena.survey(params, self.state)
            elif options != arena.options:  # the user switched maximize or weight decay
                plan = arena.kernel.plan
                arena.use(self._kernel(arena.kernel.backend, getattr(torch, plan.dtype), *options))
            arena.step(self.state, lr, where, (_decay(lr, wd, index),) if options[1] else ())
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
        for group in self.param_groups:  # saved before weight decay and maximize existed
            group.setdefault("weight_decay", 0.0)
            group.setdefault("maximize", False)

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
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        # torch casts floating state to its parameter's dtype; float16/bfloat16 parameters keep
        # float32 states here, so those come back from the saved values, not rounded.
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = dict(zip(ids, (p for group in self.param_groups for p in group["params"])))
        for index, param_state in saved.items():
            p = params.get(index)
            if p is None or p.dtype not in (torch.float16, torch.bfloat16):
                continue
            for s in self.tensor_states:
                if s in param_state:
                    self.state[p][s] = torch.as_tensor(param_state[s]).to(p.device, torch.float32)
        # torch casts every tensor in the state to the parameter's device; the step counters stay
        # on the host (read every step, so no device sync), as torch keeps Adam's `step`.
        for param_state in self.state.values():
            for s in self.scalar_states:
                if s in param_state:
                    param_state[s] = host_scalar(float(param_state[s]))
        self._arenas.clear()  # rebuilt from self.state at the next step


def _given(kernel: Any, program: Program) -> KernelPlan:
    """The plan of a kernel passed to EvolvedOptimizer, once it is known to run `program`."""
    if not isinstance(kernel, UpdateKernel):
        raise TypeError(f"kernel must be an UpdateKernel from kernels.compile, not "
                        f"{type(kernel).__name__}")
    if kernel.plan.program.hash != program.hash:
        raise ValueError(f"kernel runs another program ({kernel.plan.program.hash[:12]}, not "
                         f"{program.hash[:12]}): pass the kernel that kernels.compile gave for "
                         "this program")
    return kernel.plan


def _decay(lr: float, weight_decay: Any, index: int) -> float:
    """AdamW's factor on the weight, computed in double as torch computes it (the kernel rounds
    it to its dtype, as torch rounds a Python scalar meeting a float32 tensor)."""
    return 1.0 - lr * _check_weight_decay(weight_decay, f"param_groups[{index}]['weight_decay']")


def _check_weight_decay(value: Any, where: str) -> float:
    return _check_number(value, where, "weight_decay value")


def _check_maximize(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{where} must be True or False, not {type(value).__name__} ({value!r})")


_LR_MEANING = " (the program's `lr` input, or the step factor of a program that never reads it)"


def _check_lr(lr: Any, where: str) -> float:
    return _check_number(lr, where, "learning rate", _LR_MEANING)


def _check_number(value: Any, where: str, what: str, meaning: str = "") -> float:
    """A finite number >= 0 (or a one-element tensor holding one), as a float."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where} must be a number or a one-element tensor, got shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where} must be a number, not {type(value).__name__} ({value!r})")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"invalid {what} {where} = {value!r}: expected a finite number >= 0"
                         + meaning)
    return float(value)

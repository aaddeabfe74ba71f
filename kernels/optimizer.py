"""EvolvedOptimizer: any ALR program as a real `torch.optim.Optimizer`, one fused launch per step.

Layout ("arena"): per param group, the parameters' `.data` become views of one flat float32
buffer, and so do their gradients and every tensor state of the program. The generated kernels are
elementwise, so one launch over a contiguous range of the arena updates every parameter in that
range: the common step is *one* launch for the whole group, whatever the number of tensors.

Torch semantics kept on top of that layout:

* A parameter whose `.grad` is None is skipped (its state neither created nor advanced), as in
  torch. The launch then covers the maximal runs of neighbouring parameters that do step: a skipped
  parameter splits the group into two launches, it never costs a launch per tensor.
* Uniform states (a step counter) are per parameter, as torch keeps Adam's `step`: a 0-d float32
  CPU tensor in `state[p]`. Neighbours whose counters agree share a launch (the usual case); the
  counters are advanced on the host in float32, exactly as the kernels' reference semantics say.
* Gradients: the arena's gradient views become `p.grad`, so autograd accumulates into the arena in
  place after `zero_grad(set_to_none=False)`, and the step is one launch. After `zero_grad()`
  (set_to_none=True, torch's default) backward makes fresh gradient tensors instead: a small one
  (under DIRECT_MIN elements) is copied into the arena and `p.grad` rebound to the arena view; a
  large one gets a launch of its own where it lies, since copying it would cost more memory
  traffic than the launch. The first step after the arena is built copies every gradient in, so
  that a `set_to_none=False` loop settles into one launch a step.
* Anything that moves a parameter or a state tensor out of the arena (`p.data = ...`, `model.to()`
  onto another device, `load_state_dict`) is noticed at the next step, which rebuilds the arena.

Per-step cost: each step first *surveys* the group (identity and address checks, no tensor
work), and the launches for what it finds (which gradients are where, which counters agree) come
from a plan cached per such placement; step counters advance through a memo. On the reference
CNN (8 tensors) that keeps the Python around the kernel near 60 us (warm caches).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch.optim import Optimizer

from codegen.cache import BACKENDS
from codegen.ir import STATES, Program, evaluate
from codegen.lower import lower
from codegen.numba_emit import kernel_fn
from kernels.runtime import UpdateKernel, resolve_backend, triton_usable_on
from kernels.runtime import compile as compile_kernel

__all__ = ["EvolvedOptimizer"]

# A gradient outside the arena with at least this many elements gets a launch of its own instead
# of a copy into the arena: copying costs a read and a write of it (~8 bytes an element), a launch
# ~10-20 us; they break even near 2**16 elements on a 2-core CPU.
DIRECT_MIN = 1 << 16
# Each parameter starts on a 64-byte boundary of the arena (16 float32): cache lines on the CPU,
# and the alignment cuBLAS/cuDNN and Triton's vectorised loads want on a GPU. The few elements in
# between belong to no parameter; launches sweep over them harmlessly.
ALIGN = 16


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
        parameter's old ``.data`` keeps stale memory. See the module docstring for how fresh
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
        self._arenas: dict[int, _Arena] = {}
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
                arena = self._arenas[index] = _Arena.build(params, self.state, kernel,
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
                    param_state[s] = _scalar(float(param_state[s]))
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


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _dense_strides(p: torch.Tensor) -> tuple[int, ...]:
    # The parameter's own layout when it is dense (channels_last stays channels_last: autograd
    # gives gradients that layout too), contiguous otherwise: what empty_like would allocate.
    return torch.empty_like(p, device="meta").stride()


@dataclass
class _Slot:
    """Where one parameter lives in its group's arena."""

    param: torch.Tensor
    index: int  # position in the group
    offset: int  # first element in the flat buffers
    numel: int
    shape: torch.Size
    stride: tuple[int, ...]
    views: dict[str, torch.Tensor] = field(default_factory=dict)  # weight, grad, every state
    ptr: int = 0  # byte offset of element 0 in every flat buffer
    state_views: list[torch.Tensor] = field(default_factory=list)  # tensor, then scalar states

    @property
    def grad_view(self) -> torch.Tensor:
        return self.views["grad"]

    def holds(self, t: torch.Tensor | None, base: int) -> bool:
        """Whether `t` is this slot's view of the flat buffer that starts at address `base`."""
        return (t is not None and t.layout == torch.strided and t.data_ptr() == base + self.ptr
                and t.stride() == self.stride and t.shape == self.shape)


@dataclass(eq=False)
class _Arena:
    """One param group's flat buffers: weight, grad, and one per tensor state."""

    kernel: UpdateKernel
    scalar_states: tuple[str, ...]
    params: list[torch.Tensor]
    slots: list[_Slot]
    buffers: dict[str, torch.Tensor]
    scalars: torch.Tensor  # (scalar state, parameter) -> value, float32 on the host
    settled: bool = False  # False until the first step after the build
    plans: dict = field(default_factory=dict)  # (placement, scalar groups) -> _Plan
    snapshot: bytes = b""  # the uniform states as the last step left them
    groups: tuple[int, ...] | None = None  # which parameters share uniform states (None: all)
    advanced: dict = field(default_factory=dict)  # (old states, lr) -> new states, see advance
    last_lr: str = ""  # the lr (hex) of the last memo miss
    uniform: tuple | None = None  # (state, delta) of each scalar state, made on first use

    @property
    def grad(self) -> torch.Tensor:
        return self.buffers["grad"]

    def __post_init__(self) -> None:
        # numpy reads and writes a few floats in well under a microsecond; torch indexing costs
        # several. Shares memory with `scalars` and so with the 0-d tensors in `state[p]`.
        self.scalars_np: np.ndarray = self.scalars.numpy()

    @classmethod
    def build(cls, params: list[torch.Tensor], state: dict, kernel: UpdateKernel,
              scalar_states: tuple[str, ...]) -> "_Arena":
        device = params[0].device
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total = -(-(total + p.numel()) // ALIGN) * ALIGN
        names = ("weight", "grad") + kernel.tensor_states
        buffers = {n: torch.zeros(total, dtype=torch.float32, device=device) for n in names}
        # The uniform states of every parameter, on the host: row k holds scalar state k.
        scalars = torch.zeros((len(scalar_states), len(params)), dtype=torch.float32)
        slots = []
        for index, (p, offset) in enumerate(zip(params, offsets)):
            slot = _Slot(p, index, offset, p.numel(), p.shape, _dense_strides(p), ptr=4 * offset)
            slot.views = {n: buffers[n].as_strided(p.shape, slot.stride, offset) for n in names}
            slot.views.update({s: scalars[k, index] for k, s in enumerate(scalar_states)})
            slot.state_views = [slot.views[s] for s in kernel.tensor_states + scalar_states]
            slot.views["weight"].copy_(p.detach())
            p.data = slot.views["weight"]
            param_state = state.get(p)
            if param_state:  # states saved earlier (or loaded) move into the arena
                for s in kernel.tensor_states + scalar_states:
                    if s in param_state:
                        slot.views[s].copy_(param_state[s])
                    param_state[s] = slot.views[s]
            slots.append(slot)
        return cls(kernel, scalar_states, list(params), slots, buffers, scalars)

    def survey(self, params: list[torch.Tensor], state: dict) -> tuple[int, ...] | None:
        """Where each parameter's gradient is (SKIP, ARENA, FRESH: anywhere else, or state still
        to create), or None when the arena is stale: a parameter or state tensor no longer lives
        in it. Runs every step, so it is cheap: one pass of identity and address checks (a state
        tensor that is not the arena's own view was put there by someone else)."""
        if len(params) != len(self.params) or not all(map(operator.is_, params, self.params)):
            return None
        wbase, gbase = self.buffers["weight"].data_ptr(), self.grad.data_ptr()
        names = self.kernel.tensor_states + self.scalar_states
        where = []
        for slot in self.slots:
            p = slot.param
            if p.data_ptr() != wbase + slot.ptr or p.shape != slot.shape:
                return None
            param_state = state.get(p)
            if param_state and names and not all(map(operator.is_, map(param_state.get, names),
                                                     slot.state_views)):
                return None
            g = p.grad
            if g is None:
                where.append(SKIP)
            elif g is slot.grad_view and g.data_ptr() == gbase + slot.ptr and \
                    (param_state or not names):
                where.append(ARENA)
            else:
                where.append(FRESH)
        return tuple(where)

    def advance(self, old: bytes, lr: float) -> dict[str, float]:
        """The uniform states' new values from their old ones (float32 bytes, in
        `scalar_states` order), as the reference semantics say. Memoised along a chain: a miss
        works out the next CHAIN steps at this lr, so a step counter costs a dict lookup a step,
        not a float32 tree walk under np.errstate (~10 us cold)."""
        key = (old, lr.hex())
        new = self.advanced.get(key)
        if new is None:
            if len(self.advanced) > 64 * CHAIN:
                self.advanced.clear()
            if self.uniform is None:
                program = self.kernel.plan.program
                self.uniform = tuple((s, getattr(program, s)) for s in self.scalar_states)
            # A steady lr (the usual case) is worth a chain; one that changes every step (a
            # per-step scheduler) is not.
            chain = CHAIN if key[1] == self.last_lr else 1
            self.last_lr = key[1]
            env = {s: np.float32(0.0) for s in STATES}
            env.update(zip(self.scalar_states, np.frombuffer(old, np.float32)))
            env["lr"] = np.float32(lr)
            state = old
            with np.errstate(all="ignore"):
                for _ in range(chain):
                    for s, delta in self.uniform:
                        env[s] = np.float32(env[s] - evaluate(delta, env))
                    values = {s: float(env[s]) for s in self.scalar_states}
                    self.advanced[(state, key[1])] = values
                    state = np.array([env[s] for s in self.scalar_states], np.float32).tobytes()
            new = self.advanced[key]
        return new

    def _call(self, start: int, end: int) -> Callable[..., None]:
        """A launch over a fixed arena range, its buffers sliced once: `call(lr, scalars,
        grad=None)`, where `grad` is a flat gradient outside the arena to read instead of the
        arena's. For numba, the generated function itself on cached numpy views: the kernel ABI
        (`kernel(weight, grad, *tensor states, lr, *scalar states)`) without UpdateKernel's
        per-call conversions, which cost as much as a small parameter's update."""
        names = ("weight", "grad") + self.kernel.tensor_states
        views = [self.buffers[n][start:end] for n in names]
        if self.kernel.backend == "numba":
            module, order = self.kernel.module, self.scalar_states
            weight, grad, *states = [v.numpy() for v in views]

            def call(lr: float, scalars: dict[str, float], outside: torch.Tensor | None = None
                     ) -> None:
                kernel_fn(module)(weight, grad if outside is None else outside.detach().numpy(), *states, lr,
                   *(scalars[s] for s in order))
            return call
        named = dict(zip(names[2:], views[2:]))
        return lambda lr, scalars, outside=None: self.kernel(
            views[0], views[1] if outside is None else outside, named, lr, scalars)

    def grad_slots(self, params: list[torch.Tensor]) -> set[int]:
        base = self.grad.data_ptr()
        return {i for i, slot in enumerate(self.slots) if slot.holds(slot.param.grad, base)}

    def step(self, state: dict, lr: float, where: tuple[int, ...]) -> None:
        """Find where each gradient is (creating missing state), then run the launch plan for
        that placement: one launch per run of neighbouring parameters that step together
        (gradient in the arena, same uniform states), one per large gradient outside it.

        Plans are cached by placement, so a step that looks like the last one (the common case,
        whichever zero_grad a loop uses) costs a few microseconds of Python per parameter on top
        of the launches: at 1.2M parameters in 8 tensors that bookkeeping was otherwise ~15% of
        the step."""
        outside: dict[int, torch.Tensor] = {}
        if FRESH in where:
            where, outside = self._place_gradients(state, where)
        scalars = self.scalars_np
        snapshot = scalars.tobytes()
        if snapshot != self.snapshot:  # not what the last step left: someone wrote the states
            self.groups = None
            if scalars.shape[0] and scalars.shape[1] > 1:
                bits = scalars.view(np.uint32)  # bitwise: NaN == NaN, -0 != 0
                if not (bits == bits[:, :1]).all():
                    columns: dict[bytes, int] = {}
                    self.groups = tuple(columns.setdefault(bits[:, i].tobytes(), len(columns))
                                        for i in range(bits.shape[1]))
        key = (where, self.groups)
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= MAX_PLANS:  # placements that keep changing: do not hoard
                self.plans.clear()
            plan = self.plans[key] = self._plan(where, self.groups)
        news = []
        for launch in plan.launches:
            new = self.advance(scalars[:, launch.first].tobytes(), lr) if self.scalar_states \
                else {}
            news.append(new)
        for launch, new in zip(plan.launches, news):
            if launch.end > launch.start:
                self.launch(launch, outside.get(launch.first), lr, new)
        for launch, new in zip(plan.launches, news):
            for k, s in enumerate(self.scalar_states):
                scalars[k, launch.first:launch.last + 1] = new[s]
        # After one launch over every parameter they all still agree; after anything else the
        # groups may have merged or split: count them again next step.
        whole = len(plan.params) == len(self.slots) and len(plan.launches) == 1
        self.snapshot = scalars.tobytes() if whole and self.groups is None else b""
        self.settled = True
        # torch's in-place ops bump the version counter; the kernels write behind its back.
        _bump_versions(plan.params)

    def launch(self, launch: _Launch, grad: torch.Tensor | None, lr: float,
               scalars: dict[str, float]) -> None:
        """One kernel launch; `grad` is the gradient when it lies outside the arena."""
        launch.call(lr, scalars, grad)

    def _place_gradients(self, state: dict, surveyed: tuple[int, ...]
                         ) -> tuple[tuple[int, ...], dict[int, torch.Tensor]]:
        """For the slots the survey found FRESH: copy a small gradient into the arena (ARENA),
        or leave a large one where it lies (OUTSIDE, returned by slot index as a flat view),
        and create the states of parameters that step the first time."""
        where, outside = list(surveyed), {}
        names = self.kernel.tensor_states + self.scalar_states
        base = self.grad.data_ptr()
        into, fresh, moved = [], [], []
        for slot, kind in zip(self.slots, surveyed):
            if kind != FRESH:
                continue
            p = slot.param
            g = p.grad
            where[slot.index] = ARENA
            if not slot.holds(g, base):
                _check_grad(p, g)
                if self.settled and slot.numel >= DIRECT_MIN and g.stride() == slot.stride:
                    outside[slot.index] = g.as_strided((slot.numel,), (1,), g.storage_offset())
                    where[slot.index] = OUTSIDE
                else:
                    into.append(slot.grad_view)
                    fresh.append(g)
                    moved.append(slot)
            param_state = state[p]  # a defaultdict: {} the first time
            # The survey has checked that a non-empty state holds all of the arena's views.
            if names and not param_state:
                for s in names:
                    param_state[s] = slot.views[s].zero_()
        if into:
            torch._foreach_copy_(into, fresh)  # one dispatch for all: ~5 us a tensor otherwise
            for slot in moved:
                slot.param.grad = slot.grad_view
        return tuple(where), outside

    def _plan(self, where: tuple[int, ...], groups: tuple[int, ...] | None) -> _Plan:
        launches: list[_Launch] = []
        for slot, kind in zip(self.slots, where):
            if kind == SKIP:
                continue
            group = 0 if groups is None else groups[slot.index]
            last = launches[-1] if launches else None
            if (kind == ARENA and last is not None and last.arena and last.group == group
                    and last.last == slot.index - 1):
                last.end = slot.offset + slot.numel  # the alignment gap between comes along
                last.last = slot.index
            else:
                launches.append(_Launch(slot.offset, slot.offset + slot.numel, slot.index,
                                        slot.index, group, kind == ARENA))
        for launch in launches:
            if launch.end > launch.start:
                launch.call = self._call(launch.start, launch.end)
        params = [self.slots[i].param for launch in launches
                  for i in range(launch.first, launch.last + 1)]
        return _Plan(launches, params)


SKIP, ARENA, FRESH, OUTSIDE = 0, 1, 2, 3
# Uniform-state steps worked out per memo miss (see _Arena.advance).
CHAIN = 64
# Launch plans kept per arena, one per gradient placement seen (usually one or two).
MAX_PLANS = 16


@dataclass
class _Launch:
    """One kernel launch over arena elements [start, end): parameters first..last, which share
    their uniform states; `arena` False means the one parameter's gradient lies outside."""

    start: int
    end: int
    first: int
    last: int
    group: int
    arena: bool
    call: Callable[..., None] | None = None  # (lr, scalars, grad outside the arena or None)


@dataclass
class _Plan:
    launches: list[_Launch]
    params: list[torch.Tensor]  # those that step


def _bump_versions(params: list[torch.Tensor]) -> None:
    try:
        torch.autograd.graph.increment_version(params)  # a list at once (recent torch)
    except TypeError:
        for p in params:  # torch versions whose increment_version takes one tensor
            torch.autograd.graph.increment_version(p)


def _check_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError(f"EvolvedOptimizer needs dense gradients, got a {g.layout} gradient for a "
                        f"parameter of shape {tuple(p.shape)}: use dense gradients (e.g. "
                        "nn.Embedding(..., sparse=False)) or torch.optim.SparseAdam for this one")
    if g.dtype != torch.float32 or g.device != p.device or g.shape != p.shape:
        raise TypeError(f"a gradient must match its float32 parameter: got {g.dtype} "
                        f"{tuple(g.shape)} on {g.device} for a parameter of shape "
                        f"{tuple(p.shape)} on {p.device}")

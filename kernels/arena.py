"""The arena behind EvolvedOptimizer: one param group's flat buffers, and its step.

Layout ("arena"): per param group, the parameters' `.data` become views of one flat buffer (of
their dtype: one per group), and so do their gradients and every tensor state of the program (of
the kernel's compute dtype: float32, or float64 for float64 parameters). The generated kernels are
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
  (set_to_none=True, torch's default) backward makes fresh gradient tensors instead, and the step
  reads each where it lies: with numba's threads, one `kernel_multi` launch over the whole group
  takes a table of (arena range, gradient address) rows, so fresh gradients cost no copy and no
  launch each (a launch wakes the threads: ~10 us, often a scheduler quantum on a busy machine).
  In a one-thread process a launch is cheap: a small gradient (under DIRECT_MIN elements) is
  copied into the arena and `p.grad` rebound to the arena view, a large one gets a launch of its
  own where it lies. The first step after the arena is built copies every gradient in, so that a
  `set_to_none=False` loop settles into one launch a step.
  Keeping the arena's gradients alive across `zero_grad()` (one memset instead of fresh tensors)
  was the other way to one launch, and was left out: torch promises `p.grad is None` afterwards,
  and code relies on it (a parameter that backward did not reach keeps a None gradient and is
  skipped; Adam with a zero gradient would still move it).
* Anything that moves a parameter or a state tensor out of the arena (`p.data = ...`, `model.to()`
  onto another device, `load_state_dict`) is noticed at the next step, which rebuilds the arena.

Per-step cost: each step first *surveys* the group (identity and address checks, no tensor
work), and the launches for what it finds (which gradients are where, which counters agree) come
from a plan cached per such placement; step counters advance through a memo. On the reference
CNN (8 tensors) that keeps the Python around the kernel near 60 us (warm caches).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from codegen import backends
from kernels.runtime import UpdateKernel

__all__ = ["ALIGN", "DIRECT_MIN", "Arena", "host_scalar"]

# In a one-thread process, a gradient outside the arena with at least this many elements gets a
# launch of its own instead of a copy into the arena: copying costs a read and a write of it
# (~8 bytes an element), a launch ~10-20 us; they break even near 2**16 elements on a 2-core CPU.
DIRECT_MIN = 1 << 16
# Each parameter starts on a 64-byte boundary of the arena (16 float32): cache lines on the CPU,
# and the alignment cuBLAS/cuDNN and Triton's vectorised loads want on a GPU. The few elements in
# between belong to no parameter; launches sweep over them harmlessly.
ALIGN_BYTES = 64
ALIGN = ALIGN_BYTES // 4  # in float32 elements


def host_scalar(value: float) -> torch.Tensor:
    """A uniform state as the optimizer's state holds it: 0-d float32 on the host."""
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
class Arena:
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
    options: tuple[bool, bool] = (False, False)  # the kernel's (maximize, decay)

    @property
    def grad(self) -> torch.Tensor:
        return self.buffers["grad"]

    def __post_init__(self) -> None:
        # numpy reads and writes a few floats in well under a microsecond; torch indexing costs
        # several. Shares memory with `scalars` and so with the 0-d tensors in `state[p]`.
        self.scalars_np: np.ndarray = self.scalars.numpy()
        self.options = (self.kernel.plan.maximize, self.kernel.plan.decay)

    def use(self, kernel: UpdateKernel) -> None:
        """Run another variant of the program's kernel (maximize or weight decay switched on or
        off by the user): same states and layout, so only the launch plans go."""
        self.kernel = kernel
        self.options = (kernel.plan.maximize, kernel.plan.decay)
        self.plans.clear()

    @classmethod
    def build(cls, params: list[torch.Tensor], state: dict, kernel: UpdateKernel,
              scalar_states: tuple[str, ...]) -> "Arena":
        device, dtype = params[0].device, params[0].dtype
        itemsize = params[0].element_size()
        align = ALIGN_BYTES // itemsize
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total = -(-(total + p.numel()) // align) * align
        names = ("weight", "grad") + kernel.tensor_states
        state_dtype = getattr(torch, kernel.plan.compute_dtype)
        buffers = {n: torch.zeros(total, dtype=dtype if n in ("weight", "grad") else state_dtype,
                                  device=device) for n in names}
        # The uniform states of every parameter, on the host: row k holds scalar state k.
        scalars = torch.zeros((len(scalar_states), len(params)), dtype=torch.float32)
        slots = []
        for index, (p, offset) in enumerate(zip(params, offsets)):
            slot = _Slot(p, index, offset, p.numel(), p.shape, _dense_strides(p),
                         ptr=itemsize * offset)
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
            # A steady lr (the usual case) is worth a chain; one that changes every step (a
            # per-step scheduler) is not.
            chain = CHAIN if key[1] == self.last_lr else 1
            self.last_lr = key[1]
            state = old
            start = dict(zip(self.scalar_states, map(float, np.frombuffer(old, np.float32))))
            for values in self.kernel.stepper.chain(start, lr, chain):
                self.advanced[(state, key[1])] = values
                state = np.array([values[s] for s in self.scalar_states], np.float32).tobytes()
            new = self.advanced[key]
        return new

    def _call(self, start: int, end: int) -> Callable[..., None]:
        """A launch over a fixed arena range, its buffers sliced once: `call(lr, scalars,
        grad=None, extra=())`, where `grad` is a flat gradient outside the arena to read instead
        of the arena's and `extra` is `(decay,)` for a decay kernel. For a backend on host arrays
        (numba: its `host`), the generated
        function itself on cached numpy views: the kernel ABI (`kernel(weight, grad, *tensor
        states, lr, *scalar states, [decay])`) without UpdateKernel's per-call conversions, which
        cost as much as a small parameter's update."""
        names = ("weight", "grad") + self.kernel.tensor_states
        views = [self.buffers[n][start:end] for n in names]
        spec = backends.get(self.kernel.backend)
        if spec.host is not None:
            module, order, host, entry = (self.kernel.module, self.scalar_states, spec.host,
                                          spec.entry)
            weight, grad, *states = [host(v) for v in views]

            def call(lr: float, scalars: dict[str, float], outside: torch.Tensor | None = None,
                     extra: tuple[float, ...] = ()) -> None:
                g = grad if outside is None else host(outside)
                entry(module)(weight, g, *states, lr, *(scalars[s] for s in order), *extra)
            return call
        named = dict(zip(names[2:], views[2:]))
        kernel = self.kernel
        return lambda lr, scalars, outside=None, extra=(): kernel(
            views[0], views[1] if outside is None else outside, named, lr, scalars, *extra)

    def grad_slots(self, params: list[torch.Tensor]) -> set[int]:
        base = self.grad.data_ptr()
        return {i for i, slot in enumerate(self.slots) if slot.holds(slot.param.grad, base)}

    def step(self, state: dict, lr: float, where: tuple[int, ...],
             extra: tuple[float, ...] = ()) -> None:
        """Given the survey's `where`, place fresh gradients (creating missing state), then run
        the launch plan for that placement: one launch per run of neighbouring parameters that
        step together (gradient in the arena, same uniform states), one per large gradient
        outside it; or, with numba's threads and gradients outside the arena, one multi launch
        per set of parameters with the same uniform states. `extra` is the decay kernel's
        `(decay,)`, else empty.

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
        for launch in plan.launches:  # each reads and writes only its own parameters' states
            new = self.advance(scalars[:, launch.first].tobytes(), lr) if self.scalar_states \
                else {}
            if launch.parts:
                self.launch(launch, outside, lr, new, extra)
            elif launch.end > launch.start:
                self.launch(launch, _flat(outside.get(launch.first)), lr, new, extra)
            for k, s in enumerate(self.scalar_states):
                scalars[k, launch.members] = new[s]
        # After one launch over every parameter they all still agree; after anything else the
        # groups may have merged or split: count them again next step.
        whole = len(plan.params) == len(self.slots) and len(plan.launches) == 1
        self.snapshot = scalars.tobytes() if whole and self.groups is None else b""
        self.settled = True
        # torch's in-place ops bump the version counter; the kernels write behind its back.
        _bump_versions(plan.params)

    def launch(self, launch: _Launch, grad: torch.Tensor | None, lr: float,
               scalars: dict[str, float], extra: tuple[float, ...] = ()) -> None:
        """One kernel launch; `grad` is the gradient when it lies outside the arena (a multi
        launch finds its own gradients in `grad`, the slot -> gradient dict)."""
        launch.call(lr, scalars, grad, extra)

    def _place_gradients(self, state: dict, surveyed: tuple[int, ...]
                         ) -> tuple[tuple[int, ...], dict[int, torch.Tensor]]:
        """For the slots the survey found FRESH: copy a small gradient into the arena (ARENA),
        or leave a large one, or any when a multi launch will read it, where it lies (OUTSIDE,
        returned by slot index), and create the states of parameters that step the first time."""
        where, outside = list(surveyed), {}
        names = self.kernel.tensor_states + self.scalar_states
        base = self.grad.data_ptr()
        into, fresh, moved = [], [], []
        multi = self.settled and self.multi()  # then no gradient is worth a copy
        for slot, kind in zip(self.slots, surveyed):
            if kind != FRESH:
                continue
            p = slot.param
            g = p.grad
            where[slot.index] = ARENA
            if not slot.holds(g, base):
                _check_grad(p, g)
                if self.settled and g.stride() == slot.stride and (
                        slot.numel >= DIRECT_MIN or multi):
                    outside[slot.index] = g
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
            launch.members = slice(launch.first, launch.last + 1)
        if self.multi() and not all(launch.arena for launch in launches):
            launches = _merge(launches)
        for launch in launches:
            if launch.parts:
                launch.call = self._multi_call(launch.parts)
            elif launch.end > launch.start:
                launch.call = self._call(launch.start, launch.end)
        params = [self.slots[i].param for launch in launches for i in _indices(launch)]
        return _Plan(launches, params)

    def multi(self) -> bool:
        """Whether gradients spread over several tensors take one `kernel_multi` launch: numba
        running threads (where every launch wakes them: ~10 us, often a scheduler quantum on a
        busy machine). A one-thread process keeps a launch per tensor, which costs it little,
        and never compiles the parallel multi kernel."""
        return backends.get(self.kernel.backend).multi(self.kernel.module)

    def _multi_call(self, parts: list[_Launch]) -> Callable[..., None]:
        """One `kernel_multi` launch over `parts` (arena ranges and gradients outside it),
        cut into CHUNK-element rows so that the threads share the work evenly. The rows' ranges
        are fixed; their gradient addresses are filled in at each call."""
        itemsize = self.buffers["weight"].element_size()
        rows, owner, delta = [], [], []
        for k, part in enumerate(parts):
            for lo in range(part.start, part.end, CHUNK):
                rows.append((lo, min(lo + CHUNK, part.end), 0))
                owner.append(k)
                delta.append((lo - part.start) * itemsize)
        chunks = np.array(rows, np.int64).reshape(-1, 3)
        owner_np, delta_np = np.array(owner, np.intp), np.array(delta, np.int64)
        gbase = self.grad.data_ptr()
        bases = [(part.first, gbase + part.start * itemsize if part.arena else 0)
                 for part in parts]
        kernel, order = self.kernel.module.kernel_multi, self.scalar_states
        host = backends.get(self.kernel.backend).host
        weight, *states = [host(self.buffers[n]) for n in ("weight",) + self.kernel.tensor_states]

        def call(lr: float, scalars: dict[str, float], outside: dict[int, torch.Tensor],
                 extra: tuple[float, ...] = ()) -> None:
            # The gradients outside stay alive in `outside` (and as `.grad`) through the launch.
            at = np.array([base or outside[first].data_ptr() for first, base in bases], np.int64)
            np.add(at[owner_np], delta_np, out=chunks[:, 2])
            kernel(chunks, weight, *states, lr, *(scalars[s] for s in order), *extra)
        return call


SKIP, ARENA, FRESH, OUTSIDE = 0, 1, 2, 3
# Elements per row of a multi launch: rows are what the threads share out.
CHUNK = 1 << 14
# Uniform-state steps worked out per memo miss (see Arena.advance).
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
    call: Callable[..., None] | None = None  # (lr, scalars, grad outside or None, extra)
    members: slice | list[int] = field(default_factory=list)  # the parameters it steps
    parts: list["_Launch"] = field(default_factory=list)  # a multi launch's ranges


def _merge(launches: list[_Launch]) -> list[_Launch]:
    """One multi launch for each set of launches that share uniform states (usually all of
    them), instead of a launch per gradient tensor; a lone arena run keeps its plain launch."""
    groups: dict[int, list[_Launch]] = {}
    for launch in launches:
        groups.setdefault(launch.group, []).append(launch)
    merged = []
    for group, parts in groups.items():
        if len(parts) == 1 and parts[0].arena:
            merged.append(parts[0])
            continue
        parts = [part for part in parts if part.end > part.start]
        members = [i for part in launches if part.group == group
                   for i in range(part.first, part.last + 1)]
        merged.append(_Launch(min((p.start for p in parts), default=0),
                              max((p.end for p in parts), default=0), members[0], members[-1],
                              group, False, members=members, parts=parts))
    return merged


def _indices(launch: _Launch) -> range | list[int]:
    members = launch.members
    return range(members.start, members.stop) if isinstance(members, slice) else members


def _flat(g: torch.Tensor | None) -> torch.Tensor | None:
    # A gradient with its slot's dense strides, as the flat range the kernel reads.
    return None if g is None else g.as_strided((g.numel(),), (1,), g.storage_offset())


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
    if g.dtype != p.dtype or g.device != p.device or g.shape != p.shape:
        raise TypeError(f"a gradient must match its parameter: got {g.dtype} {tuple(g.shape)} on "
                        f"{g.device} for a {p.dtype} parameter of shape {tuple(p.shape)} on "
                        f"{p.device}")

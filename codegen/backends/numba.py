"""Numba backend: one `@njit(parallel=True)` prange loop over the flat float32 buffers, and the
same loop without threads for one-thread processes (`kernel_fn` picks).

`error_model='numpy'` so that division and sqrt give IEEE results instead of raising, and no
`fastmath`: it assumes no NaN/inf, which would break divide-no-NaN and NaN propagation.
Every value has the plan's compute dtype (`f32(...)` around constants and scalars; `f64(...)` in a
float64 module): a bare Python float would promote a float32
expression to float64 and halve the throughput. Numba has no float16/bfloat16 arithmetic, so those
plans are the torch and Triton backends'.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, Sequence

from codegen.backends.base import Backend, Launch
from codegen.ir import Const, Program
from codegen.lower import Assign, KernelPlan, literal, lower

# op -> expression template over rendered operands; all scalar float32.
TEMPLATES: dict[str, str] = {
    "neg": "-{0}",
    "add": "{0} + {1}",
    "sub": "{0} - {1}",
    "mul": "{0} * {1}",
    "div": "{0} / {1} if {1} != ZERO else ZERO",
    "pow": "_pow({0}, {1})",
    "square": "{0} * {0}",
    "sqrt": "np.sqrt({0})",
    "abs": "abs({0})",
    "sign": "_sign({0})",
    "exp": "np.exp({0})",
    "log": "np.log({0})",
    "min": "_fmin({0}, {1})",
    "max": "_fmax({0}, {1})",
}

PRELUDE = '''\
import numba
import numpy as np
from numpy import float32 as f32

ZERO = f32(0.0)
INF = f32(np.inf)
NAN = f32(np.nan)


@numba.njit(inline="always", error_model="numpy")
def _fmin(a, b):
    # NaN-propagating, like torch.minimum (Python's min would drop a NaN in `b`).
    return a if (a < b or a != a) else b


@numba.njit(inline="always", error_model="numpy")
def _fmax(a, b):
    return a if (a > b or a != a) else b


@numba.njit(inline="always", error_model="numpy")
def _pow(a, b):
    # C's pow. Numba's scalar ** gives -inf for (-inf) ** y with y not an integer; C says +inf
    # for y > 0 and +0 for y < 0. The vectorised path is right, so only this case is patched.
    if a == -INF and b != np.floor(b) and b - b == ZERO:
        return INF if b > ZERO else ZERO
    return a ** b


@numba.njit(inline="always", error_model="numpy")
def _sign(a):
    # sign(NaN) = NaN and sign(+-0) = +0, as numpy defines it: a - a is NaN for NaN and +0 for
    # either zero (returning `a` kept -0's sign, which pow(sign(x), -1) turns into -inf).
    return f32(1.0) if a > 0 else (f32(-1.0) if a < 0 else a - a)
'''

# For `kernel_multi` only, apart from PRELUDE (the math every kernel needs, which the standalone
# best_optimizer.py embeds too): a pointer made from a raw gradient address.
POINTERS = '''\
from numba.core import types as _types
from numba.core.extending import intrinsic as _intrinsic


@_intrinsic
def _at(typingctx, address, like):
    # A pointer to `like`'s element type at a raw address (a gradient the caller keeps alive).
    pointer = _types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))
    return pointer(_types.int64, like), codegen
'''


def _const(c: Const, real: str = "f32") -> str:
    text = literal(c.value, wide=real == "f64")
    return {"nan": "NAN", "inf": "INF", "-inf": "-INF"}.get(text, f"{real}({text})")


def _render(step: Assign, real: str = "f32") -> str:
    args = [_const(a, real) if isinstance(a, Const) else a for a in step.args]
    return f"{step.name} = {TEMPLATES[step.op].format(*args)}"


def emit(program: Program | KernelPlan) -> str:
    """The source of a module defining `kernel(weight, grad, *tensor_states, lr, *scalar_states)`
    over 1-D numpy arrays of the plan's dtype (float32 or float64), `kernel_serial` (the same
    without threads), plus TENSOR_STATES / SCALAR_STATES."""
    plan = program if isinstance(program, KernelPlan) else lower(program)
    if plan.dtype not in ("float32", "float64"):
        raise ValueError(f"the numba backend has no {plan.dtype} arithmetic")
    buffers = ("weight", "grad") + plan.tensor_states
    params = [f"{b}_buf" for b in buffers] + list(plan.scalars)
    real = "f64" if plan.dtype == "float64" else "f32"
    prelude = PRELUDE.replace("float32 as f32", f"{plan.dtype} as {real}").replace("f32(", real + "(")
    out = ["# " + line for line in plan.header("numba")]
    out += ["", prelude, "", POINTERS, "", f"TENSOR_STATES = {plan.tensor_states!r}",
            f"SCALAR_STATES = {plan.scalar_states!r}", f"SCALARS = {plan.scalars!r}", "", ""]
    # Two copies of one loop: `kernel` splits it over Numba's threads; `kernel_serial` is for
    # processes that run one thread (evaluation workers), where prange has nothing to share and
    # the parallel version costs ~2.4x the compile time (Numba's parfors passes). The body is
    # written out twice rather than shared through an inline helper, which costs ~35% more
    # compile time in both.
    for name, decorator, loop in (
            ("kernel", "parallel=True, ", "numba.prange"), ("kernel_serial", "", "range")):
        out.append(f'@numba.njit({decorator}error_model="numpy", cache=True)')
        out.append(f"def {name}({', '.join(params)}):")
        for scalar in plan.scalars:
            out.append(f"    {scalar} = {real}({scalar})")
        out.append(f"    for i in {loop}(weight_buf.shape[0]):")
        out += plan.body("        ", "{name} = {name}_buf[i]", lambda step: _render(step, real),
                         "{name}_buf[i] = {name}")
        out += ["", ""]
    out += _multi(plan, real)
    out += ["", ""] + _segments(plan)
    return "\n".join(out) + "\n"


def _multi(plan: KernelPlan, real: str) -> list[str]:
    """`kernel_multi(chunks, weight, *tensor_states, lr, *scalar_states)`: one parallel launch
    over several arena ranges, each reading its gradient wherever it lies: row `c` of the int64
    `chunks` is (start, end, address of the gradient of element `start`). The arena's caller
    uses it when gradients are spread over several tensors (torch's default `zero_grad()`), so
    that those tensors cost no copy and no launch each. Compiled on its first call only."""
    buffers = ("weight",) + plan.tensor_states
    params = ["_chunks"] + [f"{b}_all" for b in buffers] + list(plan.scalars)
    out = ['@numba.njit(parallel=True, error_model="numpy", cache=True)',
           f"def kernel_multi({', '.join(params)}):"]
    out += [f"    {scalar} = {real}({scalar})" for scalar in plan.scalars]
    out += ["    for _c in numba.prange(_chunks.shape[0]):",
            "        _start = _chunks[_c, 0]",
            "        _end = _chunks[_c, 1]",
            "        grad_buf = numba.carray(_at(_chunks[_c, 2], weight_all), _end - _start)"]
    out += [f"        {b}_buf = {b}_all[_start:_end]" for b in buffers]
    out.append("        for i in range(_end - _start):")
    out += plan.body("            ", "{name} = {name}_buf[i]", lambda step: _render(step, real),
                     "{name}_buf[i] = {name}")
    return out


def _segments(plan: KernelPlan) -> list[str]:
    """`kernel_segments(segments, values, weight, grad, *tensor_states)`: one launch over
    several ranges of flat buffers, each with its own scalars. Row `s` of the int64 `segments`
    is (start, end); row `s` of `values` (the compute dtype) is that range's `lr`, uniform
    states (and `decay`), in SCALARS order. Why: the same program at several learning rates (or
    seeds with their own step counters) is then one launch, not one per lr. Serial, because its
    callers (population-batched training) run in one-thread workers, where a parallel loop only
    costs compile time; compiled on its first call only."""
    buffers = ("weight", "grad") + plan.tensor_states
    out = ['@numba.njit(error_model="numpy", cache=True)',
           f"def kernel_segments(_segments, _values, {', '.join(b + '_all' for b in buffers)}):",
           "    for _s in range(_segments.shape[0]):",
           "        _start = _segments[_s, 0]",
           "        _end = _segments[_s, 1]"]
    out += [f"        {scalar} = _values[_s, {j}]" for j, scalar in enumerate(plan.scalars)]
    out += [f"        {b}_buf = {b}_all[_start:_end]" for b in buffers]
    out.append("        for i in range(_end - _start):")
    real = "f64" if plan.dtype == "float64" else "f32"
    out += plan.body("            ", "{name} = {name}_buf[i]", lambda step: _render(step, real),
                     "{name}_buf[i] = {name}")
    return out


def kernel_fn(module: object) -> Callable[..., None]:
    """The loop to call in this thread: the serial one when Numba runs one thread here."""
    import numba

    return module.kernel_serial if numba.get_num_threads() == 1 else module.kernel


def available(device: str | None) -> bool:
    """CPU tensors, when numba is installed."""
    return device in (None, "cpu") and importlib.util.find_spec("numba") is not None


def host(t: Any) -> Any:
    return t.detach().numpy()


def launcher(module: object, plan: KernelPlan) -> Launch:
    """The kernel over numpy views of the tensors, after checking each is what the loop reads."""
    def launch(buffers: Sequence[Any], values: Sequence[float]) -> None:
        kernel_fn(module)(*(_as_numpy(b, plan) for b in buffers), *values)
    return launch


def _as_numpy(t: Any, plan: KernelPlan) -> Any:
    import torch

    want = getattr(torch, plan.dtype)
    if t.device.type != "cpu" or t.dtype != want or not t.is_contiguous():
        raise TypeError(f"this numba kernel needs contiguous {plan.dtype} CPU tensors, got "
                        f"{t.dtype} on {t.device} (contiguous={t.is_contiguous()})")
    return t.detach().numpy().reshape(-1)


def multi(module: object) -> bool:
    """Numba running threads, where every launch wakes them (~10 us, often a scheduler quantum
    on a busy machine): one `kernel_multi` launch then beats a launch per tensor. A one-thread
    process never compiles the parallel multi kernel."""
    import numba

    return numba.get_num_threads() > 1 and hasattr(module, "kernel_multi")


BACKEND = Backend(
    name="numba", rank=0, templates=TEMPLATES, emit=emit,
    dtypes=("float32", "float64"),  # no float16/bfloat16 arithmetic on the CPU
    native=("cpu",), available=available,
    runs_on="CPU tensors", instead="use backend='triton' (CUDA) or backend='torch'",
    missing="the numba backend needs the numba package: install it, or use backend='torch'",
    launcher=launcher, entry=kernel_fn, host=host, multi=multi)

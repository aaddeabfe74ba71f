"""Triton backend: one `@triton.jit` kernel, masked loads and stores, one pass over memory.

Only `tl` functions are used: libdevice calls fail in the interpreter (TRITON_INTERPRET=1), which
is how the CPU tests run these kernels. Triton has no pow that works there, so `_pow` builds C's
pow from exp2/log2 with the sign and special cases spelled out.

float16/bfloat16 weights and gradients are widened to float32 on load, and the store rounds the
weight back once (to nearest even on a GPU; Triton's interpreter truncates to bfloat16, so on the
CPU a bfloat16 weight can land one unit in the last place off torch's); a float64 plan computes in float64, its scalar arguments typed float64 (Triton would
otherwise pass a Python float as float32).
"""

from __future__ import annotations

import os
from typing import Callable

from codegen.backends.base import Backend
from codegen.ir import Const, Program
from codegen.lower import Assign, KernelPlan, literal, lower

TEMPLATES: dict[str, str] = {
    "neg": "-{0}",
    "add": "{0} + {1}",
    "sub": "{0} - {1}",
    "mul": "{0} * {1}",
    "div": "tl.where({1} == 0.0, 0.0, {0} / {1})",
    "pow": "_pow({0}, {1})",
    "square": "{0} * {0}",
    "sqrt": "tl.sqrt_rn({0})",
    "abs": "tl.abs({0})",
    # {0} - {0}: NaN stays NaN and either zero gives +0, as numpy's sign (not -0).
    "sign": "tl.where({0} > 0.0, 1.0, tl.where({0} < 0.0, -1.0, {0} - {0}))",
    "exp": "tl.exp({0})",
    "log": "tl.log({0})",
    # NaN-propagating min/max (torch.minimum semantics); tl.minimum's default drops NaNs.
    "min": "tl.where(({0} < {1}) | ({0} != {0}), {0}, {1})",
    "max": "tl.where(({0} > {1}) | ({0} != {0}), {0}, {1})",
}

PRELUDE = '''\
import torch
import triton
import triton.language as tl

BLOCK = 1024
# jit functions may only read globals that are constexpr. NaN is written inline as float("nan"),
# never as a global: Triton re-checks a global's value on every new specialisation of a kernel,
# and NaN != NaN made it refuse the second compile ("Global variable NAN has changed").
INF: tl.constexpr = tl.constexpr(float("inf"))


@triton.jit
def _pow(a, b):
    # C's pow from exp2/log2: |a|**b, then the sign for negative bases with odd integer b,
    # NaN for negative bases with non-integer b, and C's special cases.
    mag = tl.exp2(b * tl.log2(tl.abs(a)))
    b_int = tl.floor(b) == b
    b_odd = b_int & ((b - 2.0 * tl.floor(0.5 * b)) == 1.0)
    neg_base = (a < 0.0) | ((a == 0.0) & ((1.0 / a) < 0.0))  # includes -0.0
    r = tl.where(neg_base & b_odd, -mag, mag)
    r = tl.where((a < 0.0) & (a > -INF) & (b == b) & ~b_int, float("nan"), r)
    r = tl.where((a == -INF) & ~b_int & (b == b), tl.where(b > 0.0, INF, 0.0), r)
    r = tl.where((a == -1.0) & (tl.abs(b) == INF), 1.0, r)
    return tl.where((b == 0.0) | (a == 1.0), 1.0, r)
'''


def _const_name(index: int) -> str:
    return f"c{index}"


def emit(program: Program | KernelPlan) -> str:
    """The source of a module with `kernel(weight, grad, *tensor_states, lr, *scalar_states)`
    (and `decay` last, for a decay plan) over 1-D contiguous torch tensors (CUDA, or CPU under
    TRITON_INTERPRET=1): the weight and grad of the plan's dtype, the states of its compute
    dtype."""
    plan = program if isinstance(program, KernelPlan) else lower(program)
    buffers = ("weight", "grad") + plan.tensor_states
    scalars = plan.scalars
    real = f"tl.{plan.compute_dtype}"
    typed = plan.compute_dtype == "float64"
    consts = {c: _const_name(i) for i, c in enumerate(plan.constants)}

    def render(step: Assign) -> str:
        args = [consts[a] if isinstance(a, Const) else a for a in step.args]
        template = TEMPLATES[step.op]
        if typed:  # sqrt_rn is float32 only; float64 sqrt is correctly rounded as it is
            template = template.replace("tl.sqrt_rn(", "tl.sqrt(")
        return f"{step.name} = {template.format(*args)}"

    out = ["# " + line for line in plan.header("triton")]
    out += ["", PRELUDE, f"TENSOR_STATES = {plan.tensor_states!r}",
            f"SCALAR_STATES = {plan.scalar_states!r}", f"SCALARS = {scalars!r}", "", ""]
    def update(name: str, params: list[str], head: list[str], value: Callable[[int, str], str]
               ) -> None:
        # One jit function: `head` sets `offsets` and `mask`; scalar j becomes value(j, name).
        out.append("@triton.jit")
        out.append(f"def {name}({', '.join(params + ['BLOCK_SIZE: tl.constexpr'])}):")
        out.extend("    " + line for line in head)
        for j, scalar in enumerate(scalars):
            # Scalars and constants as blocks of the compute dtype: every op sees same-shaped
            # tensors. (times ones, not plus zeros: -0.0 + 0.0 would lose the sign of zero)
            out.append(f"    {scalar} = tl.full((BLOCK_SIZE,), 1.0, {real}) * {value(j, scalar)}")
        for const, cname in consts.items():
            text = literal(const.value, wide=typed)
            text = {"inf": "INF", "-inf": "-INF", "nan": 'float("nan")'}.get(text, text)
            out.append(f"    {cname} = tl.full((BLOCK_SIZE,), {text}, {real})")
        out.extend(plan.body(
            "    ", "{name} = tl.load({name}_ptr + offsets, mask=mask)", render,
            "tl.store({name}_ptr + offsets, {name}, mask=mask)",
            widen="{name} = tl.load({name}_ptr + offsets, mask=mask).to(tl.float32)"))
        out.extend(["", ""])

    pointers = [f"{b}_ptr" for b in buffers]
    update("_update", pointers + [f"{s}: tl.float64" if typed else s for s in scalars] + ["n"],
           ["offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)",
            "mask = offsets < n"], lambda j, scalar: scalar)
    # Per-segment scalars: program (i, s) covers block i of segment s, whose range is row s of
    # `segments` and whose lr, uniform states (and decay) are row s of `values`.
    update("_update_segments", ["segments_ptr", "values_ptr", *pointers, "N_VALUES"],
           ["segment = tl.program_id(1).to(tl.int64)",
            "start = tl.load(segments_ptr + 2 * segment)",
            "end = tl.load(segments_ptr + 2 * segment + 1)",
            "offsets = start + tl.program_id(0).to(tl.int64) * BLOCK_SIZE"
            " + tl.arange(0, BLOCK_SIZE)",
            "mask = offsets < end"],
           lambda j, scalar: f"tl.load(values_ptr + segment * N_VALUES + {j})")
    out += _launchers(buffers, scalars)
    return "\n".join(out) + "\n"


def _launchers(buffers: tuple[str, ...], scalars: tuple[str, ...]) -> list[str]:
    """The host-side `kernel` and `kernel_segments` that launch the two jit functions."""
    call_args = ", ".join([*buffers, *(f"float({s})" for s in scalars), "n"])
    return [
        f"def kernel({', '.join(buffers + scalars)}):",
        "    n = weight.numel()",
        "    grid = (triton.cdiv(n, BLOCK),)",
        f"    _update[grid]({call_args}, BLOCK_SIZE=BLOCK)",
        "", "",
        f"def kernel_segments(segments, values, {', '.join(buffers)}):",
        "    # segments: int64 (S, 2) rows (start, end); values: (S, len(SCALARS)) of the "
        "compute dtype; both on the buffers' device.",
        "    if segments.shape[0] == 0:",
        "        return",
        "    longest = int((segments[:, 1] - segments[:, 0]).max())",
        "    grid = (max(1, triton.cdiv(longest, BLOCK)), segments.shape[0])",
        f"    _update_segments[grid](segments, values, {', '.join(buffers)}, "
        "values.shape[1], BLOCK_SIZE=BLOCK)",
    ]


def available(device: str | None) -> bool:
    """CUDA tensors (device None: a CUDA device present), or any under TRITON_INTERPRET=1, which
    must be set before triton is first imported."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if device is None:
        from codegen.backends import cuda_present

        return cuda_present()
    return device == "cuda"


BACKEND = Backend(
    name="triton", rank=1, templates=TEMPLATES, emit=emit,
    dtypes=("float32", "float64", "float16", "bfloat16"), native=("cuda",), available=available,
    runs_on="CUDA tensors",
    instead="use backend='numba' on the CPU (or set TRITON_INTERPRET=1 before importing triton "
            "to run it, slowly, in its interpreter)",
    missing="the triton backend needs a CUDA device; on the CPU use backend='numba', or set "
            "TRITON_INTERPRET=1 before importing triton to run it (slowly) in the interpreter")

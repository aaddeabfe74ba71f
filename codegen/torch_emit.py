"""torch backend: the reference implementation in eager elementwise ops.

No compile step and exact float32 semantics; slow (one pass over memory per op), which is why the
Numba and Triton backends exist. `torch.sign(NaN)` is 0, so sign is special-cased to keep NaN.
"""

from __future__ import annotations

from codegen.ir import Const, Program, format_float
from codegen.lower import Assign, KernelPlan, lower

TEMPLATES: dict[str, str] = {
    "neg": "torch.neg({0})",
    "add": "torch.add({0}, {1})",
    "sub": "torch.sub({0}, {1})",
    "mul": "torch.mul({0}, {1})",
    "div": "torch.where({1} == 0, 0.0, torch.div({0}, {1}))",
    "pow": "torch.pow({0}, {1})",
    "square": "torch.mul({0}, {0})",
    "sqrt": "torch.sqrt({0})",
    "abs": "torch.abs({0})",
    "sign": "torch.where(torch.isnan({0}), {0}, torch.sign({0}))",
    "exp": "torch.exp({0})",
    "log": "torch.log({0})",
    "min": "torch.minimum({0}, {1})",
    "max": "torch.maximum({0}, {1})",
}


def emit(program: Program | KernelPlan) -> str:
    """The source of a module with `kernel(weight, grad, *tensor_states, lr, *scalar_states)`
    over float32 torch tensors of one shape, on any device."""
    plan = program if isinstance(program, KernelPlan) else lower(program)
    buffers = ("weight", "grad") + plan.tensor_states
    scalars = ("lr",) + plan.scalar_states
    consts = {c: f"c{i}" for i, c in enumerate(plan.constants)}

    def render(step: Assign) -> str:
        args = [consts[a] if isinstance(a, Const) else a for a in step.args]
        return f"{step.name} = {TEMPLATES[step.op].format(*args)}"

    out = ["# " + line for line in plan.header("torch")]
    out += ["", "import torch", "", f"TENSOR_STATES = {plan.tensor_states!r}",
            f"SCALAR_STATES = {plan.scalar_states!r}", "", ""]
    out.append(f"def kernel({', '.join(f'{b}_buf' for b in buffers)}, {', '.join(scalars)}):")
    out.append("    def scalar(value):")
    out.append("        # 0-d float32 tensors: every op sees tensors, so float32 semantics hold.")
    out.append("        return torch.full((), value, dtype=torch.float32, device=weight_buf.device)")
    out.append("")
    out += [f"    {s} = scalar({s})" for s in scalars]
    for const, name in consts.items():
        text = format_float(const.value)
        literal = f"float({text!r})" if text in ("nan", "inf", "-inf") else text
        out.append(f"    {name} = scalar({literal})")
    out += plan.body("    ", "{name} = {name}_buf", render, "{name}_buf.copy_({name})")
    return "\n".join(out) + "\n"

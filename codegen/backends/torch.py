"""torch backend: the reference implementation in eager elementwise ops.

No compile step and exact float32 (or float64) semantics; slow (one pass over memory per op),
which is why the Numba and Triton backends exist. `torch.sign(NaN)` is 0, so sign is special-cased
to keep NaN. One kernel serves every dtype of DTYPES, on any device, deciding at run time (so the
standalone best_optimizer.py gets them all from one function): float64 weights compute in float64;
float16/bfloat16 weights and gradients are widened to float32 on load and the weight rounded back
once, by the final copy.
"""

from __future__ import annotations

from codegen.backends.base import Backend
from codegen.ir import Const, Program
from codegen.lower import Assign, KernelPlan, literal, lower

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
    (and `decay` last, for a decay plan) over torch tensors of one shape, on any device: the
    weight and grad of one dtype, the states of its compute dtype (float64 for float64, else
    float32)."""
    plan = program if isinstance(program, KernelPlan) else lower(program)
    buffers = ("weight", "grad") + plan.tensor_states
    scalars = plan.scalars
    consts = {c: f"c{i}" for i, c in enumerate(plan.constants)}

    def render(step: Assign) -> str:
        args = [consts[a] if isinstance(a, Const) else a for a in step.args]
        return f"{step.name} = {TEMPLATES[step.op].format(*args)}"

    out = ["# " + line for line in plan.header("torch")]
    out += ["", "import torch", "", f"TENSOR_STATES = {plan.tensor_states!r}",
            f"SCALAR_STATES = {plan.scalar_states!r}", f"SCALARS = {scalars!r}", "", ""]
    out.append(f"def kernel({', '.join(f'{b}_buf' for b in buffers)}, {', '.join(scalars)}):")
    out.append("    real = torch.float64 if weight_buf.dtype == torch.float64 else torch.float32")
    out.append("")
    out.append("    def scalar(value):")
    out.append("        # 0-d tensors of the compute dtype: every op sees tensors, so its semantics "
               "hold.")
    out.append("        return torch.full((), value, dtype=real, device=weight_buf.device)")
    out.append("")
    out += [f"    {s} = scalar({s})" for s in scalars]
    for const, name in consts.items():
        text = literal(const.value, wide=True)  # the one kernel serves float64 too
        text = f"float({text!r})" if text in ("nan", "inf", "-inf") else text
        out.append(f"    {name} = scalar({text})")
    # .to(real) widens a float16/bfloat16 weight or grad and returns any other buffer itself.
    out += plan.body("    ", "{name} = {name}_buf.to(real)", render, "{name}_buf.copy_({name})")
    out += ["", "", *SEGMENTS.format(buffers=", ".join(buffers)).splitlines()]
    return "\n".join(out) + "\n"


# The reference for the other backends' one-launch version: `kernel` on each range, with that
# range's scalars (row s of `values`: lr, uniform states, decay, as `kernel` takes them).
SEGMENTS = '''\
def kernel_segments(segments, values, {buffers}):
    for (start, end), scalars in zip(segments.tolist(), values.tolist()):
        kernel(*(b[start:end] for b in ({buffers},)), *scalars)'''


def available(device: str | None) -> bool:
    """Anywhere torch runs."""
    return True


BACKEND = Backend(
    name="torch", rank=2, templates=TEMPLATES, emit=emit,
    dtypes=("float32", "float64", "float16", "bfloat16"), native=None, available=available,
    runs_on="any device", instead="", missing="")

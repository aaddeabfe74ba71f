"""Lowering: a canonical Program -> a straight-line kernel plan that every emitter renders.

The plan is what makes the generated kernels touch only live data: dead states are gone (canonical
form), uniform states (step counters) are scalars advanced on the host, `grad` is loaded only when
read, and identical subexpressions are computed once.

A plan also carries the per-launch options that change the kernel but not the program (each its
own cached kernel, so the common one pays for none of them): `maximize` (the gradient negated as
it is loaded, as torch's ``maximize=True``), `decay` (decoupled weight decay: the weight multiplied
by a host-computed ``decay = 1 - lr * weight_decay`` before its update, as AdamW) and `dtype` (the
parameters' dtype; see DTYPES). The lr rule is the IR's: a program that never reads ``lr`` has its
weight update multiplied by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from codegen.ir import STATES, Call, Const, Node, Program, Var, format_float, variables

Operand = Union[str, Const]  # a value name in the kernel, or a constant

# Parameter dtypes a kernel can be generated for. float64 parameters compute in float64 with
# float64 states; float16/bfloat16 ones load as float32, keep float32 states, compute in float32,
# and round the weight once on store. Uniform states are float32 on the host for every dtype.
# Which backend takes which: each backend's `dtypes` (codegen.backends).
DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass(frozen=True)
class Assign:
    """`name = op(*args)`; `update` marks `state = state - delta`, the new value of a target."""

    name: str
    op: str
    args: tuple[Operand, ...]
    update: bool = False


@dataclass(frozen=True)
class KernelPlan:
    program: Program  # canonical
    hash: str
    tensor_states: tuple[str, ...]  # loaded and stored per element, in update order
    scalar_states: tuple[str, ...]  # uniform: the kernel receives their new values as scalars
    reads_grad: bool
    sections: tuple[tuple[str, tuple[Assign, ...]], ...]  # (target, its steps), in update order
    maximize: bool = False
    decay: bool = False
    dtype: str = "float32"

    @property
    def compute_dtype(self) -> str:
        """The dtype of the math and of the tensor states."""
        return "float64" if self.dtype == "float64" else "float32"

    @property
    def widened(self) -> tuple[str, ...]:
        """Buffers stored narrower than the math (float16/bfloat16 weight and grad)."""
        return () if self.dtype == self.compute_dtype else ("weight", "grad")

    @property
    def scalars(self) -> tuple[str, ...]:
        """The kernel's scalar arguments, in ABI order."""
        return ("lr",) + self.scalar_states + (("decay",) if self.decay else ())

    @property
    def steps(self) -> tuple[Assign, ...]:
        return tuple(step for _, steps in self.sections for step in steps)

    def commented_steps(self) -> list[tuple[str | None, Assign]]:
        """Each step, with a comment line `target <- target - delta` before a section's first."""
        out: list[tuple[str | None, Assign]] = []
        for target, steps in self.sections:
            if target == "grad":
                comment = "maximize: the gradient negated"
            else:
                delta = getattr(self.program, target)
                scaled = target == "weight" and not self.program.reads_lr
                comment = f"{target} <- {target} - {'lr * ' if scaled else ''}{delta}"
                if target == "weight" and self.decay:
                    comment = "decoupled weight decay, then " + comment
            out += [(comment if i == 0 else None, step) for i, step in enumerate(steps)]
        return out

    @property
    def constants(self) -> tuple[Const, ...]:
        seen: dict[Const, None] = {}
        for step in self.steps:
            for arg in step.args:
                if isinstance(arg, Const):
                    seen.setdefault(arg, None)
        return tuple(seen)

    @property
    def stored(self) -> tuple[str, ...]:
        return self.tensor_states + ("weight",)

    @property
    def loaded(self) -> tuple[str, ...]:
        """Buffers the kernel reads: the weight, grad when read, the tensor states."""
        return ("weight",) + (("grad",) if self.reads_grad else ()) + self.tensor_states

    def body(self, indent: str, load: str, render: Callable[[Assign], str], store: str,
             widen: str = "") -> list[str]:
        """The per-element body every emitter shares: loads, one line per step (with a comment
        naming each update), stores. `load`/`store` are templates over `{name}`; `widen`, when
        given, is the load template for `widened` buffers (converted to the compute dtype on
        load; the store rounds the weight back to its dtype, once)."""
        lines = [indent + (widen if widen and b in self.widened else load).format(name=b)
                 for b in self.loaded]
        for comment, step in self.commented_steps():
            if comment:
                lines.append(f"{indent}# {comment}")
            lines.append(indent + render(step))
        return lines + [indent + store.format(name=s) for s in self.stored]

    def signature(self) -> tuple[str, ...]:
        """Kernel arguments, the ABI every backend shares: buffers, then lr, then scalar states."""
        return ("weight", "grad") + self.tensor_states + self.scalars

    def header(self, backend: str) -> list[str]:
        lines = [f"AutoLR generated update kernel ({backend} backend)",
                 f"program hash: {self.hash}", "program (canonical form):"]
        options = [f"{self.dtype} parameters" + ("" if self.dtype == self.compute_dtype else
                                                 f", {self.compute_dtype} math and states")]
        if not self.program.reads_lr:
            options.append("the program never reads lr, so its weight update is scaled by lr")
        if self.maximize:
            options.append("maximize (the gradient negated)")
        if self.decay:
            options.append("decoupled weight decay (weight *= decay, decay = 1 - lr * "
                           "weight_decay from the host)")
        lines += [f"    {line}" for line in str(self.program).splitlines()]
        lines.append("options: " + "; ".join(options) + ".")
        lines.append("kernel(" + ", ".join(self.signature()) + ") updates "
                     + ", ".join(self.stored) + " in place.")
        if self.scalar_states:
            lines.append("Uniform states " + ", ".join(self.scalar_states)
                         + " are advanced on the host and passed in as scalars (new values).")
        return lines


def literal(value: float, wide: bool) -> str:
    """A constant as source text: the shortest float32 text, or for float64 math (`wide`) text
    that reads back as the float32 value itself (0.9 is 0.8999999761581421 in float32: float64
    math must see that value, as the reference does, not 0.9)."""
    text = format_float(value)
    return text if not wide or text in ("nan", "inf", "-inf") or float(text) == value \
        else repr(float(value))


def lower(program: Program, *, maximize: bool = False, decay: bool = False,
          dtype: str = "float32") -> KernelPlan:
    """The plan for `program` with these options (see the module docstring)."""
    if dtype not in DTYPES:
        raise ValueError(f"no kernels for {dtype} parameters: choose one of {', '.join(DTYPES)}")
    canonical = program.canonical()
    scalar_states = canonical.uniform_states()
    tensor_states = canonical.tensor_states()
    reads_grad = any("grad" in variables(getattr(canonical, t)) for t in tensor_states + ("weight",))
    builder = _Builder()
    sections = []
    if maximize and reads_grad:
        sections.append(("grad", (Assign("grad", "neg", ("grad",)),)))
    for target in tensor_states + ("weight",):
        delta = getattr(canonical, target)
        if delta is None:
            continue
        builder.steps = []
        if target == "weight":
            if decay:  # the states never read the weight, so this is AdamW's order
                builder.steps.append(Assign("weight", "mul", ("weight", "decay")))
            if not canonical.reads_lr:  # the IR's lr rule; the same op as `mul(lr, delta)`
                delta = Call("mul", (Var("lr"), delta))
        value = builder.value(delta)
        builder.steps.append(Assign(target, "sub", (target, value), update=True))
        builder.forget(target)  # later reads of `target` see its new value
        sections.append((target, tuple(builder.steps)))
    options = [name for name, on in (("maximize", maximize), ("decay", decay),
                                     (dtype, dtype != "float32")) if on]
    # Each option set is its own kernel, so its own cache file; the plain one keeps the hash.
    plan_hash = "_".join([canonical.hash, *options])
    return KernelPlan(canonical, plan_hash, tensor_states, scalar_states, reads_grad,
                      tuple(sections), maximize, decay, dtype)


class _Builder:
    """Emits SSA steps with common-subexpression elimination."""

    def __init__(self) -> None:
        self.steps: list[Assign] = []
        self.memo: dict[Node, Operand] = {}
        self.temps = 0

    def value(self, node: Node) -> Operand:
        if isinstance(node, Const):
            return node
        if isinstance(node, Var):
            return node.name
        if node in self.memo:
            return self.memo[node]
        assert isinstance(node, Call)
        args = tuple(self.value(a) for a in node.args)
        name = f"t{self.temps}"
        self.temps += 1
        self.steps.append(Assign(name, node.op, args))
        self.memo[node] = name
        return name

    def forget(self, state: str) -> None:
        assert state in STATES or state == "weight"
        self.memo = {n: v for n, v in self.memo.items() if state not in variables(n)}

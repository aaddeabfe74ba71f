"""Lowering: a canonical Program -> a straight-line kernel plan that every emitter renders.

The plan is what makes the generated kernels touch only live data: dead states are gone (canonical
form), uniform states (step counters) are scalars advanced on the host, `grad` is loaded only when
read, and identical subexpressions are computed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from codegen.ir import STATES, Call, Const, Node, Program, Var, variables

Operand = Union[str, Const]  # a value name in the kernel, or a constant


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

    @property
    def steps(self) -> tuple[Assign, ...]:
        return tuple(step for _, steps in self.sections for step in steps)

    def commented_steps(self) -> list[tuple[str | None, Assign]]:
        """Each step, with a comment line `target <- target - delta` before a section's first."""
        out: list[tuple[str | None, Assign]] = []
        for target, steps in self.sections:
            comment = f"{target} <- {target} - {getattr(self.program, target)}"
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

    def body(self, indent: str, load: str, render: Callable[[Assign], str], store: str) -> list[str]:
        """The per-element body every emitter shares: loads, one line per step (with a comment
        naming each update), stores. `load`/`store` are templates over `{name}`."""
        lines = [indent + load.format(name=b) for b in self.loaded]
        for comment, step in self.commented_steps():
            if comment:
                lines.append(f"{indent}# {comment}")
            lines.append(indent + render(step))
        return lines + [indent + store.format(name=s) for s in self.stored]

    def signature(self) -> tuple[str, ...]:
        """Kernel arguments, the ABI every backend shares: buffers, then lr, then scalar states."""
        return ("weight", "grad") + self.tensor_states + ("lr",) + self.scalar_states

    def header(self, backend: str) -> list[str]:
        lines = [f"AutoLR generated update kernel ({backend} backend)",
                 f"program hash: {self.hash}", "program (canonical form):"]
        lines += [f"    {line}" for line in str(self.program).splitlines()]
        lines.append("kernel(" + ", ".join(self.signature()) + ") updates "
                     + ", ".join(self.stored) + " in place.")
        if self.scalar_states:
            lines.append("Uniform states " + ", ".join(self.scalar_states)
                         + " are advanced on the host and passed in as scalars (new values).")
        return lines


def lower(program: Program) -> KernelPlan:
    canonical = program.canonical()
    scalar_states = canonical.uniform_states()
    tensor_states = canonical.tensor_states()
    builder = _Builder()
    sections = []
    for target in tensor_states + ("weight",):
        delta = getattr(canonical, target)
        if delta is None:
            continue
        builder.steps = []
        value = builder.value(delta)
        builder.steps.append(Assign(target, "sub", (target, value), update=True))
        builder.forget(target)  # later reads of `target` see its new value
        sections.append((target, tuple(builder.steps)))
    reads_grad = any("grad" in variables(getattr(canonical, t)) for t in tensor_states + ("weight",))
    return KernelPlan(canonical, canonical.hash, tensor_states, scalar_states, reads_grad,
                      tuple(sections))


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

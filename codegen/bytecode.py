"""Bytecode: a canonical Program -> a compact instruction list that one interpreter, compiled once,
runs for every program (kernels/interp.py), so that a program seen once costs no compile.

The instructions come from the same KernelPlan the emitters render (codegen.lower: straight-line
steps, common subexpressions computed once, uniform states as scalars), with two changes:

* the lr rule: a program that never reads `lr` has its weight update scaled by `lr` (``weight:
  mul(lr, E)``, decided on the canonical form, so programs with one hash scale alike); one that
  reads `lr` uses it where it reads it;
* uniform hoisting: a step whose operands are all uniform (constants, `lr`, uniform states, other
  such steps) goes to a *prologue* that the interpreter runs once per segment on one element and
  broadcasts. The generated kernels get the same from the compiler (loop-invariant code motion);
  without it Adam's bias corrections (exp, log) would be a full pass each.

Registers are rows of one float32 scratch array. Fixed rows hold the inputs (GRAD, ALPHA, BETA,
SIGMA, LR; WEIGHT is named only by the weight update, which the interpreter applies to the arena
itself), then the constants, then the prologue's results, then the body's temporaries,
which are reused once dead. A step never writes a row it reads (a state update writes a fresh row
and the state is renamed to it), so every instruction is a loop over distinct rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from codegen.ir import STATES, Call, Const, Program, Var, variables
from codegen.lower import Assign, lower

# Opcodes: the arithmetic ops, the only ones a Program may use (`if` and comparisons are for
# schedules, which run on the host).
OPCODES: dict[str, int] = {op: i for i, op in enumerate((
    "neg", "square", "sqrt", "abs", "sign", "exp", "log",
    "add", "sub", "mul", "div", "pow", "min", "max"))}

WEIGHT, GRAD, ALPHA, BETA, SIGMA, LR = range(6)
FIXED = 6  # the first constant's row
INPUT_ROWS = {"weight": WEIGHT, "grad": GRAD, "alpha": ALPHA, "beta": BETA, "sigma": SIGMA,
              "lr": LR}
# How a segment sees each of alpha, beta, sigma: not at all, as a tensor in the arena (loaded and
# stored), or as a uniform scalar (broadcast into its row).
UNUSED, TENSOR, SCALAR = 0, 1, 2


@dataclass(frozen=True, eq=False)
class Bytecode:
    """One program's instructions; `code` rows are (opcode, dst, a, b), b 0 for unary ops."""

    program: Program  # canonical, as given (before the lr rule)
    code: np.ndarray  # int32 (n, 4): the prologue's rows, then the body's
    n_prologue: int  # rows run once per segment, on one element
    constants: np.ndarray  # float32: row FIXED + i holds constants[i]
    n_registers: int
    kinds: tuple[int, int, int]  # UNUSED/TENSOR/SCALAR for alpha, beta, sigma
    # The row holding the weight's delta: the weight update itself (the body's last step, and
    # the weight's only read) is left to the interpreter, which applies it straight to the arena.
    weight_delta: int
    stores: tuple[int, int, int]  # final row of alpha, beta, sigma (-1: not stored)
    reads_grad: bool
    scaled_by_lr: bool  # the lr rule applied: the program itself never reads lr

    @property
    def hash(self) -> str:
        return self.program.hash

    @property
    def tensor_states(self) -> tuple[str, ...]:
        return tuple(s for s, k in zip(STATES, self.kinds) if k == TENSOR)

    @property
    def scalar_states(self) -> tuple[str, ...]:
        return tuple(s for s, k in zip(STATES, self.kinds) if k == SCALAR)


# Program.canonical() is a full pass over the trees (~2 ms for Adam), so the helpers below take
# it once and pass the canonical form along.

def reads_lr(program: Program) -> bool:
    """Whether the canonical form of `program` reads `lr` anywhere (a live update reading it)."""
    return _reads_lr(program.canonical())


def with_lr_rule(program: Program) -> Program:
    """The canonical program with the lr rule applied: ``weight: mul(lr, E)`` when it never reads
    `lr`, itself otherwise. Its reference step is what the interpreter computes."""
    return _with_lr_rule(program.canonical())


def _reads_lr(canonical: Program) -> bool:
    return any("lr" in variables(e) for e in canonical.deltas().values())


def _with_lr_rule(canonical: Program) -> Program:
    if _reads_lr(canonical):
        return canonical
    return dataclasses.replace(canonical, weight=Call("mul", (Var("lr"), canonical.weight)))


def assemble(program: Program) -> Bytecode:
    """The bytecode of `program` (any form: it is made canonical first)."""
    return _assemble(program.canonical())


@lru_cache(maxsize=4096)
def _assemble(canonical: Program) -> Bytecode:
    # Lower the rule-applied program; `lower` makes it canonical again, which may reorder the new
    # mul's operands: IEEE multiplication is commutative, bit for bit.
    scaled = not _reads_lr(canonical)
    plan = lower(_with_lr_rule(canonical))
    # Uniform states are the same for the rule-applied program: the rule touches only the weight.
    kinds = tuple(TENSOR if s in plan.tensor_states else SCALAR if s in plan.scalar_states
                  else UNUSED for s in STATES)
    constants = plan.constants
    const_row = {c: FIXED + i for i, c in enumerate(constants)}
    steps = plan.steps
    uniform_names = {"lr", *plan.scalar_states}
    hoisted = []
    for step in steps:
        if not step.update and all(isinstance(a, Const) or a in uniform_names for a in step.args):
            uniform_names.add(step.name)
            hoisted.append(step)
    body = [s for s in steps if s.name not in uniform_names or s.update]
    rows = dict(INPUT_ROWS)
    next_free = FIXED + len(constants)
    prologue_code = []
    for step in hoisted:  # each result keeps its row for the whole segment
        rows[step.name] = next_free
        next_free += 1
        prologue_code.append(_row(step, rows, const_row, rows[step.name]))
    body_code, n_registers, final = _allocate(body, rows, const_row, next_free)
    weight_update = body_code.pop()  # allocated like the others, so its delta's row stays live
    assert weight_update[0] == OPCODES["sub"] and weight_update[2] == WEIGHT
    stores = tuple(final.get(s, -1) if k == TENSOR else -1 for s, k in zip(STATES, kinds))
    code = np.array(prologue_code + body_code, dtype=np.int32).reshape(-1, 4)
    return Bytecode(canonical, code, len(prologue_code),
                    np.array([c.value for c in constants], dtype=np.float32), n_registers, kinds,
                    weight_update[3], stores, plan.reads_grad, scaled)


def _row(step: Assign, rows: dict[str, int], const_row: dict[Const, int], dst: int) -> list[int]:
    args = [const_row[a] if isinstance(a, Const) else rows[a] for a in step.args]
    return [OPCODES[step.op], dst, *args, *[0] * (2 - len(args))]


def _allocate(body: list[Assign], rows: dict[str, int], const_row: dict[Const, int],
              first: int) -> tuple[list[list[int]], int, dict[str, int]]:
    """Rows for the body's values: a fresh row for each result (never one of its operands'),
    recycled after its last read. Updated states are renamed to their new row, which lives to
    the end (it is stored). Returns the code, the register count and each target's final row."""
    last_read: dict[str, int] = {}
    for i, step in enumerate(body):
        for a in step.args:
            if isinstance(a, str):
                last_read[a] = i
    free: list[int] = []
    n_registers = first
    code = []
    final: dict[str, int] = {}
    rows = dict(rows)
    owned: set[str] = set()  # names whose row is a body temporary (recyclable)
    for i, step in enumerate(body):
        if free:
            dst = free.pop()
        else:
            dst, n_registers = n_registers, n_registers + 1
        code.append(_row(step, rows, const_row, dst))
        for a in set(a for a in step.args if isinstance(a, str)):
            if a in owned and last_read[a] == i:
                owned.discard(a)
                free.append(rows[a])
        if step.update:
            final[step.name] = dst
            rows[step.name] = dst  # later steps read the new value
        else:
            rows[step.name] = dst
            owned.add(step.name)
    return code, n_registers, final

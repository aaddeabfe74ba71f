"""The optimizer IR: typed expression trees, their text form (read by codegen.parse), reference
semantics and canonical hash.

Everything AutoLR evolves is a tree of the nodes below.  The numpy evaluator in this module is the
*definition* of what every op means; each backend (codegen/*_emit.py) is tested against it.

ALR programs update three state tensors and the weight, in this order, every op elementwise::

    alpha  <- alpha  - Fa(alpha, grad)
    beta   <- beta   - Fb(alpha, beta, grad)          # alpha is the new alpha
    sigma  <- sigma  - Fs(alpha, beta, sigma, grad)   # new alpha, new beta
    weight <- weight - Fw(alpha, beta, sigma, grad)   # all three new

Every expression may also read the scalar runtime input ``lr``. A program that never reads it
(after dead code is dropped: see `Program.reads_lr`) has its weight update scaled by it instead,
``weight <- weight - lr * Fw``, so that ``lr`` (1.0 by default: the evolved step unchanged) and the
LR schedulers that drive it act on every program; one that reads it uses it where it reads it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator, Mapping, Union

import numpy as np

# --------------------------------------------------------------------------------------------
# Ops: one closed table, with named groups that passes ask about instead of listing ops.
# --------------------------------------------------------------------------------------------

ARITY: dict[str, int] = {
    "neg": 1, "square": 1, "sqrt": 1, "abs": 1, "sign": 1, "exp": 1, "log": 1,
    "add": 2, "sub": 2, "mul": 2, "div": 2, "pow": 2, "min": 2, "max": 2,
    "lt": 2, "le": 2, "gt": 2, "ge": 2,
    "if": 3,
}
PAPER_OPS = frozenset({"neg", "add", "sub", "mul", "div", "pow", "square", "sqrt"})
EXTENDED_OPS = frozenset({"abs", "sign", "exp", "log", "min", "max"})
ARITHMETIC_OPS = PAPER_OPS | EXTENDED_OPS
COMMUTATIVE_OPS = frozenset({"add", "mul", "min", "max"})
# Comparisons only appear as the condition of an `if`, written infix: if(lr < 0.01, a, b).
COMPARISON_SYMBOLS: dict[str, str] = {"lt": "<", "le": "<=", "gt": ">", "ge": ">="}
SYMBOL_COMPARISONS = {v: k for k, v in COMPARISON_SYMBOLS.items()}

STATES = ("alpha", "beta", "sigma")
TARGETS = STATES + ("weight",)
# What each update may read (docs/protocol.md, "Program forms"): a state sees the states updated
# before it and itself, the weight sees every state.
VISIBLE: dict[str, frozenset[str]] = {
    "alpha": frozenset({"alpha", "grad", "lr"}),
    "beta": frozenset({"alpha", "beta", "grad", "lr"}),
    "sigma": frozenset({"alpha", "beta", "sigma", "grad", "lr"}),
    "weight": frozenset({"alpha", "beta", "sigma", "grad", "lr"}),
}
SCHEDULE_INPUTS = frozenset({"epoch", "lr"})


class ParseError(ValueError):
    """Bad program text; the message names the line, the column and what was expected."""

    def __init__(self, message: str, line: int, column: int, text_line: str = ""):
        self.line, self.column, self.reason = line, column, message
        where = f"line {line}, column {column}: {message}"
        if text_line:
            where += f"\n    {text_line}\n    {' ' * (column - 1)}^"
        super().__init__(where)


# --------------------------------------------------------------------------------------------
# Nodes: frozen and hashable, so equal trees compare and hash equal.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Const:
    """A float32 constant (the value is stored already rounded to float32)."""

    value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", float(np.float32(self.value)))

    def __str__(self) -> str:
        return format_float(self.value)

    def __eq__(self, other: object) -> bool:
        # NaN constants must equal each other, or a folded tree would never equal itself.
        return isinstance(other, Const) and (
            self.value == other.value and math.copysign(1, self.value) == math.copysign(1, other.value)
            or (math.isnan(self.value) and math.isnan(other.value)))

    def __hash__(self) -> int:
        return hash(("const", str(self)))


@dataclass(frozen=True, slots=True)
class Var:
    """A program input: a state, `grad`, `lr`, or (in schedules) `epoch`."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Call:
    op: str
    args: tuple["Node", ...]

    def __str__(self) -> str:
        if self.op == "if":
            cond, then, other = self.args
            assert isinstance(cond, Call) and cond.op in COMPARISON_SYMBOLS
            a, b = cond.args
            return f"if({a} {COMPARISON_SYMBOLS[cond.op]} {b}, {then}, {other})"
        return f"{self.op}({', '.join(map(str, self.args))})"


Node = Union[Const, Var, Call]


def format_float(value: float) -> str:
    """Shortest text that reads back as the same float32 (what `str(np.float32)` prints)."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = str(np.float32(value))
    return text


def walk(node: Node) -> Iterator[Node]:
    """Every node of the tree, parents before children."""
    yield node
    if isinstance(node, Call):
        for arg in node.args:
            yield from walk(arg)


def variables(node: Node | None) -> frozenset[str]:
    if node is None:
        return frozenset()
    return frozenset(n.name for n in walk(node) if isinstance(n, Var))


def depth(node: Node) -> int:
    return 1 + max((depth(a) for a in node.args), default=0) if isinstance(node, Call) else 1


def size(node: Node) -> int:
    return sum(1 for _ in walk(node))


# --------------------------------------------------------------------------------------------
# Reference semantics (numpy).  This is the spec: backends must agree with it.
# --------------------------------------------------------------------------------------------

def _div(a, b):
    # divide-no-NaN: 0 wherever the divisor is zero, whatever the numerator (even inf or NaN).
    zero = b == 0
    return np.where(zero, 0, a / np.where(zero, 1, b))


def _pow(a, b):
    # C's pow, which numpy's power follows except for pow(-inf, y) with y not an integer:
    # numpy says NaN, C (and torch) say +inf for y > 0 and +0 for y < 0.
    result = np.power(a, b)
    fix = (a == -np.inf) & (np.floor(b) != b) & ~np.isnan(b) & ~np.isinf(b)
    return np.where(fix, np.where(b > 0, np.inf, 0.0), result) if np.any(fix) else result


REFERENCE_IMPL = {
    "neg": np.negative,
    "square": lambda a: a * a,
    "sqrt": np.sqrt,
    "abs": np.abs,
    "sign": np.sign,  # sign(NaN) = NaN, sign(0) = 0
    "exp": np.exp,
    "log": np.log,
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": _div,
    "pow": _pow,  # C pow: pow(x, 0) = 1 and pow(1, y) = 1 even for NaN; real for int exponents
    "min": np.minimum,  # NaN-propagating, like torch.minimum
    "max": np.maximum,
    "lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
    "if": np.where,
}


def evaluate(node: Node, env: Mapping[str, object], dtype=np.float32):
    """Evaluate `node` elementwise on numpy values of `dtype` (float32 is the spec; float64 is
    used by tests to tell ill-conditioned elements from backend errors)."""
    with np.errstate(all="ignore"):
        return _evaluate(node, env, np.dtype(dtype))


def _evaluate(node: Node, env: Mapping[str, object], dtype: np.dtype):
    if isinstance(node, Const):
        return dtype.type(node.value)
    if isinstance(node, Var):
        try:
            value = env[node.name]
        except KeyError:
            raise KeyError(f"no value given for input {node.name!r}") from None
        return np.asarray(value, dtype=dtype) if np.ndim(value) else dtype.type(value)
    args = [_evaluate(a, env, dtype) for a in node.args]
    result = REFERENCE_IMPL[node.op](*args)
    if node.op in COMPARISON_SYMBOLS:
        return result
    return np.asarray(result, dtype=dtype) if np.ndim(result) else dtype.type(result)


# --------------------------------------------------------------------------------------------
# Canonical form: what makes two programs "the same" for hashing, caching and fitness.
# --------------------------------------------------------------------------------------------

def simplify(node: Node) -> Node:
    """Fold constants, apply identities that are exact in IEEE float32, order commutative operands.

    Only rewrites that give bit-identical results for *every* input (NaN, inf and -0 included)
    are allowed here, because two programs with one hash share one fitness.
    """
    if not isinstance(node, Call):
        return node
    args = tuple(simplify(a) for a in node.args)
    op = node.op
    if op == "if":
        cond = args[0]  # always a comparison; simplify() keeps it as one
        if all(isinstance(a, Const) for a in cond.args):
            return args[1] if bool(evaluate(cond, {})) else args[2]
        return args[1] if args[1] == args[2] else Call(op, args)
    if op in COMPARISON_SYMBOLS:
        return Call(op, args)
    if all(isinstance(a, Const) for a in args):
        return Const(float(evaluate(Call(op, args), {})))
    exact = _exact_identity(op, args)
    if exact is not None:
        return exact
    if op in COMMUTATIVE_OPS:
        args = tuple(sorted(args, key=_order_key))
    return Call(op, args)


def _is_const(node: Node, value: float) -> bool:
    return isinstance(node, Const) and node.value == value and math.copysign(1, node.value) > 0


def _exact_identity(op: str, args: tuple[Node, ...]) -> Node | None:
    # x*1, x/1, x-0 and pow(x, 1) return x bit for bit (NaN, inf, -0 included); x+0 does not
    # (-0 + 0 = +0), nor x*0 (inf*0 = NaN), so those stay.
    if op == "mul":
        if _is_const(args[0], 1.0):
            return args[1]
        if _is_const(args[1], 1.0):
            return args[0]
    if op in ("div", "pow") and _is_const(args[1], 1.0):
        return args[0]
    if op == "sub" and isinstance(args[1], Const) and args[1].value == 0.0:
        return args[0] if math.copysign(1, args[1].value) > 0 else None
    if op == "div" and isinstance(args[1], Const) and args[1].value == 0.0:
        return Const(0.0)
    if op == "pow" and isinstance(args[1], Const) and args[1].value == 0.0:
        return Const(1.0)  # C pow(x, +-0) = 1 for every x
    if op == "pow" and _is_const(args[0], 1.0):
        return Const(1.0)  # C pow(1, y) = 1 for every y
    if op == "neg" and isinstance(args[0], Call) and args[0].op == "neg":
        return args[0].args[0]
    return None


def _order_key(node: Node) -> tuple[int, str]:
    # Constants first, then variables, then calls; text breaks ties: a total, stable order.
    rank = 0 if isinstance(node, Const) else 1 if isinstance(node, Var) else 2
    return rank, str(node)


def substitute(node: Node, values: Mapping[str, Node]) -> Node:
    if isinstance(node, Var):
        return values.get(node.name, node)
    if isinstance(node, Call):
        return Call(node.op, tuple(substitute(a, values) for a in node.args))
    return node


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------
# Programs (ALR) and schedules (DLR)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Program:
    """An ALR optimizer: one delta expression per target; None means a delta of 0."""

    alpha: Node | None = None
    beta: Node | None = None
    sigma: Node | None = None
    weight: Node | None = None

    def __post_init__(self) -> None:
        for target in TARGETS:
            expr = getattr(self, target)
            if expr is None:
                continue
            hidden = variables(expr) - VISIBLE[target]
            if hidden:
                raise ValueError(
                    f"the {target} update reads {', '.join(sorted(hidden))}, which it cannot see "
                    f"(it may read {', '.join(sorted(VISIBLE[target]))})")
            bad_ops = {n.op for n in walk(expr) if isinstance(n, Call)} - ARITHMETIC_OPS
            if bad_ops:
                raise ValueError(f"the {target} update uses {', '.join(sorted(bad_ops))}, "
                                 "which only schedules may use")

    def deltas(self) -> dict[str, Node | None]:
        return {t: getattr(self, t) for t in TARGETS}

    def __str__(self) -> str:
        return "\n".join(f"{t}: {e}" for t, e in self.deltas().items() if e is not None)

    @classmethod
    def parse(cls, text: str) -> "Program":
        """The program `text` spells (the form: codegen/parse.py); bad text raises a ParseError
        naming the line and column."""
        from codegen.parse import parse_program  # here: codegen.parse imports this module

        return parse_program(text)

    # ---- analysis ---------------------------------------------------------------------------
    def live_states(self) -> tuple[str, ...]:
        """States whose value can reach the weight update, in update order."""
        live = set(variables(self.weight)) & set(STATES)
        frontier = list(live)
        while frontier:
            for name in variables(getattr(self, frontier.pop())) & set(STATES):
                if name not in live:
                    live.add(name)
                    frontier.append(name)
        return tuple(s for s in STATES if s in live)

    def uniform_states(self) -> tuple[str, ...]:
        """Live states that hold one value for every element (a step counter, say): their delta
        reads only constants, `lr` and other uniform states. Kernels take them as scalars."""
        uniform: list[str] = []
        for s in self.live_states():
            if variables(getattr(self, s)) <= set(uniform) | {"lr", s}:
                uniform.append(s)
        return tuple(uniform)

    def stepper(self) -> UniformStepper:
        """The stepper of this program's uniform states: build it once, step it often."""
        return UniformStepper(self)

    def tensor_states(self) -> tuple[str, ...]:
        """Live states that need a tensor of their own (loaded and stored by the kernel)."""
        uniform = set(self.uniform_states())
        return tuple(s for s in self.live_states() if s not in uniform)

    def canonical(self) -> "Program":
        """Dead states dropped, states that never change replaced by 0, then simplified."""
        deltas = {t: (None if e is None else simplify(e)) for t, e in self.deltas().items()}
        for _ in range(len(TARGETS)):  # each pass can expose more dead code
            program = Program(**deltas)
            live = set(program.live_states())
            zero = {s: Const(0.0) for s in STATES if deltas[s] is None or deltas[s] == Const(0.0)}
            new = {}
            for t, e in deltas.items():
                if t in STATES and (t not in live or t in zero):
                    new[t] = None
                elif e is not None:
                    e = simplify(substitute(e, zero))
                    new[t] = None if e == Const(0.0) else e
                else:
                    new[t] = None
            if new == deltas:
                break
            deltas = new
        # A program that never moves the weight still prints as a program: "weight: 0.0".
        deltas["weight"] = deltas["weight"] or Const(0.0)
        return Program(**deltas)

    @cached_property
    def canonical_text(self) -> str:
        return str(self.canonical())

    @cached_property
    def hash(self) -> str:
        """Hex digest of the canonical text: equal for programs that compute the same thing by
        construction (folded constants, operand order, dead states)."""
        return _digest("program\n" + self.canonical_text)

    @cached_property
    def reads_lr(self) -> bool:
        """Whether the canonical program reads `lr`; one that does not has its weight update
        scaled by `lr` when it runs (see the module docstring)."""
        c = self.canonical()
        return any("lr" in variables(getattr(c, t)) for t in TARGETS)

    def reads_grad_in_weight(self) -> bool:
        """Whether `grad` can reach the weight update, directly or through a live state."""
        c = self.canonical()
        reads = variables(c.weight)
        return "grad" in reads or any("grad" in variables(getattr(c, s)) for s in c.live_states())


def reference_step(program: Program, weight, grad, state: Mapping[str, object] | None = None,
                   lr: float = 1.0, dtype=np.float32):
    """One optimizer step by the reference semantics; pure (returns new arrays).

    `state` maps alpha/beta/sigma to arrays (or scalars); missing states start at 0.
    Returns (new_weight, new_state) with every state of the program's targets. A program that
    never reads `lr` has its weight update multiplied by it, as the kernels do.
    """
    dt = np.dtype(dtype)
    env: dict[str, object] = {"grad": np.asarray(grad, dt), "lr": dt.type(lr)}
    state = dict(state or {})
    for s in STATES:
        env[s] = np.asarray(state.get(s, 0.0), dt)
    for s in STATES:
        delta = getattr(program, s)
        if delta is not None:
            with np.errstate(all="ignore"):
                env[s] = np.asarray(env[s] - evaluate(delta, env, dt), dt)
    w = np.asarray(weight, dt)
    if program.weight is not None:
        delta = program.weight if program.reads_lr else Call("mul", (Var("lr"), program.weight))
        with np.errstate(all="ignore"):
            w = np.asarray(w - evaluate(delta, env, dt), dt)
    return w, {s: env[s] for s in STATES}


class UniformStepper:
    """A program's uniform states (step counters) stepped alone in float32, by the reference
    semantics: the host's share of a kernel step, for the runtime, the arena, the batched trainer,
    the interpreter and the export. Built once per program: finding the states and deltas at
    every step instead made batched training 16% slower."""

    __slots__ = ("states", "deltas", "reads_lr")
    _FLOAT32 = np.dtype(np.float32)

    def __init__(self, program: Program) -> None:
        self.states: tuple[str, ...] = program.uniform_states()
        self.deltas: tuple[tuple[str, Node], ...] = tuple((s, getattr(program, s))
                                                          for s in self.states)
        self.reads_lr = any("lr" in variables(delta) for _, delta in self.deltas)

    def step(self, values: Mapping[str, float], lr: float) -> dict[str, float]:
        """The uniform states one step on from `values` (a state missing there starts at 0)."""
        return self.chain(values, lr, 1)[0]

    def chain(self, values: Mapping[str, float], lr: float, steps: int
              ) -> list[dict[str, float]]:
        """The uniform states after 1, 2, ..., `steps` steps from `values` at a steady `lr`."""
        env: dict[str, object] = {s: np.float32(values.get(s, 0.0)) for s in STATES}
        env["lr"] = np.float32(lr)
        out = []
        with np.errstate(all="ignore"):
            for _ in range(steps):
                for s, delta in self.deltas:
                    env[s] = np.float32(env[s] - _evaluate(delta, env, self._FLOAT32))
                out.append({s: float(env[s]) for s in self.states})
        return out


@dataclass(frozen=True)
class Schedule:
    """A DLR learning-rate schedule: lr_next = f(epoch, lr), called once per epoch."""

    expr: Node

    def __post_init__(self) -> None:
        hidden = variables(self.expr) - SCHEDULE_INPUTS
        if hidden:
            raise ValueError(f"a schedule reads only epoch and lr, not {', '.join(sorted(hidden))}")

    def __str__(self) -> str:
        return str(self.expr)

    @classmethod
    def parse(cls, text: str) -> "Schedule":
        from codegen.parse import parse_schedule  # here: codegen.parse imports this module

        return parse_schedule(text)

    def __call__(self, epoch: int, lr: float) -> float:
        return float(evaluate(self.expr, {"epoch": float(epoch), "lr": lr}, np.float64))

    def canonical(self) -> "Schedule":
        return Schedule(simplify(self.expr))

    @cached_property
    def hash(self) -> str:
        return _digest("schedule\n" + str(self.canonical()))

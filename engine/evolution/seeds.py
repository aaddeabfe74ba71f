"""Seed programs: hand-written optimizers and schedules made derivable in a grammar, by snapping.

Evolution can start from known-good programs (later AutoLR work pre-populates with Adam, RMSprop
and momentum: docs/protocol.md, "Search settings"; the Lion search warm-starts from AdamW). But
the paper's ALR grammar has no ``lr`` input and only 100 fixed constants, so a program such as
``str(kernels.zoo.adam())`` is not a phenotype it can produce. Snapping makes it one:

- in ALR programs ``lr`` becomes a constant (``--seed-lr``, 0.001 by default, Adam's and Keras's
  step size), since an evolved optimizer carries its own step sizes;
- every constant becomes the nearest constant the grammar offers (a negative one, when the grammar
  has no negative constants, becomes ``neg(nearest(|c|))``), unless the grammar has free
  constants (``alr_ext.bnf``), which take every value as it is; in DLR schedules a constant compared
  with ``epoch`` snaps to the grammar's integer constants, any other to its non-integer ones;
- an ALR program that leaves a state out gets ``state: 0.0`` lines when the grammar's start rule
  needs all four.

The result is then derived in the grammar (``engine.evolution.sge.individual_from_text``); a program that
uses an op or an input the grammar lacks is an error naming it. ``kernels.zoo.adam()`` is such a
program (its float32-accurate bias correction uses ``exp``, ``log`` and ``max``), so the zoo seeds
below write Adam and AdaBelief in the paper's ops: bias corrections as ``1 - pow(b, sigma)`` over
a step counter ``sigma`` (the recipe of docs/protocol.md, "Named optimizers").
``kernels.zoo.lion()`` needs ``sign``, which the paper's grammar lacks too; its seed writes
``sign(c)`` as ``div(c, sqrt(square(c)))``, the same value in float32 (with a correctly rounded
sqrt) for every c whose square neither overflows nor underflows, and 0 at c = 0, as ``div`` by
zero gives 0. RMSprop, momentum and Adagrad come from the zoo as they are.

Seed files (``--seed-programs FILE``) hold one program per block; blocks are separated by blank
lines, and a ``# name`` comment line at the top of a block names it (other ``#`` comments are
ignored). An ALR program is its ``state: expr`` lines, a DLR schedule one expression.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

from codegen.ir import COMPARISON_SYMBOLS, TARGETS, Call, Const, Node, ParseError, Var
from engine.evolution.grammar import Grammar
from engine.evolution.sge import individual_from_text

if TYPE_CHECKING:  # the modes build on this module (engine.modes -> engine.evolution)
    from engine.modes import Mode

__all__ = [
    "ADABELIEF_PAPER_OPS",
    "ADAM_PAPER_OPS",
    "DEFAULT_SEED_LR",
    "LION_PAPER_OPS",
    "SeedError",
    "SeedProgram",
    "baseline",
    "read_seed_file",
    "snap",
    "snap_all",
    "with_lr",
    "zoo_seeds",
]

DEFAULT_SEED_LR = 0.001

# torch.optim.Adam(betas=(0.9, 0.999), eps=1e-8) in the paper's ops: alpha is m, beta is v, sigma
# the step count t (sigma <- sigma - (-1)); the weight update is lr * m_hat / (sqrt(v_hat) + eps)
# with m_hat = m / (1 - 0.9^t), v_hat = v / (1 - 0.999^t).
ADAM_PAPER_OPS = (
    "alpha: mul(0.1, sub(alpha, grad))\n"
    "beta: mul(0.001, sub(beta, square(grad)))\n"
    "sigma: -1.0\n"
    "weight: div(mul(lr, div(alpha, sub(1.0, pow(0.9, sigma)))), "
    "add(sqrt(div(beta, sub(1.0, pow(0.999, sigma)))), 1e-08))"
)

# kernels.zoo.adabelief() (betas=(0.9, 0.999), eps=1e-16) the same way: beta is the belief s, with
# eps added as it is stored (s <- s - (0.001*(s - (g - m)^2) - eps)).
ADABELIEF_PAPER_OPS = (
    "alpha: mul(0.1, sub(alpha, grad))\n"
    "beta: sub(mul(0.001, sub(beta, square(sub(grad, alpha)))), 1e-16)\n"
    "sigma: -1.0\n"
    "weight: div(mul(lr, div(alpha, sub(1.0, pow(0.9, sigma)))), "
    "add(sqrt(div(beta, sub(1.0, pow(0.999, sigma)))), 1e-16))"
)

# kernels.zoo.lion() (betas=(0.9, 0.99)) in the paper's ops: alpha is the momentum m, updated first,
# so Lion's c = 0.9*m_old + 0.1*g is written with the new m as (0.9/0.99)*m + (1 - 0.9/0.99)*g
# (shorter than the zoo's exact recovery of m_old; a seed only needs to be close), and sign(c) as
# div(c, sqrt(square(c))).
_LION_C = "add(mul(0.90909094, alpha), mul(0.09090909, grad))"
LION_PAPER_OPS = (
    "alpha: mul(0.01, sub(alpha, grad))\n"
    f"weight: mul(lr, div({_LION_C}, sqrt(square({_LION_C}))))"
)


class SeedError(ValueError):
    """A seed program that cannot enter the population; the message names it and says why."""


@dataclass(frozen=True)
class SeedProgram:
    """A seed as written by its author, before snapping; ``where`` locates it for messages."""

    name: str
    text: str
    lr: float = DEFAULT_SEED_LR
    where: str = ""


def read_seed_file(path: str | Path, lr: float = DEFAULT_SEED_LR) -> list[SeedProgram]:
    """The programs of a seed file (format in the module docstring); SeedError when unreadable
    or empty."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SeedError(f"--seed-programs {path}: cannot read it ({err})") from None
    seeds = []
    for number, (line, name, body) in enumerate(_blocks(text), start=1):
        seeds.append(SeedProgram(name or f"{path.name} #{number}", body, lr,
                                 f"{path}, line {line}"))
    if not seeds:
        raise SeedError(f"--seed-programs {path}: no programs in it (one program per block, "
                        "blocks separated by blank lines)")
    return seeds


def snap_all(seeds: list[SeedProgram], grammar: Grammar, mode: Mode,
             max_depth: int) -> dict[str, str]:
    """name -> snapped, derivable text for every seed, in order; names made unique."""
    out: dict[str, str] = {}
    for seed in seeds:
        name, k = seed.name, 2
        while name in out:
            name, k = f"{seed.name} ({k})", k + 1
        out[name] = snap(seed, grammar, mode, max_depth)
    return out


def snap(seed: SeedProgram, grammar: Grammar, mode: Mode, max_depth: int) -> str:
    """The seed with ``lr`` (ALR) and every constant snapped, checked derivable in ``grammar``."""
    label = f"seed program {seed.name!r}" + (f" ({seed.where})" if seed.where else "")
    if not (isinstance(seed.lr, (int, float)) and math.isfinite(seed.lr) and seed.lr > 0):
        raise SeedError(f"{label}: the lr to snap to must be a positive number, not {seed.lr!r}")
    try:
        candidates = mode.snap_candidates(_Snapper(grammar), seed)
    except (ParseError, ValueError) as err:
        raise SeedError(f"{label}: {' '.join(str(err).split())}") from None
    errors = []
    for text in dict.fromkeys(candidates):
        try:
            individual_from_text(grammar, text, max_depth, seed.name)
            return text
        except ValueError as err:
            errors.append(str(err))
    raise SeedError(f"{label} cannot be derived in {grammar.source} even after snapping its "
                    f"constants: {errors[-1]}")


# -- the snapping itself ---------------------------------------------------------------------


def with_lr(node: Node, lr: float) -> Node:
    """``node`` with the input ``lr`` written in as the constant ``lr``."""
    if isinstance(node, Var) and node.name == "lr":
        return Const(lr)
    if isinstance(node, Call):
        return Call(node.op, tuple(with_lr(a, lr) for a in node.args))
    return node


class _Snapper:
    """Snaps constants to the grammar's numeric terminals and renders them as the grammar
    spells them (a grammar may write 0.5 as '0.50', so the IR's own spelling is not used)."""

    def __init__(self, grammar: Grammar) -> None:
        self.spelling: dict[float, str] = {}
        integral: set[float] = set()
        other: set[float] = set()
        for rule in grammar.rules:
            values = []
            for production in rule:
                if len(production.symbols) == 1 and isinstance(production.symbols[0], str):
                    value = _number(production.symbols[0])
                    if value is not None:
                        values.append(value)
                        self.spelling.setdefault(value, production.symbols[0].strip())
            if values:
                (integral if all(v == int(v) for v in values) else other).update(values)
        every = integral | other
        self.every = sorted(every)
        self.integral = sorted(integral) or self.every
        self.other = sorted(other) or self.every
        self.has_negative = any(v < 0 for v in every)
        self.free = grammar.has_free_constants  # every constant is derivable as it is

    def alr(self, node: Node) -> Node:
        return self._walk(node, self.every)

    def schedule(self, node: Node) -> Node:
        """Constants compared with epoch snap to integers; everything else to the others."""
        if isinstance(node, Call) and node.op in COMPARISON_SYMBOLS:
            a, b = node.args
            pool = self.integral if Var("epoch") in (a, b) else self.other
            return Call(node.op, (self._walk(a, pool), self._walk(b, pool)))
        if isinstance(node, Call):
            return Call(node.op, tuple(self.schedule(a) for a in node.args))
        return self._walk(node, self.other)

    def _walk(self, node: Node, pool: list[float]) -> Node:
        if isinstance(node, Call):
            return Call(node.op, tuple(self._walk(a, pool) for a in node.args))
        if not isinstance(node, Const):
            return node
        value = node.value
        if not math.isfinite(value):
            raise ValueError(f"constant {value} has no counterpart in a grammar")
        if self.free:
            return node
        if not pool:
            raise ValueError("the grammar has no numeric constants to snap to")
        if value < 0 and not self.has_negative:
            return Call("neg", (self._nearest(-value, pool),))
        return self._nearest(value, pool)

    @staticmethod
    def _nearest(value: float, pool: list[float]) -> Const:
        return Const(min(pool, key=lambda v: (abs(v - value), v)))

    def render(self, node: Node) -> str:
        if isinstance(node, Const):
            return self.spelling.get(node.value, str(node))
        if isinstance(node, Var):
            return node.name
        if node.op == "if":
            cond, then, other = node.args
            a, b = cond.args  # type: ignore[union-attr]
            symbol = COMPARISON_SYMBOLS[cond.op]  # type: ignore[union-attr]
            return (f"if({self.render(a)} {symbol} {self.render(b)}, {self.render(then)}, "
                    f"{self.render(other)})")
        return f"{node.op}({', '.join(self.render(a) for a in node.args)})"

    def program(self, deltas: dict[str, Node | None], fill: bool) -> str:
        zero = self.render(self._nearest(0.0, self.every)) if self.every else "0.0"
        lines = []
        for target in TARGETS:
            expr = deltas[target]
            if expr is not None:
                lines.append(f"{target}: {self.render(expr)}")
            elif fill:
                lines.append(f"{target}: {zero}")
        return "\n".join(lines)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return float(Const(value).value) if math.isfinite(value) else None


def _blocks(text: str) -> Iterator[tuple[int, str | None, str]]:
    """(first line number, name, program text) per blank-line separated block."""
    block: list[str] = []
    name: str | None = None
    start = 0
    for number, raw in enumerate(text.splitlines() + [""], start=1):
        line = raw.strip()
        if not line:
            if block:
                yield start, name, "\n".join(block)
            block, name = [], None
            continue
        if line.startswith("#"):
            if not block and name is None:
                name, start = line.lstrip("#").strip() or None, number
            continue
        if not block and name is None:
            start = number
        block.append(raw)
    return

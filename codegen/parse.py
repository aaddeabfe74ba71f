"""The text form of programs and schedules: a small recursive descent over a regex tokenizer,
with the line and column of every error (`Program.parse` and `Schedule.parse` call it).

A program is `target: expr` per line, or several on one line separated by `;` (the form reports
print); `#` starts a comment. A schedule is one expression on one line.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from codegen.ir import ARITHMETIC_OPS, ARITY, COMPARISON_SYMBOLS, SCHEDULE_INPUTS, \
    SYMBOL_COMPARISONS, TARGETS, VISIBLE, Call, Const, Node, ParseError, Program, Schedule, Var, \
    format_float


# The deepest expression a text may nest: every pass over a tree (simplify, hash, ==, str, pickle,
# lowering, the reference evaluator) recurses, up to ~7 Python frames per level (deepcopy), so 64
# levels stay under Python's default limit of 1000 with room for the caller's own stack. Evolved
# programs are at most the grammar's max_depth (17) deep; tests/test_ir.py checks the headroom.
MAX_DEPTH = 64

# ASCII digits only ([0-9], not \d): float() would read any Unicode digit ('١' is 1).
_TOKEN = re.compile(r"""
    (?P<space>[ \t]+)
  | (?P<number>[-+]?(?:[0-9]+\.?[0-9]*(?:[eE][-+]?[0-9]+)?|\.[0-9]+(?:[eE][-+]?[0-9]+)?|inf|nan)
               (?![A-Za-z_0-9]))
  | (?P<name>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<cmp><=|>=|<|>)
  | (?P<punct>[(),:])
""", re.VERBOSE)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class _Tokens:
    text: str
    line: int
    tokens: list[tuple[str, str, int]]  # (kind, text, column)
    pos: int = 0
    end: str = "end of line"  # what ends this text: the end of the line, or a ';'
    end_column: int = 0  # where it ends (a comment or the next statement may follow)

    @classmethod
    def of(cls, text: str, line: int, shown: str | None = None,
           end: str = "end of line") -> "_Tokens":
        """Tokenize `text`; `shown` is the line as the user wrote it, for error messages."""
        shown = text if shown is None else shown
        tokens, i = [], 0
        while i < len(text):
            m = _TOKEN.match(text, i)
            if not m:
                char = text[i]
                if char.isdigit():
                    raise ParseError(f"non-ASCII digit {char!r} (U+{ord(char):04X}): write numbers "
                                     "with the digits 0-9", line, i + 1, shown)
                raise ParseError(f"unexpected character {char!r}", line, i + 1, shown)
            if m.lastgroup != "space":
                tokens.append((m.lastgroup, m.group(), i + 1))
            i = m.end()
        return cls(shown, line, tokens, end=end, end_column=len(text) + 1)

    def peek(self) -> tuple[str, str, int]:
        if self.pos < len(self.tokens):
            return self.tokens[self.pos]
        return ("end", self.end, self.end_column)

    def error(self, expected: str) -> ParseError:
        kind, text, col = self.peek()
        found = self.end if kind == "end" else repr(text)
        return ParseError(f"expected {expected}, found {found}", self.line, col, self.text)

    def expect(self, text: str) -> None:
        if self.peek()[1] != text:
            raise self.error(repr(text))
        self.pos += 1


def _constant(text: str, toks: _Tokens, col: int) -> Const:
    value = float(text)
    if text.lstrip("+-") not in ("inf", "nan") and abs(value) > _FLOAT32_MAX:
        with np.errstate(over="ignore"):
            overflows = math.isinf(np.float32(value))  # just above the largest, it rounds down
        if overflows:
            shown = text if len(text) <= 24 else text[:12] + "..." + text[-8:]
            raise ParseError(f"constant {shown} does not fit a float32 (the largest is "
                             f"{format_float(_FLOAT32_MAX)}; write inf for infinity)",
                             toks.line, col, toks.text)
    return Const(value)


def _parse_expr(toks: _Tokens, visible: frozenset[str], ops: frozenset[str], who: str,
                level: int = 1) -> Node:
    """The expression at `toks`, whose node sits `level` deep in its tree (the root is 1)."""
    kind, text, col = toks.peek()
    if level > MAX_DEPTH:
        raise ParseError(f"expression deeper than {MAX_DEPTH} levels (the limit)",
                         toks.line, col, toks.text)
    if kind == "number":
        toks.pos += 1
        return _constant(text, toks, col)
    if kind != "name":
        raise toks.error("a number, an input or an op")
    toks.pos += 1
    if toks.peek()[1] != "(":
        if text in visible:
            return Var(text)
        if text in ARITY:
            raise toks.error(f"'(' after {text}")
        raise ParseError(f"{text!r} is not an input {who} can read "
                         f"(it may read {', '.join(sorted(visible))})", toks.line, col, toks.text)
    if text not in ARITY or text in COMPARISON_SYMBOLS:
        raise ParseError(f"unknown op {text!r} (known: {', '.join(sorted(ops))})",
                         toks.line, col, toks.text)
    if text not in ops:
        raise ParseError(f"op {text!r} is not allowed in {who}", toks.line, col, toks.text)
    toks.expect("(")
    args: list[Node] = []
    if text == "if":
        # The comparison is a node of its own, one level below the if: its operands two below.
        left = _parse_expr(toks, visible, ops, who, level + 2)
        kind, sym, _ = toks.peek()
        if kind != "cmp":
            raise toks.error("a comparison (<, <=, >, >=) in the condition of if")
        toks.pos += 1
        right = _parse_expr(toks, visible, ops, who, level + 2)
        args.append(Call(SYMBOL_COMPARISONS[sym], (left, right)))
    for i in range(len(args), ARITY[text]):
        if i:
            if toks.peek()[1] == ")":
                raise toks.error(f"',' ({text} takes {ARITY[text]} arguments)")
            toks.expect(",")
        args.append(_parse_expr(toks, visible, ops, who, level + 1))
    if toks.peek()[1] == ",":
        raise toks.error(f"')' ({text} takes {ARITY[text]} argument{'s' * (ARITY[text] > 1)})")
    toks.expect(")")
    return Call(text, tuple(args))


def _strip_comment(raw: str) -> str:
    return raw.split("#", 1)[0].rstrip()


def _statements(line: str) -> Iterator[tuple[int, str, bool]]:
    """(offset, text, ends at a ';') of each `;`-separated statement of a line: the one-line
    form `alpha: ...; weight: ...` that reports print is the same program as one per line."""
    offset = 0
    for part in line.split(";"):
        yield offset, part, offset + len(part) < len(line)
        offset += len(part) + 1


def parse_program(text: str) -> Program:
    if not isinstance(text, str):
        raise TypeError(f"program text must be a str, not {type(text).__name__}")
    deltas: dict[str, Node] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        for offset, part, before_semicolon in _statements(_strip_comment(raw)):
            if not part.strip():
                continue
            m = re.match(r"\s*([A-Za-z_][A-Za-z_0-9]*)\s*:", part)
            if not m:
                where = "the start of the line" if offset == 0 else "the start of a statement"
                raise ParseError(f"expected 'alpha:', 'beta:', 'sigma:' or 'weight:' at {where}",
                                 number, offset + len(part) - len(part.lstrip()) + 1, raw)
            target, column = m.group(1), offset + m.start(1) + 1
            if target not in TARGETS:
                raise ParseError(f"unknown update {target!r} (expected one of "
                                 f"{', '.join(TARGETS)})", number, column, raw)
            if target in deltas:
                raise ParseError(f"{target} is defined twice", number, column, raw)
            # Parse the expression in place (padding keeps columns true to the original line).
            expr_text = " " * (offset + m.end()) + part[m.end():]
            toks = _Tokens.of(expr_text, number, shown=raw,
                              end="';'" if before_semicolon else "end of line")
            if not toks.tokens:
                raise ParseError(f"expected an expression after '{target}:'", number,
                                 offset + m.end() + 1, raw)
            expr = _parse_expr(toks, VISIBLE[target], ARITHMETIC_OPS, f"the {target} update")
            if toks.peek()[0] != "end":
                raise toks.error("end of line or ';'")
            deltas[target] = expr
    if not deltas:
        raise ParseError("empty program: expected lines like 'weight: mul(lr, grad)'", 1, 1,
                         text.splitlines()[0] if text.splitlines() else "")
    return Program(**deltas)


def parse_schedule(text: str) -> Schedule:
    if not isinstance(text, str):
        raise TypeError(f"schedule text must be a str, not {type(text).__name__}")
    lines = [(n, _strip_comment(raw), raw) for n, raw in enumerate(text.splitlines(), 1)]
    lines = [x for x in lines if x[1].strip()]
    if not lines:
        raise ParseError("empty schedule: expected an expression like 'if(epoch < 10, 0.1, 0.01)'",
                         1, 1, "")
    if len(lines) > 1:
        number, _, raw = lines[1]
        raise ParseError("a schedule is one expression on one line", number, 1, raw)
    number, line, raw = lines[0]
    toks = _Tokens.of(line, number, shown=raw)
    expr = _parse_expr(toks, SCHEDULE_INPUTS, ARITHMETIC_OPS | {"if"}, "a schedule")
    if toks.peek()[0] != "end":
        raise toks.error("end of line")
    return Schedule(expr)

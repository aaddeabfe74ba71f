"""Context-free grammars in a small BNF dialect, validated and annotated for depth control.

Why a dialect of our own: the grammars are data that users edit (``--grammar FILE``), so every
mistake must come back as one clear error naming the file and the line, and the engine needs a
few derived tables (shortest derivation depths) that a general-purpose parser would not give.

The format, one rule per line::

    # a comment: an unescaped '#' starts a comment that runs to the end of the line
    <start> ::= alpha: <expr>\\nbeta: <expr>
    <expr>  ::= add(<expr>, <expr>) | <term>
    <term>  ::= grad | 0.5

- The first rule's left side is the start symbol.
- ``<name>`` (letters, digits, underscore) is a non-terminal; everything else is terminal text,
  copied to the phenotype verbatim. Whitespace around an alternative is dropped, whitespace inside
  it is kept (``sub(<e>, <e>)`` renders as ``sub(x, y)``). A ``<`` that does not open a
  ``<name>`` is plain text, so ``<cmp> ::= < | <= | > | >=`` works unescaped.
- ``|`` separates alternatives. Escapes: ``\\n`` a newline (how a multi-line phenotype such as
  the ALR program is written on one rule line), ``\\|`` a literal bar, ``\\#`` a literal hash,
  ``\\\\`` a backslash.
- Repeated alternatives are allowed on purpose: they bias the choice (the ALR grammar lists
  ``grad`` several times and ``add`` twice).
- Free constants: a rule whose only alternative is ``%float`` (``<free_a> ::= %float``) derives
  one real number, carried in the genotype itself instead of picked from a list of terminals
  (engine/evolution/sge.py says how it is drawn, rendered and mutated). ``%float`` anywhere else is
  an error: a number mixed into other text could not be mutated as one value.

Depth: the start symbol's node is at depth 1, a node's children at depth + 1, and a tree's depth
is the deepest non-terminal node. ``Grammar.shortest`` gives, for each non-terminal, the depth of
its shallowest complete tree; ``Production.shortest`` the same for the levels below a node that
picks that production. A node at depth ``d`` can pick production ``p`` within ``max_depth`` exactly
when ``d + p.shortest <= max_depth``: this is exact for any recursion, direct or indirect (the
reference system only checked direct self-recursion and grew depth-48 trees).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ALR_EXT_GRAMMAR",
    "ALR_GRAMMAR",
    "DLR_GRAMMAR",
    "FREE_CONSTANT",
    "Grammar",
    "GrammarError",
    "Production",
    "load_grammar",
    "parse_grammar",
]

GRAMMAR_DIR = Path(__file__).resolve().parent / "grammars"
ALR_GRAMMAR = GRAMMAR_DIR / "alr.bnf"
DLR_GRAMMAR = GRAMMAR_DIR / "dlr.bnf"
ALR_EXT_GRAMMAR = GRAMMAR_DIR / "alr_ext.bnf"
FREE_CONSTANT = "%float"
# A number as the IR's text form writes one (codegen/parse.py), whitespace already removed.
_FREE_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*(?:[eE][-+]?[0-9]+)?"
                          r"|\.[0-9]+(?:[eE][-+]?[0-9]+)?)")

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_NT_AT = re.compile(rf"<({_NAME})>")
_LHS = re.compile(rf"^<({_NAME})>$")
_ESCAPES = {"n": "\n", "|": "|", "#": "#", "\\": "\\"}
_INFINITE = math.inf

Symbol = str | int  # terminal text, or the index of a non-terminal


class GrammarError(ValueError):
    """A grammar file that cannot be used; the message names the file, the line and the fix.

    ``kind`` is a short stable code (``"undefined"``, ``"unreachable"``...) so that callers and
    tests can tell errors apart without matching on prose.
    """

    def __init__(self, source: str, line: int | None, kind: str, message: str) -> None:
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")
        self.source = source
        self.line = line
        self.kind = kind


def _ladder(productions: tuple["Production", ...]) -> tuple[int, ...] | None:
    values = []
    for production in productions:
        if len(production.symbols) != 1 or not isinstance(production.symbols[0], str):
            return None
        try:
            values.append(float(production.symbols[0]))
        except ValueError:
            return None
    if len(values) < 2:
        return None
    return tuple(sorted(range(len(values)), key=lambda k: (values[k], k)))


@dataclass(frozen=True)
class Production:
    """One alternative of a rule: terminal strings and non-terminal indices, in order.

    ``shortest`` is the fewest levels that must hang below a node choosing this production (0 for
    an all-terminal one), ``height`` the most (``math.inf`` when it can recurse): depth control and
    growth during initialisation read these instead of walking the grammar.
    """

    symbols: tuple[Symbol, ...]
    shortest: int
    height: float


@dataclass(frozen=True)
class Grammar:
    """A validated grammar with its depth tables; index 0 is the start symbol.

    Immutable so that one instance can be shared by every individual, worker and test.
    """

    source: str
    text: str
    names: tuple[str, ...]
    rules: tuple[tuple[Production, ...], ...]
    shortest: tuple[int, ...]
    lines: tuple[int, ...]

    @functools.cached_property
    def ladders(self) -> tuple[tuple[int, ...] | None, ...]:
        """Per non-terminal: its production indices sorted by value when every production is a
        single number (a constant rule), else None. Mutation steps along these."""
        return tuple(_ladder(rules) for rules in self.rules)

    @functools.cached_property
    def free(self) -> tuple[bool, ...]:
        """Per non-terminal: whether it is a free-constant rule (``<x> ::= %float``), whose
        codons are the constants' values rather than production indices."""
        return tuple(len(rule) == 1 and rule[0].symbols == (FREE_CONSTANT,) for rule in self.rules)

    @property
    def has_free_constants(self) -> bool:
        return any(self.free)
    # _fits[nt][budget]: productions whose shortest derivation fits in `budget` more levels.
    _fits: tuple[tuple[tuple[int, ...], ...], ...]

    @property
    def start(self) -> int:
        return 0

    def index(self, name: str) -> int:
        """Index of non-terminal ``name`` (with or without the angle brackets)."""
        bare = name[1:-1] if name.startswith("<") and name.endswith(">") else name
        try:
            return self.names.index(bare)
        except ValueError:
            raise KeyError(f"{self.source}: no non-terminal <{bare}>; it has "
                           f"{', '.join('<' + n + '>' for n in self.names)}") from None

    def fitting(self, nt: int, budget: int) -> tuple[int, ...]:
        """Productions of ``nt`` whose shortest derivation needs at most ``budget`` more levels.

        Never empty for a budget >= shortest[nt] - 1, which the mapper maintains as an invariant.
        """
        table = self._fits[nt]
        if budget < 0:
            return ()
        return table[budget] if budget < len(table) else table[-1]

    def render(self, production: Production) -> str:
        """The production as it would appear in the BNF file (for messages)."""
        return "".join(s if isinstance(s, str) else f"<{self.names[s]}>"
                       for s in production.symbols)


def load_grammar(path: str | Path) -> Grammar:
    """Read and validate a BNF file; every problem is a GrammarError naming the file and line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise GrammarError(str(path), None, "missing",
                           "no such grammar file; give the path of a .bnf file, e.g. "
                           f"{ALR_GRAMMAR}") from None
    except IsADirectoryError:
        raise GrammarError(str(path), None, "missing",
                           "is a directory, not a grammar file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise GrammarError(str(path), None, "not-text",
                           f"is not a UTF-8 text file (byte {err.start}); a grammar is plain "
                           "text with one '<name> ::= alt | alt' rule per line") from None
    if "\x00" in text:
        raise GrammarError(str(path), None, "not-text",
                           "contains NUL bytes, so it is not a text grammar file")
    return parse_grammar(text, source=str(path))


def parse_grammar(text: str, source: str = "<string>") -> Grammar:
    """Build a Grammar from BNF text; ``source`` is the name used in error messages."""
    rule_names: list[str] = []
    rule_alts: list[list[list[str | tuple[str, int]]]] = []  # NT references keep their line
    rule_lines: list[int] = []
    defined: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        content = _strip_comment(line, source, lineno).strip()
        if not content:
            continue
        parts = _split_unescaped(content, "::=")
        if len(parts) == 1:
            raise GrammarError(source, lineno, "not-a-rule",
                               f"expected a rule '<name> ::= alt | alt', found {content[:60]!r}")
        if len(parts) > 2:
            raise GrammarError(source, lineno, "two-rules",
                               "more than one '::=' on the line; write one rule per line")
        lhs = parts[0].strip()
        match = _LHS.match(lhs)
        if match is None:
            raise GrammarError(source, lineno, "bad-lhs",
                               f"the left side {lhs!r} must be one non-terminal like <expr> "
                               "(letters, digits and '_' inside angle brackets)")
        name = match.group(1)
        if name in defined:
            raise GrammarError(source, lineno, "duplicate-rule",
                               f"<{name}> is already defined on line {defined[name]}; "
                               "put all its alternatives in that one rule")
        alts = []
        for k, alt in enumerate(_split_unescaped(parts[1], "|"), start=1):
            alt = alt.strip()
            if not alt:
                raise GrammarError(source, lineno, "empty-alternative",
                                   f"alternative {k} of <{name}> is empty; remove the stray "
                                   "'|' (an empty string is not a valid production)")
            alts.append(_symbols(alt, source, lineno))
        defined[name] = lineno
        rule_names.append(name)
        rule_alts.append(alts)
        rule_lines.append(lineno)
    if not rule_names:
        raise GrammarError(source, None, "empty",
                           "contains no rules, so there is no start symbol; the first rule "
                           "'<name> ::= ...' defines it")
    return _build(source, text, rule_names, rule_alts, rule_lines)


def _strip_comment(line: str, source: str, lineno: int) -> str:
    """Cut an unescaped '#' comment; check escapes here so that every later step can trust them."""
    i = 0
    while i < len(line):
        ch = line[i]
        if ch == "\\":
            if i + 1 >= len(line) or line[i + 1] not in _ESCAPES:
                bad = line[i:i + 2]
                raise GrammarError(source, lineno, "bad-escape",
                                   f"unknown escape {bad!r} at column {i + 1}; the escapes are "
                                   r"\n (newline), \| (bar), \# (hash) and \\ (backslash)")
            i += 2
            continue
        if ch == "#":
            return line[:i]
        i += 1
    return line


def _split_unescaped(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside escapes; the pieces keep their escapes for _symbols."""
    parts, start, i = [], 0, 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text.startswith(sep, i):
            parts.append(text[start:i])
            i += len(sep)
            start = i
        else:
            i += 1
    parts.append(text[start:])
    return parts


def _symbols(alt: str, source: str, lineno: int) -> list[str | tuple[str, int]]:
    """Terminal runs (escapes resolved) and ``(name, line)`` references, merged and in order."""
    out: list[str | tuple[str, int]] = []
    buf: list[str] = []
    i = 0
    while i < len(alt):
        ch = alt[i]
        if ch == "\\":
            buf.append(_ESCAPES[alt[i + 1]])
            i += 2
            continue
        match = _NT_AT.match(alt, i) if ch == "<" else None
        if match:
            if buf:
                out.append("".join(buf))
                buf = []
            out.append((match.group(1), lineno))
            i = match.end()
            continue
        buf.append(ch)
        i += 1
    if buf:
        out.append("".join(buf))
    return out


def _check_reachable(source: str, names: list[str], alts: list[list[list]], lines: list[int],
                     index: dict[str, int]) -> None:
    """A GrammarError for the first rule that the start symbol cannot reach."""
    reachable = {0}
    frontier = [0]
    while frontier:
        i = frontier.pop()
        for alt in alts[i]:
            for sym in alt:
                if isinstance(sym, tuple) and index[sym[0]] not in reachable:
                    reachable.add(index[sym[0]])
                    frontier.append(index[sym[0]])
    for i, name in enumerate(names):
        if i not in reachable:
            raise GrammarError(source, lines[i], "unreachable",
                               f"<{name}> cannot be reached from the start symbol <{names[0]}> "
                               "(only unreachable rules use it); connect it or remove it")


def _build(source: str, text: str, names: list[str], alts: list[list[list]],
           lines: list[int]) -> Grammar:
    """Semantic checks (undefined, unused, unreachable, non-terminating) and the depth tables."""
    index = {name: i for i, name in enumerate(names)}
    users: dict[str, list[int]] = {name: [] for name in names}  # rules that mention a name
    for i, rule in enumerate(alts):
        for alt in rule:
            for sym in alt:
                if isinstance(sym, tuple):
                    ref, lineno = sym
                    if ref not in index:
                        close = [n for n in names if n.lower() == ref.lower()]
                        hint = f" (did you mean <{close[0]}>?)" if close else ""
                        raise GrammarError(source, lineno, "undefined",
                                           f"<{ref}> is used but never defined{hint}; add a "
                                           f"rule '<{ref}> ::= ...' or fix the name")
                    users[ref].append(i)

    for i, name in enumerate(names[1:], start=1):
        if not any(u != i for u in users[name]):
            raise GrammarError(source, lines[i], "unused",
                               f"<{name}> is defined but no other rule uses it; remove the rule "
                               "or refer to it (only the first rule is the start symbol)")

    _check_reachable(source, names, alts, lines, index)

    rules = [[tuple(index[s[0]] if isinstance(s, tuple) else s for s in alt) for alt in rule]
             for rule in alts]
    for i, rule in enumerate(rules):
        for alt in rule:
            mixed = any(isinstance(s, str) and FREE_CONSTANT in s for s in alt)
            if mixed and not (len(rule) == 1 and alt == (FREE_CONSTANT,)):
                raise GrammarError(source, lines[i], "bad-float",
                                   f"<{names[i]}> mixes {FREE_CONSTANT} with other text or "
                                   f"alternatives; a free constant is a rule of its own, "
                                   f"'<free> ::= {FREE_CONSTANT}', that other rules refer to")
    shortest = _shortest_depths(rules)
    stuck = [i for i, d in enumerate(shortest) if d == _INFINITE]
    if stuck:
        first = stuck[0]
        others = ", ".join(f"<{names[i]}>" for i in stuck[1:])
        also = f" (so do {others})" if others else ""
        raise GrammarError(source, lines[first], "non-terminating",
                           f"<{names[first]}> has no terminating derivation{also}: every "
                           "alternative leads to a non-terminal that never ends; give it an "
                           "alternative made of terminals only")
    heights = _heights(rules)
    productions = tuple(
        tuple(Production(symbols=alt,
                         shortest=_level(alt, shortest, max, 0),
                         height=_level(alt, heights, max, 0))
              for alt in rule)
        for rule in rules)
    fits = tuple(_fit_table(rule) for rule in productions)
    return Grammar(source=source, text=text, names=tuple(names), rules=productions,
                   shortest=tuple(int(d) for d in shortest), lines=tuple(lines), _fits=fits)


def _level(alt: tuple[Symbol, ...], table: list, combine, empty: float) -> float:
    """Levels below a node choosing ``alt``: the deepest child's value, ``empty`` with none."""
    values = [table[s] for s in alt if isinstance(s, int)]
    return combine(values) if values else empty


def _shortest_depths(rules: list[list[tuple[Symbol, ...]]]) -> list[float]:
    """Fixed point of shortest(N) = 1 + min over alternatives of max over children.

    Least fixed point from infinity: a non-terminal still infinite at the end has no finite tree.
    """
    depth = [_INFINITE] * len(rules)
    changed = True
    while changed:
        changed = False
        for i, rule in enumerate(rules):
            best = 1 + min(_level(alt, depth, max, 0) for alt in rule)
            if best < depth[i]:
                depth[i] = best
                changed = True
    return depth


def _heights(rules: list[list[tuple[Symbol, ...]]]) -> list[float]:
    """The deepest tree each non-terminal can grow, infinite when it can recurse.

    Longest paths in an acyclic graph of n nodes have at most n levels, so after n + 1 rounds of
    relaxation anything still growing sits on or above a cycle.
    """
    n = len(rules)
    height = [0.0] * n
    for _ in range(n + 1):
        height = [1 + max(_level(alt, height, max, 0) for alt in rule) for rule in rules]
    return [h if h <= n else _INFINITE for h in height]


def _fit_table(rule: tuple[Production, ...]) -> tuple[tuple[int, ...], ...]:
    """For budgets 0..max(shortest): the productions that fit; larger budgets use the last row."""
    top = max(p.shortest for p in rule)
    return tuple(tuple(k for k, p in enumerate(rule) if p.shortest <= budget)
                 for budget in range(top + 1))

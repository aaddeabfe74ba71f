"""Text back to a derivation tree of a grammar: how a hand-written program (a seed) becomes the
genotype that evolution works on (engine.evolution.grammar says what depth means)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.evolution.grammar import _FREE_NUMBER, Grammar

__all__ = ["Derivation", "DerivationError", "derive"]


class DerivationError(ValueError):
    """A text that the grammar cannot derive, with where the derivation got stuck."""


@dataclass(frozen=True)
class Derivation:
    """A derivation tree: the production chosen at a non-terminal, and the subtrees it expands.

    ``depth`` counts this node's level and those below it, as in the module docstring.
    """

    nt: int
    choice: int
    children: tuple[Derivation, ...]
    depth: int
    value: float | None = None  # the number a free-constant rule derived


def derive(grammar: Grammar, text: str) -> Derivation:
    """Parse ``text`` back into a derivation of ``grammar``, ignoring all whitespace.

    Why: evolution works on genotypes, so a hand-written program (a seed such as Adam written
    with the grammar's constants) must first be turned into the choices that produce it.
    Whitespace is not significant in either of our phenotype languages, and ignoring it lets a
    seed be formatted freely. The parser is a memoised backtracking descent that keeps, for each
    (non-terminal, start, end), the shallowest tree: ambiguity (duplicated alternatives, a
    constant reachable two ways) then costs nothing, and the tree most likely to fit a depth limit
    wins. Left-recursive grammars are not supported (none of ours is). Over 60 lines because
    `expand` is a closure over the memo and the furthest failure, which a module-level function
    would have to take and hand back at every one of its recursive calls.
    """
    kept = [i for i, ch in enumerate(text) if not ch.isspace()]
    flat = "".join(text[i] for i in kept)
    rules = tuple(
        tuple(tuple(s if isinstance(s, int) else "".join(s.split()) for s in p.symbols
                    if not (isinstance(s, str) and not s.strip()))
              for p in rule)
        for rule in grammar.rules)
    memo: dict[tuple[int, int], dict[int, Derivation]] = {}
    free = grammar.free
    furthest = [0, set()]  # position of the furthest failed terminal, and what was expected

    def expand(nt: int, pos: int) -> dict[int, Derivation]:
        key = (nt, pos)
        if key in memo:
            return memo[key]
        memo[key] = {}  # an in-progress entry stops left recursion from looping
        results: dict[int, Derivation] = {}
        if free[nt]:
            number = _FREE_NUMBER.match(flat, pos)
            value = _float32(number.group()) if number else None
            if value is not None:
                results[number.end()] = Derivation(nt, 0, (), 1, value)
            elif pos > furthest[0]:
                furthest[0], furthest[1] = pos, {"a number"}
            elif pos == furthest[0]:
                furthest[1].add("a number")
            memo[key] = results
            return results
        for k, symbols in enumerate(rules[nt]):
            partial: dict[int, tuple[Derivation, ...]] = {pos: ()}
            for sym in symbols:
                following: dict[int, tuple[Derivation, ...]] = {}
                for at, kids in partial.items():
                    if isinstance(sym, str):
                        if flat.startswith(sym, at):
                            following.setdefault(at + len(sym), kids)
                        elif at > furthest[0]:
                            furthest[0], furthest[1] = at, {sym}
                        elif at == furthest[0]:
                            furthest[1].add(sym)
                        continue
                    for end, tree in expand(sym, at).items():
                        grown = kids + (tree,)
                        old = following.get(end)
                        if old is None or _deepest(grown) < _deepest(old):
                            following[end] = grown
                partial = following
                if not partial:
                    break
            for end, kids in partial.items():
                tree = Derivation(nt, k, kids, 1 + _deepest(kids))
                if end not in results or tree.depth < results[end].depth:
                    results[end] = tree
        memo[key] = results
        return results

    try:
        found = expand(grammar.start, 0).get(len(flat))
    except RecursionError:
        raise DerivationError(f"not derivable in {grammar.source}: the text nests too deeply "
                              "to parse") from None
    if found is not None:
        return found
    raise _not_derivable(grammar, text, kept, furthest[0], furthest[1])


def _not_derivable(grammar: Grammar, text: str, kept: list[int], at: int,
                   wanted: set[str]) -> DerivationError:
    """The error for text that `derive` could not parse: where the furthest attempt failed (at
    `at` in the whitespace-free text whose characters lie at `kept` in `text`) and what it
    expected there."""
    # Stuck at the end: point just after the last character rather than at trailing whitespace.
    where = kept[at] if at < len(kept) else (kept[-1] + 1 if kept else 0)
    line = text.count("\n", 0, where) + 1
    column = where - (text.rfind("\n", 0, where) + 1) + 1
    expected = sorted(wanted, key=lambda s: (len(s), s))
    shown = ", ".join(repr(s) for s in expected[:8]) + (", ..." if len(expected) > 8 else "")
    rest = text[where:where + 20].split("\n")[0]
    found_text = repr(rest) if at < len(kept) else "the end of the text"
    return DerivationError(f"not derivable in {grammar.source}: at line {line}, column {column} "
                           f"expected one of {shown}; found {found_text}")


def _float32(text: str) -> float | None:
    """``text`` as the float32 the IR would store, None when it is not a finite one."""
    with np.errstate(over="ignore"):
        value = float(np.float32(float(text)))
    return value if math.isfinite(value) else None


def _deepest(trees: tuple[Derivation, ...]) -> int:
    return max((t.depth for t in trees), default=0)
